"""The VPPO trainer: a table of contents. One call per stage of a step (docs/algorithm.md walks through each stage):

    rollout -> reward -> dynamic sampling -> experience (dual pass) -> advantages + TAS -> TGF -> updates -> sync

    torchrun --nproc-per-node N -m vppo_megatron.train --config examples/configs/tiny_cpu.yaml [key=value ...]
    python -m vppo_megatron.train --config X --dry-run     # validate at the target world size, print the layout

Trainer rank 0 drives the vLLM fleet on Ray (RAY_ADDRESS joins a running cluster; otherwise a local one). The
state and the stages are `vppo_megatron/trainer.py`; the DAPO / GRPO baselines run through the same stages with
TAS and TGF off (`vppo_megatron/algo/ablations.py`).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="vppo train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--dry-run", action="store_true", help="validate for parallel.world_size and exit")
    parser.add_argument("--rehearse", action="store_true", help="with --dry-run: build each rank role (vppo plan)")
    parser.add_argument("--resume", help="auto | none | a checkpoint directory (checkpoint.resume)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algorithm.token_fraction=0.4")
    return parser.parse_args(argv)


from vppo_megatron import faults  # noqa: E402
from vppo_megatron.trainer import (  # noqa: E402 - after the environment defaults above
    StageTimer,
    StalledRun,
    Trainer,
    cluster_lost_line,
    collective_timeout,
)


def train_step(t: Trainer, step: int) -> dict[str, float]:
    """One step: the seven stages, in order (stage 1 on rank 0, the rest on every rank)."""
    timer = StageTimer()
    t.progress.phase("rollout + reward")
    groups, metrics = t.rollout(step)  # 1: generate, reward, dynamic sampling
    timer.lap("rollout")
    data = t.distribute(groups, step)  # 2: DP shards, micro-batches built once
    timer.lap("distribute")
    if not data.rollouts.samples:
        return {**metrics, **timer.total(), "actor/skipped_step": 1.0}
    t.progress.phase("experience (dual pass)")
    experience, lifecycle = t.experience(data)  # 3: old / perturbed log-probs, dependency, entropy
    timer.lap("experience")
    advantage_B, shaping = t.advantages(data, experience)  # 4: GRPO advantages x TAS
    mask_BT = t.token_filter(experience, step)  # 5: TGF gradient mask
    shaping.update(t.diagnose(data, experience, mask_BT))  # where the dependency and the mask land
    t.progress.phase("update")
    updates = t.update(data, experience, advantage_B, mask_BT)  # 6: ppo_epochs x mini-batches optimizer steps
    timer.lap("update")
    t.progress.phase("weight sync")
    synced = t.push_weights()  # 7: weights to every engine (+ the verify_sync probe)
    timer.lap("sync_stage")
    for part in (lifecycle, shaping, updates, synced, timer.total()):
        metrics.update(part)
    metrics["time/perception_fraction"] = metrics["time/experience_s"] / metrics["time/step_s"]
    return metrics


def main(argv=None) -> int:
    from vppo_megatron.config import load

    args = parse_args(argv)
    try:
        cfg = load(args.config, [*args.overrides, *([f"checkpoint.resume={args.resume}"] if args.resume else [])])
        if args.dry_run:
            from vppo_megatron.plan import dry_run

            return dry_run(cfg, args.rehearse)
    except ValueError as exc:  # ConfigError, or a model config.json the memory estimate cannot read
        print(f"vppo train: error: {exc}", file=sys.stderr)
        return 2
    from vppo_megatron.actor.integrity import DamagedCheckpoint
    from vppo_megatron.resume import CheckpointWriteError

    try:
        return run(cfg)
    except DamagedCheckpoint as exc:  # checkpoint.resume names a damaged checkpoint: nothing was loaded
        return _fail(f"{exc}; resume from another checkpoint (checkpoint.resume=auto picks the newest sound one)", 2)
    except CheckpointWriteError as exc:
        return _fail(str(exc), 1)
    except RuntimeError as exc:  # a collective past parallel.timeout_s: one line naming the stage it waited in
        message = collective_timeout(exc, cfg.parallel.timeout_s) or _ray_cluster_lost(cfg)
        if message is None:
            raise
        return _fail(message, 1, every_rank=True)  # each rank names what it waited for
    except Exception:  # trainer rank 0's Ray calls fail once its cluster is gone: say so in one line
        message = _ray_cluster_lost(cfg)
        if message is None:
            raise
        return _fail(message, 1)


def _ray_cluster_lost(cfg) -> str | None:
    """On trainer rank 0 (the Ray driver) whose cluster's head no longer answers: the line saying so ("" when the
    Ray watchdog is saying it, `trainer._cluster_lost`)."""
    if "vppo_megatron.rollout.fleet" not in sys.modules:  # this rank never drove a fleet
        return None
    from vppo_megatron.rollout.fleet import lost_cluster

    address = lost_cluster()
    return None if address is None else cluster_lost_line(cfg, address, wait=False) or ""


def _fail(message: str, code: int, every_rank: bool = False) -> int:
    """One error line (from trainer rank 0 when every rank has the same one) and the exit code."""
    import torch.distributed as dist

    if message and (every_rank or not dist.is_initialized() or dist.get_rank() == 0):
        print(f"vppo train: error: {message}", file=sys.stderr, flush=True)
    return code


def run(cfg) -> int:
    """Builds the trainer and runs every step (main's body once the config is valid)."""
    from vppo_megatron.metrics import Progress

    trainer = Trainer.build(cfg)
    t, every = cfg.trainer, cfg.checkpoint.save_every
    bars = cfg.logging.progress_bars and trainer.is_driver
    trainer.progress = Progress(t.total_steps, trainer.start_step, "vppo train", bars)
    try:  # the bar ends its line before any error line (main prints them)
        for step in range(trainer.start_step, t.total_steps):
            faults.set_step(step)
            trainer.progress.phase("validation")
            metrics = trainer.validate() if t.val_every and step % t.val_every == 0 else {}
            metrics.update(train_step(trainer, step))
            trainer.log(step, metrics)
            try:
                trainer.check_skipped(step, metrics)
            except StalledRun as exc:
                trainer.progress.close()
                trainer.sync.close()  # the shared memory the weight sync holds (what finish() would release)
                if trainer.is_driver:
                    print(f"vppo train: error: {exc}", file=sys.stderr, flush=True)
                return 2
            if every and (step + 1) % every == 0:
                trainer.progress.phase("checkpoint")
                trainer.checkpoint(step)
            trainer.progress.advance(metrics)
    finally:
        trainer.progress.close()
    trainer.finish()
    return 0


if __name__ == "__main__":  # vLLM and dist_checkpointing spawn processes: the guard is required
    sys.exit(main())
