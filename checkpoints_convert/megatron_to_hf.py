"""Megatron checkpoint (converted or trained) -> Hugging Face safetensors + config + tokenizer/processor files,
loadable by transformers and vLLM as is. Optimizer state in training checkpoints is not read.

  python -m checkpoints_convert.megatron_to_hf --megatron DIR --out DIR [--tp N --pp M --vpp V] [--hf-config DIR]
      [--first-stage-layers F --last-stage-layers L] [--verify]

--tp/--pp/--vpp and the stage layers choose the layout the checkpoint is loaded at (any layout works, whatever
the checkpoint was written at; use the ranks you have). Each pipeline stage writes its own safetensors shards,
gathering one tensor at a time over TP, so memory is bounded by --max-shard-mb, not by the model. The output
appears at --out only when complete.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODULE = "checkpoints_convert.megatron_to_hf"


def parse_args(argv=None) -> argparse.Namespace:
    from checkpoints_convert.common import add_layout_args

    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--megatron", required=True, help="checkpoint directory written by this project")
    parser.add_argument("--out", required=True, help="new (or empty) directory for the HF model")
    parser.add_argument(
        "--hf-config",
        help="HF directory whose config/tokenizer/processor files to use (default: the copy inside the checkpoint)",
    )
    add_layout_args(parser)
    parser.add_argument("--max-shard-mb", type=int, default=4096, help="largest safetensors file written")
    parser.add_argument("--verify", action="store_true", help="compare every tensor and probe log-probs")
    return parser.parse_args(argv)


def precheck(args) -> tuple[dict, Path, dict]:
    from checkpoints_convert.common import hf_family, layout_of
    from checkpoints_convert.inputs import check_hf_config_matches
    from vppo_megatron.actor.checkpoint import HF_FILES, check_output_dir, read_metadata
    from vppo_megatron.actor.integrity import check_distcp, dcp_metadata

    meta = read_metadata(args.megatron)
    stored = dcp_metadata(args.megatron)  # torch.distributed.checkpoint's .metadata, read once
    check_distcp(args.megatron, stored)
    hf_files = Path(args.hf_config) if args.hf_config else Path(args.megatron) / HF_FILES
    _, hf_config = hf_family(hf_files)
    check_hf_config_matches(args.megatron, stored, hf_config, hf_files)
    check_output_dir(args.out)
    layout_of(args, hf_config, args.tp * args.pp)
    return meta, hf_files, hf_config


def export(args, meta: dict, hf_files: Path, hf_config: dict) -> int:
    import torch.distributed as dist

    from checkpoints_convert import common
    from vppo_megatron.actor import checkpoint
    from vppo_megatron.actor.engine import MegatronActor

    dtype = meta.get("dtype", common.dtype_of(hf_config))
    cfg, groups = common.setup(args, hf_config, dtype)
    start = time.perf_counter()
    actor = MegatronActor(cfg, groups, str(hf_files), training=False, load_weights=False)
    checkpoint.load(actor.chunks, args.megatron)
    total = checkpoint.export_hf(actor, args.out, hf_files, args.max_shard_mb * 2**20, progress=True)
    if dist.get_rank() == 0:
        elapsed = time.perf_counter() - start
        print(f"wrote {total / 2**20:.1f} MiB to {args.out} in {elapsed:.2f}s ({total / 2**20 / elapsed:.0f} MiB/s)")
    return 0 if not args.verify or common.verify(actor, args.out, dtype) else 1


def main(argv=None) -> int:
    from checkpoints_convert.common import run_cli

    return run_cli(MODULE, parse_args(argv), precheck, export)


if __name__ == "__main__":  # dist_checkpointing may start an mp.Manager: the guard is required
    sys.exit(main())
