"""Token-level Gradient Filtering (TGF), paper Eq. 6 and App. I.

Hard mask (default): per response keep the top ceil(k * L_i) tokens by score (L_i valid tokens, k =
`token_fraction`); a non-empty response keeps >= 1 token. The reference computes k * L_i as a float32 product, so
for some (k, L) it keeps one token more than the exact rule (k = 0.3, L = 50: float32(0.3) * 50 rounds to
15.000001, ceil 16; exactly 15): `count="reference"` (default) reproduces that, `count="exact"` is the exact
rule. Padding is never selected; equal scores keep the earlier position (stable sort). One `select_top_tokens`
serves every selection signal: dependency (VPPO), random or entropy scores (ablations, Table 4).

Soft mask (App. I): z-score the scores within each trajectory, w_t = sigmoid(z_t - c_i) with c_i chosen so the
mean weight over the valid tokens is k.

The mask depends only on stored old/perturbed log-probs, so it is fixed for the whole rollout step.

Legend: B rollouts, T response positions.
"""

from __future__ import annotations

import torch

CEIL_SLACK = 1e-6  # ceil(k * L) in floats: 0.7 * 10 = 7.000000000000001 must keep 7 tokens, not 8
SOFT_MASK_ITERATIONS = 60  # bisection steps for c: the bracket [-50, 50] shrinks below 1e-16
SOFT_MASK_BRACKET = 50.0
STD_EPS = 1e-6  # z-score of a trajectory whose scores are all equal: every z is 0


def num_selected(response_mask_BT: torch.Tensor, fraction: float, count: str = "reference") -> torch.Tensor:
    """k_i = ceil(fraction * L_i), at least 1 for a non-empty response, [B]; `count` as in the module docstring."""
    length_B = response_mask_BT.sum(-1)
    if count == "reference":
        k_B = torch.ceil(length_B.float() * torch.tensor(fraction, dtype=torch.float32)).long().clamp_min(1)
    elif count == "exact":
        k_B = torch.ceil(length_B.double() * fraction - CEIL_SLACK).long().clamp_min(1)
    else:
        raise ValueError(f"unknown token_count {count!r}; use reference or exact")
    return torch.where(length_B > 0, k_B.clamp_max(length_B), 0)


def select_top_tokens(
    score_BT: torch.Tensor, response_mask_BT: torch.Tensor, fraction: float, count: str = "reference"
) -> torch.Tensor:
    """gradient_mask_BT: True on the top ceil(fraction * L_i) valid tokens of each row by score."""
    valid_BT = response_mask_BT.bool()
    masked_BT = torch.where(valid_BT, score_BT.double(), -torch.inf)
    order_BT = torch.sort(masked_BT, dim=-1, descending=True, stable=True).indices
    rank_BT = torch.empty_like(order_BT).scatter_(-1, order_BT, torch.arange(score_BT.shape[-1]).expand_as(order_BT))
    return (rank_BT < num_selected(valid_BT, fraction, count).unsqueeze(-1)) & valid_BT


def random_scores(response_mask_BT: torch.Tensor, seed: int) -> torch.Tensor:
    """Uniform random scores (seeded): select_top_tokens on them is the random-k% ablation."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(response_mask_BT.shape, generator=generator, dtype=torch.float64)


def soft_token_weights(score_BT: torch.Tensor, response_mask_BT: torch.Tensor, fraction: float) -> torch.Tensor:
    """w_t = sigmoid(z_t - c_i), z the within-trajectory z-score, c_i such that mean_t w_t = fraction (App. I)."""
    valid_BT = response_mask_BT.bool()
    mask = valid_BT.double()
    count_B = mask.sum(-1, keepdim=True).clamp_min(1.0)
    score = score_BT.double() * mask
    mean_B = score.sum(-1, keepdim=True) / count_B
    var_B = (((score_BT.double() - mean_B) * mask) ** 2).sum(-1, keepdim=True) / count_B
    z_BT = (score_BT.double() - mean_B) / (var_B.sqrt() + STD_EPS)
    lo_B = torch.full_like(mean_B, -SOFT_MASK_BRACKET)
    hi_B = torch.full_like(mean_B, SOFT_MASK_BRACKET)
    for _ in range(SOFT_MASK_ITERATIONS):  # the mean weight decreases monotonically in c
        c_B = (lo_B + hi_B) / 2
        too_heavy_B = (torch.sigmoid(z_BT - c_B) * mask).sum(-1, keepdim=True) / count_B > fraction
        lo_B, hi_B = torch.where(too_heavy_B, c_B, lo_B), torch.where(too_heavy_B, hi_B, c_B)
    weights_BT = torch.sigmoid(z_BT - (lo_B + hi_B) / 2) * mask
    return weights_BT.to(score_BT.dtype if score_BT.is_floating_point() else torch.float32)


def gradient_mask(
    score_BT: torch.Tensor,
    response_mask_BT: torch.Tensor,
    fraction: float,
    kind: str = "hard",
    count: str = "reference",
) -> torch.Tensor:
    """The per-token gradient weights: hard top-k (0/1) or soft sigmoid weights, float [B, T]."""
    if kind == "hard":
        return select_top_tokens(score_BT, response_mask_BT, fraction, count).float()
    if kind == "soft":
        return soft_token_weights(score_BT, response_mask_BT, fraction).float()
    raise ValueError(f"unknown token_mask {kind!r}; use hard or soft")
