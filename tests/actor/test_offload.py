"""actor/offload.py on a real Megatron actor: every offloaded storage is really released (nbytes() == 0) between
offload and onload, and comes back bit-identical (gradient buffers: zeroed, as every update zeroes them first)."""

import pytest
import torch

from vppo_megatron.testing import run_distributed


def _offload_round_trip(rank, world_size, model_dir, dtype):
    from parity_worker import fixed_training_inputs, make_samples

    from vppo_megatron.actor.engine import MegatronActor
    from vppo_megatron.actor.offload import KINDS
    from vppo_megatron.config import load
    from vppo_megatron.parallel.layout import ParallelLayout, destroy, initialize

    cfg = load(None, [f"model.dtype={dtype}", "model.transformer_impl=local", "trainer.micro_batch_size=2"])
    actor = MegatronActor(cfg, initialize(ParallelLayout(tp=world_size), seed=1), model_dir)
    samples = make_samples(model_dir)
    experience = actor.experience(samples, step=0)
    advantage, mask = fixed_training_inputs(len(samples), experience.old_logp_BT.shape[1])
    actor.update(samples, experience.old_logp_BT, advantage, mask)  # creates the Adam state

    def snapshot(kind):
        return [torch.empty(0, dtype=torch.uint8).set_(s).clone() for s in actor.residency.storages(kind)]

    before = {kind: snapshot(kind) for kind in KINDS}
    storages = {kind: actor.residency.storages(kind) for kind in KINDS}
    released = actor.offload(KINDS)
    during = {kind: [s.nbytes() for s in storages[kind]] for kind in KINDS}
    restored = actor.onload()
    after = {kind: snapshot(kind) for kind in KINDS}
    again = actor.update(samples, experience.old_logp_BT, advantage, mask)  # the state still trains
    destroy()
    same = {
        kind: all(torch.equal(a, b) for a, b in zip(before[kind], after[kind]))
        and len(before[kind]) == len(after[kind])
        for kind in ("optimizer", "weights")
    }
    return {
        "released": released,
        "restored": restored,
        "counts": {kind: len(storages[kind]) for kind in KINDS},
        "during": during,
        "same": same,
        "grads_zero": all(not t.any() for t in after["grads"]),
        "again_ok": again["actor/update_ok"],
    }


@pytest.mark.parametrize("dtype,world", [("float32", 1), ("bfloat16", 2)])
def test_offload_releases_storages_and_restores_them_bit_exactly(tiny_model_dir, dtype, world):
    result = run_distributed(_offload_round_trip, world, str(tiny_model_dir), dtype, timeout_s=600)[0]
    for kind in ("optimizer", "grads", "weights"):
        assert result["counts"][kind] > 0, kind
        assert result["released"][kind] > 0 and result["released"][kind] == result["restored"][kind], kind
        assert set(result["during"][kind]) == {0}, f"{kind}: a storage kept its memory while offloaded"
    assert result["same"] == {"optimizer": True, "weights": True}
    assert result["grads_zero"] and result["again_ok"] == 1.0
