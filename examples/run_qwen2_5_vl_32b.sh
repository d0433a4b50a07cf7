#!/usr/bin/env bash
# VPPO on Qwen2.5-VL-32B-Instruct, 4 nodes x 8 H800 (examples/configs/qwen2_5_vl_32b.yaml), through Slurm.
#   MODEL=/models/Qwen2.5-VL-32B-Instruct DATA=/data/ViRL39K examples/run_qwen2_5_vl_32b.sh [key=value ...]
# Without Slurm run tools/launch_multinode.sh on every node (NNODES, NODE_RANK, MASTER_ADDR) with the same args.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=examples/configs/qwen2_5_vl_32b.yaml
MODEL=${MODEL:-/models/Qwen2.5-VL-32B-Instruct}
DATA=${DATA:-/data/ViRL39K}
args=("model.path=$MODEL" "data.train_files=[$DATA/train.parquet]" "data.val_files=[$DATA/validation.parquet]" "$@")
python -m vppo_megatron.train --config "$CONFIG" --dry-run "${args[@]}"
exec sbatch --nodes=4 tools/slurm_vppo.sbatch "$CONFIG" "${args[@]}"
