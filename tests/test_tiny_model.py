import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from vllm_greedy import vllm_greedy

from vppo_megatron.tiny_model import TINY_MARKER, TinySpec, build_tiny_model


def _image(seed=0, size=112):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def _prompt(processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many red shapes?"}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_layout_respects_cpu_and_tp_constraints(tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    text, vision = cfg["text_config"], cfg["vision_config"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert head_dim >= 32  # CPU attention kernels need head_dim >= 32
    assert sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2
    assert text["num_attention_heads"] % 2 == 0 and text["num_key_value_heads"] % 2 == 0  # TP=2 splits both
    assert text["vocab_size"] % 128 == 0
    assert vision["hidden_size"] // vision["num_heads"] >= 32 and vision["out_hidden_size"] == text["hidden_size"]
    assert json.loads((tiny_model_dir / TINY_MARKER).read_text())["seed"] == 0


def test_build_is_deterministic_and_atomic(tiny_model_dir, tmp_path):
    again = build_tiny_model(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        digest = [hashlib.sha256((d / name).read_bytes()).hexdigest() for d in (tiny_model_dir, again)]
        assert digest[0] == digest[1], name
    assert [p.name for p in tmp_path.iterdir()] == ["again"]  # no temporary directory left behind
    with pytest.raises(FileExistsError, match="overwrite"):
        build_tiny_model(again)
    other = tmp_path / "precious"
    other.mkdir()
    (other / "weights.bin").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="other than a tiny model"):
        build_tiny_model(other, overwrite=True)
    build_tiny_model(again, TinySpec(seed=1), overwrite=True)
    assert json.loads((again / TINY_MARKER).read_text())["seed"] == 1


def test_tokenizer_has_qwen_special_tokens_and_template(tiny_processor):
    tok = tiny_processor.tokenizer
    for token in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"):
        assert len(tok.encode(token, add_special_tokens=False)) == 1, token
    assert tok.eos_token == "<|im_end|>"
    text = _prompt(tiny_processor)
    assert "<|vision_start|><|image_pad|><|vision_end|>How many red shapes?" in text
    assert text.endswith("<|im_start|>assistant\n")
    sample = "<think> I count 3 shapes. </think> \\boxed{3}"
    assert tok.decode(tok.encode(sample, add_special_tokens=False)) == sample


def test_hf_loads_offline_and_the_image_changes_the_logits(tiny_model_dir, tiny_processor):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    text = _prompt(tiny_processor)
    logits = []
    for seed in (0, 1):
        inputs = tiny_processor(text=[text], images=[_image(seed)], return_tensors="pt")
        # 112 x 112 image -> 8 x 8 patches of 14 px -> 16 tokens after the 2 x 2 merge
        assert (inputs["input_ids"] == model.config.image_token_id).sum() == 16
        with torch.no_grad():
            logits.append(model(**inputs).logits)
    assert torch.isfinite(logits[0]).all()
    assert (logits[0][0, -1] - logits[1][0, -1]).abs().max() > 1e-4  # the vision tower reaches the output


@pytest.mark.slow
def test_vllm_cpu_serves_it_and_matches_hf_greedy(tiny_model_dir, tiny_processor, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    text = _prompt(tiny_processor)
    result = vllm_greedy(tiny_model_dir, text, tmp_path)

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    inputs = tiny_processor(text=[text], images=[_image(0)], return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == result["prompt_ids"]
    with torch.no_grad():
        generated = model.generate(**inputs, do_sample=False, max_new_tokens=8, min_new_tokens=8)
    assert generated[0, inputs["input_ids"].shape[1] :].tolist() == result["ids"]


def test_tiny_qwen3_vl_has_deepstack_qk_norm_and_interleaved_mrope(tiny_qwen3_vl_dir, tmp_path):
    cfg = json.loads((tiny_qwen3_vl_dir / "config.json").read_text())
    text, vision = cfg["text_config"], cfg["vision_config"]
    assert cfg["model_type"] == "qwen3_vl" and cfg["architectures"] == ["Qwen3VLForConditionalGeneration"]
    assert vision["deepstack_visual_indexes"] == [0, 1] and vision["depth"] == 3 and vision["patch_size"] == 16
    rope = text["rope_parameters"]
    assert rope["mrope_interleaved"] and rope["mrope_section"] == [6, 5, 5]  # not transformers' default [24, 20, 20]
    assert sum(rope["mrope_section"]) == text["head_dim"] // 2 and text["head_dim"] >= 32
    assert text["num_hidden_layers"] == 4 and text["vocab_size"] % 128 == 0
    from safetensors import safe_open

    with safe_open(tiny_qwen3_vl_dir / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.language_model.layers.0.self_attn.q_norm.weight" in names
    assert not any(n.endswith("q_proj.bias") for n in names)  # Qwen3: no QKV bias
    from vppo_megatron.tiny_model import tiny_spec

    again = build_tiny_model(tmp_path / "again", tiny_spec("qwen3_vl"))
    digest = [hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest() for d in (tiny_qwen3_vl_dir, again)]
    assert digest[0] == digest[1]


def test_held_out_shapes_have_every_trait_no_other_fixture_has(held_out_qwen2_5_vl_dir, held_out_qwen3_vl_dir):
    """conftest.HELD_OUT_SPECS: odd layer count, vocab not a multiple of 128, M-RoPE sections other than the
    family's tiny default, heads x head_dim != hidden (Qwen3-VL), one tied and one untied."""
    from vppo_megatron.tiny_model import tiny_spec

    texts, tied = {}, {}
    for family, model_dir in [("qwen2_5_vl", held_out_qwen2_5_vl_dir), ("qwen3_vl", held_out_qwen3_vl_dir)]:
        config = json.loads((model_dir / "config.json").read_text())
        text = texts[family] = config["text_config"]
        tied[family] = config["tie_word_embeddings"]
        default = tiny_spec(family)
        assert text["num_hidden_layers"] % 2 == 1 and text["num_hidden_layers"] != default.num_layers
        assert text["vocab_size"] % 128 != 0
        head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
        sections = text["rope_parameters"]["mrope_section"]
        share = {"qwen2_5_vl": 3 / 8, "qwen3_vl": 5 / 16}[family]  # the tiny default: H = W = share of head_dim / 2
        assert sum(sections) == head_dim // 2 and sections[1] != int(share * head_dim // 2)
    qwen3 = texts["qwen3_vl"]
    assert qwen3["num_attention_heads"] * qwen3["head_dim"] != qwen3["hidden_size"]
    assert tied == {"qwen2_5_vl": True, "qwen3_vl": False}
