#!/usr/bin/env bash
# Multi-node VPPO launch, run once on every node (same command, different NODE_RANK).
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC_PER_NODE=8 RAY_AUTH_TOKEN=<secret> \
#     tools/launch_multinode.sh examples/configs/qwen2_5_vl_32b.yaml [key=value ...]
# Node 0 starts the Ray head, the others join it; every node waits until all NNODES Ray nodes are alive, then
# torchrun starts the trainer ranks on every node. Trainer rank 0 (on node 0) drives the vLLM fleet through
# RAY_ADDRESS. Each node's Ray runs under this script (`ray start --block`) and is stopped when the script exits,
# and only that node's Ray: several nodes may share a host (tests/rollout/test_launch_multinode.py runs two).
# Optional per node:
#   RAY_NODE_ARGS       extra `ray start` arguments, split on whitespace ("--num-cpus 32", or distinct
#                       --node-manager-port/--object-manager-port/... for two nodes on one host)
#   ROLLOUT_GPUS        >0 on nodes reserved for disaggregated engines (Ray resource "rollout")
#   RAY_JOIN_TIMEOUT_S  how long a node waits for the head and for all nodes to join (default 300)
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [overrides...]}; shift
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-29500}
RAY_PORT=${RAY_PORT:-6379}
ROLLOUT_GPUS=${ROLLOUT_GPUS:-0}
RAY_JOIN_TIMEOUT_S=${RAY_JOIN_TIMEOUT_S:-300}
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
read -r -a node_args <<< "${RAY_NODE_ARGS:-}"
if [ "$ROLLOUT_GPUS" -gt 0 ]; then node_args+=(--resources "{\"rollout\": ${ROLLOUT_GPUS}}"); fi

head_answers() { ray status --address "$RAY_ADDRESS" >/dev/null 2>&1; }

alive_nodes() {  # the node lines of `ray status` ("Active:" and "Idle:" sections, before "Pending:")
  { ray status --address "$RAY_ADDRESS" 2>/dev/null || true; } \
    | awk '/^Active:/ {on = 1; next} /^Pending:/ {on = 0} on && /node_/ {n++} END {print n + 0}'
}

all_nodes_alive() { [ "$(alive_nodes)" -ge "$NNODES" ]; }

wait_for() {  # wait_for WHAT COMMAND...: polls COMMAND; gives up after RAY_JOIN_TIMEOUT_S or if this node's Ray died
  local what=$1 deadline=$((SECONDS + RAY_JOIN_TIMEOUT_S))
  shift
  until "$@"; do
    if [ -n "${ray_pid:-}" ] && ! kill -0 "$ray_pid" 2>/dev/null; then
      echo "launch_multinode: node $NODE_RANK: ray start exited while waiting for $what" >&2
      exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "launch_multinode: node $NODE_RANK: no $what after ${RAY_JOIN_TIMEOUT_S}s (RAY_JOIN_TIMEOUT_S)" >&2
      exit 1
    fi
    sleep 2
  done
}

descendants() {  # every process below pid $1
  local child
  for child in $(pgrep -P "$1" 2>/dev/null); do
    echo "$child"
    descendants "$child"
  done
}

ray_processes=""  # this node's Ray processes (GCS, raylet, agents), recorded once the node is up
stop_ray() {  # on SIGTERM `ray start --block` stops the Ray processes it started (this node's), then exits
  kill -TERM "$ray_pid" 2>/dev/null || true
  wait "$ray_pid" 2>/dev/null || true
  # if `ray start` itself was killed they outlive it (the raylet and its agents wait a minute for a lost head):
  # stop them here, SIGKILL for those still there after 5 s
  local signal tries
  for signal in TERM KILL; do
    for tries in 1 2 3 4 5; do
      [ -n "$(ray_left)" ] || return 0
      if [ "$tries" -eq 1 ]; then ray_left | xargs -r kill "-$signal" 2>/dev/null || true; fi
      sleep 1
    done
  done
}

ray_left() {  # the recorded Ray processes still running (a reused pid runs something else: not ours)
  local pid
  for pid in $ray_processes; do
    if ps -o args= -p "$pid" 2>/dev/null | grep -q ray; then echo "$pid"; fi
  done
}

if [ "$NODE_RANK" -eq 0 ]; then
  ray start --head --node-ip-address "$MASTER_ADDR" --port "$RAY_PORT" "${node_args[@]}" --block &
else
  wait_for "Ray head at $RAY_ADDRESS" head_answers
  ray start --address "$RAY_ADDRESS" "${node_args[@]}" --block &
fi
ray_pid=$!
trap stop_ray EXIT
wait_for "Ray head at $RAY_ADDRESS" head_answers
wait_for "cluster of $NNODES Ray nodes" all_nodes_alive
echo "launch_multinode: node $NODE_RANK: $(alive_nodes) of $NNODES Ray nodes alive"
ray_processes=$(descendants "$ray_pid" | tr '\n' ' ')
trainer_failed() {  # torchrun's exit status; says so when this node's Ray died during the run
  local status=$1
  if ! kill -0 "$ray_pid" 2>/dev/null; then
    echo "launch_multinode: node $NODE_RANK: this node's Ray stopped during the run (its log is above); the trainer" \
      "stopped with it. Checkpoints are intact: launch again to resume from the newest" >&2
  fi
  return "$status"
}
torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m vppo_megatron.train --config "$CONFIG" "$@" || trainer_failed $?
