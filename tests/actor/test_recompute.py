"""model.recompute=full recomputes the language layers and checkpoints every vision-tower block: same step, same
weights after it (the memory estimate counts the tower's activations as checkpointed under full recompute)."""

import pytest
import torch
from conftest import FAMILY_MODELS

from vppo_megatron.testing import run_distributed


def _one_step(rank, world_size, model_dir, recompute):
    from parity_worker import family_of, fixed_training_inputs, make_samples

    from vppo_megatron.actor.engine import MegatronActor
    from vppo_megatron.config import load
    from vppo_megatron.parallel.layout import ParallelLayout, destroy, initialize

    overrides = ["model.dtype=float32", "model.transformer_impl=local", "trainer.micro_batch_size=2"]
    overrides += ["optimizer.lr=0.1", "optimizer.adam_eps=1.0", f"model.recompute={recompute}"]
    overrides += [f"model.family={family_of(model_dir)}"]
    actor = MegatronActor(load(None, overrides), initialize(ParallelLayout(), seed=1), model_dir)
    samples = make_samples(model_dir)
    experience = actor.experience(samples, step=0)
    advantage, mask = fixed_training_inputs(len(samples), experience.old_logp_BT.shape[1])
    metrics = actor.update(samples, experience.old_logp_BT, advantage, mask)
    params = {n: t.clone() for n, t in actor.hf_tensors()}
    checkpointed = actor.chunks[0].vision.gradient_checkpointing
    destroy()
    return metrics["actor/grad_norm"], params, checkpointed


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_full_recompute_checkpoints_the_vision_tower_and_changes_no_result(family, request):
    """Qwen3-VL: the DeepStack features enter the recomputed layers through megatron-core's checkpoint."""
    tiny_model_dir = request.getfixturevalue(FAMILY_MODELS[family])
    plain_norm, plain, plain_ckpt = run_distributed(_one_step, 1, str(tiny_model_dir), "none", timeout_s=600)[0]
    full_norm, full, full_ckpt = run_distributed(_one_step, 1, str(tiny_model_dir), "full", timeout_s=600)[0]
    assert full_ckpt and not plain_ckpt
    assert abs(full_norm - plain_norm) <= 1e-5 * plain_norm
    assert any(name.startswith(("visual.", "model.visual.")) for name in full)
    for name, value in plain.items():
        torch.testing.assert_close(full[name], value, atol=1e-6, rtol=0, msg=name)
