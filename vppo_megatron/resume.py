"""Trainer checkpoints: resume at start-up (checkpoint.resume) and save every checkpoint.save_every steps.

A checkpoint holds the model and optimizer (sharded, any layout), the trainer state (next step, data-loader
position, policy version, RNG) and is written atomically; the newest checkpoint.keep_last are kept.
`checkpoint.load_optimizer: false` resumes the weights (and the step, data position and RNG) with fresh optimizer
state.
"""

from __future__ import annotations

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
    """checkpoint.resume: auto (latest complete checkpoint, if any), none, or a directory (collective)."""
    from vppo_megatron.actor import checkpoint

    target = cfg.checkpoint.resume
    path = checkpoint.latest(checkpoint_root(cfg)) if target == "auto" else None if target == "none" else target
    if path is None:
        return None
    state = checkpoint.load_training(actor, path, optimizer=cfg.checkpoint.load_optimizer)
    return Restored(Path(path), state["step"], state["version"], state["loader"], cfg.checkpoint.load_optimizer)


def save(cfg, actor, step: int, version: int, loader_state: dict | None) -> Path:
    """After `step`: a resumable checkpoint (collective; `loader_state` from trainer rank 0, None elsewhere),
    the newest checkpoint.keep_last kept."""
    import torch.distributed as dist

    from vppo_megatron.actor import checkpoint

    box = [loader_state]
    dist.broadcast_object_list(box, src=0)
    state = {"step": step + 1, "loader": box[0], "version": version}
    path = checkpoint_root(cfg) / f"{checkpoint.STEP_PREFIX}{step + 1}"
    checkpoint.save_training(actor, path, cfg.model.path, state)
    if dist.get_rank() == 0:
        checkpoint.prune(checkpoint_root(cfg), cfg.checkpoint.keep_last)
    return path
