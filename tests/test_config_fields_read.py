"""A setting that nothing reads is a bug: every leaf field of the config tree must be read by code outside
config.py (validation alone does not count) as `<section>.<field>` attribute access or a getattr by name."""

import ast
import dataclasses
import typing
from pathlib import Path

from vppo_megatron.config import Config

PACKAGE = Path(__file__).parents[1] / "vppo_megatron"
# Fields whose whole effect is resolving other fields inside config.py; each is checked to change them below.
RESOLVES_OTHERS = {"algorithm.base"}


def _leaf_fields(cls=Config, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f.name


def _names_read():
    """Attribute names loaded anywhere outside config.py, and string constants (getattr(cfg, name) loops)."""
    attributes, strings = set(), set()
    for path in PACKAGE.rglob("*.py"):
        if path.name == "config.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                attributes.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                strings.add(node.value)
    return attributes, strings


def test_every_config_field_is_read_by_some_code():
    attributes, strings = _names_read()
    unread = [
        dotted
        for dotted, name in _leaf_fields()
        if name not in attributes and name not in strings and dotted not in RESOLVES_OTHERS
    ]
    assert not unread, f"config fields no code reads: {unread} (implement them or remove them)"


def test_the_check_catches_an_unread_field():
    attributes, strings = _names_read()
    assert "an_unused_setting_name" not in attributes | strings
    assert {"ppo_epochs", "load_optimizer", "verify_sync_every", "max_tokens_per_micro_batch"} <= attributes


def test_fields_that_resolve_others_do_change_them():
    from vppo_megatron.config import load

    dapo, grpo = load(None, []).algorithm, load(None, ["algorithm.base=grpo"]).algorithm
    assert (dapo.dynamic_sampling, dapo.clip_ratio_high) == (True, 0.28)
    assert (grpo.dynamic_sampling, grpo.clip_ratio_high) == (False, grpo.clip_ratio_low)
