#!/usr/bin/env bash
# Qwen3-VL-8B-Instruct on 8 x H800 (examples/configs/qwen3_vl_8b.yaml). The layout and memory validate, but the
# Megatron actor does not implement the qwen3_vl family yet, so the trainer stops at start-up with that message.
set -euo pipefail
CONFIG=examples/configs/qwen3_vl_8b.yaml DEFAULT_MODEL=/models/Qwen3-VL-8B-Instruct
# shellcheck source=examples/common.sh
source "$(dirname "$0")/common.sh"
exec torchrun --standalone --nproc-per-node "${NPROC_PER_NODE:-8}" -m vppo_megatron.train --config "$CONFIG" "${args[@]}"
