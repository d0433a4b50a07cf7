"""The import direction of CONTRIBUTING.md, checked on the source: a lower layer never imports a higher one, and the
heavy frameworks stay in their one home (megatron.core: actor/ and parallel/; vllm and ray: rollout/)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "vppo_megatron"
LAYERS = {
    "families": -1,
    "config": 0,
    "types": 0,
    "testing": 0,
    "processes": -0.5,
    "faults": 0,
    "topology": 0.5,
    "memory": 1,
    "lifecycle": 0,
    "algo": 1,
    "reward": 1,
    "data": 1,
    "tiny_model": 1,
    "parallel": 2,
    "convert": 2,
    "actor": 3,
    "rollout": 3,
    "sync": 4,
    "batch": 4,
    "metrics": 0,
    "trainer": 5,
    "train": 6,
    "plan": 4,
    "sft": 5,
    "evaluate": 5,
    "miniature": 5,
    "compare": 5,
    "resume": 4,
    "cli": 7,
}
FRAMEWORK_HOMES = {"megatron": {"actor", "parallel"}, "vllm": {"rollout"}, "ray": {"rollout"}}


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _unit(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py") if rel.parts[0] != "__init__.py" else "__init__"


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_every_module_belongs_to_a_layer():
    units = {_unit(p) for p in _modules()} - {"__init__"}
    assert units <= set(LAYERS), f"add {units - set(LAYERS)} to LAYERS (and to CONTRIBUTING.md's import direction)"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layering(path):
    unit = _unit(path)
    if unit == "__init__":
        return
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] == "vppo_megatron" and len(parts) > 1:
            target = parts[1]
            assert target == unit or LAYERS[target] < LAYERS[unit], f"{unit} (layer {LAYERS[unit]}) imports {name}"
        homes = FRAMEWORK_HOMES.get(parts[0])
        if homes is not None:
            assert unit in homes, f"{path.name} imports {name}; only {sorted(homes)} may"
