"""The dry-run's memory estimate: exact parameter counts (against transformers for every published config), the
published model sizes, the Qwen3-VL examples, and refusal of a layout that cannot fit or that splits DeepStack
layers off the vision tower's chunk."""

import json
import subprocess
import sys

import pytest
import torch

from vppo_megatron import families
from vppo_megatron.config import load
from vppo_megatron.memory import (
    KNOWN,
    arch_from_hf,
    estimate,
    estimate_stages,
    in_flight,
    layer_activation_bytes,
    layers_per_rank,
    report,
    resolve_arch,
    stages,
)


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


@pytest.mark.parametrize("name", list(families.published()))
def test_parameter_count_equals_transformers_for_the_published_configs(name):
    """Every public config the registry holds (Qwen2.5-VL 7B/32B/72B, Qwen3-VL 2B/4B/8B/32B; 2B and 4B tie their
    embeddings), built by transformers on the meta device: the dry run's count is exact."""
    excerpt = families.published()[name]
    family = families.get(excerpt["model_type"])
    with torch.device("meta"):
        model = family.model_class()(family.hf_config_from_excerpt(excerpt))
    assert KNOWN[name].total_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name, billions",
    [
        ("Qwen2.5-VL-7B-Instruct", 8.29),
        ("Qwen2.5-VL-32B-Instruct", 33.45),
        ("Qwen2.5-VL-72B-Instruct", 73.41),
        ("Qwen3-VL-8B-Instruct", 8.77),
    ],
)
def test_built_in_architectures_match_the_published_sizes(name, billions):
    assert KNOWN[name].total_params() / 1e9 == pytest.approx(billions, abs=0.005)


def test_a_tp_rank_holds_split_layers_and_the_whole_vision_tower():
    arch = KNOWN["Qwen2.5-VL-7B-Instruct"]
    # (h*(3584 + 2*512) + (3584 + 1024) QKV bias + 3584*h + 3*h*18944) / 2 + 2*h RMSNorm weights (replicated)
    assert arch.layer_params(2) == 233_050_624 // 2 + 2 * 3584 == 116_532_480
    (only,) = stages(arch, load("examples/configs/qwen2_5_vl_7b.yaml").parallel)
    parts = only.params(arch, 2)
    assert parts["vision"] == arch.vision_params  # HF's module, replicated over TP
    assert parts["embedding"] == 152064 // 2 * 3584 and parts["output"] == 152064 // 2 * 3584 + 3584
    assert parts["replicated"] == arch.vision_params + 28 * 2 * 3584 + 3584


def test_uneven_pipeline_split_follows_megatron_core():
    assert layers_per_rank(80, 4, 2) == [20, 20, 20, 20]
    assert layers_per_rank(80, 4, 2, 16, 20) == [16, 22, 22, 20]  # (80 - 16 - 20) / 2 middle stages
    assert layers_per_rank(64, 2, 1, 28) == [28, 36]  # the last stage takes the rest
    with pytest.raises(ValueError, match="the other 3 stage.s. must split the remaining 62"):
        layers_per_rank(80, 4, 2, 18)
    with pytest.raises(ValueError, match="parallel.first_stage_layers: pipeline rank 0 would hold 15 layers"):
        layers_per_rank(80, 4, 2, 15, 21)  # 22 + 22 in the middle, but 15 layers cannot split over VPP2
    with pytest.raises(ValueError, match="need parallel.pp > 1"):
        layers_per_rank(64, 1, 1, 30)


def test_in_flight_replays_the_1f1b_schedule():
    # non-interleaved: rank r runs PP - r - 1 warm-up forwards, then one forward per backward
    assert [in_flight(4, 1, r, 64) for r in range(4)] == [(4, 4), (3, 3), (2, 2), (1, 1)]
    assert in_flight(4, 1, 0, 2) == (2, 2)  # only 2 micro-batches
    # interleaved PP4 VPP2, rank 0: 2*3 + 1*4 = 10 warm-up forwards (virtual stage 0, 0, 0, 0, 1, 1, 1, 1, 0, 0),
    # then forward 11 (stage 0) before the first backward: 11 held, 7 on stage 0; backward 1 frees stage 1 and
    # forward 12 is stage 0 again: 8 on stage 0
    assert in_flight(4, 2, 0, 64) == (11, 8)
    assert in_flight(4, 2, 3, 64)[0] == 5
    assert in_flight(1, 1, 0, 64) == (1, 1)


def test_layer_activation_bytes_from_the_architecture():
    """32B on a TP8 rank with SP, s=1024, b=1 (n=1024 tokens, 128 in the norm region), Transformer Engine."""
    arch = KNOWN["Qwen2.5-VL-32B-Instruct"]
    parts = layer_activation_bytes(arch, 1024, 1, 8, True, "none")
    assert parts == {
        "norms": 2 * (128 * 5120 * (2 + 2) + 128 * 4),  # input + normed output bf16, fp32 rstd; two norms
        "rope": 4 * 1024 * 128 * 2,  # cos, sin for q and k
        "mlp": 5 * 1024 * 3456 * 2,  # fc1 out (2 f), silu, linear half copy, product (f each)
        "attention": 1024 * 128 * (5 + 1 + 7 + 5) * 2 + 1024 * 5 * 4,  # q, k, QKV storage, out; logsumexp
    }
    assert layer_activation_bytes(arch, 1024, 1, 8, True, "full") == {"checkpoint": 128 * 5120 * 2}
    no_sp = layer_activation_bytes(arch, 1024, 1, 8, False, "none")
    assert no_sp["norms"] == 8 * parts["norms"] and no_sp["mlp"] == parts["mlp"]  # SP splits the norm region


def test_every_pipeline_stage_is_estimated_and_the_heaviest_decides():
    arch = KNOWN["Qwen2.5-VL-72B-Instruct"]
    cfg = load("examples/configs/qwen2_5_vl_72b.yaml")
    per_stage = estimate_stages(cfg, arch)
    assert list(per_stage) == ["first", "middle", "last"]
    assert per_stage["last"]["logits"] > 0 == per_stage["first"]["logits"]
    assert per_stage["first"]["vision_activations"] > 0 == per_stage["middle"]["vision_activations"]
    assert estimate(cfg, arch) == max(per_stage.values(), key=lambda parts: parts["actor_peak"])
    even_cfg = load("examples/configs/qwen2_5_vl_72b.yaml", ["parallel.first_stage_layers=0"])
    even = estimate(even_cfg, arch)
    # even 20/20/20/20 piles the vision tower and embedding onto the first stage; 16/22/22/20 balances it
    assert even == estimate_stages(even_cfg, arch)["first"]
    assert estimate(cfg, arch)["actor_peak"] < even["actor_peak"] - 3
    text, fits = report(cfg)
    assert fits and "first (16 layers)" in text and "middle (22 layers)" in text and "heaviest: first stage" in text
    with pytest.raises(ValueError, match="parallel.tp=16 does not divide the model's num_key_value_heads=8"):
        estimate(load("examples/configs/qwen2_5_vl_72b.yaml", ["parallel.tp=16"]), arch)


def test_estimate_follows_the_layout():
    cfg = load("examples/configs/qwen2_5_vl_7b.yaml")
    arch = KNOWN["Qwen2.5-VL-7B-Instruct"]
    base = estimate(cfg, arch)
    assert base["weights"] * 2 == pytest.approx(base["gradients"])  # bf16 weight, fp32 main grad
    # the distributed optimizer shards Adam over DP=4; without it every rank holds all of its TP shard
    unsharded = estimate(load("examples/configs/qwen2_5_vl_7b.yaml", ["optimizer.distributed_optimizer=false"]), arch)
    assert unsharded["optimizer"] == pytest.approx(4 * base["optimizer"])
    # full recompute keeps one checkpoint per layer (plus the one layer recomputed) instead of every activation
    held = estimate(load("examples/configs/qwen2_5_vl_7b.yaml", ["model.recompute=none"]), arch)
    assert base["activations"] < held["activations"] / 5  # the recipe recomputes (full)
    assert base["vision_activations"] < held["vision_activations"] / 5  # the vision tower too
    text, fits = report(cfg)
    assert fits and "actor_peak" in text and "8.29B params" in text


def test_dry_run_refuses_a_layout_that_cannot_fit():
    command = [sys.executable, "-m", "vppo_megatron.train", "--config", "examples/configs/qwen2_5_vl_7b.yaml"]
    overrides = ["trainer.micro_batch_size=4", "parallel.sequence_parallel=false", "model.recompute=none"]
    proc = subprocess.run([*command, "--dry-run", *overrides], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "more than 90% of parallel.device_memory_gib=80" in proc.stdout and "micro_batch_size" in proc.stdout


def test_unknown_model_gets_no_estimate_but_says_why(tmp_path):
    cfg = load("examples/configs/tiny_cpu.yaml", [f"model.path={tmp_path / 'elsewhere'}"])
    text, fits = report(cfg)
    assert fits and "no estimate" in text and "KNOWN" in text
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    with pytest.raises(ValueError, match="lacks 'vision_config': not a Qwen2.5-VL or Qwen3-VL config"):
        report(load("examples/configs/tiny_cpu.yaml", [f"model.path={tmp_path / 'elsewhere'}"]))


def _vppo_train_dry_run(capsys, config: str, *overrides: str) -> tuple[int, str]:
    """`vppo train --config CONFIG --dry-run OVERRIDES` through the CLI's main: (exit status, stdout + stderr)."""
    from vppo_megatron.cli import main

    capsys.readouterr()
    status = main(["train", "--config", config, "--dry-run", *overrides])
    out, err = capsys.readouterr()
    return status, out + err


@pytest.mark.parametrize(
    "config, layout, billions, layers",
    [
        ("examples/configs/qwen3_vl_8b.yaml", "config OK for 8 ranks: TP=2 PP=1 CP=2 DP=2", "8.77B", 36),
        ("examples/configs/qwen3_vl_32b.yaml", "config OK for 32 ranks: TP=8 PP=1 CP=1 DP=4", "33.36B", 64),
    ],
)
def test_qwen3_vl_examples_pass_the_dry_run_with_a_layout_and_an_estimate(capsys, config, layout, billions, layers):
    status, out = _vppo_train_dry_run(capsys, config)
    assert status == 0, out
    assert layout in out and f"{billions} params from built-in table" in out
    assert f"only ({layers} layers)" in out and "update_phase" in out and "heaviest: only stage" in out
    assert "does not implement" not in out  # the actor trains qwen3_vl: no refusal note
    cfg = load(config)
    assert cfg.model.family == "qwen3_vl" and report(cfg)[1]
    # the published VPPO-8B recipe (examples/configs/qwen3_vl_8b.yaml; the 32B example carries it over)
    assert (cfg.rollout.max_response_length, cfg.algorithm.entropy_coef, cfg.trainer.total_steps) == (8192, 0.12, 130)


def test_qwen3_vl_family_must_match_the_checkpoint():
    from vppo_megatron.actor.engine import check_family
    from vppo_megatron.config import ConfigError

    check_family("qwen3_vl", "qwen3_vl", "/models/Qwen3-VL-8B-Instruct")  # a supported family now
    check_family("qwen2_5_vl", "qwen2_5_vl", "/models/Qwen2.5-VL-7B-Instruct")
    with pytest.raises(ConfigError, match="config.json is model_type 'qwen3_vl'; set model.family=qwen3_vl"):
        check_family("qwen2_5_vl", "qwen3_vl", "/models/Qwen3-VL-8B-Instruct")


def test_dry_run_refuses_a_split_that_takes_deepstack_layers_off_the_first_chunk(capsys):
    """Qwen3-VL-32B adds DeepStack features to its first 3 LLM layers; they exist only where the vision tower
    runs, so the first pipeline stage's first (virtual) chunk must hold all 3."""
    config = "examples/configs/qwen3_vl_32b.yaml"
    status, out = _vppo_train_dry_run(capsys, config, "parallel.pp=2", "parallel.first_stage_layers=2")
    assert status == 2
    assert "DeepStack vision features to its first 3 LLM layers" in out and "first model chunk holds 2" in out
    status, out = _vppo_train_dry_run(capsys, config, "parallel.pp=4", "parallel.vpp=8")  # 64 / 32 chunks = 2
    assert status == 2 and "first model chunk holds 2" in out
    status, out = _vppo_train_dry_run(capsys, config, "parallel.pp=2", "parallel.first_stage_layers=3")
    assert status == 0 and "first (3 layers)" in out  # exactly the 3 DeepStack layers: accepted
    # Qwen2.5-VL has no DeepStack: the same split of its 32B is the pipeline's business only
    status, out = _vppo_train_dry_run(
        capsys, "examples/configs/qwen2_5_vl_32b.yaml", "parallel.pp=2", "parallel.first_stage_layers=2"
    )
    assert status == 0 and "DeepStack" not in out


def test_phase_peaks_follow_the_lifecycle_table():
    """The rollout phase holds the awake engines plus what actor.offload leaves; the update holds the whole actor
    with the engines asleep; the 7B recipe only fits colocated because the actor offloads during rollout."""
    cfg = load("examples/configs/qwen2_5_vl_7b.yaml")
    arch = resolve_arch(cfg.model.path)[0]
    engines = cfg.rollout.gpu_memory_utilization * cfg.parallel.device_memory_gib
    parts = estimate(cfg, arch)  # actor.offload=all
    assert parts["rollout_phase"] == pytest.approx(engines)
    assert parts["update_phase"] == pytest.approx(parts["actor_peak"])
    # the sync: the actor's weights, the engines' and the buckets a rank holds (packing one, the engines loading
    # the other, the gathered tensors being packed: 3 of at most max(512 MiB, the embedding's 1.01 GiB))
    assert parts["sync_buffers"] == pytest.approx(3 * 152064 * 3584 * 2 / 2**30)
    assert parts["sync_phase"] == pytest.approx(parts["weights"] + parts["vllm_weights"] + parts["sync_buffers"])
    kept = estimate(load("examples/configs/qwen2_5_vl_7b.yaml", ["actor.offload=optimizer"]), arch)
    assert kept["rollout_phase"] == pytest.approx(engines + parts["weights"] + parts["gradients"])
    text, fits = report(load("examples/configs/qwen2_5_vl_7b.yaml", ["actor.offload=none"]))
    assert not fits and "the rollout phase needs" in text and "set actor.offload=all" in text
    assert report(cfg)[1]
    apart = estimate(load("examples/configs/qwen2_5_vl_7b.yaml", ["rollout.placement=disaggregated"]), arch)
    state = apart["weights"] + apart["gradients"] + apart["optimizer"]
    assert apart["rollout_phase"] == pytest.approx(state)  # no engine on the trainer's GPUs, nothing offloaded


def test_a_token_budget_sizes_the_activation_estimate_by_the_rows_it_admits():
    from vppo_megatron.config import load
    from vppo_megatron.memory import rollouts_per_micro_batch

    fixed = load(None, ["trainer.micro_batch_size=4"])
    assert rollouts_per_micro_batch(fixed) == 4
    # 4096 prompt + 2048 response tokens at most: a 20,000-token budget admits 3 such rows, 1,000 still one
    assert rollouts_per_micro_batch(load(None, ["trainer.max_tokens_per_micro_batch=20000"])) == 3
    assert rollouts_per_micro_batch(load(None, ["trainer.max_tokens_per_micro_batch=1000"])) == 1


def test_every_phase_and_the_host_are_planned_and_an_over_budget_recipe_is_refused(capsys):
    """The dry run prints every phase of a run (start-up, resume, rollout, experience, update, checkpoint, sync)
    and the busiest node's host memory; a recipe that does not fit is refused naming the phase, what it holds and
    the setting to change."""
    from vppo_megatron.memory import GIB, PHASES, next_power_of_two

    status, out = _vppo_train_dry_run(capsys, "examples/configs/qwen2_5_vl_7b.yaml")
    assert status == 0, out
    assert all(f"  {phase} " in out for phase in PHASES)
    assert "host memory of the busiest node (trainer rank 0's, 8 ranks; GiB): offload_buffers" in out
    assert "engine_sleep_copies" in out and "sync_staging" in out and "step_batch" in out
    # the 7B recipe on 48 GB devices: loading the Adam state beside the built actor does not fit
    status, out = _vppo_train_dry_run(capsys, "examples/configs/qwen2_5_vl_7b.yaml", "parallel.device_memory_gib=48")
    assert status == 2
    assert "error: the resume phase needs" in out and "loaded optimizer state 12.5" in out
    assert "parallel.device_memory_gib=48; raise parallel.tp" in out
    # the 72B recipe on nodes of 512 GiB: vLLM's sleep copies and the sync's staging alone are half a terabyte
    status, out = _vppo_train_dry_run(capsys, "examples/configs/qwen2_5_vl_72b.yaml", "parallel.host_memory_gib=512")
    assert status == 2
    assert "error: the host memory of a node needs" in out and "parallel.host_memory_gib=512" in out
    assert next_power_of_two(8.4 * GIB) == 16 * GIB  # the caching host allocator's rounding of a pinned buffer
