"""VPPO's step cost against DAPO's, measured side by side in one process tree (the paper: +9.7% wall clock at 7B).

One torchrun job builds two trainers on the same process groups and the same warm vLLM fleet: VPPO (the config
as given) and DAPO (the same config with TAS and TGF off, `algo/ablations.py` table2/dapo). Each step generates
ONE set of rollouts (rewards, dynamic sampling) and both trainers run stages 2-7 of `train.py`'s `train_step` on
it, alternating which goes first; so both see the same data, seeds and engines, and the rollout stage (identical
work for both) is timed once and charged to both. Prints per-stage medians over the measured steps, the ratio
VPPO step / DAPO step (whole step, and the trainer's stages 2-7 alone), the perception pass's share of the VPPO
step, and the spread of the per-step ratio.

  python benchmarks/bench_step.py                       # the demo config on a tiny model built here, 2 ranks
  python benchmarks/bench_step.py --model runs/demo/sft --steps 6 --json runs/bench_step.json [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

STAGES = ("rollout", "distribute", "experience", "update", "sync_stage")
CONFIG = "examples/configs/tiny_cpu.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--model", help="HF model directory (default: a tiny model and data built in --work)")
    parser.add_argument("--data", help="directory with train.parquet / validation.parquet (default: built)")
    parser.add_argument("--steps", type=int, default=4, help="measured steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--nproc", type=int, default=2, help="trainer ranks (torchrun --nproc-per-node)")
    parser.add_argument("--work", help="scratch directory (default: a temporary one)")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for both runs")
    return parser.parse_args(argv)


def _prepare(args, work: Path) -> tuple[str, str]:
    from vppo_megatron.data.synthetic import write_dataset
    from vppo_megatron.tiny_model import build_tiny_model

    tiny, data = work / "tiny-qwen2_5_vl", args.data or str(work / "data")
    if args.model is None and not (tiny / "config.json").exists():  # a --work directory is reused
        build_tiny_model(tiny)
    if args.data is None and not (work / "data" / "train.parquet").exists():
        write_dataset(data, ["largest_color"], num_train=256, num_val=8, seed=0)
    return args.model or str(tiny), data


def _overrides(args, work: Path, name: str) -> list[str]:
    from vppo_megatron.algo.ablations import PLAIN

    base = [
        f"model.path={args.model}",
        f"data.train_files=[{args.data}/train.parquet]",
        f"data.val_files=[{args.data}/validation.parquet]",
        f"trainer.output_dir={work / name}",
        f"trainer.total_steps={args.warmup + args.steps}",
        "trainer.val_every=0",
        "checkpoint.save_every=0",
        "checkpoint.resume=none",
        "logging.progress_bars=false",
        "logging.console=false",
        "logging.tensorboard=false",
        # a model that solves nothing keeps no group under dynamic sampling; the rollout is shared anyway
        *([] if args.model_given else ["algorithm.dynamic_sampling=false"]),
        *args.overrides,
    ]
    return base + (PLAIN if name == "dapo" else [])


def worker(args) -> None:
    import torch.distributed as dist

    from vppo_megatron.config import load
    from vppo_megatron.train import train_step
    from vppo_megatron.trainer import StageTimer, Trainer

    class Replaying(Trainer):
        """Stage 1 replays the step's shared rollouts (generated once by `generate`)."""

        shared: tuple = (None, {})

        def rollout(self, step):
            return self.shared

    work = Path(args.work)
    vppo = Replaying.build(load(args.config, _overrides(args, work, "vppo")))
    dapo = Replaying.build(load(args.config, _overrides(args, work, "dapo")), alongside=vppo)
    rows = []
    for step in range(args.warmup + args.steps):
        timer = StageTimer()
        groups, metrics = Trainer.rollout(vppo, step)  # stage 1, once for both
        timer.lap("rollout")
        row = {"step": step, "rollout_s": timer.metrics["time/rollout_s"]}
        for trainer in (vppo, dapo) if step % 2 == 0 else (dapo, vppo):
            trainer.shared = (groups, dict(metrics))
            trainer.sync.claim_engines()  # the fleet reads weights from this trainer's staging directory
            out = train_step(trainer, step)
            name = "vppo" if trainer is vppo else "dapo"
            row[name] = {s: out.get(f"time/{s}_s", 0.0) for s in STAGES[1:]}
            row[name]["trainer_s"] = out["time/step_s"] - out["time/rollout_s"]  # stages 2-7
        rows.append(row)
    vppo.sync.close()
    dapo.sync.close()
    if dist.get_rank() == 0:
        Path(args.work, "rows.json").write_text(json.dumps(rows))


def summarise(rows: list[dict], warmup: int) -> dict:
    measured = rows[warmup:]
    median = statistics.median
    out = {"steps": len(measured), "rollout_s": median(r["rollout_s"] for r in measured)}
    for name in ("vppo", "dapo"):
        out[name] = {k: median(r[name][k] for r in measured) for k in measured[0][name]}
        out[name]["step_s"] = median(r["rollout_s"] + r[name]["trainer_s"] for r in measured)
    per_step = [(r["rollout_s"] + r["vppo"]["trainer_s"]) / (r["rollout_s"] + r["dapo"]["trainer_s"]) for r in measured]
    out["ratio_step"] = out["vppo"]["step_s"] / out["dapo"]["step_s"]
    out["ratio_step_min"], out["ratio_step_max"] = min(per_step), max(per_step)
    out["ratio_trainer"] = out["vppo"]["trainer_s"] / out["dapo"]["trainer_s"]
    out["perception_share"] = (out["vppo"]["experience"] - out["dapo"]["experience"]) / out["vppo"]["step_s"]
    # VPPO's extra cost in units of DAPO's experience pass (its intrinsic extra is one more such forward pass)
    unit = out["dapo"]["experience"]
    out["extra_x_experience"] = {s: (out["vppo"][s] - out["dapo"][s]) / unit for s in STAGES[1:]}
    out["extra_x_experience"]["step"] = (out["vppo"]["step_s"] - out["dapo"]["step_s"]) / unit
    return out


def report(s: dict) -> str:
    lines = [f"median over {s['steps']} steps (seconds)      VPPO      DAPO"]
    lines.append(f"  1 rollout + reward (shared)        {s['rollout_s']:8.3f}  {s['rollout_s']:8.3f}")
    labels = {"distribute": "2 distribute + micro-batches", "experience": "3 experience pass",
              "update": "4-6 advantages, TGF, updates", "sync_stage": "7 weight sync"}  # fmt: skip
    extra = s["extra_x_experience"]
    lines[0] += "   VPPO - DAPO, x DAPO's experience pass"
    for stage, label in labels.items():
        lines.append(f"  {label:<34} {s['vppo'][stage]:8.3f}  {s['dapo'][stage]:8.3f}  {extra[stage]:+8.3f}")
    lines.append(f"  {'step':<34} {s['vppo']['step_s']:8.3f}  {s['dapo']['step_s']:8.3f}  {extra['step']:+8.3f}")
    lines.append(
        f"VPPO's extra cost: {extra['step']:.3f} x DAPO's experience pass (target <= 1.10: one more forward pass, "
        "the perturbed view, and little else)"
    )
    lines.append(
        f"VPPO / DAPO step: {s['ratio_step']:.3f} (per step {s['ratio_step_min']:.3f}..{s['ratio_step_max']:.3f}; "
        f"target <= 1.10, the paper's 7B GPU run: 1.097)"
    )
    lines.append(f"VPPO / DAPO stages 2-7 (no rollout): {s['ratio_trainer']:.3f}")
    lines.append(f"perception pass (VPPO experience - DAPO experience) / VPPO step: {s['perception_share']:.1%}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.model_given = args.model is not None
    if args.worker:
        args.model_given = os.environ.get("BENCH_MODEL_GIVEN") == "1"
        worker(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_step_") as scratch:
        work = Path(args.work or scratch)
        work.mkdir(parents=True, exist_ok=True)
        args.model, args.data = _prepare(args, work)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}"]
        command += [__file__, "--worker", "--work", str(work), "--model", args.model, "--data", args.data]
        command += ["--config", args.config, "--steps", str(args.steps), "--warmup", str(args.warmup)]
        env = dict(os.environ, BENCH_MODEL_GIVEN="1" if args.model_given else "0")
        subprocess.run(command + args.overrides, check=True, env=env)
        summary = summarise(json.loads((work / "rows.json").read_text()), args.warmup)
    print(report(summary), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
