"""vLLM worker extension: runs inside every vLLM worker process (`worker_extension_cls`), `self` is the worker.

Weights arrive as checkpoint-format (HF) tensors and go through vLLM's layerwise reload, which re-runs its
weight processing (CPU GEMM repacking, fusions) for each layer once all of its tensors arrived. Calling
`model.load_weights` after start-up without it corrupts CPU engines (their weights were repacked and emptied).

One sync is ONE reload session (`vppo_begin_sync` ... buckets ... `vppo_finish_sync`), as vLLM's own
`reload_weights` is one for a whole checkpoint: a layer not in the current bucket is simply not loaded yet, and
the session ends once, after the last bucket (no per-bucket "Failed to load weights" for the layers other
buckets carry, no walk over every module per bucket). Each bucket carries whole vLLM layers (sync/buckets.py).

Transports:
- shared memory (CPU, and every node's snapshot): one file per bucket in the node's staging directory + a
  manifest of (name, dtype, shape, offset, nbytes); the worker loads views of its mapping of the file.
- CUDA IPC (colocated GPU): one handle per bucket (a flat buffer) from the trainer rank on this worker's GPU.
- NCCL broadcast (disaggregated GPU): the flat bucket received from the engine's feeder rank over a
  communicator this worker joined at `vppo_init_nccl`.
With a snapshot path, the first worker also copies the bucket to its node's shared memory (rollback, restarts).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch


def tensors_from_shared_file(path: str, manifest: list, mapped: dict | None = None) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for every manifest entry (name, dtype, shape, offset, nbytes) of a shared-memory file: views of
    the mapped file (no copy; the load copies each into its parameter). `mapped` caches this process's mappings:
    the sync rewrites the same files in place every other version, so their pages are faulted in once."""
    total = max((offset + nbytes for _, _, _, offset, nbytes in manifest), default=0)
    if total == 0:
        return [(name, torch.empty(shape, dtype=getattr(torch, dtype))) for name, dtype, shape, _, _ in manifest]
    key = (path, total, os.stat(path).st_ino)
    raw = mapped.get(key) if mapped is not None else None
    if raw is None:
        raw = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
        if mapped is not None:
            mapped[key] = raw
    return views(raw, manifest)


def views(raw: torch.Tensor, manifest: list) -> list[tuple[str, torch.Tensor]]:
    """The manifest's tensors as views of the flat uint8 buffer `raw` (host or device)."""
    return [
        (name, raw[offset : offset + nbytes].view(getattr(torch, dtype)).reshape(shape))
        for name, dtype, shape, offset, nbytes in manifest
    ]


def device_uuid(device) -> str:
    """The physical GPU's UUID: the same in every process, whatever CUDA_VISIBLE_DEVICES numbers it."""
    return str(torch.cuda.get_device_properties(device).uuid)


def _write_snapshot(path: str | None, flat: torch.Tensor) -> None:
    """The node's snapshot copy of a bucket (one worker per engine: the first TP rank)."""
    if path is None or (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0):
        return
    from vppo_megatron.rollout.staging import map_file

    Path(path).parent.mkdir(exist_ok=True)
    map_file(Path(path), flat.numel(), _SNAPSHOT_MAPS).copy_(flat)


_SNAPSHOT_MAPS: dict = {}  # this worker's snapshot files, mapped once (rewritten in place every other sync)


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


def _own_pending_tensors(model: torch.nn.Module, flat: torch.Tensor) -> None:
    """vLLM's layerwise reload keeps the loader's arguments of a layer that is not complete yet (and of attention
    layers, processed only at finalize). Those still pointing into the sender's bucket buffer, which the trainer
    reuses two buckets later, are replaced by copies of their own."""
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

    storage = flat.untyped_storage().data_ptr()
    for layer in model.modules():
        for _, bound in getattr(get_layerwise_info(layer), "loaded_weights", ()):
            for key, value in bound.arguments.items():
                if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() == storage:
                    bound.arguments[key] = value.clone()


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

        start = time.perf_counter()
        self.vppo_begin_sync()
        with set_current_vllm_config(self.vllm_config):
            self._vppo_loaded |= set(self.model_runner.get_model().load_weights(iter(tensors)) or ())
        self._vppo_reload_s = getattr(self, "_vppo_reload_s", 0.0) + time.perf_counter() - start
        return len(tensors)

    def vppo_take_reload_seconds(self) -> float:
        """Seconds this worker spent in vLLM's reload (load_weights, weight processing, finalize) since the last
        call: the engine's own share of a sync, whatever the transport."""
        seconds, self._vppo_reload_s = getattr(self, "_vppo_reload_s", 0.0), 0.0
        return seconds

    def vppo_finish_sync(self) -> list[str]:
        """Closes the session: layers still waiting are processed (vLLM's finalize), the caches computed with the
        old weights dropped. Returns the model's parameters no bucket of this session loaded (none in a complete
        sync)."""
        if getattr(self, "_vppo_loaded", None) is None:
            return []
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        start = time.perf_counter()
        model = self.model_runner.get_model()
        _nothing_to_load_in_buffer_only_layers(model)
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(model, self.vllm_config.model_config)
        self._vppo_reload_s = getattr(self, "_vppo_reload_s", 0.0) + time.perf_counter() - start
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
        if not hasattr(self, "_vppo_mapped"):
            self._vppo_mapped: dict = {}
        return self._vppo_load(tensors_from_shared_file(path, manifest, self._vppo_mapped))

    def vppo_forget_mappings(self) -> None:
        """Unmaps the staging files of an earlier run (their shared memory is freed once nobody maps them)."""
        self._vppo_mapped = {}
        _SNAPSHOT_MAPS.clear()

    def vppo_load_ipc(self, handles: dict, manifest: list, snapshot: str | None) -> int:
        """handles: GPU UUID -> (rebuild function, rebuild args) from torch.multiprocessing.reductions.reduce_tensor
        of the flat bucket held by the trainer rank on that GPU; this worker opens its own GPU's."""
        device = torch.cuda.current_device()
        mine = device_uuid(device)
        if mine not in handles:
            raise RuntimeError(
                f"no trainer rank sent a bucket from this worker's GPU {mine}: colocated engines must sit on the "
                "trainer's GPUs (rollout.placement=colocated)"
            )
        rebuild, args = handles[mine]
        args = list(args)
        args[6] = device  # the sender's device index is meaningless in this process
        flat = rebuild(*args)
        _write_snapshot(snapshot, flat)
        count = self._vppo_load(views(flat, manifest))
        _own_pending_tensors(self.model_runner.get_model(), flat)
        torch.cuda.synchronize()  # every copy out of the sender's memory landed before it is reused
        return count

    def vppo_init_nccl(self, master_address: str, master_port: int, rank_offset: int, world_size: int) -> None:
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        if getattr(self, "_vppo_nccl", None) is not None:  # a new group for a restarted feeder's engine
            self._vppo_nccl.destroy()
        rank = rank_offset + torch.distributed.get_rank() if torch.distributed.is_initialized() else rank_offset
        group = StatelessProcessGroup.create(host=master_address, port=master_port, rank=rank, world_size=world_size)
        self._vppo_nccl = PyNcclCommunicator(group, device=torch.cuda.current_device())

    def vppo_load_nccl(self, manifest: list, nbytes: int, snapshot: str | None) -> int:
        """Receives the flat bucket by broadcast from the engine's feeder rank, then reloads views of it."""
        flat = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        self._vppo_nccl.broadcast(flat, src=0, stream=torch.cuda.current_stream())
        torch.cuda.synchronize()
        _write_snapshot(snapshot, flat)
        return self._vppo_load(views(flat, manifest))
