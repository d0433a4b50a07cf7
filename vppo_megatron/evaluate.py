"""`vppo eval`: avg@k validation accuracy of a Hugging Face model directory, on its own vLLM fleet (Ray), with the
trainer's prompts, sampling settings and reward: the number `val/accuracy` would log for that model.

    vppo eval --config X [--model DIR] [--out result.json] [key=value ...]

No Megatron and no torchrun: evaluate a warm-started model, a training checkpoint (exported to HF once, beside
it) or the original release side by side. The fleet is named `vppo-eval`, so it never attaches to a training
run's engines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def evaluate(cfg, model_dir: str) -> dict:
    from transformers import AutoProcessor

    from vppo_megatron.data.dataset import PromptDataset
    from vppo_megatron.reward.loading import load_reward_function
    from vppo_megatron.rollout.collect import validate
    from vppo_megatron.rollout.fleet import RolloutFleet, connect

    _check_model(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    val = PromptDataset.for_processor(cfg.data.val_files, cfg.data, processor)
    samples = val.head(cfg.trainer.val_prompts)
    reward_fn = load_reward_function(cfg.algorithm.reward_function)
    connect()
    fleet = RolloutFleet(cfg, model_dir, name="vppo-eval")
    try:
        start = time.perf_counter()
        metrics = validate(fleet, samples, cfg, reward_fn)
    finally:
        fleet.shutdown()
    return {
        "model": str(model_dir),
        **metrics,
        "val/samples_per_prompt": cfg.rollout.val_num_samples,
        "val/temperature": cfg.rollout.val_temperature,
        "time/eval_s": time.perf_counter() - start,
    }


PROTOCOL = {  # the paper's evaluation (docs/evaluation.md): avg@8, T 1.0, top_p 1.0, 2048 tokens, 768 x 768 pixels
    "samples": 8,
    "temperature": 1.0,
    "top_p": 1.0,
    "max_tokens": 2048,
    "max_pixels": 768 * 768,
}


def evaluate_benchmarks(
    cfg, model_dir: str, directory: Path, names: list[str], samples: int, max_tokens: int, root: Path | None = None
) -> dict:
    """The paper's protocol on the benchmarks `names` found under `directory` (docs/evaluation.md): per benchmark
    the accuracy (mean over items of the mean over `samples` samples), its std over the samples, the item count;
    their average; the benchmarks not found, by name."""
    import statistics
    import tempfile
    from dataclasses import replace

    from transformers import AutoProcessor

    from vppo_megatron.data import benchmarks
    from vppo_megatron.data.dataset import PromptDataset
    from vppo_megatron.reward.loading import load_reward_function
    from vppo_megatron.rollout.collect import score
    from vppo_megatron.rollout.fleet import RolloutFleet, connect

    _check_model(model_dir)
    found, missing = benchmarks.find(directory, names)
    if not found:
        raise FileNotFoundError(f"none of {', '.join(names)} under {directory} (docs/evaluation.md names the files)")
    processor = AutoProcessor.from_pretrained(model_dir)
    data = replace(
        cfg.data, max_pixels=PROTOCOL["max_pixels"], prompt_key="problem", answer_key="answer", image_key="images"
    )
    prompts, table = {}, {}
    with tempfile.TemporaryDirectory(prefix="vppo-bench-") as tmp:
        for name, path in found.items():
            rows, left_out = benchmarks.load(name, path, root)
            prompt_file = benchmarks.write_prompt_file(rows, path.parent, Path(tmp) / f"{name}.parquet")
            dataset = PromptDataset.for_processor([str(prompt_file)], data, processor)
            prompts[name] = dataset.head(0)
            table[name] = {"file": str(path), "left_out": left_out, "skipped": dataset.report.total}
    reward_fn = load_reward_function(cfg.algorithm.reward_function)
    connect()
    fleet = RolloutFleet(cfg, model_dir, name="vppo-eval")
    start = time.perf_counter()
    try:
        for name, items in prompts.items():
            results, _ = fleet.generate(
                items,
                n=samples,
                temperature=PROTOCOL["temperature"],
                top_p=PROTOCOL["top_p"],
                max_tokens=max_tokens,
                seed=cfg.trainer.seed,
            )
            accuracies = [g.accuracies for g in score(results, items, reward_fn)]
            per_pass = [sum(a[k] for a in accuracies) / len(accuracies) for k in range(samples)]
            table[name].update(
                accuracy=sum(per_pass) / samples,
                std=statistics.stdev(per_pass) if samples > 1 else 0.0,
                items=len(items),
            )
    finally:
        fleet.shutdown()
    return {
        "model": str(model_dir),
        "benchmarks": table,
        "average": sum(t["accuracy"] for t in table.values()) / len(table),
        "missing": missing,
        "protocol": dict(PROTOCOL, samples=samples, max_tokens=max_tokens),
        "time/eval_s": time.perf_counter() - start,
    }


def markdown(result: dict) -> str:
    """The per-benchmark table (accuracy and std in %, items) and the average, missing benchmarks named."""
    lines = ["| benchmark | accuracy (%) | std over samples | items |", "|---|---|---|---|"]
    for name, t in result["benchmarks"].items():
        lines.append(f"| {name} | {100 * t['accuracy']:.1f} | {100 * t['std']:.1f} | {t['items']} |")
    lines.append(f"| **average** | **{100 * result['average']:.1f}** | | |")
    if result["missing"]:
        lines.append(f"\nmissing (no file found): {', '.join(result['missing'])}")
    return "\n".join(lines) + "\n"


def _check_model(model_dir: str) -> None:
    if not (Path(model_dir) / "config.json").exists():
        raise FileNotFoundError(
            f"{model_dir} has no config.json: pass an HF model directory or a checkpoint of this project with --model"
        )


def resolve_model(path: str) -> str:
    """An HF directory as it is; a Megatron checkpoint of this project (a `step_N` directory, or a checkpoints
    directory: its newest complete one) exported once to `<checkpoint>-hf` beside it (`vppo convert
    megatron-to-hf`, one rank) and that export; a later evaluation of the same checkpoint reuses it."""
    import subprocess

    from vppo_megatron.actor.checkpoint import METADATA, latest

    model = Path(path)
    if (model / "config.json").exists() or not model.is_dir():
        return path
    checkpoint = model if (model / METADATA).exists() else latest(model)
    if checkpoint is None:
        return path  # _check_model says what is wrong
    export = checkpoint.with_name(f"{checkpoint.name}-hf")
    if not (export / "config.json").exists():
        print(f"exporting the Megatron checkpoint {checkpoint} to {export} (HF) for the evaluation", flush=True)
        command = [sys.executable, "-m", "checkpoints_convert.megatron_to_hf", "--megatron", str(checkpoint)]
        if subprocess.run([*command, "--out", str(export)]).returncode:
            raise ValueError(f"could not export {checkpoint} for the evaluation (the lines above say why)")
    return str(export)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`vppo eval`'s arguments (also the `vppo` command's eval subcommand)."""
    from vppo_megatron.data.benchmarks import BENCHMARKS

    parser.add_argument("--config", required=True)
    parser.add_argument(
        "--model", help="HF model directory, or a checkpoint of this project (exported once) (default: model.path)"
    )
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    parser.add_argument("--benchmarks", type=Path, help="run the paper's protocol on the benchmark files here")
    parser.add_argument("--names", default=",".join(BENCHMARKS), help="benchmarks to run (default: all eight)")
    parser.add_argument("--samples", type=int, default=PROTOCOL["samples"], help="samples per item (protocol: 8)")
    parser.add_argument("--max-tokens", type=int, default=PROTOCOL["max_tokens"], help="(protocol: 2048)")
    parser.add_argument("--papo-root", type=Path, help="the PAPO-Eval checkout its files' image paths start from")
    parser.add_argument("--markdown", type=Path, help="with --benchmarks: also write the table here")
    parser.add_argument("overrides", nargs="*")


def main(argv=None) -> int:

    parser = argparse.ArgumentParser(prog="vppo eval", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    from vppo_megatron.config import load

    cfg = load(args.config, args.overrides)
    model = resolve_model(args.model or cfg.model.path)
    if args.benchmarks:
        names = [n.strip() for n in args.names.split(",") if n.strip()]
        result = evaluate_benchmarks(cfg, model, args.benchmarks, names, args.samples, args.max_tokens, args.papo_root)
        print(markdown(result), flush=True)
        if args.markdown:
            args.markdown.write_text(markdown(result))
    else:
        result = evaluate(cfg, model)
    print(json.dumps(result), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
