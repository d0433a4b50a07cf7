"""The step's rollouts, from trainer rank 0 to every rank: broadcast, data-parallel shards, mini-batches.

Prompt groups stay whole (GRPO normalises within a group, TAS `group` scope needs it), so shards and
mini-batches are made of groups. Each DP rank takes every dp-th group; the group count is trimmed to a multiple
of the DP size so every rank runs the same number of collectives.

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


def broadcast_groups(groups) -> list[tuple[str, list[int], list[list[int]], list, list[float]]]:
    """Rank 0's Groups as plain tuples (uid, prompt ids, response ids per rollout, images, rewards) on all ranks."""
    payload = [None]
    if dist.get_rank() == 0:
        payload = [
            [
                (
                    g.prompt.uid,
                    g.rollouts[0].prompt_ids if g.rollouts else [],
                    [r.response_ids for r in g.rollouts],
                    g.prompt.images,
                    g.rewards,
                )
                for g in groups
            ]
        ]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]


def shard(groups: list, dp_rank: int, dp_size: int) -> RankBatch:
    usable = len(groups) - len(groups) % dp_size
    samples, rewards, group_ids = [], [], []
    for g in range(dp_rank, usable, dp_size):
        uid, prompt_ids, responses, images, group_rewards = groups[g]
        for j, (response, reward) in enumerate(zip(responses, group_rewards)):
            samples.append(ActorSample(f"{uid}/{j}", prompt_ids, response, images))
            rewards.append(reward)
            group_ids.append(g)
    return RankBatch(samples, torch.tensor(rewards, dtype=torch.float32), torch.tensor(group_ids))


def mini_batches(batch: RankBatch, groups_per_update: int) -> list[slice]:
    """Row ranges of consecutive whole groups, `groups_per_update` groups each (the last may be smaller)."""
    starts, previous = [], None
    for row, group in enumerate(batch.group_ids_B.tolist()):
        if group != previous:
            starts.append(row)
            previous = group
    bounds = starts[::groups_per_update] + [len(batch.samples)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
