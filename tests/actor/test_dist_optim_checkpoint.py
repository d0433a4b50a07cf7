"""Optimizer checkpoints: save, a new process resumes, the next step is the uninterrupted one, for the distributed
optimizer (dp_reshardable: another DP size resumes, another TP split is refused with the fix) and the plain one,
including a checkpoint written before the first optimizer step (every group filtered by dynamic sampling)."""

import pytest
import torch
from dist_optim_worker import resume_and_step, train_and_save

from vppo_megatron.testing import run_distributed


@pytest.fixture(scope="module", params=[True, False], ids=["distributed", "plain"])
def saved(request, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("optimizer-ckpt")
    results = run_distributed(train_and_save, 2, str(tiny_model_dir), str(out), request.param)
    return {"out": str(out), "model": str(tiny_model_dir), "distributed": request.param, **results[0]}


def _resume(saved, world_size, ckpt, *overrides):
    overrides = [f"optimizer.distributed_optimizer={str(saved['distributed']).lower()}", *overrides]
    return run_distributed(resume_and_step, world_size, saved["model"], saved["out"], saved[ckpt], overrides)[0]


def _assert_same_step(resumed, reference, atol=0.0):
    for name, value in reference["params"].items():
        assert torch.allclose(resumed["params"][name], value, atol=atol, rtol=0), name
    for name in ("actor/loss", "actor/grad_norm", "actor/pg_clipfrac"):
        assert resumed["metrics"][name] == pytest.approx(reference["metrics"][name], abs=max(atol, 1e-12)), name


def test_resume_in_a_new_process_repeats_the_uninterrupted_step(saved):
    # bit-exact: same layout, Adam moments and step count restored (megatron-core's distributed optimizer loads
    # torch Adam's step counter shared and overwritten: restore_adam_steps)
    _assert_same_step(_resume(saved, 2, "after"), saved["second"])


def test_a_checkpoint_before_the_first_optimizer_step_resumes_as_a_fresh_optimizer(saved):
    _assert_same_step(_resume(saved, 2, "before"), saved["first"])


def test_distributed_optimizer_resumes_at_another_dp_size(saved):
    if not saved["distributed"]:
        pytest.skip("the plain optimizer's state is model-space: any layout (tests/actor/test_trainer_stages.py)")
    # dp_reshardable: the same TP/PP split at DP1 instead of DP2; float summation order differs, nothing else
    _assert_same_step(_resume(saved, 1, "after"), saved["second"], atol=1e-6)


def test_distributed_optimizer_at_another_tp_split_is_refused_with_the_fix(saved):
    if not saved["distributed"]:
        pytest.skip("the plain optimizer's state is model-space: any layout")
    refused = _resume(saved, 2, "after", "parallel.tp=2")
    assert "tp 1 -> 2" in refused["error"] and "checkpoint.load_optimizer=false" in refused["error"]
    weights_only = _resume(saved, 2, "after", "parallel.tp=2", "checkpoint.load_optimizer=false")
    assert "error" not in weights_only
