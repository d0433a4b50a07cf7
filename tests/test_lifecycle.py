"""The lifecycle's documented table and order (lifecycle.py), and its config rules. The calls on the real actor and
engine are checked end to end in tests/rollout/test_fleet.py and tests/actor/test_offload.py."""

import pytest

from vppo_megatron.config import ConfigError, load
from vppo_megatron.lifecycle import OFFLOAD_KINDS, resident, resolve_offload, startup_order, step_order


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


def _walk(calls: list[str]):
    """Replays recorded calls on a model of one colocated GPU: the engines' awake parts and the actor's resident
    kinds after each call (engines are born awake; the actor holds everything once built)."""
    engines, actor, states = {"weights", "kv_cache"}, set(), []
    for call in calls:
        if call == "engines.sleep(level=1)":
            engines = set()
        elif call.startswith("engines.wake_up("):
            engines.add(call.removeprefix("engines.wake_up(").rstrip(")"))
        elif call in ("actor.build", "actor.onload"):
            actor = {"optimizer", "grads", "weights"}
        elif call.startswith("actor.offload("):
            actor -= set(call.removeprefix("actor.offload(").rstrip(")").split("+"))
        states.append((call, frozenset(engines), frozenset(actor)))
    return states


@pytest.mark.parametrize("offload", list(OFFLOAD_KINDS))
@pytest.mark.parametrize("resumed", [False, True])
def test_start_up_never_holds_the_awake_engines_and_the_whole_actor(offload, resumed):
    """The documented start-up (docs/scaling.md): the engines sleep before the actor is built (and a checkpoint
    loaded); the first sync is the step's own; afterwards the rollout state of every step."""
    order = startup_order(offload, "colocated", resumed)
    assert order[:2] == ["engines.sleep(level=1)", "actor.build"]
    assert ("actor.load(checkpoint)" in order) == resumed
    assert order.index("sync.push") > order.index("engines.wake_up(weights)")
    states = _walk(order + step_order(offload, "colocated") * 2)
    for call, engines, actor in states:
        if actor == {"optimizer", "grads", "weights"} and offload != "none":
            assert not engines, f"after {call}: engines {set(engines)} awake next to the whole actor"
        if "kv_cache" in engines:
            assert not actor & set(OFFLOAD_KINDS[offload]), call  # the rollout state: offloaded kinds gone
    rollout = resident("rollout", offload, "colocated")
    _, engines, actor = states[len(order) - 1]
    assert engines == {"weights", "kv_cache"}
    assert actor == {k for k in ("optimizer", "grads", "weights") if rollout[f"actor_{k}"]}
    assert startup_order(offload, "disaggregated", resumed)[-1] == "sync.push"


@pytest.mark.parametrize("resumed", [False, True])
def test_every_phase_of_a_run_is_closed_once_in_order(resumed):
    """The phases whose peak memory a CUDA host records (memory_peaks.jsonl, compared with the plan by
    tools/gpu_acceptance.sh): start-up or resume, then each step's rollout, experience, update, sync, and a
    checkpoint between steps (no engines and no actor offload here: the transitions alone)."""
    from vppo_megatron.lifecycle import Lifecycle

    lifecycle = Lifecycle(load(None, []), None, None, lambda: None, cuda=False)
    lifecycle.start_up(lambda: None, lambda actor: {"step": 1} if resumed else None)
    lifecycle.first_sync(dict)
    for phase in ("experience", "update", "sync", "rollout"):
        lifecycle.enter(phase)
    with lifecycle.everything_resident():
        pass
    first = "resume" if resumed else "startup"
    step = ["rollout", "experience", "update", "sync"]
    assert lifecycle.closed == [first, "sync", *step, "rollout", "checkpoint", "sync"]
