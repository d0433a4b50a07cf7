"""The rules of docs/security.md, checked on the source: no pickle loading outside the documented places, no
remote code, user code imported only by the reward loader."""

import ast
from pathlib import Path

ROOTS = [Path("vppo_megatron"), Path("checkpoints_convert"), Path("tools")]


def _calls():
    for root in ROOTS:
        for path in sorted(root.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call):
                    yield path, node


def _name(func) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def test_no_pickle_is_loaded_outside_the_documented_places():
    found = []
    for path, call in _calls():
        name = _name(call.func)
        if name in ("pickle.load", "pickle.loads", "cloudpickle.loads", "dill.load", "dill.loads"):
            found.append(f"{path}: {name}")
        if name == "torch.load":
            keywords = {k.arg: k.value for k in call.keywords}
            safe = isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value is True
            if not safe and str(path) != "vppo_megatron/testing.py":
                found.append(f"{path}: torch.load without weights_only=True")
    assert not found, found


def test_no_remote_code_and_user_code_only_through_the_reward_loader():
    found = []
    for path, call in _calls():
        for keyword in call.keywords:
            if keyword.arg == "trust_remote_code" and not (
                isinstance(keyword.value, ast.Constant) and keyword.value.value is False
            ):
                found.append(f"{path}: trust_remote_code")
        name = _name(call.func)
        if name.endswith("spec_from_file_location") and str(path) != "vppo_megatron/reward/loading.py":
            found.append(f"{path}: imports a file")
        if isinstance(call.func, ast.Name) and name in ("eval", "exec"):  # the builtins, not model.eval()
            found.append(f"{path}: {name}")
    assert not found, found
