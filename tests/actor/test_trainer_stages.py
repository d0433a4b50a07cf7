"""The trainer's stages 2-6 on one gloo rank (tests/actor/step_worker.py runs every scenario in one process)."""

import pytest
import torch
from step_worker import PROMPTS, SAMPLES, trainer_stages

from vppo_megatron.testing import run_distributed


@pytest.fixture(scope="module")
def stages(tiny_model_dir, tmp_path_factory):
    (results,) = run_distributed(trainer_stages, 1, str(tiny_model_dir), str(tmp_path_factory.mktemp("stages")))
    return results


def test_a_step_encodes_each_image_once_per_view_however_many_passes(stages):
    # ppo_epochs=2 runs the update twice over the same micro-batches: the original view is encoded once per
    # prompt image (its rollouts share it), the perturbed view once per rollout image (each its own mask)
    assert stages["encoded_images"] == PROMPTS + PROMPTS * SAMPLES
    assert stages["encode_calls"] == PROMPTS + PROMPTS * SAMPLES


def test_ppo_epochs_2_reuses_the_step_experience_for_a_second_pass(stages):
    run = stages["epochs2"]
    assert run["updates"] == 2 * 2  # 2 epochs x 2 mini-batches (prompts_per_update = 2 of 4 prompts)
    assert run["metrics"]["actor/optimizer_steps"] == 4.0
    # the last update scores against the step's stored old log-probs after three optimizer steps: ratio != 1
    assert abs(run["metrics"]["actor/ppo_kl"]) > 1e-4
    one_epoch = stages["fixed"]  # the same step with ppo_epochs=1 (TAS scope aside) moves the weights less
    moved = lambda r: sum((r["params"][n] - stages["resumed_False"]["params"][n]).norm() for n in r["params"])  # noqa: E731
    assert moved(run) > moved(one_epoch)


def test_token_budget_micro_batches_equal_fixed_count_ones(stages):
    fixed, budget = stages["fixed"], stages["budget"]
    assert fixed["micro_rows"] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    # sequence lengths 36 42 40 37 | 40 37 43 41: rows x longest <= 130 packs three, never across the mini-batch
    assert budget["micro_rows"] == [(0, 3), (3, 4), (4, 7), (7, 8)]
    assert torch.allclose(budget["old_logp"], fixed["old_logp"], atol=1e-6)
    assert torch.allclose(budget["dependency"], fixed["dependency"], atol=1e-6)
    assert budget["metrics"]["actor/grad_norm"] == pytest.approx(fixed["metrics"]["actor/grad_norm"], rel=1e-6)
    # Adam moves every weight by ~lr (3e-4) whatever its gradient's size: a split bug shows at that scale, float
    # summation order at ~3e-6 (measured) on weights with near-zero gradients
    for name, value in fixed["params"].items():
        assert torch.allclose(budget["params"][name], value, atol=1e-5, rtol=0), name
    assert budget["metrics"]["actor/loss"] == pytest.approx(fixed["metrics"]["actor/loss"], abs=1e-6)


def test_resume_without_the_optimizer_restores_weights_and_fresh_adam_state(stages):
    with_opt, weights_only = stages["resumed_True"], stages["resumed_False"]
    assert (with_opt["step"], with_opt["optimizer"], weights_only["optimizer"]) == (1, True, False)
    for name, value in stages["fixed"]["params"].items():
        assert torch.equal(weights_only["params"][name], value) and torch.equal(with_opt["params"][name], value)
    saved = stages["saved_moments"]
    assert saved and all(m.abs().sum() > 0 for m in saved)
    assert len(with_opt["moments"]) == len(saved)
    assert all(torch.equal(a, b) for a, b in zip(with_opt["moments"], saved))
    assert all(m.abs().sum() == 0 for m in weights_only["moments"])  # no moments restored
    # and the next update differs: Adam with restored moments vs from zero
    differs = any(
        not torch.equal(with_opt["after_update"][n], weights_only["after_update"][n]) for n in with_opt["after_update"]
    )
    assert differs


def test_the_experience_pass_holds_one_micro_batch_of_inputs_and_pixels_once_per_prompt(stages):
    """Each micro-batch's inputs (both views) are made and moved when the schedule asks for them and released
    before the next: never more than one micro-batch's bytes live. The step stores each prompt's pixels once,
    shared by its rollouts."""
    inputs = stages["fixed"]["inputs"]
    assert inputs["moved"] == inputs["expected"] and len(inputs["moved"]) == 4  # every micro-batch, whole
    assert inputs["peak_live"] == max(inputs["moved"]) and inputs["live_after"] == 0
    assert inputs["pixel_bytes"] == inputs["per_prompt"] == inputs["per_rollout"] // SAMPLES
