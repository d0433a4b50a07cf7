"""Qwen3-VL dense (2B / 4B / 8B / 32B): QK-norm and no QKV bias (Qwen3 text layers), interleaved M-RoPE, a
LayerNorm/GELU ViT with 16 px patches and learned position embeddings, and DeepStack: merged features of a few
intermediate ViT layers added to the hidden states of the first LLM layers at the image tokens.

HF (Hub and transformers) names: `model.visual.*`, `model.language_model.{embed_tokens, layers.{i}, norm}`,
`lm_head` (absent when the embeddings are tied, as in 2B and 4B). Megatron names are the actor's, as for every
family: `vision.` (HF's vision tower as is) and `language_model.` (megatron-core's GPTModel).
"""

from __future__ import annotations

from vppo_megatron.families.qwen2_5_vl import (
    L,
    drop_tied_head,
    language_rules,
    merger_params,
    norm_rules,
    special_token_config,
    tiny_text_config,
    vision_rules,
)
from vppo_megatron.families.registry import Family, Rule

H = "model.language_model.layers.{i}"
MODELING = "transformers.models.qwen3_vl.modeling_qwen3_vl"
PATCH, MERGE = 16, 2  # the vision patch in pixels and the spatial merge per side


def rules(spec: str, vision_names: list[str], tie_word_embeddings: bool = False) -> list[Rule]:
    """All rules of the family for a layer spec (local | transformer_engine): Qwen2.5-VL's language model without
    the QKV bias, plus the per-head q/k RMSNorms (the same module names in both specs)."""
    language = language_rules(
        H, "model.language_model.embed_tokens.weight", "model.language_model.norm.weight", qkv_bias=False
    )
    qk_norms = [
        Rule(f"{L}.self_attention.q_layernorm.weight", (f"{H}.self_attn.q_norm.weight",)),
        Rule(f"{L}.self_attention.k_layernorm.weight", (f"{H}.self_attn.k_norm.weight",)),
    ]
    return (
        vision_rules(vision_names, "model.visual.")
        + drop_tied_head(language, tie_word_embeddings)
        + qk_norms
        + norm_rules(H, spec)
    )


def vision_params(vision: dict, text_hidden: int) -> int:
    """Exact parameter count of the ViT: LayerNorm blocks with a GELU MLP, learned position embeddings, the merger
    and one DeepStack merger (with its own LayerNorm over the merged width) per deepstack layer."""
    h, ffn, patch = vision["hidden_size"], vision["intermediate_size"], vision.get("patch_size", 16)
    attention = 3 * h * h + 3 * h + h * h + h
    block = attention + 2 * h * ffn + ffn + h + 4 * h
    embed = 3 * 2 * patch * patch * h + h  # Conv3d with bias
    merger = merger_params(h, vision.get("out_hidden_size") or text_hidden)
    deepstack = len(vision.get("deepstack_visual_indexes", []))
    positions = vision.get("num_position_embeddings", 0) * h
    return vision["depth"] * block + embed + merger + 2 * h + deepstack * (merger + 2 * 4 * h) + positions


def published_config(text: tuple, vision: tuple, tie: bool) -> dict:
    """A Qwen3-VL config.json excerpt. text: (layers, hidden, heads, kv_heads, ffn); vision: (depth, hidden, ffn,
    deepstack layers)."""
    layers, hidden, heads, kv_heads, ffn = text
    depth, vision_hidden, vision_ffn, deepstack = vision
    return {
        "model_type": "qwen3_vl",
        "tie_word_embeddings": tie,
        "text_config": {
            "num_hidden_layers": layers,
            "hidden_size": hidden,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": 128,
            "intermediate_size": ffn,
            "vocab_size": 151936,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 262144,
            "tie_word_embeddings": tie,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "mrope_section": [24, 20, 20],
                "mrope_interleaved": True,
            },
        },
        "vision_config": {
            "depth": depth,
            "hidden_size": vision_hidden,
            "intermediate_size": vision_ffn,
            "num_heads": 16,
            "out_hidden_size": hidden,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "deepstack_visual_indexes": list(deepstack),
            "num_position_embeddings": 2304,
        },
    }


def tiny_config(spec, token_ids: dict[str, int], vocab_size: int):
    """The tiny Qwen3-VL: DeepStack from two ViT layers into the first two LLM layers, QK-norm, interleaved M-RoPE
    with a non-default section (head_dim 32: 16 frequencies, T 6 / H 5 / W 5)."""
    from transformers import Qwen3VLConfig

    half = spec.attention_head_dim // 2
    mrope_section = list(spec.mrope_section) or [half - 2 * (5 * half // 16), 5 * half // 16, 5 * half // 16]
    text = tiny_text_config(spec, token_ids, vocab_size, mrope_section)
    text["rope_parameters"]["mrope_interleaved"] = True
    text["head_dim"] = spec.attention_head_dim
    vision = dict(
        depth=spec.vision_depth,
        hidden_size=spec.vision_hidden_size,
        intermediate_size=2 * spec.vision_hidden_size,
        num_heads=spec.vision_heads,
        out_hidden_size=spec.hidden_size,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=2,
        in_channels=3,
        num_position_embeddings=64,  # an 8 x 8 learned grid, bilinearly resampled to each image
        deepstack_visual_indexes=list(range(min(2, spec.vision_depth))),
    )
    return Qwen3VLConfig(
        text_config=text, vision_config=vision, **special_token_config(token_ids, spec.tie_word_embeddings)
    )


def tiny_processor(spec, tokenizer, chat_template: str):
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    size = {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}
    half = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}  # Qwen3-VL's normalisation
    image_processor = Qwen2VLImageProcessor(
        size=size, patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2, **half
    )
    video_processor = Qwen3VLVideoProcessor(
        size=size, patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2, **half
    )
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=chat_template,
    )


FAMILY = Family(
    model_type="qwen3_vl",
    display="Qwen3-VL",
    hf_config_class="transformers:Qwen3VLConfig",
    hf_model_class="transformers:Qwen3VLForConditionalGeneration",
    vision_tower_class=f"{MODELING}:Qwen3VLVisionModel",
    rope_owner_class=f"{MODELING}:Qwen3VLModel",
    vllm_architecture="Qwen3VLForConditionalGeneration",
    rules=rules,
    qk_layernorm=True,
    qkv_bias=False,
    mrope_interleaved=True,
    patch_size=PATCH,
    merge_size=MERGE,
    vision_params=vision_params,
    published={
        "Qwen3-VL-2B-Instruct": published_config((28, 2048, 16, 8, 6144), (24, 1024, 4096, (5, 11, 17)), True),
        "Qwen3-VL-4B-Instruct": published_config((36, 2560, 32, 8, 9728), (24, 1024, 4096, (5, 11, 17)), True),
        "Qwen3-VL-8B-Instruct": published_config((36, 4096, 32, 8, 12288), (27, 1152, 4304, (8, 16, 24)), False),
        "Qwen3-VL-32B-Instruct": published_config((64, 5120, 64, 8, 25600), (27, 1152, 4304, (8, 16, 24)), False),
    },
    # 4 LLM layers so that PP2 keeps both DeepStack layers on the first stage; 3 ViT blocks (DeepStack from the
    # first two); image areas in Qwen3-VL's 32 px units (16 px patches, 2 x 2 merge)
    tiny_shape={"num_layers": 4, "vision_depth": 3, "min_pixels": 32 * 32 * 4, "max_pixels": 32 * 32 * 64},
    tiny_config=tiny_config,
    tiny_processor=tiny_processor,
)
