# shellcheck shell=bash
# Sourced by the run scripts: CONFIG and the model's default MODEL are set by the caller. Builds `args` (model and
# data paths, then the caller's key=value overrides) and validates the run at its target world size first.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
MODEL=${MODEL:-$DEFAULT_MODEL}
DATA=${DATA:-/data/ViRL39K}
args=("model.path=$MODEL" "data.train_files=[$DATA/train.parquet]" "data.val_files=[$DATA/validation.parquet]" "$@")
python -m vppo_megatron.train --config "$CONFIG" --dry-run "${args[@]}"
