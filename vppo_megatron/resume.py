"""Trainer checkpoints: resume at start-up (checkpoint.resume) and save every checkpoint.save_every steps.

A checkpoint holds the model and optimizer (sharded, any layout), the trainer state (next step, data-loader
position, policy version, RNG) and is written atomically; the newest checkpoint.keep_last are kept.
"""

from __future__ import annotations

from pathlib import Path


def checkpoint_root(cfg) -> Path:
    return Path(cfg.trainer.output_dir) / "checkpoints"


def resume(run) -> int:
    """checkpoint.resume: auto (latest complete checkpoint, if any), none, or a directory; returns the step."""
    import torch.distributed as dist

    from vppo_megatron.actor import checkpoint

    cfg = run["cfg"]
    target = cfg.checkpoint.resume
    path = checkpoint.latest(checkpoint_root(cfg)) if target == "auto" else None if target == "none" else target
    if path is None:
        return 0
    state = checkpoint.load_training(run["actor"], path)
    run["sync"].version = state["version"] - 1  # the start-up push re-serves the saved version, same number
    if dist.get_rank() == 0:
        run["loader"].load_state_dict(state["loader"])
        print(f"resumed from {path} at step {state['step']}", flush=True)
    return state["step"]


def save(run, step: int) -> None:
    """After `step`: a resumable checkpoint every checkpoint.save_every steps, the newest keep_last kept."""
    import torch.distributed as dist

    from vppo_megatron.actor import checkpoint

    cfg = run["cfg"]
    loader = [run["loader"].state_dict() if run["fleet"] is not None else None]
    dist.broadcast_object_list(loader, src=0)
    state = {"step": step + 1, "loader": loader[0], "version": run["sync"].version}
    checkpoint.save_training(
        run["actor"], checkpoint_root(cfg) / f"{checkpoint.STEP_PREFIX}{step + 1}", cfg.model.path, state
    )
    if dist.get_rank() == 0:
        checkpoint.prune(checkpoint_root(cfg), cfg.checkpoint.keep_last)
