"""The VPPO trainer: a table of contents. One call per stage of a step (the README's data flow):

    rollout -> reward -> dynamic sampling -> experience (dual pass) -> advantages + TAS -> TGF -> updates -> sync

    torchrun --nproc-per-node N -m vppo_megatron.train --config examples/configs/tiny_cpu.yaml [key=value ...]
    python -m vppo_megatron.train --config X --dry-run     # validate at the target world size, print the layout

Trainer rank 0 drives the vLLM fleet on Ray (RAY_ADDRESS joins a running cluster; otherwise a local one).
`algorithm.name` selects vppo, dapo or grpo; the baselines run through the same code.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

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


from vppo_megatron.resume import resume, save  # noqa: E402 - after the environment defaults above


def build(cfg):
    """Every component of a run, on every rank (the fleet and the data loaders on rank 0 only)."""
    import torch.distributed as dist
    from transformers import AutoProcessor

    from vppo_megatron.actor.engine import MegatronActor
    from vppo_megatron.data.dataset import PromptDataset, PromptLoader
    from vppo_megatron.lifecycle import Lifecycle
    from vppo_megatron.metrics import MetricsLogger
    from vppo_megatron.parallel.layout import ParallelLayout, init_distributed, initialize
    from vppo_megatron.reward.loading import load_reward_function
    from vppo_megatron.sync.weight_sync import WeightSync

    init_distributed()
    cfg.validate(dist.get_world_size())
    groups = initialize(ParallelLayout.from_config(cfg.parallel, dist.get_world_size()), cfg.trainer.seed)
    actor = MegatronActor(cfg, groups, cfg.model.path)
    run = {"cfg": cfg, "groups": groups, "actor": actor, "fleet": None}
    if dist.get_rank() == 0:
        from vppo_megatron.rollout.fleet import RolloutFleet, connect

        processor = AutoProcessor.from_pretrained(cfg.model.path)
        ip = processor.image_processor
        train = PromptDataset(cfg.data.train_files, cfg.data, processor.tokenizer, ip.patch_size, ip.merge_size)
        val = PromptDataset(cfg.data.val_files, cfg.data, processor.tokenizer, ip.patch_size, ip.merge_size)
        run["loader"] = PromptLoader(train, cfg.trainer.prompts_per_step, cfg.trainer.seed, cfg.data.shuffle)
        run["val_samples"] = val.head(cfg.trainer.val_prompts)
        run["reward_fn"] = load_reward_function(cfg.algorithm.reward_function)
        run["logger"] = MetricsLogger(cfg, Path(cfg.trainer.output_dir))
        connect()
        run["fleet"] = RolloutFleet.create_or_attach(cfg, cfg.model.path)
    run["sync"] = WeightSync(cfg, actor, run["fleet"])
    run["start_step"] = resume(run)
    run["sync"].push()  # engines serve exactly the actor's weights from the first rollout on
    run["lifecycle"] = Lifecycle(cfg, actor, run["fleet"], dist.barrier)
    run["lifecycle"].start()  # rollout state: engines awake, the actor holds what actor.offload leaves
    return run


def train_step(run, step: int) -> dict[str, float]:
    import torch
    import torch.distributed as dist

    from vppo_megatron import batch as batching
    from vppo_megatron.algo.pipeline import advantages_and_mask
    from vppo_megatron.rollout.collect import collect

    cfg, groups, actor, lifecycle = run["cfg"], run["groups"], run["actor"], run["lifecycle"]
    phase = run["progress"].phase
    start, metrics, kept = time.perf_counter(), {}, None
    phase("rollout + reward")
    if dist.get_rank() == 0:
        kept, metrics = collect(run["fleet"], run["loader"], cfg, step, run["reward_fn"])  # stages 1-2
    data = batching.distribute(kept, groups)  # this DP rank's groups only
    metrics["time/rollout_s"] = time.perf_counter() - start
    if not data.samples:
        return dict(metrics, **{"actor/skipped_step": 1.0})
    phase("experience (dual pass)")
    metrics.update(lifecycle.enter("experience"))  # engines sleep, the actor's state comes back
    tick = time.perf_counter()
    experience = actor.experience(data.samples, step, with_perception=cfg.algorithm.name == "vppo")  # stage 3
    metrics["time/experience_s"] = time.perf_counter() - tick
    groups_per_update = max(1, cfg.trainer.prompts_per_update // groups.layout.dp)
    phase("update")
    lifecycle.enter("update")
    for rows in batching.mini_batches(data, groups_per_update):  # stages 4-6, one optimizer step each
        micro_ids = torch.arange(rows.stop - rows.start) // cfg.trainer.micro_batch_size
        advantage, mask, shaping_metrics = advantages_and_mask(
            cfg.algorithm,
            data.reward_B[rows],
            data.group_ids_B[rows],
            experience.dependency_BT[rows],
            experience.entropy_BT[rows],
            experience.response_mask_BT[rows],
            micro_ids,
            seed=cfg.trainer.seed * 7919 + step,
            dp_group=groups.dp,
        )
        metrics.update(shaping_metrics)
        metrics.update(
            actor.update(
                data.samples[rows], experience.old_logp_BT[rows], advantage, mask, experience.dependency_BT[rows]
            )
        )
    metrics["time/update_s"] = time.perf_counter() - tick - metrics["time/experience_s"]
    phase("weight sync")
    metrics.update(lifecycle.enter("sync"))  # optimizer state (+ grads) leave, engines' weights wake
    metrics.update(run["sync"].push())  # stage 7
    metrics.update(lifecycle.enter("rollout"))  # weights leave (offload=all), engines' KV cache wakes
    metrics["time/step_s"] = time.perf_counter() - start
    metrics["time/perception_fraction"] = metrics["time/experience_s"] / metrics["time/step_s"]
    return metrics


def evaluate(run) -> dict[str, float]:
    from vppo_megatron.rollout.collect import validate

    return validate(run["fleet"], run["val_samples"], run["cfg"], run["reward_fn"]) if run["fleet"] else {}


def main(argv=None) -> int:
    from vppo_megatron.config import load
    from vppo_megatron.metrics import Progress

    args = parse_args(argv)
    try:
        cfg = load(args.config, [*args.overrides, *([f"checkpoint.resume={args.resume}"] if args.resume else [])])
        if args.dry_run:
            from vppo_megatron.plan import dry_run

            return dry_run(cfg, args.rehearse)
    except ValueError as exc:  # ConfigError, or a model config.json the memory estimate cannot read
        print(f"vppo train: error: {exc}", file=sys.stderr)
        return 2
    run = build(cfg)
    t = cfg.trainer
    every = cfg.checkpoint.save_every
    progress = run["progress"] = Progress(
        t.total_steps, run["start_step"], "vppo train", cfg.logging.progress_bars and run["fleet"] is not None
    )
    for step in range(run["start_step"], t.total_steps):
        progress.phase("validation")
        metrics = evaluate(run) if t.val_every and step % t.val_every == 0 else {}
        metrics.update(train_step(run, step))
        if run["fleet"] is not None:
            run["logger"].log(step, metrics)
        if every and (step + 1) % every == 0:
            progress.phase("checkpoint")
            with run["lifecycle"].everything_resident():
                save(run, step)
        progress.advance(metrics)
    progress.close()
    if run["fleet"] is not None:
        final = evaluate(run)
        run["logger"].log(t.total_steps, final)
        curve = run["logger"].plot(Path(t.output_dir) / "accuracy.png")
        print(f"metrics: {run['logger'].path}\ncurve: {curve}", flush=True)
    run["sync"].close()
    return 0


if __name__ == "__main__":  # vLLM and dist_checkpointing spawn processes: the guard is required
    sys.exit(main())
