"""`vppo eval`: avg@k validation accuracy of a Hugging Face model directory, on its own vLLM fleet (Ray), with the
trainer's prompts, sampling settings and reward: the number `val/accuracy` would log for that model.

    vppo eval --config X [--model DIR] [--out result.json] [key=value ...]

No Megatron and no torchrun: evaluate a warm-started model, an exported checkpoint (`megatron_to_hf`) or the
original release side by side. The fleet is named `vppo-eval`, so it never attaches to a training run's engines.
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

    if not (Path(model_dir) / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} has no config.json: pass an HF model directory with --model")
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


def main(argv=None) -> int:
    from vppo_megatron.config import load

    parser = argparse.ArgumentParser(prog="vppo eval", description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--model", help="HF model directory (default: model.path)")
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load(args.config, args.overrides)
    result = evaluate(cfg, args.model or cfg.model.path)
    print(json.dumps(result), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
