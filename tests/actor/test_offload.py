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


def test_a_kind_that_grows_gets_a_new_host_buffer_and_the_old_pinned_one_is_released(monkeypatch):
    """Start-up offloads the optimizer before its first step, when it holds only the master copies; the moments
    appear at that step. The next offload needs a larger buffer: the old one is dropped first and torch's cached
    pinned block released (on a GPU it would otherwise stay cached for the whole run: 8 GiB per rank at 7B)."""
    import types
    import weakref

    from vppo_megatron.actor import offload

    released = []
    on_gpu = [True]  # the offload's CUDA branch, on this host's memory; the optimizer's step on the host
    monkeypatch.setattr(torch.cuda, "is_available", lambda: on_gpu[0])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(offload, "_host_buffer", lambda nbytes, pinned: torch.empty(nbytes, dtype=torch.uint8))
    monkeypatch.setattr(offload, "_release_cached_pinned_memory", lambda: released.append(True))
    model = torch.nn.Linear(8, 8)
    adam = torch.optim.AdamW(model.parameters())
    moved = offload.ActorOffload([model], types.SimpleNamespace(optimizer=adam))
    moved.offload(("weights", "optimizer"))  # before any step: no moments, an empty optimizer buffer
    first = weakref.ref(moved._host["optimizer"])
    moved.onload()
    model(torch.ones(1, 8)).sum().backward()
    on_gpu[0] = False
    adam.step()  # the moments appear
    on_gpu[0] = True
    moved.offload(("weights", "optimizer"))
    assert moved._host["optimizer"].numel() == 2 * 4 * (8 * 8 + 8)  # exp_avg + exp_avg_sq, fp32
    assert first() is None and released == [True]  # the old buffer is gone, the cache released once
    weights = moved._host["weights"]
    moved.onload()
    moved.offload(("weights", "optimizer"))  # same sizes: the buffers are reused, nothing released
    assert moved._host["weights"] is weights and released == [True]
    moved.onload()
