"""Hugging Face Qwen2.5-VL -> Megatron distributed checkpoint (torch_dist), loadable at any TP/PP/VPP split.

  python -m checkpoints_convert.hf_to_megatron --hf DIR --out DIR --tp N --pp M [--vpp V]
      [--first-stage-layers F --last-stage-layers L] [--verify]

Runs on tp * pp ranks: under torchrun as launched (multi-node: your torchrun line), or re-launched locally
under torchrun when started as a plain command. Each rank reads only the HF tensors of its own shard, one at a
time. The checkpoint appears at --out only when complete.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODULE = "checkpoints_convert.hf_to_megatron"


def parse_args(argv=None) -> argparse.Namespace:
    from checkpoints_convert.common import add_layout_args

    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hf", required=True, help="HF model directory (config, safetensors, processor)")
    parser.add_argument("--out", required=True, help="new (or empty) directory for the Megatron checkpoint")
    add_layout_args(parser)
    parser.add_argument("--verify", action="store_true", help="reload and compare every tensor and probe log-probs")
    return parser.parse_args(argv)


def precheck(args) -> tuple[str, dict]:
    """Everything that can be checked before starting ranks, so a bad input fails once, clearly."""
    from checkpoints_convert.common import hf_family, layout_of
    from checkpoints_convert.inputs import check_safetensors
    from vppo_megatron.actor.checkpoint import check_output_dir

    family, hf_config = hf_family(args.hf)
    check_safetensors(args.hf)
    check_output_dir(args.out)
    layout_of(args, hf_config, args.tp * args.pp)
    return family, hf_config


def convert(args, hf_config: dict) -> int:
    import torch.distributed as dist

    from checkpoints_convert import common
    from vppo_megatron.actor import checkpoint
    from vppo_megatron.actor.engine import MegatronActor

    dtype = common.dtype_of(hf_config)
    cfg, groups = common.setup(args, hf_config, dtype)
    start = time.perf_counter()
    actor = MegatronActor(cfg, groups, args.hf, training=False, progress=True)
    layout = checkpoint.layout_metadata(groups.layout)
    checkpoint.save(
        actor.chunks,
        args.out,
        args.hf,
        {"family": actor.hf_config.model_type, "written_at": layout, "dtype": dtype, "optimizer": False, "step": 0},
    )
    if dist.get_rank() == 0:
        split = " ".join(f"{k}={v}" for k, v in layout.items())
        elapsed, mib = time.perf_counter() - start, common.weight_bytes(args.hf) / 2**20
        print(f"wrote {args.out} at {split} ({dtype}) in {elapsed:.2f}s ({mib / elapsed:.0f} MiB/s)")
    ok = verify(args, cfg, groups, dtype) if args.verify else True
    return 0 if ok else 1


def verify(args, cfg, groups, dtype: str) -> bool:
    """Reloads the written checkpoint into a fresh model and compares it with the HF source."""
    from checkpoints_convert import common
    from vppo_megatron.actor import checkpoint
    from vppo_megatron.actor.engine import MegatronActor

    actor = MegatronActor(cfg, groups, args.hf, training=False, load_weights=False)
    checkpoint.load(actor.chunks, args.out)
    return common.verify(actor, args.hf, dtype)


def main(argv=None) -> int:
    from checkpoints_convert.common import run_cli

    return run_cli(MODULE, parse_args(argv), precheck, lambda args, family, hf_config: convert(args, hf_config))


if __name__ == "__main__":  # dist_checkpointing starts an mp.Manager: the guard is required
    sys.exit(main())
