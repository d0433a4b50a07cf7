"""Context-parallel and packed-sequence core attention for hosts without Transformer Engine (CPU tests of the CP
and THD paths).

megatron-core's local DotProductAttention refuses context parallelism; TE's attention implements it with ring
(p2p) communication on GPU. This module is a drop-in `core_attention` for the local layer spec that makes the
whole CP path real on CPU: each rank holds the zigzag chunks (r, 2cp-1-r) of every sequence; K and V are
all-gathered over the CP group (autograd-aware: the backward all-reduces the gradient and keeps the local
slice), put back into global order, and the local queries attend causally by *global* position.
Packed sequences (megatron-core's THD format, cp = 1): one row of several sequences bounded by cu_seqlens; each
query attends causally within its own sequence. It is used only where Transformer Engine is absent; on GPU the TE
spec's attention does CP and THD.

Legend: S_l local sequence length (S / cp), S global length, b batch, n query heads, g KV groups, d head dim.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule


class _AllGatherSeq(torch.autograd.Function):
    """all_gather along dim 0 over `group`; backward: all_reduce(SUM) then this rank's slice (gloo has no
    reduce_scatter)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        ctx.group, ctx.rank, ctx.length = group, dist.get_rank(group), local.shape[0]
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.length : (ctx.rank + 1) * ctx.length], None


def zigzag_positions(seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global positions held by `cp_rank`: chunks r and 2cp-1-r of 2cp equal chunks (load-balanced causal work)."""
    chunk = seq_len // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk)
    return torch.cat([first, second])


class ContextParallelAttention(MegatronModule):
    """Causal softmax attention over the CP-gathered sequence, or within each packed sequence (local spec only; no
    dropout)."""

    def __init__(
        self,
        config,
        layer_number,
        attn_mask_type,
        attention_type,
        attention_dropout=None,
        softmax_scale=None,
        cp_comm_type=None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        self.cp_group = cp_group or parallel_state.get_context_parallel_group()
        self.cp_size = dist.get_world_size(self.cp_group)
        self.cp_rank = dist.get_rank(self.cp_group)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(self.head_dim)

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        assert attention_bias is None, "attention bias needs Transformer Engine"
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        if self.cp_size == 1:  # padded rows (pack_sequences built this module): each row as one sequence
            return torch.stack([self._causal(query[:, b], key[:, b], value[:, b]) for b in range(query.shape[1])], 1)
        local_len = query.shape[0]
        seq_len = local_len * self.cp_size
        key_all = _AllGatherSeq.apply(key, self.cp_group)  # [S, b, g, d], rank-major chunk order
        value_all = _AllGatherSeq.apply(value, self.cp_group)
        held = torch.cat([zigzag_positions(seq_len, self.cp_size, r) for r in range(self.cp_size)])
        order = torch.argsort(held)  # rank-major -> global position order
        key_all, value_all = key_all[order], value_all[order]
        query_positions = zigzag_positions(seq_len, self.cp_size, self.cp_rank)
        future = torch.arange(seq_len)[None, :] > query_positions[:, None]  # [S_l, S]: causal by global position
        rows = [self._attend(query[:, b], key_all[:, b], value_all[:, b], future) for b in range(query.shape[1])]
        return torch.stack(rows, dim=1)  # [S_l, b, n * d]

    def _packed(self, query, key, value, packed_seq_params) -> torch.Tensor:
        """THD: query [T, n, d], key / value [T, g, d] of one packed row -> [T, n * d]. Each sequence attends to
        itself alone, as flash attention's varlen kernels do: the scores are [n, s_i, s_i] per sequence, never
        [n, T, T] (no more work or memory than the padded rows)."""
        assert self.cp_size == 1, "packed sequences are not split for context parallelism here"
        assert packed_seq_params.qkv_format == "thd", packed_seq_params.qkv_format
        bounds = packed_seq_params.cu_seqlens_q_padded
        bounds = (bounds if bounds is not None else packed_seq_params.cu_seqlens_q).tolist()
        total = query.shape[0]
        assert bounds[-1] == total, f"cu_seqlens end at {bounds[-1]}, the packed row has {total} tokens"
        parts = [self._causal(query[a:b], key[a:b], value[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        return torch.cat(parts)

    def _causal(self, query, key, value) -> torch.Tensor:
        """One sequence: query [s, n, d], key / value [s, g, d] -> causal attention output [s, n * d]."""
        future = torch.ones(len(query), len(query), dtype=torch.bool, device=query.device).triu(1)
        return self._attend(query, key, value, future)

    def _attend(self, query, key, value, hidden) -> torch.Tensor:
        """query [s_q, n, d] over key / value [s_k, g, d], `hidden` [s_q, s_k] masked out -> [s_q, n * d]."""
        repeat = query.shape[1] // key.shape[1]  # GQA: each KV group serves `repeat` query heads
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
        scores = torch.einsum("qnd,knd->nqk", query.float(), key.float()) * self.softmax_scale
        probs = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1).to(query.dtype)
        return torch.einsum("nqk,knd->qnd", probs, value).reshape(len(query), -1)
