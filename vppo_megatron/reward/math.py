"""Rule-based math reward for VPPO.

VPPO's reward (docs/algorithm.md, "The base objective"): 1.0 if the last \\boxed{...} content grades equal to the
answer (mathruler-style normalisation), else 0.0. No format reward.

Contract of every scorer here: ``fn(response, ground_truth) -> {"overall": float, "accuracy": float}``, both values
equal (1.0 or 0.0). Scorers never raise on model output: a missing, empty, unbalanced, oversized or unparsable answer
scores 0.0.

`compute_score` reproduces the reference (EasyR1 fork, `compute_score_wo_format`): whitespace around ``<``, ``>``
and ``/`` removed from the response, then ``grade_answer(extract_boxed_content(response), ground_truth)`` from
mathruler, with these deliberate differences:

- no box yields no answer (mathruler returns the string ``"None"``, which would match a ground truth of "None");
- escaped braces ``\\{`` / ``\\}`` inside the box do not count as structure; ``\\boxed {5}`` (a space before the
  brace, which LaTeX accepts) is read; ``\\fbox{...}`` is read when the response has no ``\\boxed{...}``, and
  ``\\boxed 5`` when it has neither (the reference reads only the last ``\\boxed{``, so a braced ``\\boxed`` always
  wins over both, as there);
- a blank ground truth never matches (mathruler says ``\\boxed{}`` equals ``""``);
- candidates longer than `MAX_ANSWER_CHARS`, or containing ``**`` / ``!`` (which can make sympy compute huge numbers,
  e.g. ``9**9**9`` or ``(10!)!``), are compared by mathruler's normalised strings only, without sympy.

`compute_score_math_verify` grades the same extracted answer with math-verify instead.
"""

import re
import threading

from math_verify import parse, verify
from math_verify.errors import TimeoutException
from mathruler.grader import _normalize as _mathruler_normalize
from mathruler.grader import grade_answer as _mathruler_grade_answer
from mathruler.math_normalize import normalize_answer as _mathd_normalize

# Real answers are a few dozen characters; sympy simplify time grows fast with length (~1.4 s at 540 chars).
MAX_ANSWER_CHARS = 512
# math-verify's limit per parse / comparison; only enforceable in the main thread (it uses SIGALRM).
MATH_VERIFY_TIMEOUT_SECONDS = 5

# a box command, then its opening brace (group 2) or the whitespace of the bare form `\boxed 5`
_BOX_COMMAND = re.compile(r"\\(boxed|fbox)(?![A-Za-z])(\s*\{|\s+)?")
# the reference removes whitespace around these before extracting and grading (for Qwen2.5-VL-32B's spacing)
_SPACED_DELIMITER = re.compile(r"\s*(<|>|/)\s*")
# A backslash escapes the next character, so `\{`, `\}` and `\\` are skipped as units.
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)
_BARE_TOKEN = re.compile(r"[^\s$]+")
_SYMPY_HAZARD = re.compile(r"\*\*|!")


def _braced_content(text: str, open_index: int) -> str | None:
    depth = 0
    for match in _BRACE_TOKEN.finditer(text, open_index):
        token = match.group()
        if token == "{":
            depth += 1
        elif token == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : match.start()].strip()
    return None


def extract_last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text``, stripped; without one, of the last ``\\fbox{...}``; without
    either, the token after the last bare ``\\boxed 5`` / ``\\fbox 5``.

    Nested braces are matched. Returns None when there is no box or the chosen box is unbalanced (an earlier,
    balanced box is not used as a fallback, as in mathruler).
    """
    if not text:
        return None
    braced: dict[str, re.Match] = {}
    bare = None
    for match in _BOX_COMMAND.finditer(text):
        if match.group(2) is None:
            continue  # `\boxed.` or `\boxed` at the end: no argument
        if match.group(2).endswith("{"):
            braced[match.group(1)] = match
        else:
            bare = match
    chosen = braced.get("boxed") or braced.get("fbox")
    if chosen is not None:
        return _braced_content(text, chosen.end() - 1)
    if bare is not None:
        token = _BARE_TOKEN.match(text, bare.end())
        return token.group() if token else None
    return None


def _equal_without_sympy(given: str, ground_truth: str) -> bool:
    if _mathd_normalize(given) == _mathd_normalize(ground_truth):
        return True
    return _mathruler_normalize(given) == _mathruler_normalize(ground_truth)


def _is_gradable(given: str | None, ground_truth: str | None) -> bool:
    return bool(given and given.strip() and ground_truth and ground_truth.strip())


def grade_answer(given: str | None, ground_truth: str) -> bool:
    """mathruler's ``grade_answer`` (MATH normalisation, then sympy equality), made total: never raises or hangs."""
    if not _is_gradable(given, ground_truth):
        return False
    try:
        if len(given) > MAX_ANSWER_CHARS or _SYMPY_HAZARD.search(given.replace("\\!", "")):  # `\!`: a thin space
            return _equal_without_sympy(given, ground_truth)
        return bool(_mathruler_grade_answer(given, ground_truth))
    except Exception:
        return False


def _score(correct: bool) -> dict[str, float]:
    value = 1.0 if correct else 0.0
    return {"overall": value, "accuracy": value}


def answer_of(response: str) -> str | None:
    """The answer a response gives, as the reference reads it: whitespace around ``<``, ``>`` and ``/`` removed,
    then the last box's content."""
    return extract_last_boxed(_SPACED_DELIMITER.sub(r"\1", response) if response else response)


def compute_score(response: str, ground_truth: str) -> dict[str, float]:
    """VPPO reward: 1.0 if the last boxed answer in ``response`` grades equal to ``ground_truth``, else 0.0."""
    return _score(grade_answer(answer_of(response), ground_truth))


def _math_verify_equal(given: str | None, ground_truth: str) -> bool:
    if not _is_gradable(given, ground_truth) or len(given) > MAX_ANSWER_CHARS:  # parse time grows with length
        return False
    # signal.alarm is only usable in the main thread; elsewhere run without math-verify's timeout.
    timeout = MATH_VERIFY_TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None
    try:
        # Wrapping in \boxed makes math-verify read bare LaTeX (`\frac{1}{2}`) and tuples (`(1, 2)`) as one answer.
        gold = parse(f"\\boxed{{{ground_truth}}}", parsing_timeout=timeout)
        answer = parse(f"\\boxed{{{given}}}", parsing_timeout=timeout)
        return bool(gold and answer and verify(gold, answer, timeout_seconds=timeout))
    except (Exception, TimeoutException):  # TimeoutException derives from BaseException
        return False


def compute_score_math_verify(response: str, ground_truth: str) -> dict[str, float]:
    """Same contract as `compute_score`, grading the last boxed answer with math-verify's parse + verify."""
    return _score(_math_verify_equal(answer_of(response), ground_truth))
