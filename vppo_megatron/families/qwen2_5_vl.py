"""Qwen2.5-VL (7B / 32B / 72B): QKV bias, contiguous M-RoPE sections, a windowed RMSNorm/SwiGLU ViT with 14 px
patches.

HF names are the checkpoint's (safetensors) names, which transformers, vLLM and the Hub use:
`visual.*`, `model.embed_tokens`, `model.layers.{i}.*`, `model.norm`, `lm_head`.
Megatron names are those of the actor (`vppo_megatron.actor.model.VLModel`): the vision tower (HF's own module,
replicated over TP) under `vision.`, megatron-core's GPTModel under `language_model.`.

The local layer spec keeps the pre-attention/pre-MLP norms as separate modules; the Transformer Engine spec fuses
them into the following linear layer (`layer_norm_weight`). Everything else is shared.
"""

from __future__ import annotations

from vppo_megatron.families.registry import Family, Rule

L = "language_model.decoder.layers.{i}"
H = "model.layers.{i}"
MODELING = "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"
PATCH, MERGE = 14, 2  # the vision patch in pixels and the spatial merge per side


def language_rules(h: str, embed: str, norm: str, qkv_bias: bool) -> list[Rule]:
    """The GPT-style language model's rules for HF layer prefix `h` (shared with every Qwen family)."""
    qkv = (f"{h}.self_attn.q_proj", f"{h}.self_attn.k_proj", f"{h}.self_attn.v_proj")
    rules = [
        Rule("language_model.embedding.word_embeddings.weight", (embed,), tp_dim=0),
        Rule(f"{L}.self_attention.linear_qkv.weight", tuple(f"{p}.weight" for p in qkv), kind="qkv", tp_dim=0),
    ]
    if qkv_bias:
        rules.append(Rule(f"{L}.self_attention.linear_qkv.bias", tuple(f"{p}.bias" for p in qkv), kind="qkv", tp_dim=0))
    return rules + [
        Rule(f"{L}.self_attention.linear_proj.weight", (f"{h}.self_attn.o_proj.weight",), tp_dim=1),
        Rule(
            f"{L}.mlp.linear_fc1.weight",
            (f"{h}.mlp.gate_proj.weight", f"{h}.mlp.up_proj.weight"),
            kind="gate_up",
            tp_dim=0,
        ),
        Rule(f"{L}.mlp.linear_fc2.weight", (f"{h}.mlp.down_proj.weight",), tp_dim=1),
        Rule("language_model.decoder.final_layernorm.weight", (norm,)),
        Rule("language_model.output_layer.weight", ("lm_head.weight",), tp_dim=0),
    ]


def norm_rules(h: str, spec: str) -> list[Rule]:
    """Pre-attention and pre-MLP RMSNorms: separate modules (local spec) or fused into the next linear (TE)."""
    if spec == "local":
        return [
            Rule(f"{L}.input_layernorm.weight", (f"{h}.input_layernorm.weight",)),
            Rule(f"{L}.pre_mlp_layernorm.weight", (f"{h}.post_attention_layernorm.weight",)),
        ]
    return [
        Rule(f"{L}.self_attention.linear_qkv.layer_norm_weight", (f"{h}.input_layernorm.weight",)),
        Rule(f"{L}.mlp.linear_fc1.layer_norm_weight", (f"{h}.post_attention_layernorm.weight",)),
    ]


def vision_rules(vision_names: list[str], prefix: str) -> list[Rule]:
    """The vision tower is HF's module as is: every `{prefix}X` is `vision.X`, replicated over TP."""
    return [Rule(f"vision.{name}", (f"{prefix}{name}",)) for name in vision_names]


def drop_tied_head(rules: list[Rule], tie_word_embeddings: bool) -> list[Rule]:
    return [r for r in rules if not (tie_word_embeddings and r.hf == ("lm_head.weight",))]


def rules(spec: str, vision_names: list[str], tie_word_embeddings: bool = False) -> list[Rule]:
    """All rules of the family for a layer spec (local | transformer_engine)."""
    language = language_rules(H, "model.embed_tokens.weight", "model.norm.weight", qkv_bias=True)
    return vision_rules(vision_names, "visual.") + drop_tied_head(language, tie_word_embeddings) + norm_rules(H, spec)


def merger_params(hidden: int, out_hidden: int) -> int:
    """A 2 x 2 patch merger's MLP (LayerNorm/RMSNorm not included)."""
    merged = 4 * hidden
    return merged * merged + merged + merged * out_hidden + out_hidden


def vision_params(vision: dict, text_hidden: int) -> int:
    """Exact parameter count of the ViT: RMSNorm blocks with a gated MLP, one merger."""
    h, ffn, patch = vision["hidden_size"], vision["intermediate_size"], vision.get("patch_size", 14)
    attention = 3 * h * h + 3 * h + h * h + h
    block = attention + 3 * h * ffn + 2 * ffn + h + 2 * h
    embed = 3 * 2 * patch * patch * h  # Conv3d, temporal patch 2, no bias
    return vision["depth"] * block + embed + merger_params(h, vision.get("out_hidden_size") or text_hidden) + h


def published_config(layers: int, hidden: int, heads: int, kv_heads: int, ffn: int, vision_ffn: int) -> dict:
    """A Qwen2.5-VL config.json excerpt (transformers' nested layout): what memory and `vppo plan` read."""
    return {
        "model_type": "qwen2_5_vl",
        "tie_word_embeddings": False,
        "text_config": {
            "num_hidden_layers": layers,
            "hidden_size": hidden,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "intermediate_size": ffn,
            "vocab_size": 152064,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 128000,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        },
        "vision_config": {
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": vision_ffn,
            "num_heads": 16,
            "out_hidden_size": hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2,
        },
    }


def tiny_text_config(spec, token_ids: dict[str, int], vocab_size: int, mrope_section: list[int]) -> dict:
    """The tiny language model, shared by the Qwen families (TinySpec in vppo_megatron/tiny_model.py)."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope_section},
        bos_token_id=token_ids["<|endoftext|>"],
        eos_token_id=token_ids["<|im_end|>"],
        pad_token_id=token_ids["<|endoftext|>"],
        tie_word_embeddings=spec.tie_word_embeddings,
    )


def special_token_config(token_ids: dict[str, int], tie_word_embeddings: bool = False) -> dict:
    return dict(
        image_token_id=token_ids["<|image_pad|>"],
        video_token_id=token_ids["<|video_pad|>"],
        vision_start_token_id=token_ids["<|vision_start|>"],
        vision_end_token_id=token_ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
    )


def tiny_config(spec, token_ids: dict[str, int], vocab_size: int):
    from transformers import Qwen2_5_VLConfig

    if spec.attention_head_dim * spec.num_heads != spec.hidden_size:
        raise ValueError(f"Qwen2.5-VL attention needs num_heads x head_dim == hidden_size: {spec}")
    # M-RoPE splits head_dim/2 rotary frequencies into (temporal, height, width) sections.
    half = spec.attention_head_dim // 2
    mrope_section = list(spec.mrope_section) or [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    vision = dict(
        depth=spec.vision_depth,
        hidden_size=spec.vision_hidden_size,
        intermediate_size=2 * spec.vision_hidden_size,
        num_heads=spec.vision_heads,
        out_hidden_size=spec.hidden_size,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[spec.vision_depth - 1],
        in_channels=3,
    )
    return Qwen2_5_VLConfig(
        text_config=tiny_text_config(spec, token_ids, vocab_size, mrope_section),
        vision_config=vision,
        **special_token_config(token_ids, spec.tie_word_embeddings),
    )


def tiny_processor(spec, tokenizer, chat_template: str):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}
    image_processor = Qwen2VLImageProcessor(size=size, patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2)
    video_processor = Qwen2VLVideoProcessor(size=size, patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=chat_template,
    )


FAMILY = Family(
    model_type="qwen2_5_vl",
    display="Qwen2.5-VL",
    hf_config_class="transformers:Qwen2_5_VLConfig",
    hf_model_class="transformers:Qwen2_5_VLForConditionalGeneration",
    vision_tower_class=f"{MODELING}:Qwen2_5_VisionTransformerPretrainedModel",
    rope_owner_class=f"{MODELING}:Qwen2_5_VLModel",
    vllm_architecture="Qwen2_5_VLForConditionalGeneration",
    rules=rules,
    qk_layernorm=False,
    qkv_bias=True,
    mrope_interleaved=False,
    patch_size=PATCH,
    merge_size=MERGE,
    vision_params=vision_params,
    published={
        "Qwen2.5-VL-7B-Instruct": published_config(28, 3584, 28, 4, 18944, 3420),
        "Qwen2.5-VL-32B-Instruct": published_config(64, 5120, 40, 8, 27648, 3456),
        "Qwen2.5-VL-72B-Instruct": published_config(80, 8192, 64, 8, 29568, 3456),
    },
    tiny_config=tiny_config,
    tiny_processor=tiny_processor,
)
