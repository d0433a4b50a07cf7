"""The VPPO objective on top of DAPO (docs/algorithm.md, "The base objective"):

    r_t  = exp(clamp(log pi(o_t) - log pi_old(o_t), -20, 20))
    pg_t = max(-A r_t, -A clip(r_t, 1 - eps_low, 1 + eps_high)),   and for A < 0: min(pg_t, -A C)   (dual clip)
    L    = (1 / N) sum_{i,t} [ m_it pg_it(alpha_i A_i) + lambda (-log pi(o_it)) ]

m_it is the TGF gradient mask (0/1 or soft weights), alpha_i A_i the TAS-shaped advantage, and N the number of
valid response tokens of the whole global mini-batch (all micro-batches, all data- and context-parallel ranks),
passed in so every rank divides by the same number: the PG term is ~k-scaled, not renormalised, exactly as the
reference. The entropy penalty covers all valid tokens, masked or not. No KL term, no reference model.

Metrics come back as (sum, count) pairs so that micro-batches and ranks combine exactly (`reduce_metrics`).

Legend: B rollouts, T response positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

LOG_RATIO_CLAMP = 20.0  # reference: keeps exp(log-ratio) finite


@dataclass
class LossOutput:
    loss: torch.Tensor
    """Scalar: this micro-batch's share of the global token-mean loss (already divided by N)."""
    metric_sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """name -> (sum, count) over this micro-batch, detached."""


def clipped_policy_gradient(
    ratio_BT: torch.Tensor, advantage_BT: torch.Tensor, clip_low: float, clip_high: float, clip_dual: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO loss with clip-higher and dual clip; returns (pg_BT, clipped_BT, dual_clipped_BT)."""
    unclipped_BT = -advantage_BT * ratio_BT
    clipped_BT = -advantage_BT * ratio_BT.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg_BT = torch.maximum(unclipped_BT, clipped_BT)
    dual_bound_BT = -advantage_BT * clip_dual
    dual_BT = (advantage_BT < 0) & (pg_BT > dual_bound_BT)
    pg_BT = torch.where(dual_BT, dual_bound_BT, pg_BT)
    return pg_BT, clipped_BT > unclipped_BT, dual_BT


def policy_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    advantage_B: torch.Tensor,
    response_mask_BT: torch.Tensor,
    gradient_mask_BT: torch.Tensor,
    *,
    num_global_tokens: int | torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    clip_dual: float = 3.0,
    entropy_coef: float = 0.06,
    dependency_BT: torch.Tensor | None = None,
) -> LossOutput:
    """L = (1/N) sum [m * pg(alpha A) + lambda * (-log pi)] over this micro-batch's valid tokens."""
    valid_BT = response_mask_BT.to(logp_BT.dtype)
    weight_BT = gradient_mask_BT.to(logp_BT.dtype) * valid_BT
    log_ratio_BT = (logp_BT - old_logp_BT).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    advantage_BT = advantage_B.to(logp_BT.dtype)  # per rollout [B], or already per token [B, T]
    advantage_BT = advantage_BT.unsqueeze(-1).expand_as(logp_BT) if advantage_BT.dim() == 1 else advantage_BT
    pg_BT, clipped_BT, dual_BT = clipped_policy_gradient(
        torch.exp(log_ratio_BT), advantage_BT, clip_low, clip_high, clip_dual
    )
    neg_logp_BT = -logp_BT
    loss = ((weight_BT * pg_BT).sum() + entropy_coef * (neg_logp_BT * valid_BT).sum()) / num_global_tokens

    with torch.no_grad():
        count = valid_BT.sum()
        selected = weight_BT.sum()
        sums = {
            "actor/pg_loss": ((weight_BT * pg_BT).sum(), count),
            "actor/pg_clipfrac": ((clipped_BT * valid_BT).sum(), count),
            "actor/pg_clipfrac_dual": ((dual_BT * valid_BT).sum(), count),
            "actor/ppo_kl": (((old_logp_BT - logp_BT) * valid_BT).sum(), count),  # unclamped, as the reference
            "actor/neg_logp": ((neg_logp_BT * valid_BT).sum(), count),
            "vppo/selected_fraction": (selected, count),
        }
        if dependency_BT is not None:
            dependency = dependency_BT.to(logp_BT.dtype)
            sums["vppo/dependency_selected"] = ((dependency * weight_BT).sum(), selected)
            sums["vppo/dependency_rejected"] = ((dependency * (valid_BT - weight_BT)).sum(), count - selected)
        sums = {k: (s.detach().double(), c.detach().double()) for k, (s, c) in sums.items()}
    return LossOutput(loss, sums)


def reduce_metrics(metric_sums: list[dict[str, tuple[torch.Tensor, torch.Tensor]]], group=None) -> dict[str, float]:
    """Sums (sum, count) pairs over micro-batches and, if `group` is given, over its ranks; returns sum / count.

    Every rank of `group` must pass the same metric names.
    """
    names = sorted({name for sums in metric_sums for name in sums})
    if not names:
        return {}
    device = next(iter(metric_sums[0].values()))[0].device  # NCCL groups need device tensors
    totals = torch.zeros(len(names), 2, dtype=torch.float64, device=device)
    for sums in metric_sums:
        for i, name in enumerate(names):
            if name in sums:
                totals[i, 0] += sums[name][0]
                totals[i, 1] += sums[name][1]
    if group is not None:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=group)
    return {name: (totals[i, 0] / totals[i, 1]).item() if totals[i, 1] > 0 else 0.0 for i, name in enumerate(names)}
