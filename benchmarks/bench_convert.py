"""Conversion throughput, side by side in one run: HF -> Megatron (TP1 PP1, torch_dist) and Megatron -> HF,
against a plain safetensors load + save of the same bytes (the machine's I/O + serialisation limit).

  python benchmarks/bench_convert.py [--layers 8 --hidden 512] [--repeats 3]

Builds a larger tiny Qwen2.5-VL so the numbers are not dominated by start-up; times only the conversion work
inside already-started ranks (model build + read + fuse/shard + write).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def _convert(rank, world_size, hf_dir, work_dir, repeats):
    import shutil

    from vppo_megatron.actor import checkpoint
    from vppo_megatron.actor.engine import MegatronActor
    from vppo_megatron.config import load
    from vppo_megatron.parallel.layout import ParallelLayout, destroy, initialize

    cfg = load(None, ["model.dtype=float32"])
    groups = initialize(ParallelLayout(), seed=0)
    to_megatron, to_hf = [], []
    for i in range(repeats):
        out = Path(work_dir) / f"megatron{i}"
        start = time.perf_counter()
        actor = MegatronActor(cfg, groups, hf_dir, training=False)
        checkpoint.save(
            actor.chunks, out, hf_dir, {"family": actor.hf_config.model_type, "written_at": {}, "dtype": "float32"}
        )
        to_megatron.append(time.perf_counter() - start)
        start = time.perf_counter()
        fresh = MegatronActor(cfg, groups, hf_dir, training=False, load_weights=False)
        checkpoint.load(fresh.chunks, out)
        export = Path(work_dir) / f"hf{i}"
        export.mkdir()
        checkpoint.write_hf_shards(fresh.hf_tensors(), export, 0, 2**32)
        to_hf.append(time.perf_counter() - start)
        shutil.rmtree(out)
        shutil.rmtree(export)
    destroy()
    return statistics.median(to_megatron), statistics.median(to_hf)


def main() -> None:
    from safetensors.torch import load_file, save_file

    from vppo_megatron.testing import run_distributed
    from vppo_megatron.tiny_model import TinySpec, build_tiny_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        hf_dir = build_tiny_model(
            Path(work) / "model",
            TinySpec(
                num_layers=args.layers,
                hidden_size=args.hidden,
                intermediate_size=4 * args.hidden,
                num_heads=8,
                num_kv_heads=2,
            ),
        )
        megabytes = (hf_dir / "model.safetensors").stat().st_size / 2**20
        plain = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            save_file(load_file(hf_dir / "model.safetensors"), Path(work) / "copy.safetensors")
            plain.append(time.perf_counter() - start)
        ((to_megatron, to_hf),) = run_distributed(_convert, 1, str(hf_dir), work, args.repeats, timeout_s=3600)
    base = statistics.median(plain)
    print(f"model: {megabytes:.1f} MiB fp32 ({args.layers} layers, hidden {args.hidden})")
    print(f"  safetensors load+save  {megabytes / base:8.1f} MiB/s")
    print(f"  HF -> Megatron         {megabytes / to_megatron:8.1f} MiB/s  ({base / to_megatron:.2f}x of plain)")
    print(f"  Megatron -> HF         {megabytes / to_hf:8.1f} MiB/s  ({base / to_hf:.2f}x of plain)")


if __name__ == "__main__":
    main()
