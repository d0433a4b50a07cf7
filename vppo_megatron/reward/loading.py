"""Load a reward function from a ``module:function`` or ``file.py:function`` spec, and score batches with it.

A reward function has the signature ``fn(response: str, ground_truth: str) -> dict[str, float]`` and returns at least
``"overall"`` (the scalar reward) and ``"accuracy"``; see `vppo_megatron.reward.math.compute_score`.
"""

import importlib
import importlib.util
import math
import numbers
import sys
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType

RewardFunction = Callable[[str, str], dict[str, float]]

REQUIRED_KEYS = ("overall", "accuracy")
# Bounds the returned value quoted in an error message.
MAX_REPR_CHARS = 200

_SPEC_FORMS = "'package.module:function' or 'path/to/file.py:function'"


def _is_file_spec(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def _load_file(path_text: str, spec: str) -> ModuleType:
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"Reward function spec {spec!r}: file {str(path)!r} does not exist; fix the path before ':'.")
    # A unique name keeps two files with the same stem from replacing each other in sys.modules.
    module_name = f"vppo_reward_{path.stem}_{uuid.uuid4().hex}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"Reward function spec {spec!r}: cannot import {str(path)!r}; it must be a Python file.")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickle look modules up here while the file runs
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _import_module(module_name: str, spec: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        # Only the spec's own module (or a parent package) missing is a spec error; a missing import inside it is not.
        if error.name is None or not (module_name == error.name or module_name.startswith(error.name + ".")):
            raise
        raise ValueError(
            f"Reward function spec {spec!r}: module {module_name!r} not found; check the dotted module path, "
            "install the package, or give a file instead as 'path/to/file.py:function'."
        ) from error


def load_reward_function(spec: str) -> RewardFunction:
    """Resolve ``spec`` (``package.module:function`` or ``path/to/file.py:function``) to a callable.

    Relative file paths are resolved against the current working directory.
    """
    target, colon, attribute = spec.rpartition(":")
    if not colon or not target or not attribute:
        raise ValueError(f"Reward function spec {spec!r} is malformed; expected {_SPEC_FORMS}.")
    module = _load_file(target, spec) if _is_file_spec(target) else _import_module(target, spec)
    if not hasattr(module, attribute):
        raise ValueError(
            f"Reward function spec {spec!r}: {target!r} has no attribute {attribute!r}; fix the name after ':'."
        )
    function = getattr(module, attribute)
    if not callable(function):
        raise ValueError(
            f"Reward function spec {spec!r}: {attribute!r} is a {type(function).__name__}, not callable; "
            "point the spec at a function (response, ground_truth) -> dict."
        )
    return function


def _describe(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _check_result(fn: Callable, index: int, result: object) -> dict[str, float]:
    shown = repr(result)[:MAX_REPR_CHARS]
    if not isinstance(result, Mapping):
        raise ValueError(f"Reward function {_describe(fn)} returned {shown} for sample {index}; expected a dict.")
    checked = dict(result)
    for key in REQUIRED_KEYS:
        value = result.get(key)
        # bool is an int subclass, but a True/False reward is almost always a bug (a grader returned instead).
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(
                f"Reward function {_describe(fn)} returned {shown} for sample {index}; "
                f"expected a finite float under key {key!r} (required keys: {', '.join(REQUIRED_KEYS)})."
            )
        checked[key] = float(value)
    return checked


def score_batch(fn: RewardFunction, responses: list[str], ground_truths: list[str]) -> list[dict[str, float]]:
    """Apply ``fn`` to each (response, ground_truth) pair and validate the results.

    ``"overall"`` and ``"accuracy"`` are returned as Python floats; any extra keys are passed through unchanged.
    """
    if len(responses) != len(ground_truths):
        raise ValueError(
            f"score_batch({_describe(fn)}): {len(responses)} responses but {len(ground_truths)} ground truths."
        )
    return [
        _check_result(fn, index, fn(response, truth))
        for index, (response, truth) in enumerate(zip(responses, ground_truths, strict=True))
    ]
