"""The conversion's inputs and output checked before any rank starts: a corrupt or mismatched file is one line
naming the file and the problem (exit code 2), never a traceback from deep inside a loader."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

HEADER_LIMIT = 100 * 2**20  # safetensors caps its JSON header at 100 MB


def check_safetensors(hf_dir: str | Path) -> None:
    """Every safetensors file the directory's index (or model.safetensors) names is there, has a readable header,
    and holds all the bytes its header describes."""
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as exc:
            raise ValueError(f"{index}: not a safetensors index ({type(exc).__name__}: {exc})") from None
        for name in files:
            if not (hf_dir / name).exists():
                raise FileNotFoundError(f"{index} lists {name}, which is missing from {hf_dir}")
    elif (hf_dir / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{hf_dir} has no model.safetensors or model.safetensors.index.json")
    for name in files:
        _check_safetensors_file(hf_dir / name)


def _check_safetensors_file(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes, no header); copy or export it again")
        (length,) = struct.unpack("<Q", head)
        if length > HEADER_LIMIT or 8 + length > size:
            raise ValueError(
                f"{path}: truncated or not a safetensors file (its header claims {length} bytes, the file has "
                f"{size}); copy or export it again"
            )
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise ValueError(f"{path}: unreadable safetensors header; copy or export it again") from None
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    need = 8 + length + max(ends, default=0)
    if size < need:
        raise ValueError(
            f"{path}: truncated safetensors file ({size} bytes, its header describes {need}); copy or export it again"
        )


EMBEDDING_KEY = re.compile(r"(^|\.)embedding\.word_embeddings\.weight$")


def check_hf_config_matches(ckpt_dir: str | Path, metadata, hf_config: dict, hf_files: str | Path) -> None:
    """The HF config an export writes describes the checkpoint's model: its embedding (vocabulary x hidden) as
    the checkpoint stores it."""
    text = hf_config.get("text_config", hf_config)
    for key, meta in metadata.state_dict_metadata.items():
        if EMBEDDING_KEY.search(key) and hasattr(meta, "size"):
            stored = tuple(meta.size)
            wanted = (text.get("vocab_size"), text.get("hidden_size"))
            if stored != wanted:
                raise ValueError(
                    f"{Path(hf_files) / 'config.json'} describes vocabulary x hidden {wanted[0]} x {wanted[1]}, "
                    f"the checkpoint {ckpt_dir} stores {stored[0]} x {stored[1]}: --hf-config is another model's; "
                    "give the HF directory the checkpoint was converted from (or leave --hf-config out)"
                )
            return


FLAGS = {
    "parallel.first_stage_layers": "--first-stage-layers",
    "parallel.last_stage_layers": "--last-stage-layers",
    "parallel.tp": "--tp",
    "parallel.pp": "--pp",
    "parallel.vpp": "--vpp",
}


def as_flags(message: str) -> str:
    """A layout error in the conversion's own words: its flags, not the trainer's config fields."""
    for field, flag in FLAGS.items():
        message = message.replace(field, flag)
    return message
