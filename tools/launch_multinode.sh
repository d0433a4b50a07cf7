#!/usr/bin/env bash
# Multi-node VPPO launch, run once on every node (same command, different NODE_RANK).
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC_PER_NODE=8 \
#     tools/launch_multinode.sh examples/configs/qwen2_5_vl_32b.yaml [key=value ...]
# Node 0 starts the Ray head, the others join it; then torchrun starts the trainer ranks on every node.
# Trainer rank 0 (on node 0) drives the vLLM fleet through RAY_ADDRESS.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [overrides...]}; shift
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-29500}
RAY_PORT=${RAY_PORT:-6379}
ROLLOUT_GPUS=${ROLLOUT_GPUS:-0}   # >0 on nodes reserved for disaggregated engines (resource "rollout")
export RAY_ADDRESS="${MASTER_ADDR}:${RAY_PORT}"
# Ray >= 2.5x enables token authentication on `ray start`: every node and the trainer need the same token.
export RAY_AUTH_MODE=token
if [ -z "${RAY_AUTH_TOKEN:-}" ]; then
  if [ "$NNODES" -gt 1 ]; then
    echo "set RAY_AUTH_TOKEN to the same secret on every node (tools/slurm_vppo.sbatch generates one)" >&2
    exit 2
  fi
  RAY_AUTH_TOKEN=$(python -c "import secrets; print(secrets.token_hex(32))")
  export RAY_AUTH_TOKEN
fi
resources=()
[ "$ROLLOUT_GPUS" -gt 0 ] && resources=(--resources "{\"rollout\": ${ROLLOUT_GPUS}}")
if [ "$NODE_RANK" -eq 0 ]; then
  ray start --head --node-ip-address "$MASTER_ADDR" --port "$RAY_PORT" "${resources[@]}"
else
  for _ in $(seq 60); do ray status --address "$RAY_ADDRESS" >/dev/null 2>&1 && break; sleep 5; done
  ray start --address "$RAY_ADDRESS" "${resources[@]}"
fi
trap 'ray stop --force >/dev/null 2>&1 || true' EXIT
torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m vppo_megatron.train --config "$CONFIG" "$@"
