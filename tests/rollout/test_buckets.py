import torch

from vppo_megatron.sync.buckets import buckets, unit_of


def test_units_are_blocks_or_modules():
    assert unit_of("model.layers.12.self_attn.q_proj.weight") == "model.layers.12"
    assert unit_of("visual.blocks.3.attn.qkv.bias") == "visual.blocks.3"
    assert unit_of("visual.merger.mlp.0.weight") == "visual.merger.mlp.0"
    assert unit_of("lm_head.weight") == "lm_head"
    # Qwen3-VL's checkpoint prefixes: the block is still the unit
    assert unit_of("model.language_model.layers.3.self_attn.q_norm.weight") == "model.language_model.layers.3"
    assert unit_of("model.visual.blocks.0.attn.qkv.weight") == "model.visual.blocks.0"
    assert unit_of("model.visual.deepstack_merger_list.1.norm.bias") == "model.visual.deepstack_merger_list.1.norm"


def test_buckets_respect_the_bound_and_never_split_a_unit():
    def t(n):
        return torch.zeros(n, dtype=torch.uint8)  # n bytes

    tensors = [
        ("model.embed_tokens.weight", t(30)),
        ("model.layers.0.self_attn.q_proj.weight", t(20)),
        ("model.layers.0.self_attn.k_proj.weight", t(20)),
        ("model.layers.1.self_attn.q_proj.weight", t(20)),
        ("model.layers.1.mlp.up_proj.weight", t(20)),
        ("model.norm.weight", t(5)),
        ("lm_head.weight", t(100)),
    ]
    out = [[name for name, _ in b] for b in buckets(iter(tensors), max_bytes=75)]
    # embed (30) + layer 0 (40) = 70 <= 75; layer 1 (40) would exceed -> new bucket; norm (5) fits with it;
    # lm_head (100) is larger than the bound and travels alone
    assert out == [
        [
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.k_proj.weight",
        ],
        ["model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight", "model.norm.weight"],
        ["lm_head.weight"],
    ]
    assert [n for b in out for n in b] == [n for n, _ in tensors]  # nothing lost, order kept
