#!/usr/bin/env bash
# Qwen3-VL-8B-Instruct on 8 x H800 (examples/configs/qwen3_vl_8b.yaml). The layout and memory validate, but the
# Megatron actor does not implement the qwen3_vl family yet, so this stops after the dry-run with that message.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=examples/configs/qwen3_vl_8b.yaml
MODEL=${MODEL:-/models/Qwen3-VL-8B-Instruct}
DATA=${DATA:-/data/ViRL39K}
args=("model.path=$MODEL" "data.train_files=[$DATA/train.parquet]" "data.val_files=[$DATA/validation.parquet]" "$@")
python -m vppo_megatron.train --config "$CONFIG" --dry-run "${args[@]}"
exec torchrun --standalone --nproc-per-node "${NPROC_PER_NODE:-8}" \
  -m vppo_megatron.train --config "$CONFIG" "${args[@]}"
