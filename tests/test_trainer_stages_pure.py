"""Trainer stages 4 and 6's bookkeeping without a model: TAS segments and the step's metrics over its updates."""

from types import SimpleNamespace

import pytest
import torch

from vppo_megatron.algo.shaping import tas_scale
from vppo_megatron.batch import RankBatch
from vppo_megatron.config import load
from vppo_megatron.trainer import StepData, Trainer, mean_over_steps

GROUPS, SAMPLES = 4, 8  # 32 rollouts on one rank, one mini-batch


def _advantages(micro_batch_size: int, tas_segment: int = 16, tas_range_rollouts: int = 0):
    cfg = load(
        None,
        [
            "trainer.prompts_per_step=4",
            "trainer.prompts_per_update=4",
            f"trainer.micro_batch_size={micro_batch_size}",
            f"algorithm.tas_segment={tas_segment}",
            f"algorithm.tas_range_rollouts={tas_range_rollouts}",
        ],
    ).validate(1)
    generator = torch.Generator().manual_seed(0)
    rows = GROUPS * SAMPLES
    rollouts = RankBatch(
        samples=[None] * rows,
        reward_B=(torch.rand(rows, generator=generator) > 0.5).float(),
        group_ids_B=torch.arange(rows) // SAMPLES,
    )
    mask_BT = torch.ones(rows, 6)
    experience = SimpleNamespace(dependency_BT=torch.rand(rows, 6, generator=generator) ** 3, response_mask_BT=mask_BT)
    micro_rows = [slice(a, a + micro_batch_size) for a in range(0, rows, micro_batch_size)]
    data = StepData(rollouts, SimpleNamespace(micro_rows=micro_rows), [slice(0, rows)])
    trainer = Trainer(cfg, SimpleNamespace(dp=None), None, None, None, None)
    advantage_B, metrics = trainer.advantages(data, experience)
    return advantage_B, metrics, experience


def test_tas_segment_not_the_memory_micro_batch_sets_the_statistic():
    one, metrics, experience = _advantages(micro_batch_size=1)
    sixteen, _, _ = _advantages(micro_batch_size=16)
    assert torch.equal(one, sixteen)  # the memory micro-batch does not enter TAS
    # alpha spreads around 1 (micro-batch 1 used to make every alpha exactly 1: TAS off)
    assert metrics["vppo/shaping_scale_min"] < 1.0 < metrics["vppo/shaping_scale_max"]
    # and equals the reference's statistic with its update micro-batch of 16 rollouts
    trajectory_B = experience.dependency_BT.mean(-1)
    alpha_B = tas_scale(trajectory_B, torch.ones(32, dtype=torch.bool), segment_ids_B=torch.arange(32) // 16)
    assert metrics["vppo/shaping_scale_max"] == pytest.approx(alpha_B.max().item())
    four, _, _ = _advantages(micro_batch_size=16, tas_segment=4)
    assert not torch.equal(one, four)  # the segment is what changes it


def test_the_tas_range_window_is_the_reference_per_gpu_mini_batch():
    """tas_range_rollouts=16 of a rank's 32: each half takes its own min and max, as the reference's per-GPU
    mini-batch would if its 32 rollouts were on two GPUs."""
    windowed, _, experience = _advantages(micro_batch_size=4, tas_segment=8, tas_range_rollouts=16)
    trajectory_B = experience.dependency_BT.mean(-1)
    valid = torch.ones(16, dtype=torch.bool)
    halves = [
        tas_scale(trajectory_B[rows], valid, segment_ids_B=torch.arange(16) // 8)
        for rows in (slice(0, 16), slice(16, 32))
    ]
    whole, _, _ = _advantages(micro_batch_size=4, tas_segment=8)
    full_window, _, _ = _advantages(micro_batch_size=4, tas_segment=8, tas_range_rollouts=32)
    assert torch.equal(whole, full_window)  # a window of the whole mini-batch is the default
    alpha_B = torch.cat(halves)
    ratio = windowed / whole.where(whole != 0, torch.ones_like(whole))
    assert not torch.equal(windowed, whole)
    whole_alpha = tas_scale(trajectory_B, torch.ones(32, dtype=torch.bool), segment_ids_B=torch.arange(32) // 8)
    nonzero = whole != 0
    torch.testing.assert_close(ratio[nonzero], (alpha_B / whole_alpha).float()[nonzero])


def test_step_metrics_are_the_mean_over_every_optimizer_step():
    per_step = [{"actor/loss": 1.0, "actor/grad_norm": 4.0}, {"actor/loss": 3.0, "actor/grad_norm": 2.0}]
    assert mean_over_steps(per_step) == {"actor/loss": 2.0, "actor/grad_norm": 3.0}
    # a metric only some steps report is averaged over those steps
    assert mean_over_steps([{"a": 1.0}, {"a": 2.0, "b": 5.0}]) == {"a": 1.5, "b": 5.0}
    assert mean_over_steps([]) == {}


def test_steps_that_train_on_nothing_warn_and_stop_the_run_after_the_configured_number(capsys):
    from vppo_megatron.trainer import StalledRun

    cfg = load(None, ["algorithm.max_skipped_steps=3"])
    trainer = Trainer(cfg, None, None, None, None, driver=SimpleNamespace())  # rank 0: it warns
    skipped = {
        "actor/skipped_step": 1.0,
        "reward/accuracy": 0.0,
        "rollout/sampled_prompts": 24.0,
        "rollout/sampling_rounds": 8.0,
        "rollout/filtered_wrong_groups": 24.0,
        "rollout/filtered_right_groups": 0.0,
    }
    trainer.check_skipped(0, skipped)
    trainer.check_skipped(1, skipped)
    trainer.check_skipped(2, {"actor/loss": 0.1})  # a step that trained: the count starts again
    trainer.check_skipped(3, skipped)
    trainer.check_skipped(4, skipped)
    with pytest.raises(StalledRun, match="3 steps in a row trained on nothing .*step 5.* reward function"):
        trainer.check_skipped(5, skipped)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 5
    assert "kept no group of 24 prompts in 8 round(s): reward/accuracy 0.000, 24 group(s) all wrong" in warnings[0]
    never = Trainer(load(None, ["algorithm.max_skipped_steps=0"]), None, None, None, None, None)
    for step in range(20):
        never.check_skipped(step, skipped)  # 0: warns only (on rank 0), never stops
