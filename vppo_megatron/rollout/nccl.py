"""Trainer side of the NCCL weight broadcast (GPU, disaggregated engines): rank 0 of a group whose other ranks
are the engines' workers (vLLM's StatelessProcessGroup + PyNcclCommunicator, the API the workers use too)."""

from __future__ import annotations

import socket


def rendezvous_address() -> tuple[str, int, socket.socket]:
    """This host's address and a port held open for the group's store (a port probed and released could be
    taken by the next feeder on the node, or be the same one where VLLM_PORT is set)."""
    from vllm.utils.network_utils import get_ip

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("", 0))
    listener.listen()
    return get_ip(), listener.getsockname()[1], listener


def trainer_communicator(address: str, port: int, world_size: int, listener: socket.socket | None = None):
    import torch
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    group = StatelessProcessGroup.create(host=address, port=port, rank=0, world_size=world_size, listen_socket=listener)
    return PyNcclCommunicator(group, device=torch.cuda.current_device())
