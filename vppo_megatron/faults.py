"""Fault injection at named points of a run, for the reliability tests and `tools/fault_table.py`.

    VPPO_FAULT="kill@update:2"                       SIGKILL trainer rank 0 as step 2's update stage starts
    VPPO_FAULT="kill@checkpoint_write:1:1"           rank 1, after step 1's checkpoint shards, before its metadata
    VPPO_FAULT="disk_full@checkpoint:3:all"          every rank's files capped at 64 KiB while step 3's checkpoint
                                                     is written (RLIMIT_FSIZE: writes fail with EFBIG)
    VPPO_FAULT="kill_engine@sync_load"               SIGKILL engine 0 once the first bucket of a sync is handed out
    VPPO_FAULT="stop_engine@sync_load"               SIGSTOP engine 0 there (alive and silent: a hang)
    VPPO_FAULT="hang@checkpoint_write:*:all"         every rank sleeps there (a save caught mid-write)

Form: action@point[:step[:rank]], several separated by commas; step `*` (or left out) is any step; rank is a
trainer rank or `all` (default 0). Each fault fires once per process. Points: the trainer's stages (`rollout`,
`experience`, `update`, `sync`, `checkpoint`, `validation`), `checkpoint_write` (inside a save, a training
checkpoint's or a conversion's, between the tensor shards and the metadata that makes a checkpoint complete) and
`sync_load` (trainer rank 0, the first bucket of a weight sync submitted to the engines). Unset, every call here is
a dictionary lookup and nothing else.
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass

ENV = "VPPO_FAULT"
ACTIONS = ("kill", "disk_full", "kill_engine", "stop_engine", "hang")
HANG_S = 3600.0  # a hang: far longer than any test waits for the process it then kills
POINTS = ("validation", "rollout", "experience", "update", "sync", "checkpoint", "checkpoint_write", "sync_load")
DISK_FULL_BYTES = 64 * 2**10  # larger than the logs a step appends, smaller than any checkpoint shard

_step: list[int | None] = [None]
_fired: set[str] = set()


@dataclass(frozen=True)
class Fault:
    action: str
    point: str
    step: int | None  # None: any step
    rank: int | None  # None: every rank

    @classmethod
    def parse(cls, text: str) -> Fault:
        action, _, where = text.strip().partition("@")
        parts = where.split(":")
        point, step, rank = parts[0], parts[1] if len(parts) > 1 else "*", parts[2] if len(parts) > 2 else "0"
        numbers = all(v.isdigit() for v in (step.replace("*", "0"), rank.replace("all", "0")))
        if action not in ACTIONS or point not in POINTS or len(parts) > 3 or not numbers:
            raise ValueError(
                f"{ENV}={text!r}: expected action@point[:step[:rank]] with action in {ACTIONS} and point in {POINTS}"
            )
        return cls(action, point, None if step == "*" else int(step), None if rank == "all" else int(rank))


def planned() -> list[Fault]:
    text = os.environ.get(ENV, "")
    return [Fault.parse(part) for part in text.split(",") if part.strip()]


def set_step(step: int) -> None:
    """The step the trainer is in (a fault's `step` is matched against it)."""
    _step[0] = step


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _due(point: str) -> list[Fault]:
    if ENV not in os.environ:
        return []
    due = []
    for fault in planned():
        key = f"{fault}"
        if fault.point != point or key in _fired:
            continue
        if fault.step is not None and fault.step != _step[0]:
            continue
        if fault.rank is not None and fault.rank != _rank():
            continue
        _fired.add(key)
        due.append(fault)
    return due


@contextmanager
def injected(point: str, fleet=None):
    """Fires the faults planned at `point` as it starts; a disk_full lasts until it ends."""
    import resource

    limits = None
    for fault in _due(point):
        print(f"fault injection: {fault.action} at {point} (step {_step[0]}, rank {_rank()})", flush=True)
        if fault.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault.action == "hang":
            time.sleep(HANG_S)
        elif fault.action == "disk_full":
            limits = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (DISK_FULL_BYTES, limits[1]))
        else:
            pid = fleet.info[0]["pid"]
            os.kill(pid, signal.SIGKILL if fault.action == "kill_engine" else signal.SIGSTOP)
    try:
        yield
    finally:
        if limits is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)


def at(point: str, fleet=None) -> None:
    """Fires the faults planned at `point` (a point with no extent: a kill or an engine fault)."""
    with injected(point, fleet):
        pass


TABLE_ENV = "VPPO_FAULT_TABLE"  # tools/fault_table.py: the file the fault tests append their rows to


def record(fault: str, where: str, lost: str, recover: float | str, survived: bool = True) -> None:
    """A fault test's row of the fault table (after its assertions held), appended to $VPPO_FAULT_TABLE as one
    JSON line; nothing when unset (a plain test run). `recover`: seconds measured, or what recovery is."""
    import json

    path = os.environ.get(TABLE_ENV)
    if not path:
        return
    row = {"fault": fault, "where": where, "survived": survived, "lost": lost, "recover": recover}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
