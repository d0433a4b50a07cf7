"""Trainer checkpoints: resume at start-up (checkpoint.resume) and save every checkpoint.save_every steps.

A checkpoint holds the model and optimizer (sharded, any layout), the trainer state (next step, data-loader
position, policy version, RNG) and is written atomically; the newest checkpoint.keep_last are kept.
`checkpoint.load_optimizer: false` resumes the weights (and the step, data position and RNG) with fresh optimizer
state.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def checkpoint_root(cfg) -> Path:
    return Path(cfg.trainer.output_dir) / "checkpoints"


@dataclass
class Restored:
    """What a resume restored beyond the actor's own state (which it loads in place)."""

    path: Path
    step: int
    """The next step to run."""
    version: int
    """The policy version the checkpoint's weights were served as."""
    loader: dict | None
    """The prompt loader's position (for trainer rank 0)."""
    optimizer: bool
    """Whether the optimizer state was restored (checkpoint.load_optimizer)."""


def resume(cfg, actor) -> Restored | None:
    """checkpoint.resume: auto (the newest complete checkpoint whose files check out, if any), none, or a
    directory (collective). A damaged checkpoint is never loaded: named directory, DamagedCheckpoint; auto, it is
    moved aside (kept, renamed `damaged-step_N`) with a warning naming the file, and the previous one loads."""
    from vppo_megatron.actor import checkpoint, integrity

    target = cfg.checkpoint.resume
    if target == "none":
        return None
    if target != "auto":
        integrity.verify(target)
        return _load(cfg, actor, Path(target))
    for path in checkpoint.complete(checkpoint_root(cfg)):
        try:
            integrity.verify(path)
        except integrity.DamagedCheckpoint as exc:
            _set_aside(path, str(exc))
            continue
        return _load(cfg, actor, path)
    return None


def _load(cfg, actor, path: Path) -> Restored:
    from vppo_megatron.actor import checkpoint

    state = checkpoint.load_training(actor, path, optimizer=cfg.checkpoint.load_optimizer)
    return Restored(path, state["step"], state["version"], state["loader"], cfg.checkpoint.load_optimizer)


def _set_aside(path: Path, problem: str) -> None:
    """Rank 0 renames a damaged checkpoint out of the resume and prune order (every rank checked it first)."""
    import torch.distributed as dist

    dist.barrier()
    if dist.get_rank() == 0:
        aside = path.with_name(f"damaged-{path.name}")
        if aside.exists():
            aside = path.with_name(f"damaged-{path.name}-{int(time.time())}")
        path.rename(aside)
        print(
            f"warning: checkpoint {path} is damaged ({problem}); moved to {aside.name}, resuming from the previous "
            "complete checkpoint",
            file=sys.stderr,
            flush=True,
        )
    dist.barrier()


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, quota, permissions); the previous ones are intact."""


def save(cfg, actor, step: int, version: int, loader_state: dict | None) -> Path:
    """After `step`: a resumable checkpoint (collective; `loader_state` from trainer rank 0, None elsewhere),
    the newest checkpoint.keep_last kept. A write that fails (a full disk) leaves no partial directory and raises
    CheckpointWriteError naming the checkpoint still there to resume from."""
    import torch.distributed as dist

    from vppo_megatron.actor import checkpoint

    box = [loader_state]
    dist.broadcast_object_list(box, src=0)
    state = {"step": step + 1, "loader": box[0], "version": version}
    root = checkpoint_root(cfg)
    path = root / f"{checkpoint.STEP_PREFIX}{step + 1}"
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _logged_errors("megatron.core.dist_checkpointing") as logged:
            checkpoint.save_training(actor, path, cfg.model.path, state)
    except (OSError, CheckpointException) as exc:  # a write that failed; the shard writers log its OSError
        if dist.get_rank() == 0:
            from vppo_megatron.actor import integrity

            integrity.remove_stale_temporaries(path, any_name=True)  # a dead writer's: gone; ours follows
            for tmp in root.glob(f".{path.name}.tmp-p{os.getpid()}-*"):
                shutil.rmtree(tmp, ignore_errors=True)
        previous = checkpoint.latest(root)
        cause = " ".join((logged[0] if logged else f"{type(exc).__name__}: {exc}").split())[:300]
        raise CheckpointWriteError(
            f"checkpoint {path} could not be written ({cause}); the disk may be full. "
            f"The partial write was removed; {f'{previous} is intact' if previous else 'no earlier checkpoint exists'}"
            ": free space, then run again (checkpoint.resume=auto continues from it)"
        ) from exc
    if dist.get_rank() == 0:
        checkpoint.prune(root, cfg.checkpoint.keep_last)
    return path


@contextmanager
def _logged_errors(name: str):
    """The ERROR records logger `name` (and its children) emits inside the block, as text."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler, log = Keep(logging.ERROR), logging.getLogger(name)
    log.addHandler(handler)
    try:
        yield records
    finally:
        log.removeHandler(handler)
