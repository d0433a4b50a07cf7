"""vLLM worker extension: runs inside every vLLM worker process (`worker_extension_cls`), `self` is the worker.

Weights arrive as checkpoint-format (HF) tensors and go through vLLM's layerwise reload, which re-runs its
weight processing (CPU GEMM repacking, fusions) for each layer once all of its tensors arrived. Calling
`model.load_weights` after start-up without it corrupts CPU engines (their weights were repacked and emptied).

One sync is ONE reload session (`vppo_begin_sync` ... buckets ... `vppo_finish_sync`), as vLLM's own
`reload_weights` is one for a whole checkpoint: a layer not in the current bucket is simply not loaded yet, and
the session ends once, after the last bucket (no per-bucket "Failed to load weights" for the layers other
buckets carry, no walk over every module per bucket). Each bucket carries whole vLLM layers (sync/buckets.py).

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
    """(name, tensor) for every manifest entry (name, dtype, shape, offset, nbytes) of a shared-memory file: views of
    the mapped file (no copy; the load copies each into its parameter)."""
    total = max((offset + nbytes for _, _, _, offset, nbytes in manifest), default=0)
    if total == 0:
        return [(name, torch.empty(shape, dtype=getattr(torch, dtype))) for name, dtype, shape, _, _ in manifest]
    raw = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
    out = []
    for name, dtype, shape, offset, nbytes in manifest:
        out.append((name, raw[offset : offset + nbytes].view(getattr(torch, dtype)).reshape(shape)))
    return out


def _nothing_to_load_in_buffer_only_layers(model: torch.nn.Module) -> None:
    """Layers that own buffers but no parameters (rotary caches, image normalisation constants) take nothing from
    a checkpoint, yet vLLM's finalize counts their buffers as loadable and warns "Failed to load weights" for each
    on every reload. They are marked as having nothing to load, so finalize restores them silently, as it does
    layers without tensors. A layer with parameters that received nothing still warns (and finish_sync raises)."""
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

    for layer in model.modules():
        if any(param is not None for param in layer._parameters.values()):
            continue
        info = get_layerwise_info(layer)
        if info.can_load() and info.load_numel <= 0:
            info.load_numel_total = 0


class WeightSyncExtension:
    def vppo_begin_sync(self) -> None:
        """Opens the sync's reload session (idempotent: a rollback after a failed bucket continues the session)."""
        if getattr(self, "_vppo_loaded", None) is not None:
            return
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.get_model())
        self._vppo_loaded: set[str] | None = set()

    def _vppo_load(self, tensors: list[tuple[str, torch.Tensor]]) -> int:
        from vllm.config import set_current_vllm_config

        self.vppo_begin_sync()
        with set_current_vllm_config(self.vllm_config):
            self._vppo_loaded |= set(self.model_runner.get_model().load_weights(iter(tensors)) or ())
        return len(tensors)

    def vppo_finish_sync(self) -> list[str]:
        """Closes the session: layers still waiting are processed (vLLM's finalize), the caches computed with the
        old weights dropped. Returns the model's parameters no bucket of this session loaded (none in a complete
        sync)."""
        if getattr(self, "_vppo_loaded", None) is None:
            return []
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        model = self.model_runner.get_model()
        _nothing_to_load_in_buffer_only_layers(model)
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(model, self.vllm_config.model_config)
        missing = sorted({name for name, _ in model.named_parameters()} - self._vppo_loaded)
        self._vppo_loaded = None
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):  # as vLLM's reload_weights
            if hasattr(self.model_runner, reset):
                getattr(self.model_runner, reset)()
        return missing

    def vppo_reload_from_disk(self) -> None:
        """Back to the checkpoint the engine started from, closing any open session first."""
        self.vppo_finish_sync()
        self.reload_weights()

    def vppo_load_shared(self, path: str, manifest: list) -> int:
        return self._vppo_load(tensors_from_shared_file(path, manifest))

    def vppo_load_ipc(self, handles: list) -> int:
        """handles: (name, rebuild function, rebuild args) from torch.multiprocessing.reductions.reduce_tensor."""
        device = torch.cuda.current_device()
        tensors = []
        for name, rebuild, args in handles:
            args = list(args)
            args[6] = device  # the sender's device index is meaningless in this process
            tensors.append((name, rebuild(*args)))
        count = self._vppo_load(tensors)
        torch.cuda.synchronize()  # every copy out of the sender's memory landed before it is reused
        return count

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
        return self._vppo_load(tensors)
