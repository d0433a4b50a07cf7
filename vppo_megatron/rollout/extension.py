"""vLLM worker extension: runs inside every vLLM worker process (`worker_extension_cls`), `self` is the worker.

Weights arrive as checkpoint-format (HF) tensors and go through the worker's `reload_weights`, which re-runs
vLLM's weight processing (CPU GEMM repacking, fusions). Calling `model.load_weights` after start-up instead
corrupts CPU engines (their weights were repacked and emptied). Each call must carry whole vLLM layers: a layer
that receives only some of its tensors (q without k and v) would be processed half-loaded; the sender groups
tensors by layer (sync/buckets.py).

Transports:
- shared memory (CPU, and any single host): one file under /dev/shm per bucket + a manifest of
  (name, dtype, shape, offset); tensors cannot travel as RPC arguments on CPU (memoryview pickling).
- CUDA IPC (colocated GPU): per-tensor CUDA IPC handles rebuilt on this worker's device.
- NCCL broadcast (disaggregated GPU): tensors received from trainer rank 0 over a communicator this worker
  joined at `vppo_init_nccl`.
"""

from __future__ import annotations

import torch


def tensors_from_shared_file(path: str, manifest: list) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for every manifest entry (name, dtype, shape, offset, nbytes) of a shared-memory file."""
    total = max((offset + nbytes for _, _, _, offset, nbytes in manifest), default=0)
    raw = torch.from_file(path, shared=False, size=total, dtype=torch.uint8)
    out = []
    for name, dtype, shape, offset, nbytes in manifest:
        out.append((name, raw[offset : offset + nbytes].view(getattr(torch, dtype)).reshape(shape)))
    return out


class WeightSyncExtension:
    def vppo_load_shared(self, path: str, manifest: list) -> int:
        tensors = tensors_from_shared_file(path, manifest)
        self.reload_weights(weights_iterator=iter(tensors), is_checkpoint_format=True)
        return len(tensors)

    def vppo_load_ipc(self, handles: list) -> int:
        """handles: (name, rebuild function, rebuild args) from torch.multiprocessing.reductions.reduce_tensor."""
        device = torch.cuda.current_device()
        tensors = []
        for name, rebuild, args in handles:
            args = list(args)
            args[6] = device  # the sender's device index is meaningless in this process
            tensors.append((name, rebuild(*args)))
        self.reload_weights(weights_iterator=iter(tensors), is_checkpoint_format=True)
        torch.cuda.synchronize()
        return len(tensors)

    def vppo_init_nccl(self, master_address: str, master_port: int, rank_offset: int, world_size: int) -> None:
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        rank = rank_offset + torch.distributed.get_rank() if torch.distributed.is_initialized() else rank_offset
        group = StatelessProcessGroup.create(host=master_address, port=master_port, rank=rank, world_size=world_size)
        self._vppo_nccl = PyNcclCommunicator(group, device=torch.cuda.current_device())

    def vppo_load_nccl(self, manifest: list) -> int:
        """Receives each manifest tensor (name, dtype, shape) by broadcast from trainer rank 0, then reloads."""
        tensors = []
        for name, dtype, shape in manifest:
            tensor = torch.empty(shape, dtype=getattr(torch, dtype), device="cuda")
            self._vppo_nccl.broadcast(tensor, src=0, stream=torch.cuda.current_stream())
            tensors.append((name, tensor))
        torch.cuda.synchronize()
        self.reload_weights(weights_iterator=iter(tensors), is_checkpoint_format=True)
        return len(tensors)
