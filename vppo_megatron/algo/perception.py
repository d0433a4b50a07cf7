"""Token and trajectory visual dependency: how much the policy's prediction moves when the image is perturbed.

Paper Def. 3.1:  S(s_t, I) = KL( pi(. | s_t, I) || pi(. | s_t, I') ),  s_t = (question, image, o_<t),
with pi the current actor (= pi_old for this step) at temperature 1, I' the perturbed image (perturb.py).

Estimators (`algorithm.estimator`):
- k3 (reference code, default): from the sampled token's log-probs only,
      d_t = clamp(log pi'(o_t) - log pi(o_t), -20, 20),  s_t = clamp(exp(d_t) - d_t - 1, 0, 10)   (Schulman's k3)
- full_kl: the exact KL over the vocabulary (vocab-parallel: vocab_parallel.kl_divergence)
- js: Jensen-Shannon divergence (Table 12 ablation)
- prob_drop: pi(o_t | I) - pi(o_t | I'), the sampled token's probability drop (Table 12 ablation)

Trajectory dependency: S_bar(tau_i) = mean of s_t over the valid response tokens of rollout i.

Legend: B rollouts, T response positions, N flattened positions, V_tp local vocabulary shard.
"""

from __future__ import annotations

import torch

from vppo_megatron.algo import vocab_parallel

LOG_RATIO_CLAMP = 20.0  # reference clamp on log pi' - log pi: keeps exp() finite in fp32
K3_MAX = 10.0  # reference clamp on the per-token k3 value: one wild token cannot dominate S_bar
SAMPLED_TOKEN_ESTIMATORS = ("k3", "prob_drop")
FULL_DISTRIBUTION_ESTIMATORS = ("full_kl", "js")


def k3_dependency(old_logp_BT: torch.Tensor, aug_logp_BT: torch.Tensor) -> torch.Tensor:
    """s_t = clamp(exp(d_t) - d_t - 1, 0, 10), d_t = clamp(aug_logp_t - old_logp_t, -20, 20)."""
    d_BT = (aug_logp_BT - old_logp_BT).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (torch.exp(d_BT) - d_BT - 1.0).clamp(0.0, K3_MAX)


def prob_drop_dependency(old_logp_BT: torch.Tensor, aug_logp_BT: torch.Tensor) -> torch.Tensor:
    """s_t = pi(o_t | I) - pi(o_t | I'); negative where the perturbation makes the token more likely."""
    return torch.exp(old_logp_BT) - torch.exp(aug_logp_BT)


def token_dependency(
    estimator: str,
    *,
    old_logp_N: torch.Tensor | None = None,
    aug_logp_N: torch.Tensor | None = None,
    logits_NV_tp: torch.Tensor | None = None,
    aug_logits_NV_tp: torch.Tensor | None = None,
    tp_group=None,
) -> torch.Tensor:
    """Per-token dependency s_t for `estimator`; sampled-token estimators need the log-probs, the others the
    (TP-local) logits of both passes. Any leading shape works for the sampled-token estimators."""
    if estimator == "k3":
        return k3_dependency(old_logp_N, aug_logp_N)
    if estimator == "prob_drop":
        return prob_drop_dependency(old_logp_N, aug_logp_N)
    if estimator == "full_kl":
        return vocab_parallel.kl_divergence(logits_NV_tp, aug_logits_NV_tp, tp_group)
    if estimator == "js":
        return vocab_parallel.js_divergence(logits_NV_tp, aug_logits_NV_tp, tp_group)
    raise ValueError(f"unknown estimator {estimator!r}; use k3, full_kl, js or prob_drop")


def masked_mean(values_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Mean over the masked positions of each row, [B]; 0 for a row with no masked position."""
    mask = mask_BT.to(values_BT.dtype)
    return (values_BT * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


def trajectory_dependency(dependency_BT: torch.Tensor, response_mask_BT: torch.Tensor) -> torch.Tensor:
    """S_bar(tau_i) = (1 / L_i) sum_t s_t over the L_i valid response tokens, [B]; 0 for an empty response."""
    return masked_mean(dependency_BT, response_mask_BT)
