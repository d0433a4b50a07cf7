"""The trainer's stages 2-6 on one gloo rank (tests/actor/step_worker.py runs every scenario in one process)."""

import pytest
import torch
from step_worker import PROMPTS, SAMPLES, trainer_stages

from vppo_megatron import faults
from vppo_megatron.testing import run_distributed


@pytest.fixture(scope="module")
def stages(tiny_model_dir, tmp_path_factory):
    (results,) = run_distributed(trainer_stages, 1, str(tiny_model_dir), str(tmp_path_factory.mktemp("stages")))
    return results


def test_a_step_encodes_each_image_once_per_view_however_many_passes(stages):
    # ppo_epochs=2 runs the update twice over the same micro-batches: the original view is encoded once per
    # prompt image (its rollouts share it); each rollout's perturbed view (its own mask) blackens that encoding's
    # patches, so the processor runs once more, for one black patch (SAMPLES rollouts per prompt)
    assert SAMPLES > 1
    assert stages["encoded_images"] == PROMPTS + 1
    assert stages["encode_calls"] == PROMPTS + 1


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


def test_packed_micro_batches_give_the_fixed_count_step(stages):
    """trainer.pack_sequences through the trainer's stages (micro-batches per mini-batch, experience, TAS, TGF,
    update): the budget counts the rollouts' own lengths (36 + 42 + 40 + 37 = 155 <= 160 packs a whole mini-batch)
    and the step equals the padded one."""
    fixed, packed = stages["fixed"], stages["packed"]
    assert packed["micro_rows"] == [(0, 4), (4, 7), (7, 8)]
    assert torch.allclose(packed["old_logp"], fixed["old_logp"], atol=1e-6)
    assert torch.allclose(packed["dependency"], fixed["dependency"], atol=1e-6)
    assert packed["metrics"]["actor/grad_norm"] == pytest.approx(fixed["metrics"]["actor/grad_norm"], rel=1e-6)
    assert packed["metrics"]["actor/loss"] == pytest.approx(fixed["metrics"]["actor/loss"], abs=1e-6)
    for name, value in fixed["params"].items():
        assert torch.allclose(packed["params"][name], value, atol=1e-5, rtol=0), name


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


def test_checkpoint_faults_a_full_disk_a_corrupted_shard_and_a_dead_writers_leftovers(stages):
    """Each checkpoint carries every file's size and CRC32. A full disk (RLIMIT_FSIZE) during a save: a clear
    error naming the checkpoint still there, no partial directory. One flipped byte in a shard: resume auto names
    the file, sets the checkpoint aside and loads the previous one; resuming that checkpoint by name fails naming
    the file. A killed writer's temporary directory is removed by the next save."""
    f = stages["faults"]
    assert not f["stale_left"] and f["manifest"]
    assert "checkpoint" in f["disk_full"] and "step_3 could not be written" in f["disk_full"], f["disk_full"]
    assert "Local worker 0 encountered an error" in f["disk_full"], f["disk_full"]  # the shard writer's own words
    assert "the disk may be full" in f["disk_full"] and "step_2 is intact" in f["disk_full"], f["disk_full"]
    assert f["after_disk_full"] == ["step_1", "step_2"]  # keep_last=2; nothing of the failed save is left
    name, step, warning = f["fallback"]
    assert (name, step) == ("step_1", 1)
    assert f"{f['corrupted']}: its CRC32 differs" in warning and "moved to damaged-step_2" in warning, warning
    assert f["after_fallback"] == ["damaged-step_2", "step_1"]  # kept for inspection, out of the resume order
    assert f["named"].startswith(f"{f['damaged_path']}: its CRC32 differs"), f["named"]
    redo = "none (the previous checkpoint loads; the steps since it run again)"
    faults.record(
        "disk full while writing a checkpoint",
        "checkpoint write (RLIMIT_FSIZE 64 KiB)",
        redo,
        "the run stops with one line; resume once space is free",
    )
    found = f"named, set aside and the previous one loaded in {f['fallback_s']:.1f} s"
    faults.record("corrupted checkpoint shard", "one byte flipped in the newest", redo, found)
