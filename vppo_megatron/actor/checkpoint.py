"""Megatron distributed checkpoints (torch_dist) of the actor: layout-independent, written atomically.

A checkpoint directory holds megatron-core's sharded tensors (each with its global shape and offset, so any TP/PP
layout can load it), `vppo_checkpoint.json` (format, model family, the layout it was written at, whether
optimizer state is included) and `hf/` (the HF config, tokenizer and processor files, so an export needs nothing
else). Everything is written into a hidden temporary directory that is renamed into place after the metadata,
the last file, is complete: an interrupted save never leaves a directory that loads.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch.distributed as dist

FORMAT = "vppo-megatron/v1"
METADATA = "vppo_checkpoint.json"
HF_FILES = "hf"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".index.json")


def read_metadata(ckpt_dir: str | Path) -> dict:
    """The checkpoint's metadata; a clear error for a directory that is not a complete checkpoint of ours."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} does not exist")
    path = ckpt_dir / METADATA
    if not path.exists():
        raise ValueError(
            f"{ckpt_dir} is not a complete vppo-megatron checkpoint ({METADATA} missing): an "
            "interrupted save, or a directory of another format"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{ckpt_dir}: checkpoint format {meta.get('format')!r}, this code reads {FORMAT!r}")
    if not (ckpt_dir / "metadata.json").exists() or not (ckpt_dir / HF_FILES / "config.json").exists():
        raise ValueError(f"{ckpt_dir} is incomplete: megatron metadata.json or {HF_FILES}/config.json missing")
    return meta


def copy_hf_files(hf_dir: str | Path, out_dir: str | Path) -> None:
    """Config, tokenizer, processor and chat-template files of an HF model directory (no weights)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in Path(hf_dir).iterdir():
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(path, out_dir / path.name)


def check_output_dir(out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"output directory {out_dir} is not empty; choose a new path or remove it")


def atomic_directory(out_dir: str | Path) -> Path:
    """A hidden temporary directory next to `out_dir`, the same on every rank (collective)."""
    out_dir = Path(out_dir)
    name = [f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}" if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(name, src=0)
    tmp = out_dir.parent / name[0]
    if dist.get_rank() == 0:
        tmp.mkdir(parents=True)
    dist.barrier()
    return tmp


def publish(tmp: Path, out_dir: str | Path) -> None:
    """Renames the finished temporary directory to `out_dir` (rank 0, after every rank is done)."""
    dist.barrier()
    if dist.get_rank() == 0:
        out_dir = Path(out_dir)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked before writing)
        os.replace(tmp, out_dir)
    dist.barrier()


# The local spec keeps the two RMSNorms as modules; Transformer Engine fuses them into the next linear layer.
# Checkpoints always use TE's names, so a checkpoint converted on a CPU host trains on a GPU cluster and back.
_NORM_KEYS = [
    (".input_layernorm.weight", ".self_attention.linear_qkv.layer_norm_weight"),
    (".pre_mlp_layernorm.weight", ".mlp.linear_fc1.layer_norm_weight"),
]


def canonical_sharded_state_dict(model) -> dict:
    """The model's sharded state dict with spec-independent (Transformer Engine) tensor keys."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    state = model.sharded_state_dict()
    for value in state.values():
        if isinstance(value, ShardedBase):
            for local, te in _NORM_KEYS:
                if value.key.endswith(local):
                    value.key = value.key[: -len(local)] + te
    return state


def save(model_chunks, out_dir: str | Path, hf_dir: str | Path, metadata: dict, extra_state: dict | None = None):
    """Writes the model's sharded state (plus `extra_state`, e.g. optimizer) to `out_dir` atomically."""
    from megatron.core import dist_checkpointing

    check_output_dir(out_dir)
    tmp = atomic_directory(out_dir)
    state = {"model": canonical_sharded_state_dict(model_chunks[0])}
    state.update(extra_state or {})
    dist_checkpointing.save(state, str(tmp))
    if dist.get_rank() == 0:
        copy_hf_files(hf_dir, tmp / HF_FILES)
        (tmp / METADATA).write_text(json.dumps({"format": FORMAT, **metadata}, indent=2) + "\n")
    publish(tmp, out_dir)


def load(model_chunks, ckpt_dir: str | Path) -> dict:
    """Loads the model weights (at this rank's layout; optimizer state, if any, is left alone)."""
    from megatron.core import dist_checkpointing

    meta = read_metadata(ckpt_dir)
    loaded = dist_checkpointing.load({"model": canonical_sharded_state_dict(model_chunks[0])}, str(ckpt_dir))
    missing, unexpected = model_chunks[0].load_state_dict(loaded["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise KeyError(
            f"{ckpt_dir}: checkpoint does not fit the model: missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    return meta
