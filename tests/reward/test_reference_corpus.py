"""The reward against the reference's `compute_score_wo_format` (its examples/reward_function/math.py): whitespace
around <, > and / removed, then mathruler's `grade_answer(extract_boxed_content(response), ground_truth)`.

Every case's expected score is the reference's, which `reference_score` below computes the way that file does
(mathruler is a dependency of ours too); the only disagreements are the deliberate ones in DEVIATIONS, each with
its reason (vppo_megatron/reward/math.py says the same).
"""

import re

import pytest
from mathruler.grader import extract_boxed_content
from mathruler.grader import grade_answer as mathruler_grade_answer

from vppo_megatron.reward import compute_score

# (response, ground truth, the reference's score = ours)
AGREED = [
    # fractions (mathruler's MATH normalisation, then sympy)
    (r"\boxed{\frac{1}{2}}", "1/2", 1),
    (r"\boxed{\dfrac{3}{4}}", "3/4", 1),
    (r"\boxed{3/4}", "0.75", 1),
    (r"\boxed{\frac12}", "1/2", 1),
    (r"\boxed{\tfrac{2}{3}}", "2/3", 1),
    (r"\boxed{2/4}", "1/2", 0),
    (r"\boxed{\frac{4}{2}}", "2", 0),
    (r"\boxed{-\frac{1}{3}}", "-1/3", 1),
    # decimals and large numbers
    (r"\boxed{0.50}", "0.5", 1),
    (r"\boxed{2.0}", "2", 1),
    (r"\boxed{.5}", "0.5", 1),
    (r"\boxed{3.140}", "3.14", 1),
    (r"\boxed{3.1416}", "3.14", 0),
    (r"\boxed{1,000,000}", "1000000", 1),
    (r"\boxed{1\,000}", "1000", 0),
    (r"\boxed{10^{3}}", "1000", 0),
    # letters and choices
    (r"\boxed{(A)}", "A", 1),
    (r"\boxed{A}", "(A)", 1),
    (r"\boxed{\text{(B)}}", "B", 1),
    (r"\boxed{B.}", "B", 0),
    (r"\boxed{b}", "B", 1),
    (r"\boxed{A, B}", "A,B", 1),
    (r"\boxed{C: 12}", "C", 0),
    (r"\boxed{\textbf{D}}", "D", 1),
    (r"\boxed{\mathrm{E}}", "E", 1),
    # units and symbols
    (r"\boxed{5\text{ cm}}", "5", 1),
    (r"\boxed{5 cm}", "5", 1),
    (r"\boxed{30^\circ}", "30", 1),
    (r"\boxed{30°}", "30", 0),
    (r"\boxed{\$5}", "5", 1),
    (r"\boxed{50\%}", "50", 1),
    (r"\boxed{50\%}", "0.5", 0),
    (r"\boxed{12 \text{ square units}}", "12", 1),
    (r"\boxed{6\pi}", r"6\pi", 1),
    (r"\boxed{6\pi}", "18.85", 0),
    (r"\boxed{\sqrt{2}}", r"\sqrt2", 1),
    (r"\boxed{2\sqrt{3}}", r"\sqrt{12}", 1),
    (r"\boxed{x=3}", "3", 1),
    (r"\boxed{3}", "x=3", 1),
    (r"\boxed{-3}", "-3", 1),
    (r"\boxed{−3}", "-3", 0),
    # sets, intervals, tuples
    (r"\boxed{(1, 2)}", "(1,2)", 1),
    (r"\boxed{[0, 1]}", "[0,1]", 1),
    (r"\boxed{\{1,2\}}", r"\{1,2\}", 1),
    # several and nested boxes: the last \boxed{ wins, an unbalanced last box is no answer
    (r"\boxed{2} then \boxed{3}", "3", 1),
    (r"\boxed{2} then \boxed{3}", "2", 0),
    (r"\boxed{\boxed{3}}", "3", 1),
    (r"<think>\boxed{1}</think> \boxed{7}", "7", 1),
    (r"\boxed{5} (I put it in \boxed.)", "5", 1),
    (r"\boxed{3} and \fbox{5}", "3", 1),
    (r"\boxed{3} and \fbox{5}", "5", 0),
    (r"\boxed{2} and finally \boxed{3", "3", 0),
    (r"\boxed{2} and finally \boxed{3", "2", 0),
    # whitespace around <, > and / is removed before grading (the reference's rule)
    (r"\boxed{1 / 2}", "1/2", 1),
    (r"\boxed{x < 3}", "x<3", 1),
    (r"\boxed{a >b}", "a>b", 1),
    (r"< think >x</ think > \boxed{4}", "4", 1),
    # text answers
    (r"\boxed{\text{yes}}", "Yes", 1),
    (r"\boxed{Yes}", "yes", 1),
    (r"\boxed{\text{red}}", "Red", 1),
    (r"\boxed{red.}", "red", 0),
    (r"\boxed{\text{no}}", "yes", 0),
    # no answer
    ("The answer is 3.", "3", 0),
    (r"\boxed{3}", "", 0),
]
# (response, ground truth, the reference's score, ours, why ours differs)
DEVIATIONS = [
    ("no box at all", "None", 1, 0, "mathruler reads a missing box as the answer 'None'"),
    (r"\boxed{}", "", 1, 0, "a blank ground truth matches nothing"),
    (r"\boxed {5}", "5", 0, 1, "LaTeX accepts a space before the brace"),
    (r"\fbox{5}", "5", 0, 1, "\\fbox is a box too, read when there is no \\boxed{...}"),
    (r"$\boxed 42$", "42", 0, 1, "\\boxed 42 is a box too, read when there is no braced box"),
    # consequences of the rules above
    (r"\boxed{3} then \boxed {5}", "3", 1, 0, "the space before the brace is read: the last box is 5"),
    (r"\boxed{2} and \boxed{3", "None", 1, 0, "an unbalanced last box is no answer, which never matches 'None'"),
    (r"\boxed{}", "{}", 1, 0, "an empty answer matches nothing"),
    (r"\boxed{\left\{x\right.}", r"\left\{x\right.", 0, 1, "escaped braces are content, not structure"),
    (r"\boxed{x**2}", "x^2", 1, 0, "** skips sympy (9**9**9 would hang the grader): compared as text"),
    (r"\boxed{\frac{1}{2!}}", "0.5", 1, 0, "! skips sympy ((10!)! would hang the grader): compared as text"),
]


def reference_score(response: str, ground_truth: str) -> int:
    response = re.sub(r"\s*(<|>|/)\s*", r"\1", response)
    return int(mathruler_grade_answer(extract_boxed_content(response), ground_truth))


def test_the_corpus_is_large_and_covers_both_scores():
    assert len(AGREED) + len(DEVIATIONS) >= 60
    assert {score for _, _, score in AGREED} == {0, 1}


@pytest.mark.parametrize("response, ground_truth, expected", AGREED)
def test_scores_as_the_reference_does(response, ground_truth, expected):
    assert reference_score(response, ground_truth) == expected
    assert compute_score(response, ground_truth) == {"overall": float(expected), "accuracy": float(expected)}


@pytest.mark.parametrize("response, ground_truth, theirs, ours, why", DEVIATIONS)
def test_deliberate_deviations_differ_only_as_documented(response, ground_truth, theirs, ours, why):
    assert reference_score(response, ground_truth) == theirs
    assert compute_score(response, ground_truth)["accuracy"] == float(ours), why
