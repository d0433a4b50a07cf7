"""Size-bounded weight buckets that never split a vLLM layer.

vLLM fuses some checkpoint tensors into one layer (q/k/v -> qkv_proj, gate/up -> gate_up_proj) and processes a
layer after loading; a bucket holding q but not k of a layer would leave that layer half-loaded. Buckets are
therefore built from whole units: a transformer block (`...layers.N.` or `...blocks.N.`, whatever the family's
prefix: `model.layers.N.` in Qwen2.5-VL, `model.language_model.layers.N.` in Qwen3-VL) or one module (the name
without its last component). A unit larger than the bound travels alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

_BLOCK = re.compile(r"^((?:[\w.]*\.)?(?:layers|blocks)\.\d+)\.")


def unit_of(name: str) -> str:
    match = _BLOCK.match(name)
    return match.group(1) if match else name.rsplit(".", 1)[0]


def buckets(tensors: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Groups (name, tensor) pairs, arriving unit by unit, into buckets of at most `max_bytes` (whole units)."""
    bucket, unit, unit_tensors, size = [], None, [], 0

    def unit_bytes(items):
        return sum(t.numel() * t.element_size() for _, t in items)

    for name, tensor in tensors:
        if unit is not None and unit_of(name) != unit:
            if bucket and size + unit_bytes(unit_tensors) > max_bytes:
                yield bucket
                bucket, size = [], 0
            bucket += unit_tensors
            size += unit_bytes(unit_tensors)
            unit_tensors = []
        unit = unit_of(name)
        unit_tensors.append((name, tensor))
    if unit_tensors:
        if bucket and size + unit_bytes(unit_tensors) > max_bytes:
            yield bucket
            bucket = []
        bucket += unit_tensors
    if bucket:
        yield bucket
