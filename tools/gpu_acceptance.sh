#!/usr/bin/env bash
# One-command GPU acceptance on one GPU (>= 40 GiB, Hopper for the FP8 step): TE vs local spec parity, FP8
# delayed + tensorwise, vLLM sleep/wake, CUDA-IPC weight sync, NCCL sync (2 GPUs), 3 VPPO steps. Minutes.
#   tools/gpu_acceptance.sh [REPORT.json] [--steps te_parity,fp8,...]    (report default: runs/gpu_acceptance.json)
# Exit 0: every step passed or was skipped for its stated reason; 1: a step failed (see the report); 3: no CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTHON=${PYTHON:-.venv/bin/python}
exec "$PYTHON" tools/gpu_acceptance.py "$@"
