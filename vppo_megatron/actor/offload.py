"""Moving the actor's model state off the device while colocated rollout engines use it, and back.

Three kinds, each a set of tensor storages (megatron-core keeps parameters and `main_grad`s as views of flat
buffers, so releasing a storage with `resize_(0)` frees the memory while every view stays a valid tensor object
that sees the data again once the storage is re-grown; megatron-core's own `offload_grad_buffers` works this
way, and so do verl's and slime's offload helpers):

- `optimizer`: the Adam moments (and the fp32 master copies of bf16 weights) of the (distributed) optimizer;
  copied to host memory (pinned on CUDA hosts) and back, so the next optimizer step sees the same values.
- `grads`: the DDP gradient buffers. Freed without a copy: every update zeroes them before its backward
  (`zero_grad_buffer`), so their values are dead between steps; re-grown zeroed.
- `weights`: the parameters (DDP's param buffers or the parameters themselves); copied to host and back.

The same code runs on CPU hosts, where "device" and "host" are both host memory: the storages really are
released (tests check `nbytes() == 0`) and the values come back bit-identical, so the lifecycle is exercised and
proven there; only the memory it frees is then not a GPU's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("optimizer", "grads", "weights")


@dataclass
class _Parked:
    storage: torch.UntypedStorage
    nbytes: int
    host: torch.Tensor | None
    """uint8 copy of the storage's bytes; None when the values need not survive (gradient buffers)."""


def drop_fp8_weight_caches(model_chunks: list[torch.nn.Module]) -> int:
    """Transformer Engine keeps each FP8 linear layer's weight cast to FP8 (and its transpose) between
    micro-batches (`_fp8_workspaces`, 2 bytes per weight): device memory the rollout's engines need, and stale once
    the optimizer steps. Dropped after every pass and whenever the actor leaves the device; the next FP8 forward
    casts the weights again. Returns the modules cleared (0 without FP8)."""
    cleared = 0
    for chunk in model_chunks:
        for module in chunk.modules():
            workspaces = getattr(module, "_fp8_workspaces", None)
            if workspaces:
                workspaces.clear()
                cleared += 1
    return cleared


def _unique_storages(tensors, exclude: set[int] = frozenset()) -> list[torch.UntypedStorage]:
    seen, out = set(exclude), []
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        out.append(storage)
    return out


def _bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor over the whole storage (so views of any dtype or offset move together)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _host_buffer(nbytes: int, pinned: bool) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)


def _release_cached_pinned_memory() -> None:
    """Frees the pinned blocks torch's caching host allocator keeps after their tensors died: a kind's buffer that
    was replaced by a larger one would otherwise stay cached for the life of the run, since the allocator reuses a
    block only for a request of the same power-of-two size (torch.cuda.empty_cache frees device memory only)."""
    empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
    empty() if empty is not None else torch._C._host_emptyCache()


def _optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer])) if optimizer is not None else []


class ActorOffload:
    """Releases and restores the storages of `KINDS` for one actor (its DDP chunks and its optimizer)."""

    def __init__(self, model_chunks: list[torch.nn.Module], optimizer):
        self.chunks, self.optimizer = model_chunks, optimizer
        self.parked: dict[str, list[_Parked]] = {}
        self._host: dict[str, torch.Tensor] = {}
        """One host buffer per kind (uint8), each storage of the kind a slice of it."""

    # -------------------------------------------------------------------------------- what each kind is

    def _weights(self) -> list[torch.Tensor]:
        return [p for chunk in self.chunks for p in chunk.parameters()]

    def _grads(self) -> list[torch.Tensor]:
        buffers = [b for chunk in self.chunks for b in getattr(chunk, "buffers", [])]
        buffers += [b for chunk in self.chunks for b in getattr(chunk, "expert_parallel_buffers", [])]
        return [b.grad_data for b in buffers if b.grad_data is not None]

    def _optimizer_state(self) -> list[torch.Tensor]:
        tensors = []
        for opt in _optimizers(self.optimizer):
            inner = getattr(opt, "optimizer", None)
            if inner is None:
                continue
            for state in inner.state.values():
                # the moments; torch Adam's per-parameter `step` counters (0-dim, host tensors unless capturable)
                # stay where they are: 4 bytes each, nothing to free
                tensors += [v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
            # fp32 master copies of bf16 weights: their own storages (fp32 weights' "masters" are views of the
            # weights themselves and are excluded below)
            for name in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups"):
                tensors += [t for group in getattr(opt, name, []) for t in group if t is not None]
        return tensors

    def storages(self, kind: str) -> list[torch.UntypedStorage]:
        """The live storages of `kind` (optimizer storages never include a weight's storage)."""
        if kind == "weights":
            return _unique_storages(self._weights())
        if kind == "grads":
            return _unique_storages(self._grads())
        assert kind == "optimizer", kind
        weight_ptrs = {s.data_ptr() for s in _unique_storages(self._weights())}
        return _unique_storages(self._optimizer_state(), exclude=weight_ptrs)

    # --------------------------------------------------------------------------------------- moving

    def offload(self, kinds: tuple[str, ...]) -> dict[str, int]:
        """Releases the storages of each kind not already offloaded; returns the bytes released per kind.

        Each kind copies into ONE host buffer (pinned on CUDA hosts), allocated once and reused every step: pinned
        allocation is slow, and the caching host allocator rounds every allocation up to a power of two, so one
        buffer per kind is what the memory plan counts (memory.host_per_node), not one per tensor. All
        device-to-host copies are issued first and waited for once, before any storage is released."""
        cuda = torch.cuda.is_available()
        self.drop_fp8_weight_caches()
        todo = {kind: self.storages(kind) for kind in kinds if kind not in self.parked}
        for kind, storages in todo.items():
            buffer = None
            if kind != "grads":
                total = sum(storage.nbytes() for storage in storages)
                buffer = self._host.get(kind)
                if buffer is not None and buffer.numel() != total:
                    # the kind grew: the optimizer's moments appear at its first step, after start-up's offload
                    buffer = self._host[kind] = None
                    if cuda:
                        _release_cached_pinned_memory()
                if buffer is None:
                    buffer = self._host[kind] = _host_buffer(total, cuda)
            parked, offset = [], 0
            for storage in storages:
                host = None
                if buffer is not None:
                    host = buffer[offset : offset + storage.nbytes()]
                    host.copy_(_bytes(storage), non_blocking=cuda)
                parked.append(_Parked(storage, storage.nbytes(), host))
                offset += storage.nbytes()
            self.parked[kind] = parked
        if cuda:
            torch.cuda.synchronize()  # the copies landed, and no kernel still reads a storage about to go
        for kind in todo:
            for p in self.parked[kind]:
                # an internal invariant: a storage ever exported to numpy (tensor.numpy()) is fixed for good
                assert p.storage.resizable(), f"a {kind} storage of {p.nbytes} bytes was exported and cannot move"
                p.storage.resize_(0)
        if cuda:
            torch.cuda.empty_cache()  # give the freed blocks back so vLLM's allocator can take them
        return {kind: sum(p.nbytes for p in self.parked[kind]) for kind in todo}

    def drop_fp8_weight_caches(self) -> int:
        return drop_fp8_weight_caches(self.chunks)

    def onload(self) -> dict[str, int]:
        """Re-grows every released storage (values copied back; gradient buffers zeroed); bytes per kind."""
        cuda = torch.cuda.is_available()
        restored = {}
        for kind, parked in self.parked.items():
            for p in parked:
                p.storage.resize_(p.nbytes)
                if p.host is None:
                    _bytes(p.storage).zero_()
                else:
                    _bytes(p.storage).copy_(p.host, non_blocking=cuda)
            restored[kind] = sum(p.nbytes for p in parked)
        if cuda:
            torch.cuda.synchronize()
        self.parked = {}
        return restored

    def resident_bytes(self) -> dict[str, int]:
        """Bytes this actor holds now: each kind's live storages on its device (0 once offloaded), and `host`, its
        offload buffers (kept for reuse once allocated)."""
        held = {kind: sum(s.nbytes() for s in self.storages(kind)) for kind in KINDS}
        held["host"] = sum(buffer.nbytes for buffer in self._host.values())
        return held

    def offloaded(self) -> tuple[str, ...]:
        return tuple(self.parked)
