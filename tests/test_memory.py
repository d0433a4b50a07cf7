"""The dry-run's memory estimate: exact parameter counts, the published model sizes, and refusal of a layout that
cannot fit."""

import json
import subprocess
import sys

import pytest
import torch

from vppo_megatron.config import load
from vppo_megatron.memory import KNOWN, arch_from_hf, estimate, report, resolve_arch


def test_parameter_count_is_exact_for_the_tiny_qwen2_5_vl(tiny_model_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    arch, source = resolve_arch(str(tiny_model_dir))
    assert source.endswith("config.json")
    assert arch.total_params() == sum(p.numel() for p in model.parameters())


def test_parameter_count_is_exact_for_a_tiny_qwen3_vl_with_deepstack():
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config = Qwen3VLConfig(
        text_config=dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            vocab_size=1024,
        ),
        vision_config=dict(
            depth=3,
            hidden_size=64,
            intermediate_size=128,
            num_heads=2,
            out_hidden_size=128,
            deepstack_visual_indexes=[0, 1],
            num_position_embeddings=64,
        ),
    )
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    assert arch_from_hf(config.to_dict()).total_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name, billions",
    [("Qwen2.5-VL-7B-Instruct", 8.29), ("Qwen2.5-VL-32B-Instruct", 33.45), ("Qwen3-VL-8B-Instruct", 8.77)],
)
def test_built_in_architectures_match_the_published_sizes(name, billions):
    assert KNOWN[name].total_params() / 1e9 == pytest.approx(billions, abs=0.005)


def test_estimate_follows_the_layout():
    cfg = load("examples/configs/qwen2_5_vl_7b.yaml")
    arch = KNOWN["Qwen2.5-VL-7B-Instruct"]
    base = estimate(cfg, arch)
    assert base["weights"] * 2 == pytest.approx(base["gradients"])  # bf16 weight, fp32 main grad
    # the distributed optimizer shards Adam over DP=4; without it every rank holds all of its TP shard
    unsharded = estimate(load("examples/configs/qwen2_5_vl_7b.yaml", ["optimizer.distributed_optimizer=false"]), arch)
    assert unsharded["optimizer"] == pytest.approx(4 * base["optimizer"])
    # full recompute keeps one checkpoint per layer instead of 34 s*b*h
    recompute = estimate(load("examples/configs/qwen2_5_vl_7b.yaml", ["model.recompute=full"]), arch)
    assert recompute["activations"] < base["activations"] / 5
    text, fits = report(cfg)
    assert fits and "actor_peak" in text and "8.29B params" in text


def test_dry_run_refuses_a_layout_that_cannot_fit():
    command = [sys.executable, "-m", "vppo_megatron.train", "--config", "examples/configs/qwen2_5_vl_7b.yaml"]
    overrides = ["trainer.micro_batch_size=4", "parallel.sequence_parallel=false"]
    proc = subprocess.run([*command, "--dry-run", *overrides], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "exceeds 90% of parallel.device_memory_gib=80" in proc.stdout and "micro_batch_size" in proc.stdout


def test_unknown_model_gets_no_estimate_but_says_why(tmp_path):
    cfg = load("examples/configs/tiny_cpu.yaml", [f"model.path={tmp_path / 'elsewhere'}"])
    text, fits = report(cfg)
    assert fits and "no estimate" in text and "KNOWN" in text
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    with pytest.raises(ValueError, match="lacks 'vision_config': not a Qwen2.5-VL or Qwen3-VL config"):
        report(load("examples/configs/tiny_cpu.yaml", [f"model.path={tmp_path / 'elsewhere'}"]))


def test_qwen3_vl_validates_but_the_actor_refuses_it_by_name():
    from vppo_megatron.actor.engine import check_family
    from vppo_megatron.config import ConfigError

    command = [sys.executable, "-m", "vppo_megatron.train", "--config", "examples/configs/qwen3_vl_8b.yaml"]
    proc = subprocess.run([*command, "--dry-run"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "8.77B params" in proc.stdout
    assert "model.family=qwen3_vl validates, but the actor does not implement it yet" in proc.stdout
    with pytest.raises(ConfigError, match="implements qwen2_5_vl only .*DeepStack"):
        check_family("qwen3_vl", "qwen3_vl", "/models/Qwen3-VL-8B-Instruct")
    with pytest.raises(ConfigError, match="config.json is model_type 'qwen3_vl'; set model.family=qwen3_vl"):
        check_family("qwen2_5_vl", "qwen3_vl", "/models/Qwen3-VL-8B-Instruct")
    check_family("qwen2_5_vl", "qwen2_5_vl", "/models/Qwen2.5-VL-7B-Instruct")
