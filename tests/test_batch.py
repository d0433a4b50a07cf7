"""batch.py: DP shards of whole groups, and `distribute` giving every rank exactly its replica's shard."""

import numpy as np
import torch

from vppo_megatron import batch
from vppo_megatron.testing import run_distributed


def _groups(count, samples=3):
    from vppo_megatron.rollout.collect import Group
    from vppo_megatron.types import PromptSample, RolloutResult

    rng = np.random.default_rng(0)
    out = []
    for p in range(count):
        prompt = PromptSample(f"q{p}", "text", [rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)], "1")
        rollouts = [RolloutResult(p, j, [1, 2, p], [p, j], [-0.1, -0.2], "", "stop", 1) for j in range(samples)]
        out.append(Group(prompt, rollouts, [float(j % 2) for j in range(samples)], [0.0] * samples))
    return out


def test_dp_shards_take_every_dp_th_whole_group_and_trim_the_rest():
    shards = batch.dp_shards(list("abcdefg"), 3)  # 7 groups on 3 ranks: 6 used
    assert shards == [[(0, "a"), (3, "d")], [(1, "b"), (4, "e")], [(2, "c"), (5, "f")]]


def test_rank_batch_expands_groups_into_rollouts_in_order():
    shard = [(g, batch._plain(x)) for g, x in batch.dp_shards(_groups(4), 2)[1]]
    rb = batch.to_rank_batch(shard)
    assert [s.uid for s in rb.samples] == ["q1/0", "q1/1", "q1/2", "q3/0", "q3/1", "q3/2"]
    assert rb.group_ids_B.tolist() == [1, 1, 1, 3, 3, 3]
    assert rb.reward_B.tolist() == [0.0, 1.0, 0.0] * 2
    assert rb.samples[4].response_ids == [3, 1] and rb.samples[0].prompt_ids == [1, 2, 1]
    assert [(s.start, s.stop) for s in batch.mini_batches(rb, 1)] == [(0, 3), (3, 6)]


def _distribute_rank(rank, world_size, layout):
    from vppo_megatron.parallel.layout import ParallelLayout, destroy, initialize

    parallel = initialize(ParallelLayout(**layout), seed=1)
    rb = batch.distribute(_groups(5) if rank == 0 else None, parallel)
    expected = batch.to_rank_batch(
        [(g, batch._plain(x)) for g, x in batch.dp_shards(_groups(5), parallel.layout.dp)[parallel.dp_rank]]
    )
    same = [s.uid for s in rb.samples] == [s.uid for s in expected.samples] and all(
        np.array_equal(a.images[0], b.images[0]) and a.response_ids == b.response_ids
        for a, b in zip(rb.samples, expected.samples)
    )
    same = same and torch.equal(rb.reward_B, expected.reward_B) and torch.equal(rb.group_ids_B, expected.group_ids_B)
    out = {"dp_rank": parallel.dp_rank, "same": same, "groups": sorted(set(rb.group_ids_B.tolist()))}
    destroy()
    return out


def test_distribute_sends_each_replica_its_own_shard():
    results = run_distributed(_distribute_rank, 4, {"pp": 2, "dp": 2}, timeout_s=300)
    assert all(r["same"] for r in results)
    by_dp = {r["dp_rank"]: r["groups"] for r in results}
    assert by_dp == {0: [0, 2], 1: [1, 3]}  # group 4 trimmed: DP ranks run the same number of collectives
