"""Trainer side of the NCCL weight broadcast (GPU, disaggregated engines): rank 0 of a group whose other ranks
are the engines' workers (vLLM's StatelessProcessGroup + PyNcclCommunicator, the API the workers use too)."""

from __future__ import annotations


def rendezvous_address() -> tuple[str, int]:
    from vllm.distributed.utils import get_ip, get_open_port

    return get_ip(), get_open_port()


def trainer_communicator(address: str, port: int, world_size: int):
    import torch
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    group = StatelessProcessGroup.create(host=address, port=port, rank=0, world_size=world_size)
    return PyNcclCommunicator(group, device=torch.cuda.current_device())
