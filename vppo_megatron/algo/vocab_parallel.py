"""Distribution statistics over a vocabulary that may be sharded across tensor-parallel ranks.

Every function takes the TP-local logit shard `logits_NV_tp` and the TP `group`; `group=None` means the shard is
the whole vocabulary (serial). Only [N]-sized partial results cross the group (max, sums), never [N, V]: a full
[tokens, vocab] gather at V = 152k would cost more memory than the model's activations.

These are forward-only (the experience pass runs under no_grad); torch.distributed.all_reduce is not
differentiable. Math in fp32 whatever the logits' dtype.

Legend: N flattened token positions, V_tp the local vocabulary shard (V when serial).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def log_normalizer(logits_NV_tp: torch.Tensor, group=None) -> torch.Tensor:
    """log sum_v exp(logit_v) over the full vocabulary, [N]. Max and sum all-reduced over `group`."""
    logits = logits_NV_tp.float()
    max_N = _all_reduce(logits.max(dim=-1).values, dist.ReduceOp.MAX, group)
    # one vocabulary-sized temporary, not two: exp in place on the shifted copy (autograd keeps exp's output)
    sum_N = _all_reduce((logits - max_N.unsqueeze(-1)).exp_().sum(dim=-1), dist.ReduceOp.SUM, group)
    return max_N + torch.log(sum_N)


def log_probs(logits_NV_tp: torch.Tensor, group=None) -> torch.Tensor:
    """Local shard of log softmax over the full vocabulary, [N, V_tp]."""
    return logits_NV_tp.float() - log_normalizer(logits_NV_tp, group).unsqueeze(-1)


def token_log_prob(logits_NV_tp: torch.Tensor, target_N: torch.Tensor, vocab_start: int = 0, group=None):
    """log pi(target) per position, [N]; `vocab_start` is the first vocabulary id of this rank's shard."""
    local_N = target_N - vocab_start
    in_shard_N = (local_N >= 0) & (local_N < logits_NV_tp.shape[-1])
    picked_N = logits_NV_tp.float().gather(-1, local_N.clamp(0, logits_NV_tp.shape[-1] - 1).unsqueeze(-1))[:, 0]
    picked_N = _all_reduce(torch.where(in_shard_N, picked_N, 0.0), dist.ReduceOp.SUM, group)
    return picked_N - log_normalizer(logits_NV_tp, group)


def entropy(logits_NV_tp: torch.Tensor, group=None) -> torch.Tensor:
    """H(pi) = -sum_v p_v log p_v per position, [N]."""
    logp_NV = log_probs(logits_NV_tp, group)
    partial_N = -(torch.exp(logp_NV) * logp_NV).sum(dim=-1)
    return _all_reduce(partial_N, dist.ReduceOp.SUM, group)


def kl_divergence(p_logits_NV_tp: torch.Tensor, q_logits_NV_tp: torch.Tensor, group=None) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) per position, [N]."""
    logp_NV, logq_NV = log_probs(p_logits_NV_tp, group), log_probs(q_logits_NV_tp, group)
    partial_N = (torch.exp(logp_NV) * (logp_NV - logq_NV)).sum(dim=-1)
    # Exact KL is >= 0; rounding can leave -1e-9 where p == q.
    return _all_reduce(partial_N, dist.ReduceOp.SUM, group).clamp_min(0.0)


def js_divergence(p_logits_NV_tp: torch.Tensor, q_logits_NV_tp: torch.Tensor, group=None) -> torch.Tensor:
    """JS(p, q) = 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q) / 2, per position, [N] (in nats, <= log 2)."""
    logp_NV, logq_NV = log_probs(p_logits_NV_tp, group), log_probs(q_logits_NV_tp, group)
    delta_NV = logq_NV - logp_NV
    # log(p/m) = -log_half_one_plus_exp(delta), log(q/m) = -log_half_one_plus_exp(-delta)
    partial_N = -0.5 * (
        torch.exp(logp_NV) * _log_half_one_plus_exp(delta_NV) + torch.exp(logq_NV) * _log_half_one_plus_exp(-delta_NV)
    ).sum(-1)
    return _all_reduce(partial_N, dist.ReduceOp.SUM, group).clamp_min(0.0)


def _log_half_one_plus_exp(d: torch.Tensor) -> torch.Tensor:
    """log((1 + e^d) / 2), overflow-free, and exactly 0 at d = 0 (so JS(p, p) is exactly 0)."""
    e = torch.exp(-d.abs())
    return torch.where(d > 0, d + torch.log((1 + e) / 2), torch.log((1 + e) / 2))
