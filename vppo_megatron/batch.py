"""The step's rollouts, from trainer rank 0 to the ranks that need them: DP shards, then mini-batches.

Prompt groups stay whole (GRPO normalises within a group, TAS `group` scope needs it), so shards and
mini-batches are made of groups. Each DP rank takes every dp-th group; the group count is a multiple of the DP
size (stage 1 trims and counts a remainder) so every rank runs the same number of collectives.

Legend: B rollouts on this rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from vppo_megatron.types import ActorSample


@dataclass
class RankBatch:
    samples: list[ActorSample]
    reward_B: torch.Tensor
    group_ids_B: torch.Tensor
    """Global group index of each rollout."""


def _plain(group) -> tuple:
    """A Group as plain data (uid, prompt ids, response ids per rollout, images, rewards, answer spans)."""
    g = group
    return (
        g.prompt.uid,
        g.rollouts[0].prompt_ids if g.rollouts else [],
        [r.response_ids for r in g.rollouts],
        g.prompt.images,
        g.rewards,
        [r.answer_span for r in g.rollouts],
    )


def trim_to_dp(groups: list, dp_size: int) -> tuple[list, int]:
    """(the first groups a multiple of `dp_size` long, how many were left out). Dynamic sampling that runs out of
    tries can keep a count no DP split divides; the remainder cannot train and is counted by the caller."""
    dropped = len(groups) % dp_size
    return groups[: len(groups) - dropped], dropped


def dp_shards(groups: list, dp_size: int) -> list[list[tuple[int, tuple]]]:
    """(global group index, group) per DP rank: rank d takes every dp-th group."""
    if len(groups) % dp_size:
        raise ValueError(f"{len(groups)} groups do not split over {dp_size} data-parallel ranks")
    return [[(g, groups[g]) for g in range(d, len(groups), dp_size)] for d in range(dp_size)]


def distribute(groups, parallel) -> RankBatch:
    """Rank 0's Groups -> this rank's DP shard. Rank 0 scatters one shard to each replica leader (images travel
    once per DP rank), and each leader broadcasts its shard over its replica (TP x CP x PP ranks)."""
    shard = [None]
    if parallel.leaders is not None:
        shards = None
        if dist.get_rank() == 0:
            shards = [[(g, _plain(group)) for g, group in s] for s in dp_shards(groups, parallel.layout.dp)]
        dist.scatter_object_list(shard, shards, src=0, group=parallel.leaders)
    dist.broadcast_object_list(shard, src=parallel.replica_leader, group=parallel.replica)
    return to_rank_batch(shard[0])


def to_rank_batch(shard: list[tuple[int, tuple]]) -> RankBatch:
    samples, rewards, group_ids = [], [], []
    for g, (uid, prompt_ids, responses, images, group_rewards, spans) in shard:
        for j, (response, reward, span) in enumerate(zip(responses, group_rewards, spans, strict=True)):
            samples.append(ActorSample(f"{uid}/{j}", prompt_ids, response, images, span))
            rewards.append(reward)
            group_ids.append(g)
    return RankBatch(samples, torch.tensor(rewards, dtype=torch.float32), torch.tensor(group_ids, dtype=torch.long))


def mini_batches(batch: RankBatch, groups_per_update: int) -> list[slice]:
    """Row ranges of consecutive whole groups, `groups_per_update` groups each (the last may be smaller)."""
    starts, previous = [], None
    for row, group in enumerate(batch.group_ids_B.tolist()):
        if group != previous:
            starts.append(row)
            previous = group
    bounds = starts[::groups_per_update] + [len(batch.samples)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
