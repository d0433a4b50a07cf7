"""The lifecycle's documented table and order (lifecycle.py), and its config rules. The calls on the real actor and
engine are checked end to end in tests/rollout/test_fleet.py and tests/actor/test_offload.py."""

import pytest

from vppo_megatron.config import ConfigError, load
from vppo_megatron.lifecycle import OFFLOAD_KINDS, resident, resolve_offload, step_order


def test_auto_offloads_everything_only_when_colocated_on_cuda():
    assert resolve_offload("auto", "colocated", cuda=True) == "all"
    assert resolve_offload("auto", "colocated", cuda=False) == "none"
    assert resolve_offload("auto", "disaggregated", cuda=True) == "none"
    assert resolve_offload("optimizer", "colocated", cuda=False) == "optimizer"


def test_colocated_all_order_matches_the_module_docstring():
    assert step_order("all", "colocated") == [
        "engines.sleep(level=1)",
        "actor.onload",
        "actor.offload(optimizer+grads)",
        "engines.wake_up(weights)",
        "actor.offload(weights)",
        "engines.wake_up(kv_cache)",
    ]
    assert step_order("none", "colocated") == [
        "engines.sleep(level=1)",
        "engines.wake_up(weights)",
        "engines.wake_up(kv_cache)",
    ]
    assert step_order("all", "disaggregated") == []


@pytest.mark.parametrize("offload", list(OFFLOAD_KINDS))
def test_engines_and_the_training_state_never_overlap_when_colocated(offload):
    update = resident("update", offload, "colocated")
    assert not update["engine_weights"] and not update["engine_kv_cache"]
    assert all(update[k] for k in ("actor_weights", "actor_grads", "actor_optimizer", "actor_activations"))
    rollout = resident("rollout", offload, "colocated")
    assert rollout["engine_kv_cache"] and not rollout["actor_activations"]
    gone = set(OFFLOAD_KINDS[offload])
    assert rollout["actor_optimizer"] == ("optimizer" not in gone)
    assert rollout["actor_grads"] == ("grads" not in gone)
    assert rollout["actor_weights"] == ("weights" not in gone)
    assert resident("sync", offload, "colocated")["actor_weights"]  # the sync reads them


def test_disaggregated_keeps_the_actor_resident_and_refuses_offload():
    for phase in ("rollout", "sync"):
        held = resident(phase, "none", "disaggregated")
        assert held["actor_weights"] and held["actor_grads"] and held["actor_optimizer"]
        assert not held["engine_weights"] and not held["engine_kv_cache"]  # the engines are on other GPUs
    with pytest.raises(ConfigError, match="actor.offload"):
        load(None, ["rollout.placement=disaggregated", "actor.offload=optimizer"]).validate()
    load(None, ["rollout.placement=disaggregated", "actor.offload=auto"]).validate()
