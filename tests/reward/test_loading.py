"""Tests for loading reward functions from specs and validating their batch results."""

import math

import pytest

from vppo_megatron.reward import compute_score, load_reward_function, score_batch

FILE_REWARD = """
def reward(response, ground_truth):
    value = 1.0 if response.strip() == ground_truth else 0.0
    return {"overall": value, "accuracy": value, "length": float(len(response))}

NOT_CALLABLE = 3
"""


def write_reward_file(directory, name="my_reward.py", body=FILE_REWARD):
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(body)
    return path


class TestLoadRewardFunction:
    def test_module_spec(self):
        # The built-in reward resolves to the very same function object.
        assert load_reward_function("vppo_megatron.reward.math:compute_score") is compute_score

    def test_absolute_file_spec(self, tmp_path):
        path = write_reward_file(tmp_path)
        reward = load_reward_function(f"{path}:reward")
        assert reward("42", "42") == {"overall": 1.0, "accuracy": 1.0, "length": 2.0}

    def test_relative_file_spec(self, tmp_path, monkeypatch):
        write_reward_file(tmp_path / "rewards")
        monkeypatch.chdir(tmp_path)
        # Relative to the working directory.
        reward = load_reward_function("rewards/my_reward.py:reward")
        assert reward("a", "b")["overall"] == 0.0

    def test_same_stem_files_stay_distinct(self, tmp_path):
        # Two files named my_reward.py must not replace each other's module.
        first = write_reward_file(
            tmp_path / "a", body="def reward(r, g):\n    return {'overall': 1.0, 'accuracy': 1.0}\n"
        )
        second = write_reward_file(
            tmp_path / "b", body="def reward(r, g):\n    return {'overall': 0.0, 'accuracy': 0.0}\n"
        )
        assert load_reward_function(f"{first}:reward")("", "")["overall"] == 1.0
        assert load_reward_function(f"{second}:reward")("", "")["overall"] == 0.0

    @pytest.mark.parametrize(
        "spec, message",
        [
            # No colon: cannot tell module from function.
            ("vppo_megatron.reward.math", "malformed"),
            # Empty function name.
            ("vppo_megatron.reward.math:", "malformed"),
            # Empty module.
            (":compute_score", "malformed"),
            # Missing leaf module and missing top-level package.
            ("vppo_megatron.reward.no_such_module:score", "not found"),
            ("no_such_package_xyz.rewards:score", "not found"),
            # Module exists, attribute does not.
            ("vppo_megatron.reward.math:no_such_function", "no attribute 'no_such_function'"),
            # Attribute exists but is an int.
            ("vppo_megatron.reward.math:MAX_ANSWER_CHARS", "not callable"),
        ],
    )
    def test_module_spec_errors(self, spec, message):
        with pytest.raises(ValueError) as error:
            load_reward_function(spec)
        assert repr(spec) in str(error.value)
        assert message in str(error.value)

    def test_missing_file(self, tmp_path):
        spec = f"{tmp_path / 'absent.py'}:reward"
        with pytest.raises(ValueError, match="does not exist") as error:
            load_reward_function(spec)
        assert repr(spec) in str(error.value)

    @pytest.mark.parametrize("attribute, message", [("absent", "no attribute"), ("NOT_CALLABLE", "not callable")])
    def test_file_attribute_errors(self, tmp_path, attribute, message):
        spec = f"{write_reward_file(tmp_path)}:{attribute}"
        with pytest.raises(ValueError, match=message) as error:
            load_reward_function(spec)
        assert repr(spec) in str(error.value)

    def test_broken_import_inside_module_is_not_masked(self, tmp_path, monkeypatch):
        # The spec's module exists; its own missing dependency must surface as the real ModuleNotFoundError.
        write_reward_file(tmp_path, "broken_reward_mod.py", "import no_such_dependency_xyz\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
            load_reward_function("broken_reward_mod:reward")


def constant(result):
    def reward(response, ground_truth):
        return result

    return reward


class TestScoreBatch:
    def test_builtin(self):
        results = score_batch(compute_score, [r"\boxed{3}", r"\boxed{4}"], ["3", "3"])
        # First is right, second wrong.
        assert [r["overall"] for r in results] == [1.0, 0.0]

    def test_ints_become_floats_and_extra_keys_pass_through(self):
        (result,) = score_batch(constant({"overall": 1, "accuracy": 0, "format": 0.5}), ["r"], ["g"])
        assert result == {"overall": 1.0, "accuracy": 0.0, "format": 0.5}
        assert type(result["overall"]) is float

    @pytest.mark.parametrize(
        "returned",
        [
            {"overall": 1.0},  # accuracy missing
            {"accuracy": 1.0},  # overall missing
            {"overall": "1.0", "accuracy": 1.0},  # string, not a number
            {"overall": True, "accuracy": 1.0},  # a grader's bool returned as the reward
            {"overall": math.nan, "accuracy": 1.0},  # NaN would poison advantages
            1.0,  # not a dict
            None,
        ],
    )
    def test_invalid_results(self, returned):
        with pytest.raises(ValueError) as error:
            score_batch(constant(returned), ["r"], ["g"])
        # The message names the function and shows what it returned.
        assert "constant.<locals>.reward" in str(error.value)
        assert repr(returned) in str(error.value)

    def test_length_mismatch(self):
        with pytest.raises(ValueError, match="2 responses but 1 ground truths"):
            score_batch(compute_score, ["a", "b"], ["a"])
