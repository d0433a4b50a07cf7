"""The two record types of the registry: a weight-mapping `Rule` and a model `Family`."""

from __future__ import annotations

import functools
import importlib
import types
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Rule:
    """One Megatron parameter and the HF checkpoint tensors it is made of (convert/mapping.py applies it)."""

    megatron: str
    """Megatron parameter name; `{i}` is the global transformer layer index."""
    hf: tuple[str, ...]
    """HF checkpoint tensor names, in fusion order."""
    kind: str = "copy"
    """copy | qkv (q, k, v fused per KV group) | gate_up (gate and up stacked, TP-interleaved)."""
    tp_dim: int | None = None
    """Dimension split across TP ranks (0 column/vocab parallel, 1 row parallel); None = replicated."""


def _import(path: str):
    """`package.module:attribute` -> the attribute (transformers is imported only when a family is used)."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class Family:
    """What the rest of the system needs to know about one model family."""

    model_type: str
    """HF `model_type` and the value of `model.family`."""
    display: str
    """Human name in messages and docs (Qwen2.5-VL)."""
    hf_config_class: str
    """transformers' config class, `module:Class`."""
    hf_model_class: str
    """transformers' image-text-to-text model class, `module:Class` (conversion checks, tiny model)."""
    vision_tower_class: str
    """transformers' vision tower class, `module:Class`; the actor holds it as is on the first pipeline stage."""
    rope_owner_class: str
    """transformers' class whose `get_rope_index` computes the M-RoPE position ids, `module:Class`."""
    vllm_architecture: str
    """The `architectures` entry vLLM serves the family with."""
    rules: Callable[[str, list[str], bool], list[Rule]]
    """(layer spec local | transformer_engine, vision tower parameter names, tied embeddings) -> the rules."""
    qk_layernorm: bool
    """Per-head RMSNorm on q and k before RoPE (Qwen3)."""
    qkv_bias: bool
    """Bias on the q, k and v projections (Qwen2)."""
    mrope_interleaved: bool
    """M-RoPE frequencies interleaved T, H, W (Qwen3-VL) instead of three contiguous sections (Qwen2.5-VL)."""
    patch_size: int
    """Vision patch in pixels (the processor's and the vision tower's)."""
    merge_size: int
    """Spatial merge of patches into one LLM token (per side)."""
    vision_params: Callable[[dict, int], int]
    """(vision_config dict, LLM hidden size) -> the vision tower's exact parameter count (memory planner)."""
    published: dict[str, dict] = field(default_factory=dict)
    """Public config.json excerpts by Hugging Face repository name (memory planner, rehearsal, dry runs)."""
    tiny_shape: dict = field(default_factory=dict)
    """The tiny model's TinySpec fields that differ from the defaults (vppo_megatron/tiny_model.py)."""
    tiny_config: Callable | None = None
    """(TinySpec, special-token ids, vocab size) -> the tiny model's transformers config."""
    tiny_processor: Callable | None = None
    """(TinySpec, tokenizer) -> the tiny model's transformers processor."""

    def config_class(self):
        return _import(self.hf_config_class)

    def model_class(self):
        return _import(self.hf_model_class)

    def vision_tower(self):
        return _import(self.vision_tower_class)

    @staticmethod
    def head_dim(text_config) -> int:
        return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads

    @staticmethod
    def deepstack_layers(hf_config) -> int:
        """How many of the first LLM layers receive DeepStack features (0: the family has none)."""
        return len(getattr(hf_config.vision_config, "deepstack_visual_indexes", None) or [])

    def rope_positions(self, hf_config, input_ids_1S, token_type_1S, image_grid_thw):
        """M-RoPE position ids [3, 1, S] from transformers' own get_rope_index, run on a stand-in owner (it reads
        only `config` and its own `get_vision_position_ids`)."""
        owner_class = _import(self.rope_owner_class)
        owner = types.SimpleNamespace(config=hf_config)
        owner.get_vision_position_ids = functools.partial(owner_class.get_vision_position_ids, owner)
        positions, _ = owner_class.get_rope_index(owner, input_ids_1S, token_type_1S, image_grid_thw=image_grid_thw)
        return positions

    def hf_config_from_excerpt(self, excerpt: dict):
        """transformers' config from a `published` excerpt (model_type removed)."""
        return self.config_class()(**{k: v for k, v in excerpt.items() if k != "model_type"})
