"""Tests for the VPPO math reward: last-box extraction and mathruler / math-verify grading."""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import vppo_megatron.reward.math as math_reward
from vppo_megatron.reward import compute_score, compute_score_math_verify, extract_last_boxed, grade_answer

CORRECT = {"overall": 1.0, "accuracy": 1.0}
WRONG = {"overall": 0.0, "accuracy": 0.0}
# Far past MAX_ANSWER_CHARS and large enough that a quadratic scan or a sympy parse would be noticeable.
LONG_GARBAGE_CHARS = 1_000_000


class TestExtractLastBoxed:
    @pytest.mark.parametrize(
        "text, expected",
        [
            # Inner braces of \frac must not close the box.
            (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
            # Content is stripped, as mathruler does.
            (r"\boxed{ 3 }", "3"),
            # The last box wins.
            (r"\boxed{2} then \boxed{3}", "3"),
            # \fbox is read only without a braced \boxed (the reference reads only \boxed{)
            (r"\boxed{2} \fbox{7}", "2"),
            (r"\fbox{7}", "7"),
            # a bare \boxed after the braced one has no argument: the braced box stays the answer
            (r"\boxed{5} (I put it in \boxed.)", "5"),
            (r"\boxed 4 and then \boxed{5}", "5"),
            # Space-separated token form, ended by `$`.
            (r"$\boxed 42$", "42"),
            # A space between the command and its braces is allowed in LaTeX.
            (r"\boxed {5}", "5"),
            # Escaped braces are content, not structure.
            (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
            (r"\boxed{\}}", r"\}"),
            # `\\` is a line break; the brace after it closes the box.
            (r"\boxed{a\\}", r"a\\"),
            # An empty box has empty content, distinct from having no box.
            (r"\boxed{}", ""),
        ],
    )
    def test_extracts(self, text, expected):
        assert extract_last_boxed(text) == expected

    @pytest.mark.parametrize(
        "text",
        [
            "The answer is 3.",  # no box at all
            "",  # empty response
            r"\boxed{3",  # unbalanced
            r"\boxed{2} and finally \boxed{3",  # last box unbalanced: no fallback to the earlier box (as mathruler)
            r"\boxedanswer{3}",  # a different command that merely starts with `boxed`
            r"\boxed",  # command with nothing after it
        ],
    )
    def test_returns_none(self, text):
        assert extract_last_boxed(text) is None

    def test_long_input_without_box(self):
        # Only checks it returns; the scan is linear.
        assert extract_last_boxed("{" * LONG_GARBAGE_CHARS) is None


class TestComputeScore:
    @pytest.mark.parametrize(
        "response, ground_truth, expected",
        [
            # mathd normalisation rewrites "1/2" into \frac{1}{2}.
            (r"\boxed{\frac{1}{2}}", "1/2", CORRECT),
            # mathd maps exactly "0.5" to \frac{1}{2}.
            (r"\boxed{\frac{1}{2}}", "0.5", CORRECT),
            # Other decimals need the sympy path: 0.25 - 1/4 simplifies to 0.
            (r"\boxed{\frac{1}{4}}", "0.25", CORRECT),
            # mathruler requires reduced fractions: 2/4 is not accepted for 1/2.
            (r"\boxed{2/4}", "1/2", WRONG),
            # Surrounding spaces in the box are ignored.
            (r"\boxed{ 3 }", "3", CORRECT),
            (r"\boxed{4}", "3", WRONG),
            # Last box wins: 3 is the answer, 2 was an intermediate step.
            (r"First \boxed{2} ... finally \boxed{3}", "3", CORRECT),
            (r"First \boxed{2} ... finally \boxed{3}", "2", WRONG),
            # No box means no answer, even if the right number is in the text.
            ("The answer is 3.", "3", WRONG),
            # Unbalanced box is no answer.
            (r"\boxed{3", "3", WRONG),
            # mathruler removes an enclosing \text{}.
            (r"\boxed{\text{red}}", "red", CORRECT),
            # mathruler lower-cases answers, so text answers are case-insensitive.
            (r"\boxed{Red}", "red", CORRECT),
            (r"\boxed{\text{RED}}", "red", CORRECT),
            # Properly formatted thousands separators are stripped, in either direction.
            (r"\boxed{1,000}", "1000", CORRECT),
            (r"\boxed{1000}", "1,000", CORRECT),
            # Multiple-choice letters compare as text.
            (r"\boxed{B}", "B", CORRECT),
            (r"\boxed{A}", "B", WRONG),
            # A box inside the think block is superseded by the final box.
            (r"<think>maybe \boxed{2}?</think> The answer is \boxed{3}.", "3", CORRECT),
            (r"<think>maybe \boxed{2}?</think> The answer is \boxed{3}.", "2", WRONG),
            # A blank ground truth matches nothing, not even an empty box (mathruler alone says "" == "").
            (r"\boxed{}", "", WRONG),
            (r"\boxed{3}", "", WRONG),
            (r"\boxed{3}", "   ", WRONG),
            # mathruler normalises `\$` to "" and would match a blank ground truth.
            (r"\boxed{\$}", "", WRONG),
            # mathruler returns the string "None" for a missing box; here a missing box never matches "None".
            ("no box", "None", WRONG),
        ],
    )
    def test_score(self, response, ground_truth, expected):
        assert compute_score(response, ground_truth) == expected

    def test_values_are_floats(self):
        # Both keys are present and are Python floats, correct or not.
        for result in (compute_score(r"\boxed{3}", "3"), compute_score("", "3")):
            assert set(result) == {"overall", "accuracy"}
            assert all(type(value) is float for value in result.values())

    def test_long_garbage_response(self):
        # Only checks it returns 0.0; no box in a megabyte of text.
        assert compute_score("x+" * (LONG_GARBAGE_CHARS // 2), "3") == WRONG

    def test_long_garbage_box(self):
        # The candidate is over MAX_ANSWER_CHARS, so it is rejected before any sympy parse.
        response = r"\boxed{" + "1+" * (LONG_GARBAGE_CHARS // 2) + "1}"
        assert compute_score(response, "0.25") == WRONG

    def test_sympy_hazard_returns(self):
        # Without the guard, sympy evaluates 9**9**9 and (10!)! forever, in C, so no in-process timeout can stop it;
        # a subprocess turns a regression into a failure instead of a hung test run.
        code = (
            "from vppo_megatron.reward import compute_score\n"
            r"print(compute_score(r'\boxed{9**9**9}', '0.25')['overall'], "
            r"compute_score(r'\boxed{\left(10!\right)!}', '0.25')['overall'])"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["0.0", "0.0"]


class TestGradeAnswer:
    def test_missing_answer(self):
        # The extractor returns None for no box; that is wrong, not an error.
        assert grade_answer(None, "3") is False

    def test_empty_answer(self):
        assert grade_answer("", "3") is False

    def test_factorial_still_matches_as_string(self):
        # Hazardous candidates skip sympy but still match by normalised string.
        assert grade_answer("5!", "5!") is True

    def test_latex_thin_space_is_not_a_factorial(self):
        # `1,\!000` (MATH-style thousands) goes through the full grader.
        assert grade_answer(r"1,\!000", "1000") is True

    def test_length_cap(self):
        # An answer past the cap is compared as normalised strings only (no sympy): equal text still matches.
        at_cap = "1" * math_reward.MAX_ANSWER_CHARS
        assert grade_answer(at_cap, at_cap) is True
        assert grade_answer(at_cap + "1", at_cap + "1") is True
        assert grade_answer(at_cap + "1", at_cap + "2") is False

    def test_grader_exception_is_wrong(self, monkeypatch):
        def broken(given, ground_truth):
            raise RuntimeError("sympy failed")

        monkeypatch.setattr(math_reward, "_mathruler_grade_answer", broken)
        # The exception is swallowed and counted as a wrong answer.
        assert grade_answer("3", "4") is False
        assert compute_score(r"\boxed{3}", "4") == WRONG


class TestComputeScoreMathVerify:
    @pytest.mark.parametrize(
        "response, ground_truth, expected",
        [
            # math-verify compares values: 1/2 == 0.5.
            (r"\boxed{\frac{1}{2}}", "0.5", CORRECT),
            (r"\boxed{\frac{1}{2}}", "1/2", CORRECT),
            # Symbolic equality: sqrt(8) == 2 sqrt(2).
            (r"\boxed{\sqrt{8}}", r"2\sqrt{2}", CORRECT),
            (r"\boxed{ 3 }", "3", CORRECT),
            (r"\boxed{1,000}", "1000", CORRECT),
            # Last box wins.
            (r"\boxed{2} ... \boxed{3}", "3", CORRECT),
            (r"\boxed{2} ... \boxed{3}", "2", WRONG),
            # Tuples are read as a whole only because the answers are wrapped in \boxed.
            (r"\boxed{(1,2)}", "(1, 2)", CORRECT),
            ("The answer is 3.", "3", WRONG),
            (r"\boxed{3", "3", WRONG),
            (r"\boxed{}", "", WRONG),
            (r"\boxed{3}", "", WRONG),
        ],
    )
    def test_score(self, response, ground_truth, expected):
        assert compute_score_math_verify(response, ground_truth) == expected

    def test_worker_thread(self):
        # math-verify's signal-based timeout raises outside the main thread; it must be disabled there.
        with ThreadPoolExecutor(max_workers=2) as pool:
            results = list(pool.map(compute_score_math_verify, [r"\boxed{\frac{1}{2}}"] * 4, ["0.5"] * 4))
        assert results == [CORRECT] * 4

    def test_long_garbage_box(self):
        response = r"\boxed{" + "1+" * (LONG_GARBAGE_CHARS // 2) + "1}"
        assert compute_score_math_verify(response, "3") == WRONG

    @pytest.mark.parametrize("error", [RuntimeError("boom"), math_reward.TimeoutException("timed out")])
    def test_grader_exception_is_wrong(self, monkeypatch, error):
        def broken(*args, **kwargs):
            raise error

        # TimeoutException derives from BaseException and must be caught too.
        monkeypatch.setattr(math_reward, "verify", broken)
        assert compute_score_math_verify(r"\boxed{3}", "3") == WRONG
