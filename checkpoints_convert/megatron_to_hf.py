"""Megatron checkpoint (converted or trained) -> Hugging Face safetensors + config + tokenizer/processor files,
loadable by transformers and vLLM as is. Optimizer state in training checkpoints is not read.

  python -m checkpoints_convert.megatron_to_hf --megatron DIR --out DIR [--tp N --pp M] [--hf-config DIR] [--verify]

--tp/--pp choose the layout the checkpoint is loaded at (any layout works; use the ranks you have). Each
pipeline stage writes its own safetensors shards, gathering one tensor at a time over TP, so memory is bounded by
--max-shard-mb, not by the model. The output appears at --out only when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODULE = "checkpoints_convert.megatron_to_hf"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--megatron", required=True, help="checkpoint directory written by this project")
    parser.add_argument("--out", required=True, help="new (or empty) directory for the HF model")
    parser.add_argument(
        "--hf-config",
        help="HF directory whose config/tokenizer/processor files to use (default: the copy inside the checkpoint)",
    )
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--max-shard-mb", type=int, default=4096, help="largest safetensors file written")
    parser.add_argument("--verify", action="store_true", help="compare every tensor and probe log-probs")
    return parser.parse_args(argv)


def precheck(args) -> tuple[dict, Path, dict]:
    from checkpoints_convert.common import hf_family
    from vppo_megatron.actor.checkpoint import HF_FILES, check_output_dir, read_metadata
    from vppo_megatron.parallel.layout import ParallelLayout

    meta = read_metadata(args.megatron)
    hf_files = Path(args.hf_config) if args.hf_config else Path(args.megatron) / HF_FILES
    _, hf_config = hf_family(hf_files)
    check_output_dir(args.out)
    text = hf_config["text_config"]
    ParallelLayout(tp=args.tp, pp=args.pp).validate(
        args.tp * args.pp,
        text["num_hidden_layers"],
        text["num_attention_heads"],
        text["num_key_value_heads"],
        text["vocab_size"],
    )
    return meta, hf_files, hf_config


def _write_stage(tensors, out_dir: Path, stage: int, max_bytes: int) -> dict[str, str]:
    """Writes (name, tensor) pairs into size-bounded safetensors files; returns name -> file name."""
    from safetensors.torch import save_file

    weight_map, pending, size, part = {}, {}, 0, 0

    def flush():
        nonlocal pending, size, part
        if pending:
            file_name = f"model-stage{stage:03d}-{part:05d}.safetensors"
            save_file(pending, str(out_dir / file_name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(pending, file_name))
            pending, size, part = {}, 0, part + 1

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if pending and size + nbytes > max_bytes:
            flush()
        pending[name] = tensor.contiguous()
        size += nbytes
    flush()
    return weight_map


def export(args, meta: dict, hf_files: Path, hf_config: dict) -> int:
    import torch.distributed as dist
    from tqdm import tqdm

    from checkpoints_convert import common
    from vppo_megatron.actor import checkpoint
    from vppo_megatron.actor.engine import MegatronActor

    dtype = meta.get("dtype", common.dtype_of(hf_config))
    cfg, groups = common.setup(args.tp, args.pp, hf_config, dtype)
    start = time.perf_counter()
    actor = MegatronActor(cfg, groups, str(hf_files), training=False, load_weights=False)
    checkpoint.load(actor.chunks, args.megatron)
    tmp = checkpoint.atomic_directory(args.out)
    writer = groups.tp_rank == 0 and groups.dp_rank == 0 and groups.cp_rank == 0
    tensors = actor.hf_tensors()  # a TP collective: every rank walks it
    if writer:
        tensors = tqdm(tensors, desc=f"stage {groups.pp_rank} export", disable=dist.get_rank() != 0)
        weight_map = _write_stage(tensors, tmp, groups.pp_rank, args.max_shard_mb * 2**20)
    else:
        weight_map = {}
        for _ in tensors:
            pass
    maps = [None] * dist.get_world_size()
    dist.all_gather_object(maps, weight_map)
    if dist.get_rank() == 0:
        merged = {k: v for m in maps for k, v in m.items()}
        total = sum((tmp / f).stat().st_size for f in set(merged.values()))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(merged.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        checkpoint.copy_hf_files(hf_files, tmp)
        elapsed = time.perf_counter() - start
        print(f"wrote {len(merged)} tensors ({total / 2**20:.1f} MiB) to {args.out} in {elapsed:.1f}s")
    checkpoint.publish(tmp, args.out)
    return 0 if not args.verify or common.verify(actor, args.out, dtype) else 1


def main(argv=None) -> int:
    from checkpoints_convert.common import run_cli

    return run_cli(MODULE, parse_args(argv), precheck, export)


if __name__ == "__main__":  # dist_checkpointing may start an mp.Manager: the guard is required
    sys.exit(main())
