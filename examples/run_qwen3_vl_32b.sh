#!/usr/bin/env bash
# VPPO on Qwen3-VL-32B-Instruct, 4 nodes x 8 H800 (examples/configs/qwen3_vl_32b.yaml), through Slurm.
#   MODEL=/models/Qwen3-VL-32B-Instruct DATA=/data/ViRL39K examples/run_qwen3_vl_32b.sh [key=value ...]
# Without Slurm run tools/launch_multinode.sh on every node (NNODES, NODE_RANK, MASTER_ADDR, RAY_AUTH_TOKEN).
set -euo pipefail
CONFIG=examples/configs/qwen3_vl_32b.yaml DEFAULT_MODEL=/models/Qwen3-VL-32B-Instruct
# shellcheck source=examples/common.sh
source "$(dirname "$0")/common.sh"
exec sbatch --nodes=4 tools/slurm_vppo.sbatch "$CONFIG" "${args[@]}"
