"""Rollouts from trainer rank 0 to the ranks that need them, measured side by side in one run (CPU, gloo):

broadcast  before: every rank receives every group, images included (one broadcast_object_list over the world)
scatter    now (vppo_megatron/batch.py `distribute`): rank 0 scatters one DP shard to each replica leader, which
           broadcasts it over its TP x CP x PP ranks

It prints, per layout, the bytes each rank receives (the pickled payload; rank 0 receives nothing), the time of
one distribution, and the ratio broadcast / scatter of the bytes per non-zero rank, and checks that both give every
rank the same RankBatch (so the training step, and its metrics, cannot change).

python benchmarks/bench_scatter.py [--prompts 64] [--samples 8] [--image 448] [--repeats 3]
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import time

import numpy as np


def synthetic_groups(num_prompts: int, num_samples: int, image_side: int, seed: int = 0) -> list:
    """Groups shaped like a step's kept rollouts: one image per prompt, 512-token prompts, 256-token responses."""
    from vppo_megatron.rollout.collect import Group
    from vppo_megatron.types import PromptSample, RolloutResult

    rng = np.random.default_rng(seed)
    groups = []
    for p in range(num_prompts):
        image = rng.integers(0, 256, (image_side, image_side, 3), dtype=np.uint8)
        prompt = PromptSample(f"q{p}", "<|image_pad|> question", [image], "3")
        prompt_ids = rng.integers(0, 150_000, 512).tolist()
        rollouts = [
            RolloutResult(p, j, prompt_ids, rng.integers(0, 150_000, 256).tolist(), [-0.5] * 256, "", "stop", 1)
            for j in range(num_samples)
        ]
        rewards = rng.integers(0, 2, num_samples).astype(float).tolist()
        groups.append(Group(prompt, rollouts, rewards, rewards))
    return groups


def _broadcast_all(groups):
    """The previous scheme: the whole step to every rank."""
    import torch.distributed as dist

    from vppo_megatron.batch import _plain

    payload = [[_plain(g) for g in groups] if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]


def distribution_rank(rank, world_size, layout_kwargs, num_prompts, num_samples, image_side, repeats):
    import torch
    import torch.distributed as dist

    from vppo_megatron import batch
    from vppo_megatron.parallel.layout import ParallelLayout, destroy, initialize

    groups = initialize(ParallelLayout(**layout_kwargs), seed=1)
    kept = synthetic_groups(num_prompts, num_samples, image_side) if rank == 0 else None
    results = {}
    for name in ("broadcast", "scatter"):
        times = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            if name == "broadcast":
                everything = _broadcast_all(kept)
                shard = batch.dp_shards(everything, groups.layout.dp)[groups.dp_rank]
                received = everything
            else:
                box = [None]
                if groups.leaders is not None:
                    shards = None
                    if rank == 0:
                        shards = [[(g, batch._plain(x)) for g, x in s] for s in batch.dp_shards(kept, groups.layout.dp)]
                    dist.scatter_object_list(box, shards, src=0, group=groups.leaders)
                dist.broadcast_object_list(box, src=groups.replica_leader, group=groups.replica)
                shard = received = box[0]
            times.append(time.perf_counter() - start)
        rank_batch = batch.to_rank_batch(shard)
        results[name] = {
            "bytes": 0 if rank == 0 else len(pickle.dumps(received)),
            "seconds": statistics.median(times),
            "uids": [s.uid for s in rank_batch.samples],
            "rewards": rank_batch.reward_B,
            "group_ids": rank_batch.group_ids_B,
        }
    # the trainer's own entry point gives the same shard
    direct = batch.distribute(kept, groups)
    results["distribute_uids"] = [s.uid for s in direct.samples]
    results["dp_rank"] = groups.dp_rank
    destroy()
    same = (
        results["broadcast"]["uids"] == results["scatter"]["uids"] == results["distribute_uids"]
        and torch.equal(results["broadcast"]["rewards"], results["scatter"]["rewards"])
        and torch.equal(results["broadcast"]["group_ids"], results["scatter"]["group_ids"])
    )
    return {"same": same, **{k: results[k] for k in ("broadcast", "scatter", "dp_rank")}}


LAYOUTS = [(4, {"tp": 2, "dp": 2}), (8, {"tp": 2, "dp": 4}), (8, {"tp": 2, "pp": 2, "dp": 2})]


def main() -> None:
    from vppo_megatron.testing import run_distributed

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--image", type=int, default=448, help="image side in pixels (one RGB image per prompt)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{args.prompts} prompts x {args.samples} rollouts, one {args.image}x{args.image} image each")
    print(f"{'layout':<18} {'scheme':<10} {'MiB/non-zero rank (max)':>24} {'MiB all ranks':>14} {'s':>8}")
    for world, layout in LAYOUTS:
        results = run_distributed(
            distribution_rank, world, layout, args.prompts, args.samples, args.image, args.repeats, timeout_s=900
        )
        assert all(r["same"] for r in results), "broadcast and scatter gave a rank different rollouts"
        name = " ".join(f"{k.upper()}{v}" for k, v in layout.items()) + f" ({world})"
        per = {}
        for scheme in ("broadcast", "scatter"):
            received = [r[scheme]["bytes"] for r in results[1:]]
            per[scheme] = max(received)
            seconds = max(r[scheme]["seconds"] for r in results)
            print(
                f"{name:<18} {scheme:<10} {per[scheme] / 2**20:>24.2f} {sum(received) / 2**20:>14.2f} {seconds:>8.3f}"
            )
        print(
            f"{'':<18} bytes per non-zero rank, broadcast / scatter: {per['broadcast'] / per['scatter']:.2f}"
            f" (DP = {layout.get('dp', 1)})"
        )


if __name__ == "__main__":
    main()
