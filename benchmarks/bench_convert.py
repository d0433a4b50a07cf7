"""Conversion throughput, side by side in one run: the converters as users run them (HF -> Megatron torch_dist,
Megatron -> HF safetensors), against a plain safetensors load + save of the same model file (the machine's
I/O + serialisation limit).

  python benchmarks/bench_convert.py [--layers 12 --hidden 2048] [--repeats 3] [--dtype bfloat16]

The model is a tiny-architecture Qwen2.5-VL made large (default: 12 layers of hidden 2048, 1.4 GiB in bf16) so
the numbers are not dominated by process start-up. Each converter prints the time of its work (model build, read,
fuse/shard, write); the benchmark times the whole command too and reports the difference, the start-up (Python,
imports, torch.distributed), separately. Each number is the median of --repeats runs. Beside them, the floor
of the torch_dist format itself on this machine (FLOOR below): what a converter would take if reading, building
and fusing cost nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HF_TO_MEGATRON, MEGATRON_TO_HF = "checkpoints_convert.hf_to_megatron", "checkpoints_convert.megatron_to_hf"
WORK_TIME = re.compile(r" in ([0-9.]+)s")


def build_model(out: Path, layers: int, hidden: int, dtype: str) -> Path:
    """A tiny-architecture model of the given size, its weights stored in `dtype` (as releases are: bf16)."""
    import torch
    from safetensors.torch import load_file, save_file

    from vppo_megatron.tiny_model import TinySpec, build_tiny_model

    spec = TinySpec(num_layers=layers, hidden_size=hidden, intermediate_size=4 * hidden, num_heads=16, num_kv_heads=4)
    model_dir = build_tiny_model(out, spec)
    if dtype != "float32":
        weights = model_dir / "model.safetensors"
        tensors = {k: v.to(getattr(torch, dtype)) for k, v in load_file(weights).items()}
        save_file(tensors, weights, metadata={"format": "pt"})
        config = json.loads((model_dir / "config.json").read_text())
        for section in (config, config.get("text_config", {}), config.get("vision_config", {})):
            for key in ("dtype", "torch_dtype"):
                if key in section:
                    section[key] = dtype
        config.setdefault("torch_dtype", dtype)
        (model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return model_dir


PLAIN = """
import sys, time
from safetensors.torch import load_file, save_file
start = time.perf_counter()
save_file(load_file(sys.argv[1]), sys.argv[2], metadata={"format": "pt"})
print(f"copied in {time.perf_counter() - start:.3f}s")
"""


# The floor of megatron-core's torch_dist format on this machine: its writer serialises every tensor with
# torch.save into the shard file and its reader torch.load's every item back (megatron-core 0.19 fixes
# SerializationFormat.TORCH_SAVE), which no converter can beat. Timed here on tensors already in memory (owned
# copies, as a model's parameters are), so neither reading the HF file nor building a model is counted.
FLOOR = """
import os, sys, time, torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.utils import _create_file_view
tensors = {k: v.clone() for k, v in load_file(sys.argv[1]).items()}
start = time.perf_counter()
offsets = []
with open(sys.argv[2], "wb") as f:
    for value in tensors.values():
        offset = f.tell()
        torch.save(value, f)
        offsets.append((offset, f.tell() - offset))
written = time.perf_counter()
keys = list(tensors)
del tensors  # the reader builds its own tensors, as the converter's load does
os.sync()  # the file reaches the disk first, as a checkpoint converted earlier has (not timed)
synced = time.perf_counter()
with open(sys.argv[2], "rb") as f:  # each item through a view of the file, as torch's FileSystemReader reads it
    loaded = [torch.load(_create_file_view(f, o, n), map_location="cpu", weights_only=True) for o, n in offsets]
print(f"torch.save per item in {written - start:.3f}s")
print(f"torch.load per item in {time.perf_counter() - synced:.3f}s")
"""
FLOOR_TIMES = re.compile(r"torch\.(?:save|load) per item in ([0-9.]+)s")


def run_timed(command: list[str]) -> tuple[float, float]:
    """(whole command, the work it reports as "... in Xs") in seconds: a fresh process for every measurement,
    so each pays the same start-up and the same first touches of its memory."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{command[:3]} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    found = WORK_TIME.findall(done.stdout)
    if not found:
        raise SystemExit(f"{command[:3]} printed no work time:\n{done.stdout[-2000:]}")
    return wall, float(found[-1])


def main() -> None:
    import shutil

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-dir", help="where the model and outputs go (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        work = Path(work)
        model_dir = build_model(work / "model", args.layers, args.hidden, args.dtype)
        weights = model_dir / "model.safetensors"
        mib = weights.stat().st_size / 2**20
        plain, to_megatron, to_hf, floor_write, floor_read = [], [], [], [], []
        for i in range(args.repeats):  # interleaved, so a slow spell of the machine hits every column alike
            plain.append(run_timed([sys.executable, "-c", PLAIN, str(weights), str(work / "copy.safetensors")]))
            (work / "copy.safetensors").unlink()
            items = work / "items.bin"
            command = [sys.executable, "-c", FLOOR, str(weights), str(items)]
            done = subprocess.run(command, capture_output=True, text=True, timeout=3600, check=True)
            write, read = map(float, FLOOR_TIMES.findall(done.stdout))
            floor_write.append(write)
            floor_read.append(read)
            items.unlink()
            megatron, hf = work / f"megatron{i}", work / f"hf{i}"
            to_megatron.append(
                run_timed([sys.executable, "-m", HF_TO_MEGATRON, "--hf", str(model_dir), "--out", str(megatron)])
            )
            to_hf.append(
                run_timed([sys.executable, "-m", MEGATRON_TO_HF, "--megatron", str(megatron), "--out", str(hf)])
            )
            shutil.rmtree(megatron)
            shutil.rmtree(hf)
    base = statistics.median(w for _, w in plain)
    # HF -> Megatron: the format's write; Megatron -> HF: its read, then a safetensors save (the plain copy's cost:
    # its load only maps the file)
    floors = {"HF -> Megatron": statistics.median(floor_write), "Megatron -> HF": statistics.median(floor_read) + base}
    print(f"model: {mib:.0f} MiB {args.dtype} ({args.layers} layers, hidden {args.hidden}); median of {args.repeats}")
    columns = ("MiB/s", "x plain", "work s", "start-up s", "floor s", "x floor")
    print(f"  {'':24s} " + " ".join(f"{c:>{11 if c == 'start-up s' else 8}s}" for c in columns))
    for name, runs in (("safetensors load+save", plain), ("HF -> Megatron", to_megatron), ("Megatron -> HF", to_hf)):
        work_s = statistics.median(w for _, w in runs)
        startup = statistics.median(wall - w for wall, w in runs)
        floor = floors.get(name, base)
        print(
            f"  {name:24s} {mib / work_s:8.0f} {base / work_s:8.2f} {work_s:8.2f} {startup:11.2f} {floor:8.2f}"
            f" {floor / work_s:8.2f}"
        )
    print(
        "  floor: the torch_dist format's own cost on tensors in memory (HF -> Megatron: torch.save per item; "
        "Megatron -> HF: torch.load per item + the plain copy)"
    )
    print(
        f"  the format's floor against the plain copy: write {base / floors['HF -> Megatron']:.2f}x, "
        f"read + export {base / floors['Megatron -> HF']:.2f}x"
    )


if __name__ == "__main__":
    main()
