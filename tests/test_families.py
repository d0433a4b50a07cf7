"""The family registry: one record per HF model_type, and every record's rules match its own checkpoints."""

import json

import pytest
import torch

from vppo_megatron import families
from vppo_megatron.config import ConfigError, load
from vppo_megatron.convert import mapping


def test_every_registered_family_is_complete():
    assert families.NAMES == ("qwen2_5_vl", "qwen3_vl")
    for name in families.NAMES:
        family = families.get(name)
        assert family.model_type == name
        for load_class in (family.config_class, family.model_class, family.vision_tower):
            assert isinstance(load_class(), type)
        assert family.published, name
        for repo, excerpt in family.published.items():
            assert excerpt["model_type"] == name, repo
            family.hf_config_from_excerpt(excerpt)  # transformers accepts the excerpt


def test_unknown_family_is_refused_with_the_known_ones():
    with pytest.raises(families.UnknownFamily, match="'llava' is not a supported family .*qwen2_5_vl, qwen3_vl"):
        families.get("llava")
    with pytest.raises(ConfigError, match="model.family='llava': must be one of qwen2_5_vl, qwen3_vl"):
        load(None, ["model.family=llava"]).validate()


@pytest.mark.parametrize("spec", ["local", "transformer_engine"])
@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_qwen3_vl_dir"])
def test_rules_cover_exactly_the_checkpoint(fixture, spec, request):
    """Every tensor of the family's own (tiny) checkpoint is mapped once, whichever layer spec is used."""
    from transformers import AutoConfig

    from vppo_megatron.actor.weights import SafetensorsReader, family_rules

    model_dir = request.getfixturevalue(fixture)
    rules = family_rules(AutoConfig.from_pretrained(model_dir), spec)
    hf_names = [name for rule in rules for name in rule.hf]
    assert len(hf_names) == len(set(hf_names))
    assert set(hf_names) == SafetensorsReader(model_dir).keys()
    megatron = [rule.megatron for rule in rules]
    assert len(megatron) == len(set(megatron))


def test_qwen3_vl_rules_have_qk_norms_and_no_qkv_bias():
    rules = families.get("qwen3_vl").rules("local", [], False)
    names = {r.megatron for r in mapping.expand_rules(rules, 1)}
    assert "language_model.decoder.layers.0.self_attention.q_layernorm.weight" in names
    assert not any(n.endswith("linear_qkv.bias") for n in names)
    tied = {h for r in families.get("qwen3_vl").rules("local", [], True) for h in r.hf}
    assert "lm_head.weight" not in tied  # 2B / 4B tie the output layer to the embedding


def test_a_checkpoint_of_another_family_is_refused_by_name(tiny_qwen3_vl_dir):
    from vppo_megatron.actor.engine import check_family

    model_type = json.loads((tiny_qwen3_vl_dir / "config.json").read_text())["model_type"]
    with pytest.raises(ConfigError, match="config.json is model_type 'qwen3_vl'; set model.family=qwen3_vl"):
        check_family("qwen2_5_vl", model_type, tiny_qwen3_vl_dir)
    check_family("qwen3_vl", model_type, tiny_qwen3_vl_dir)


def test_interleaved_mrope_matches_transformers(monkeypatch):
    """The actor's interleaved M-RoPE frequencies equal transformers' Qwen3VLTextRotaryEmbedding."""
    from transformers import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    from vppo_megatron.actor.model import InterleavedMRoPE

    section = [6, 5, 5]
    text = Qwen3VLTextConfig(
        hidden_size=128,
        num_attention_heads=4,
        head_dim=32,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section, "mrope_interleaved": 1},
    )
    # distinct T, H and W positions [3, 1, 9]: any mix-up of the sections shows
    positions = torch.stack([torch.arange(9), torch.arange(9) // 3, torch.arange(9) % 3 + 4])[:, None]
    cos, _ = Qwen3VLTextRotaryEmbedding(text)(torch.zeros(1, dtype=torch.float32), positions)  # [1, 9, 32]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: torch.device("cpu"))  # megatron-core places inv_freq
    ours = InterleavedMRoPE(32, 1.0, rotary_base=1e6, cp_group=None)(positions, section)  # [9, 1, 1, 32] angles
    torch.testing.assert_close(ours[:, 0, 0].cos(), cos[0], atol=1e-6, rtol=0)
