"""The model-family registry: everything that differs between Qwen2.5-VL, Qwen3-VL and the next family, in one
record per family, keyed by the Hugging Face `model_type` (`config.json`), which is also `model.family`.

Every other module asks the registry (`get(model_type)`) instead of naming a family: the HF <-> Megatron weight
rules (conversion, the actor's loading and the weight sync all use them), the transformers classes (config, model,
vision tower, the M-RoPE position function), the language-model traits megatron-core builds from (QK-norm, QKV
bias, interleaved M-RoPE, DeepStack), the processor's patch and merge sizes, the vLLM architecture, the public
configs the memory planner knows and the tiny model's shape.

Adding a family is its own module here plus one line in `_MODULES` (CONTRIBUTING.md walks through it). This package
is the lowest layer: it imports nothing from the project and transformers only inside functions.
"""

from __future__ import annotations

import importlib

from vppo_megatron.families.registry import Family, Rule

# model_type -> the module holding its FAMILY record
_MODULES = {
    "qwen2_5_vl": "vppo_megatron.families.qwen2_5_vl",
    "qwen3_vl": "vppo_megatron.families.qwen3_vl",
}
NAMES: tuple[str, ...] = tuple(_MODULES)


class UnknownFamily(KeyError):
    """A model_type no family module implements."""

    def __str__(self) -> str:
        return str(self.args[0])


def get(model_type: str) -> Family:
    """The family record of an HF `model_type`; UnknownFamily (naming the supported ones) otherwise."""
    if model_type not in _MODULES:
        raise UnknownFamily(
            f"model_type {model_type!r} is not a supported family ({', '.join(NAMES)}); "
            "adding one is a module in vppo_megatron/families/ (CONTRIBUTING.md)"
        )
    family = importlib.import_module(_MODULES[model_type]).FAMILY
    assert family.model_type == model_type, f"{_MODULES[model_type]} registers {family.model_type}"
    return family


def published() -> dict[str, dict]:
    """Every family's public configs (config.json excerpts by Hugging Face repository name)."""
    out = {}
    for name in NAMES:
        out.update(get(name).published)
    return out


__all__ = ["NAMES", "Family", "Rule", "UnknownFamily", "get", "published"]
