"""tools/gpu_acceptance.sh: a host without CUDA is refused at once (exit 3, one line, nothing written); the runner
records every step's status and goes on after a failure; every shell script is shellcheck-clean. On a GPU host the
`gpu` tests run the acceptance steps themselves (the same code the script runs)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import gpu_acceptance  # noqa: E402 - a script in tools/, not a package module

PATTERNS = ("tools/*.sh", "tools/*.sbatch", "examples/*.sh")
SHELL_SCRIPTS = sorted(str(p.relative_to(REPO)) for pattern in PATTERNS for p in REPO.glob(pattern))
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_shell_scripts_are_shellcheck_clean():
    assert "tools/gpu_acceptance.sh" in SHELL_SCRIPTS and "tools/slurm_vppo.sbatch" in SHELL_SCRIPTS
    proc = subprocess.run(["shellcheck", "-x", *SHELL_SCRIPTS], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA")
def test_refuses_a_host_without_cuda_before_any_work(tmp_path):
    report = tmp_path / "gpu_acceptance.json"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", "tools/gpu_acceptance.sh", str(report)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == gpu_acceptance.NO_CUDA_EXIT == 3
    assert proc.stderr.strip() == gpu_acceptance.NO_CUDA_LINE and proc.stdout == ""
    assert list(tmp_path.iterdir()) == []  # no report, no scratch directory: nothing was built


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU host these steps run for real (the gpu tests)")
def test_runner_records_each_step_and_goes_on_after_a_failure(tmp_path):
    """On this CPU host the TE step fails (no Transformer Engine) and the NCCL step is skipped (no second GPU):
    both land in the report, in order, and the run fails because one step failed, not because one was skipped."""
    report = tmp_path / "report.json"
    assert gpu_acceptance.run(report, ["te_parity", "nccl_sync"], tmp_path / "work") == 1
    result = json.loads(report.read_text())
    te, nccl = result["steps"]
    assert (te["name"], te["status"]) == ("te_parity", "failed") and "Transformer Engine" in te["error"]
    assert (nccl["name"], nccl["status"]) == ("nccl_sync", "skipped") and "needs 2 GPUs" in nccl["error"]
    assert result["passed"] is False and result["host"]["devices"] == []
    assert Path(te["log"]).exists() and te["seconds"] > 0


def test_rollout_steps_name_the_missing_stack_in_one_line(monkeypatch):
    """A GPU host without vLLM or Ray (the first one lent to this project had neither): the rollout steps fail
    with the packages and the install command, not an ImportError from deep inside a rank."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(RuntimeError, match=r"^vllm not importable on this node: pip install -r requirements/gpu"):
        gpu_acceptance._require_rollout_stack()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(RuntimeError, match=r"^vllm and ray not importable"):
        gpu_acceptance.step_sleep_wake(Path("unused"), {})


@pytest.fixture(scope="module")
def acceptance_work(tmp_path_factory):
    work = tmp_path_factory.mktemp("gpu_acceptance")
    record = gpu_acceptance.run_step_process("prepare", work)
    assert record["status"] == "passed", record
    return work


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("step", [name for name in gpu_acceptance.STEPS if name != "prepare"])
def test_gpu_acceptance_step(acceptance_work, step):
    record = gpu_acceptance.run_step_process(step, acceptance_work)
    assert record["status"] in ("passed", "skipped"), f"{record['error']}\nfigures: {record['figures']}"


@pytest.mark.slow
def test_sync_probe_driver_runs_on_cpu_over_shared_memory(tiny_model_dir):
    """The driver of the cuda_ipc / nccl steps, on this host's transport: the same push, weight change, second
    push and probe, and the same checks (versions, probe gap, the engine's log-probs moving)."""
    from vppo_megatron.testing import run_distributed

    overrides = ["model.dtype=float32", "model.transformer_impl=local", "rollout.sync_transport=shm"]
    (result,) = run_distributed(gpu_acceptance.sync_probe_rank, 1, str(tiny_model_dir), None, overrides, timeout_s=900)
    figures = {}
    gpu_acceptance._check_sync(result, "shm", figures)
    assert figures["probe_max_abs_diff"] <= 1e-3  # fp32 on both sides
