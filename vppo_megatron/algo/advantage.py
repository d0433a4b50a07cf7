"""GRPO outcome advantages and DAPO's dynamic-sampling group filter (docs/algorithm.md, "The base objective").

    A_i = (R_i - mean_g R) / (std_g R + eps),  std unbiased, over the rollouts of prompt group g

Groups are given by `group_ids_B` (any integer labels), so rollouts need not be contiguous or equally many.

Legend: B rollouts, G number of groups.
"""

from __future__ import annotations

import torch


def _group_stats(values_B: torch.Tensor, group_ids_B: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-rollout (group mean, unbiased group std, group size) of `values_B`."""
    _, index_B = torch.unique(group_ids_B, return_inverse=True)
    num_groups = int(index_B.max()) + 1 if index_B.numel() else 0
    values = values_B.double()
    count_G = torch.zeros(num_groups, dtype=values.dtype).index_add_(0, index_B, torch.ones_like(values))
    mean_G = torch.zeros(num_groups, dtype=values.dtype).index_add_(0, index_B, values) / count_G
    squares_G = torch.zeros(num_groups, dtype=values.dtype).index_add_(0, index_B, (values - mean_G[index_B]) ** 2)
    std_G = torch.sqrt(squares_G / (count_G - 1).clamp_min(1))
    return mean_G[index_B], std_G[index_B], count_G[index_B]


def grpo_advantages(reward_B: torch.Tensor, group_ids_B: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (R_i - mean) / (std + eps) within each group (unbiased std).

    A group of one rollout has no spread to normalise by: like EasyR1, mean 0 and std 1 are used (A = R / (1 + eps)).
    """
    mean_B, std_B, count_B = _group_stats(reward_B, group_ids_B)
    single_B = count_B == 1
    mean_B = torch.where(single_B, 0.0, mean_B)
    std_B = torch.where(single_B, 1.0, std_B)
    return ((reward_B.double() - mean_B) / (std_B + eps)).to(reward_B.dtype)


def dynamic_sampling_keep(
    accuracy_B: torch.Tensor, group_ids_B: torch.Tensor, low: float = 0.01, high: float = 0.99
) -> torch.Tensor:
    """Keep mask [B]: True for rollouts whose group's mean accuracy is strictly between `low` and `high`.

    All-correct and all-wrong groups have zero advantage everywhere and only dilute the batch (DAPO).
    """
    mean_B, _, _ = _group_stats(accuracy_B, group_ids_B)
    return (mean_B > low) & (mean_B < high)
