"""Qwen2.5-VL: HF checkpoint names <-> the Megatron actor's parameter names.

HF names are the checkpoint's (safetensors) names, which transformers, vLLM and the Hub use:
`visual.*`, `model.embed_tokens`, `model.layers.{i}.*`, `model.norm`, `lm_head`.
Megatron names are those of `vppo_megatron.actor.model.Qwen25VLModel`: the vision tower (HF's own module,
replicated over TP) under `vision.`, megatron-core's GPTModel under `language_model.`.

The local layer spec keeps the pre-attention/pre-MLP norms as separate modules; the Transformer Engine spec fuses
them into the following linear layer (`layer_norm_weight`). Everything else is shared.
"""

from __future__ import annotations

from vppo_megatron.convert.mapping import Rule

L = "language_model.decoder.layers.{i}"
H = "model.layers.{i}"

LANGUAGE_RULES = [
    Rule("language_model.embedding.word_embeddings.weight", ("model.embed_tokens.weight",), tp_dim=0),
    Rule(
        f"{L}.self_attention.linear_qkv.weight",
        (f"{H}.self_attn.q_proj.weight", f"{H}.self_attn.k_proj.weight", f"{H}.self_attn.v_proj.weight"),
        kind="qkv",
        tp_dim=0,
    ),
    Rule(
        f"{L}.self_attention.linear_qkv.bias",
        (f"{H}.self_attn.q_proj.bias", f"{H}.self_attn.k_proj.bias", f"{H}.self_attn.v_proj.bias"),
        kind="qkv",
        tp_dim=0,
    ),
    Rule(f"{L}.self_attention.linear_proj.weight", (f"{H}.self_attn.o_proj.weight",), tp_dim=1),
    Rule(
        f"{L}.mlp.linear_fc1.weight", (f"{H}.mlp.gate_proj.weight", f"{H}.mlp.up_proj.weight"), kind="gate_up", tp_dim=0
    ),
    Rule(f"{L}.mlp.linear_fc2.weight", (f"{H}.mlp.down_proj.weight",), tp_dim=1),
    Rule("language_model.decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("language_model.output_layer.weight", ("lm_head.weight",), tp_dim=0),
]
NORM_RULES = {
    "local": [
        Rule(f"{L}.input_layernorm.weight", (f"{H}.input_layernorm.weight",)),
        Rule(f"{L}.pre_mlp_layernorm.weight", (f"{H}.post_attention_layernorm.weight",)),
    ],
    "transformer_engine": [
        Rule(f"{L}.self_attention.linear_qkv.layer_norm_weight", (f"{H}.input_layernorm.weight",)),
        Rule(f"{L}.mlp.linear_fc1.layer_norm_weight", (f"{H}.post_attention_layernorm.weight",)),
    ],
}


def vision_rules(vision_names: list[str]) -> list[Rule]:
    """The vision tower is HF's module as is: every `visual.X` is `vision.X`, replicated over TP."""
    return [Rule(f"vision.{name}", (f"visual.{name}",)) for name in vision_names]


def rules(spec: str, vision_names: list[str], tie_word_embeddings: bool = False) -> list[Rule]:
    """All rules of the family for a layer spec (local | transformer_engine)."""
    language = [r for r in LANGUAGE_RULES if not (tie_word_embeddings and r.hf == ("lm_head.weight",))]
    return vision_rules(vision_names) + language + NORM_RULES[spec]
