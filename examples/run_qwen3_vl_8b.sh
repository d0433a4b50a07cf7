#!/usr/bin/env bash
# VPPO on Qwen3-VL-8B-Instruct, one node of 8 x H800 (examples/configs/qwen3_vl_8b.yaml: VPPO-8B's recipe).
#   MODEL=/models/Qwen3-VL-8B-Instruct DATA=/data/ViRL39K examples/run_qwen3_vl_8b.sh [key=value ...]
# Validates the layout and the memory estimate first, then starts 8 trainer ranks; trainer rank 0 starts a local
# Ray instance for the 4 colocated vLLM engines (set RAY_ADDRESS to use a running cluster instead).
set -euo pipefail
CONFIG=examples/configs/qwen3_vl_8b.yaml DEFAULT_MODEL=/models/Qwen3-VL-8B-Instruct
# shellcheck source=examples/common.sh
source "$(dirname "$0")/common.sh"
exec torchrun --standalone --nproc-per-node "${NPROC_PER_NODE:-8}" -m vppo_megatron.train --config "$CONFIG" "${args[@]}"
