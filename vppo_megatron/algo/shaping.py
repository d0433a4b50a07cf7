"""Trajectory-level Advantage Shaping (TAS), paper Eq. 5 and the reference code's exact form.

    u_i     = clamp((S_bar_i - lo) / (hi - lo), 0, 1)                 lo, hi = min, max of S_bar (valid rollouts)
    dynamic (reference):  alpha_i = beta_min + (1 - beta_min) * u_i / (mean(u) + 1e-8)
                          i.e. beta_max = beta_min + (1 - beta_min) / mean(u), so mean(alpha) = 1
    fixed   (Table 3):    alpha_i = beta_min + (beta_max - beta_min) * u_i
    A'_i = alpha_i * A_i;  if hi - lo <= 1e-6 every alpha is 1.

Scopes (`algorithm.tas_scope`) decide which rollouts lo, hi and mean(u) are taken over:
- segment: lo, hi over a window of the rank's mini-batch (`algorithm.tas_range_rollouts`; the reference's is its
  per-GPU mini-batch, 0 here = the rank's whole mini-batch), mean(u) per segment of consecutive rollouts (the
  reference's segment is its update micro-batch, 16 rollouts in the 7B script, 4 in the 8B one; the segment size
  bounds alpha <= beta_min + (1 - beta_min) * segment size). Here it is `algorithm.tas_segment`, independent of the
  memory micro-batch, so micro_batch_size=1 does not switch TAS off.
- global: lo, hi and mean(u) over the whole global mini-batch, all-reduced over the data-parallel `dp_group`:
  the result does not depend on the parallel layout.
- group: lo, hi and mean(u) within each prompt group (the caller keeps a group's rollouts on one rank).
Rollouts with no valid token get alpha = 1 and take no part in the statistics (they carry no loss).

Legend: B rollouts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from vppo_megatron.algo.advantage import grpo_advantages

RANGE_EPS = 1e-6  # reference: below this spread all trajectories are equally perceptive -> alpha = 1
MEAN_EPS = 1e-8  # reference: guards mean(u) = 0 (then every alpha is beta_min)


def _segment_reduce(values_B: torch.Tensor, segment_B: torch.Tensor, valid_B: torch.Tensor, reduce: str):
    """Per-rollout reduction of `values_B` over the valid rollouts of its segment (amin | amax | mean)."""
    _, index_B = torch.unique(segment_B, return_inverse=True)
    num_segments = int(index_B.max()) + 1
    fill = {"amin": float("inf"), "amax": float("-inf"), "mean": 0.0}[reduce]
    out = torch.full((num_segments,), fill, dtype=values_B.dtype)
    src = torch.where(valid_B, values_B, torch.full_like(values_B, fill))
    out = out.scatter_reduce(0, index_B, src, reduce=reduce, include_self=reduce != "mean")
    if reduce == "mean":  # scatter 'mean' would count invalid rollouts: divide by valid counts instead
        sums = torch.zeros(num_segments, dtype=values_B.dtype).index_add_(0, index_B, src)
        counts = torch.zeros(num_segments, dtype=values_B.dtype).index_add_(0, index_B, valid_B.to(values_B.dtype))
        out = sums / counts.clamp_min(1.0)
    return out[index_B]


def _global_stats(values_B: torch.Tensor, valid_B: torch.Tensor, dp_group) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) over the valid rollouts of every data-parallel rank."""
    lo = torch.where(valid_B, values_B, torch.inf).min().reshape(1).double()
    hi = torch.where(valid_B, values_B, -torch.inf).max().reshape(1).double()
    if dp_group is not None:
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=dp_group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=dp_group)
    return lo, hi


def _global_mean(u_B: torch.Tensor, valid_B: torch.Tensor, dp_group) -> torch.Tensor:
    sum_count = torch.stack([(u_B * valid_B).sum(), valid_B.sum().to(u_B.dtype)]).double()
    if dp_group is not None:
        dist.all_reduce(sum_count, op=dist.ReduceOp.SUM, group=dp_group)
    return sum_count[0] / sum_count[1].clamp_min(1.0)


def tas_scale(
    trajectory_dependency_B: torch.Tensor,
    valid_B: torch.Tensor,
    *,
    scope: str = "segment",
    tas_range: str = "dynamic",
    beta_min: float = 0.9,
    beta_max: float = 1.1,
    segment_ids_B: torch.Tensor | None = None,
    group_ids_B: torch.Tensor | None = None,
    range_ids_B: torch.Tensor | None = None,
    dp_group=None,
) -> torch.Tensor:
    """shaping_scale_B = alpha_i of TAS (see the module docstring for the formulas and scopes)."""
    s_B = trajectory_dependency_B.double()
    valid_B = valid_B.bool()
    if not valid_B.any() and scope != "global":
        return torch.ones_like(trajectory_dependency_B)
    if scope == "global":
        lo, hi = _global_stats(s_B, valid_B, dp_group)
        lo_B, hi_B = lo.expand_as(s_B), hi.expand_as(s_B)
    else:
        if scope == "group":
            stats_segment_B = group_ids_B
        else:  # segment: the range window each rollout is in (one window: the whole mini-batch)
            stats_segment_B = range_ids_B if range_ids_B is not None else torch.zeros_like(s_B, dtype=torch.long)
        if scope not in ("segment", "group") or stats_segment_B is None:
            raise ValueError(f"tas_scope={scope!r} needs group_ids_B (group) or is unknown; use segment|global|group")
        lo_B = _segment_reduce(s_B, stats_segment_B, valid_B, "amin")
        hi_B = _segment_reduce(s_B, stats_segment_B, valid_B, "amax")
    spread_B = hi_B - lo_B
    u_B = ((s_B - lo_B) / spread_B.clamp_min(RANGE_EPS)).clamp(0.0, 1.0)
    if tas_range == "fixed":
        alpha_B = beta_min + (beta_max - beta_min) * u_B
    else:
        if scope == "global":
            mean_u_B = _global_mean(u_B, valid_B, dp_group).expand_as(u_B)
        else:
            if scope == "segment" and segment_ids_B is None:
                raise ValueError("tas_scope=segment needs segment_ids_B (which TAS segment each rollout is in)")
            mean_segment_B = segment_ids_B if scope == "segment" else group_ids_B
            mean_u_B = _segment_reduce(u_B, mean_segment_B, valid_B, "mean")
        alpha_B = beta_min + (1.0 - beta_min) * u_B / (mean_u_B + MEAN_EPS)
    alpha_B = torch.where((spread_B > RANGE_EPS) & valid_B, alpha_B, 1.0)
    return alpha_B.to(trajectory_dependency_B.dtype)


def shaped_advantages(
    reward_B: torch.Tensor, group_ids_B: torch.Tensor, shaping_scale_B: torch.Tensor, target: str, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO advantages with TAS applied to the advantage (paper), to the reward (Table 6 ablation), or not at all.

    advantage: A'_i = alpha_i * A_i;  reward: A'_i = GRPO(alpha * R)_i;  none: A_i.
    """
    if target == "advantage":
        return shaping_scale_B * grpo_advantages(reward_B, group_ids_B, eps)
    if target == "reward":
        return grpo_advantages(shaping_scale_B * reward_B, group_ids_B, eps)
    if target == "none":
        return grpo_advantages(reward_B, group_ids_B, eps)
    raise ValueError(f"unknown trajectory_shaping {target!r}; use advantage, reward or none")
