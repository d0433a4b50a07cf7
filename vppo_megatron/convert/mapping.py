"""The machinery behind every HF <-> Megatron weight mapping: rules, fusions and tensor-parallel sharding.

A model family is a small table of `Rule`s (vppo_megatron/families: one module per family). A rule names one
Megatron parameter (with `{i}` standing for the global layer index), the HF checkpoint tensors it is made of, how
they fuse, and which dimension tensor parallelism splits. Conversion, the actor's weight loading and weight sync
all go through `expand_rules`, so there is exactly one name table per family, and any name that no rule covers is
an error.

"Full" Megatron tensors are the TP=1 layout; `shard`/`unshard` move between it and one TP rank's slice.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from vppo_megatron.families import Rule


@dataclass(frozen=True)
class AttentionDims:
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class ExpandedRule:
    megatron: str
    hf: tuple[str, ...]
    rule: Rule


def expand_rules(rules: list[Rule], num_layers: int) -> list[ExpandedRule]:
    """One entry per concrete parameter: layer rules repeated for layers 0..num_layers-1."""
    out = []
    for rule in rules:
        layers = range(num_layers) if "{i}" in rule.megatron else [None]
        for i in layers:
            fmt = {} if i is None else {"i": i}
            out.append(ExpandedRule(rule.megatron.format(**fmt), tuple(h.format(**fmt) for h in rule.hf), rule))
    return out


def fuse(rule: Rule, hf_tensors: list[torch.Tensor], dims: AttentionDims) -> torch.Tensor:
    """HF tensors -> the full (TP=1) Megatron tensor."""
    if rule.kind == "copy":
        (tensor,) = hf_tensors
        return tensor
    if rule.kind == "gate_up":
        return torch.cat(hf_tensors, dim=0)
    if rule.kind == "qkv":
        q, k, v = hf_tensors
        groups, per_group = dims.num_kv_heads, dims.num_heads // dims.num_kv_heads
        tail = q.shape[1:]
        # Megatron orders rows per KV group g: [the q heads of g, k_g, v_g] (get_query_key_value_tensors)
        fused = torch.cat(
            [
                q.reshape(groups, per_group * dims.head_dim, *tail),
                k.reshape(groups, dims.head_dim, *tail),
                v.reshape(groups, dims.head_dim, *tail),
            ],
            dim=1,
        )
        return fused.reshape(-1, *tail)
    raise AssertionError(f"unknown rule kind {rule.kind}")


def split(rule: Rule, full: torch.Tensor, dims: AttentionDims) -> list[torch.Tensor]:
    """The full Megatron tensor -> HF tensors (inverse of `fuse`)."""
    if rule.kind == "copy":
        return [full]
    if rule.kind == "gate_up":
        return list(full.chunk(2, dim=0))
    if rule.kind == "qkv":
        groups, per_group = dims.num_kv_heads, dims.num_heads // dims.num_kv_heads
        tail = full.shape[1:]
        grouped = full.reshape(groups, (per_group + 2) * dims.head_dim, *tail)
        q, k, v = grouped.split([per_group * dims.head_dim, dims.head_dim, dims.head_dim], dim=1)
        return [q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)]
    raise AssertionError(f"unknown rule kind {rule.kind}")


def shard(rule: Rule, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's slice of a full Megatron tensor."""
    if rule.tp_dim is None or tp_size == 1:
        return full
    _check_split(rule, full, tp_size)
    if rule.kind == "gate_up":  # each rank holds [gate_r; up_r]
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], dim=0)
    return full.chunk(tp_size, dim=rule.tp_dim)[tp_rank].contiguous()


def load_shard(rule: Rule, hf_tensors: list[torch.Tensor], dims: AttentionDims, out: torch.Tensor, tp_rank: int,
               tp_size: int) -> None:  # fmt: skip
    """Writes this TP rank's slice of the fused HF tensors straight into `out` (the parameter): what
    `shard(fuse(...))` gives, without materialising the full or the fused tensor (each HF tensor, often a view of
    the memory-mapped file, is read once into its place; a dtype difference is converted by the copy)."""
    if rule.kind == "qkv" and dims.num_kv_heads % tp_size:
        raise ValueError(f"{rule.megatron}: {dims.num_kv_heads} KV heads do not split into {tp_size} TP ranks")
    parts = [t if rule.tp_dim is None or tp_size == 1 else _rank_slice(rule, t, tp_rank, tp_size) for t in hf_tensors]
    expected = (sum(p.shape[0] for p in parts), *parts[0].shape[1:]) if rule.kind != "copy" else parts[0].shape
    if tuple(expected) != tuple(out.shape):
        raise ValueError(
            f"{rule.megatron}: checkpoint gives shape {tuple(expected)} for TP rank {tp_rank}, the model has "
            f"{tuple(out.shape)}"
        )
    if rule.kind == "copy":
        out.copy_(parts[0])
    elif rule.kind == "gate_up":  # each rank holds [gate_r; up_r]
        gate, up = parts
        out[: gate.shape[0]].copy_(gate)
        out[gate.shape[0] :].copy_(up)
    elif rule.kind == "qkv":  # rows per KV group: [the group's q heads, k, v]; a rank holds whole groups
        q, k, v = parts
        per_group, tail = dims.num_heads // dims.num_kv_heads, q.shape[1:]
        grouped = out.view(k.shape[0] // dims.head_dim, (per_group + 2) * dims.head_dim, *tail)
        width = per_group * dims.head_dim
        grouped[:, :width].copy_(q.reshape(grouped.shape[0], width, *tail))
        grouped[:, width : width + dims.head_dim].copy_(k.reshape(grouped.shape[0], dims.head_dim, *tail))
        grouped[:, width + dims.head_dim :].copy_(v.reshape(grouped.shape[0], dims.head_dim, *tail))
    else:
        raise AssertionError(f"unknown rule kind {rule.kind}")


def _rank_slice(rule: Rule, hf_tensor: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """TP rank's slice of one HF tensor of a rule (q, k and v split by whole KV groups, gate and up each in
    tp_size parts): a view, no copy."""
    _check_split(rule, hf_tensor, tp_size)
    return hf_tensor.chunk(tp_size, dim=rule.tp_dim)[tp_rank]


def _check_split(rule: Rule, tensor: torch.Tensor, tp_size: int) -> None:
    if tensor.shape[rule.tp_dim] % tp_size:
        raise ValueError(
            f"{rule.megatron}: dimension {rule.tp_dim} of size {tensor.shape[rule.tp_dim]} "
            f"does not split into {tp_size} tensor-parallel shards"
        )


def unshard(rule: Rule, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full Megatron tensor from every TP rank's slice, in rank order."""
    if rule.tp_dim is None or len(shards) == 1:
        return shards[0]
    if rule.kind == "gate_up":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=rule.tp_dim)


def hf_to_megatron(
    hf_state: Mapping[str, torch.Tensor], rules: list[ExpandedRule], dims: AttentionDims
) -> dict[str, torch.Tensor]:
    """Full Megatron state from an HF checkpoint state; raises listing every missing or unmapped HF name."""
    needed = {name for r in rules for name in r.hf}
    missing = sorted(needed - set(hf_state))
    unmapped = sorted(set(hf_state) - needed)
    if missing or unmapped:
        raise KeyError(_name_report("HF checkpoint", missing, unmapped))
    return {r.megatron: fuse(r.rule, [hf_state[n] for n in r.hf], dims) for r in rules}


def megatron_to_hf(
    megatron_state: Mapping[str, torch.Tensor], rules: list[ExpandedRule], dims: AttentionDims
) -> dict[str, torch.Tensor]:
    """HF checkpoint state from a full Megatron state; raises listing every missing or unmapped Megatron name."""
    needed = {r.megatron for r in rules}
    missing = sorted(needed - set(megatron_state))
    unmapped = sorted(set(megatron_state) - needed)
    if missing or unmapped:
        raise KeyError(_name_report("Megatron state", missing, unmapped))
    out = {}
    for r in rules:
        out.update(zip(r.hf, split(r.rule, megatron_state[r.megatron], dims)))
    return out


def _name_report(what: str, missing: list[str], unmapped: list[str]) -> str:
    def short(names: list[str]) -> str:
        # collapse layer indices so a 64-layer model lists each kind of name once
        collapsed = sorted({re.sub(r"\.\d+\.", ".N.", n) for n in names})
        return ", ".join(collapsed[:20]) + (" ..." if len(collapsed) > 20 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} expected names missing: {short(missing)}")
    if unmapped:
        parts.append(f"{len(unmapped)} names no rule maps: {short(unmapped)}")
    return (
        f"{what} does not match the model family's mapping: "
        + "; ".join(parts)
        + " (wrong model family, or an incomplete checkpoint?)"
    )
