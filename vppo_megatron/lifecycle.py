"""The device-memory lifecycle of a training step: the one owner of the order in which the Megatron actor and the
colocated vLLM engines give up and take back accelerator memory. The trainer calls `enter(phase)` once per phase.

Colocated placement (engines share the trainer's GPUs), one step:

    rollout     engines awake (weights + KV cache); the actor keeps only what `actor.offload` leaves resident
    experience  engines sleep (level 1: weights to host, KV cache dropped) -> barrier -> actor onload
    update      actor fully resident (weights, gradient buffers, optimizer state, activations)
    sync        actor offloads optimizer state [+ gradient buffers] -> barrier -> engines wake their weights
                -> the weight sync writes into them (CUDA IPC on GPU, shared memory on CPU)
    rollout     actor offloads its weights (offload=all) -> barrier -> engines wake the KV cache (fully awake:
                their schedulers resume)

Disaggregated placement: the engines own their GPUs; nothing sleeps and nothing offloads (NCCL sync).

Start-up (`start_up`, then `first_sync`), so that the awake engines and the whole actor never share a device:

    engines.start   trainer rank 0 starts the engines (vLLM profiles a device the actor has not touched yet)
    engines.sleep   level 1 -> barrier: no rank allocates before every engine has let go of its device memory
    actor.build     weights, gradient buffers, optimizer (the update phase's state, without activations)
    actor.load      on resume: the checkpoint's weights and optimizer state, into the resident actor
    sync            as every step ends: optimizer [+ grads] offloaded -> engines wake their weights -> the sync
                    -> weights offloaded (offload=all) -> engines wake the KV cache: the rollout state

Level 1 sleep keeps the engine's weights in host memory, so a failed sync can still roll the engines back. The
barriers matter on GPU: memory must be released on every rank of a node before anything on it grows again.
`resident()` is the same table as data, so the memory estimate (memory.py) and the code that runs agree.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

OFFLOAD_KINDS = {
    "none": (),
    "optimizer": ("optimizer",),
    "optimizer+grads": ("optimizer", "grads"),
    "all": ("optimizer", "grads", "weights"),
}
PHASES = ("rollout", "experience", "update", "sync")


def resolve_offload(offload: str, placement: str, cuda: bool) -> str:
    """actor.offload with `auto` resolved: everything when colocated on a CUDA host, nothing otherwise."""
    if offload == "auto":
        return "all" if placement == "colocated" and cuda else "none"
    return offload


def resident(phase: str, offload: str, placement: str) -> dict[str, bool]:
    """Which parts hold device memory on a trainer GPU during `phase` (offload already resolved)."""
    assert phase in PHASES, phase
    colocated = placement == "colocated"
    gone = set(OFFLOAD_KINDS[offload]) if colocated else set()
    if phase == "sync":
        gone.discard("weights")  # the sync reads them
    training = phase in ("experience", "update")
    return {
        "actor_weights": training or "weights" not in gone,
        "actor_grads": training or "grads" not in gone,
        "actor_optimizer": training or "optimizer" not in gone,
        "actor_activations": phase == "update",
        "engine_weights": colocated and phase in ("rollout", "sync"),
        "engine_kv_cache": colocated and phase == "rollout",
    }


def _sync_calls(kinds: tuple[str, ...], push: bool) -> list[str]:
    """The colocated sync's calls: optimizer [+ grads] leave, engines wake their weights, [the sync,] the weights
    leave (offload=all), the engines wake their KV cache."""
    first = "+".join(k for k in kinds if k != "weights")
    calls = ([f"actor.offload({first})"] if first else []) + ["engines.wake_up(weights)"]
    calls += (["sync.push"] if push else []) + (["actor.offload(weights)"] if "weights" in kinds else [])
    return calls + ["engines.wake_up(kv_cache)"]


def step_order(offload: str, placement: str) -> list[str]:
    """The documented sequence of residency calls of one step (what `Lifecycle.calls` records)."""
    if placement != "colocated":
        return []
    kinds = OFFLOAD_KINDS[offload]
    return ["engines.sleep(level=1)"] + (["actor.onload"] if kinds else []) + _sync_calls(kinds, push=False)


def startup_order(offload: str, placement: str, resumed: bool) -> list[str]:
    """The documented sequence of calls of a start-up (what `Lifecycle.calls` records, rank 0's log): the engines
    asleep while the actor builds (and loads a checkpoint), then the step's sync transitions around the push."""
    colocated = placement == "colocated"
    calls = (["engines.sleep(level=1)"] if colocated else []) + ["actor.build"]
    calls += ["actor.load(checkpoint)"] if resumed else []
    return calls + (_sync_calls(OFFLOAD_KINDS[offload], push=True) if colocated else ["sync.push"])


class Lifecycle:
    """Runs the transitions above on the real actor (every rank) and fleet (trainer rank 0; None elsewhere)."""

    def __init__(self, cfg, actor, fleet, barrier, cuda: bool | None = None):
        """`barrier` synchronises every trainer rank; rank 0 (the one with the fleet) logs each call to
        `trainer.output_dir/lifecycle.log` with the bytes it moved."""
        if cuda is None:
            import torch

            cuda = torch.cuda.is_available()
        self.placement = cfg.rollout.placement
        self.offload_mode = resolve_offload(cfg.actor.offload, self.placement, cuda)
        self.kinds = OFFLOAD_KINDS[self.offload_mode] if self.placement == "colocated" else ()
        self.actor, self.fleet, self.barrier = actor, fleet, barrier
        self.log_path = Path(cfg.trainer.output_dir) / "lifecycle.log" if fleet is not None else None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.calls: list[str] = []
        self.phase = "start"  # engines awake (born so), no actor yet
        self.cuda = cuda
        self.closing: str | None = None
        self.closed: list[str] = []  # the phases ended so far, in order (each one's peak is measured on CUDA)
        self.peaks_dir = Path(cfg.trainer.output_dir) / "memory_peaks"

    def start_up(self, build: Callable[[], object], load: Callable[[object], object]) -> tuple[object, object]:
        """The engines (started and loaded by trainer rank 0 before this call) go to sleep; only then does every
        rank build the actor (`build()`) and, on resume, load its checkpoint (`load(actor)`, None when there is
        nothing to resume): the whole actor is resident, the engines hold no device memory (the update phase's
        state without its activations). Returns (actor, what `load` returned); `first_sync` follows."""
        assert self.phase == "start", self.phase
        if self.placement == "colocated":
            self._engines("sleep", 1)
        else:
            self.barrier()  # the engines have their own GPUs; the ranks still start together
        self.actor = build()
        self._record("actor.build")
        restored = load(self.actor)
        if restored is not None:
            self._record("actor.load(checkpoint)")
        self.phase, self.closing = "update", "resume" if restored is not None else "startup"  # first_sync closes
        return self.actor, restored

    def first_sync(self, push: Callable[[], dict]) -> dict[str, float]:
        """The start-up sync, under the same transitions as every step's: the actor's optimizer state [+ grads]
        leave, the engines' weights wake, `push()` serves the actor's weights, then the rollout state."""
        metrics = self.enter("sync")
        metrics.update(push())
        self._record("sync.push")
        metrics.update(self.enter("rollout"))
        return metrics

    def enter(self, phase: str) -> dict[str, float]:
        """Moves memory for `phase`; returns lifecycle metrics (bytes moved, seconds) for rank 0's log."""
        assert phase in PHASES, phase
        previous, self.phase = self.phase, phase
        self._close_phase(self.closing or previous)
        self.closing = None
        metrics = self._transition(phase, previous)
        self._reset_peak()  # the new phase's peak starts from what it holds, not the transition's
        return metrics

    def _transition(self, phase: str, previous: str) -> dict[str, float]:
        if self.placement != "colocated" or phase == "update":
            return {}
        if phase == "experience":
            assert previous == "rollout", previous
            self._engines("sleep", 1)
            return self._onload(phase)
        if phase == "sync":
            assert previous == "update", previous
            metrics = self._offload(tuple(k for k in self.kinds if k != "weights"), phase)
            self._engines("wake_up", ["weights"])
            return metrics
        assert previous == "sync", previous
        metrics = self._offload(tuple(k for k in self.kinds if k == "weights"), phase)
        self._engines("wake_up", ["kv_cache"])
        return metrics

    @contextmanager
    def everything_resident(self):
        """A checkpoint between steps: the whole actor back on its device (engines asleep), then as before."""
        if self.placement != "colocated" or self.phase != "rollout":
            yield
            return
        self.enter("experience")
        self.phase, self.closing = "update", "checkpoint"  # the peak the next transition closes: the save's
        try:
            yield
        finally:
            self.enter("sync")
            self.enter("rollout")

    # ----------------------------------------------------------------------------------------- moves

    def _engines(self, method: str, arg) -> None:
        self.barrier()  # every rank released its memory before an engine grows (or: before ranks grow)
        label = f"level={arg}" if method == "sleep" else ",".join(arg)
        if self.fleet is not None:
            self.fleet.call_all(method, arg)
        self.barrier()
        self._record(f"engines.{method}({label})")

    def _offload(self, kinds: tuple[str, ...], phase: str) -> dict[str, float]:
        if not kinds:
            return {}
        start = time.perf_counter()
        released = self.actor.offload(kinds)
        self._record(f"actor.offload({'+'.join(kinds)})", released)
        return {
            f"lifecycle/offloaded_mib_{phase}": sum(released.values()) / 2**20,
            f"time/offload_{phase}_s": time.perf_counter() - start,
        }

    def _onload(self, phase: str) -> dict[str, float]:
        if not self.kinds:
            return {}
        start = time.perf_counter()
        restored = self.actor.onload()
        self._record("actor.onload", restored)
        return {"lifecycle/onloaded_mib": sum(restored.values()) / 2**20, "time/onload_s": time.perf_counter() - start}

    def _close_phase(self, name: str) -> None:
        """Ends phase `name`. On CUDA hosts every rank appends to `output_dir/memory_peaks/rank<N>.jsonl` the
        phase's peak allocated and reserved memory of its own allocator (since the last transition) and the
        device's used memory at its end (every process, the engines too; a snapshot, not a peak);
        tools/gpu_acceptance.sh compares the heaviest rank's peaks with the plan."""
        if name == "start":
            return
        self.closed.append(name)
        if not self.cuda:
            return
        import json

        import torch
        import torch.distributed as dist

        free, total = torch.cuda.mem_get_info()
        row = {
            "phase": name,
            "allocated": torch.cuda.max_memory_allocated(),
            "reserved": torch.cuda.max_memory_reserved(),
            "device_used_at_end": total - free,
        }
        self.peaks_dir.mkdir(parents=True, exist_ok=True)
        rank = dist.get_rank() if dist.is_initialized() else 0
        with open(self.peaks_dir / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def _reset_peak(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()

    def _record(self, call: str, sizes: dict[str, int] | None = None) -> None:
        """Rank 0's log line: the call, the bytes it moved, then what the actor holds after it (bytes per kind and
        of host buffers: what the memory plan's state parts predict, `resident=weights:N,grads:N,...`)."""
        self.calls.append(call)
        if self.log_path is not None:
            detail = " ".join(f"{k}={v / 2**20:.2f}MiB" for k, v in (sizes or {}).items())
            residency = getattr(self.actor, "residency", None)
            if residency is not None:
                held = residency.resident_bytes()
                detail += " resident=" + ",".join(f"{k}:{v}" for k, v in held.items())
            with open(self.log_path, "a") as f:
                f.write(f"{time.time():.3f} phase={self.phase} {call} {detail.strip()}".rstrip() + "\n")
