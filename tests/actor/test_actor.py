import pytest
import torch
from parity_worker import bf16_update, hf_bf16_vision_gap, hf_logit_gap, packed_vs_padded, schedule_calls, te_vs_local

from vppo_megatron.config import ConfigError, load, transformer_engine_available
from vppo_megatron.testing import run_distributed

BF16_LOGP_GAP = 0.01  # bf16 Megatron vs bf16 transformers, tiny models: measured 1.0e-3 (Qwen2.5-VL), 3.6e-3 (Qwen3-VL)


def test_serial_megatron_equals_hf_transformers(tiny_model_dir):
    (gaps,) = run_distributed(hf_logit_gap, 1, str(tiny_model_dir))
    assert len(gaps) == 3 and max(gaps) <= 1e-4, gaps  # fp32: measured ~5e-7


def test_serial_megatron_equals_hf_transformers_for_qwen3_vl_with_deepstack(tiny_qwen3_vl_dir):
    """QK-norm, interleaved M-RoPE (non-default section) and DeepStack from 2 ViT layers against transformers."""
    ((gaps, without),) = run_distributed(hf_logit_gap, 1, str(tiny_qwen3_vl_dir), True)
    assert len(gaps) == 3 and max(gaps) <= 1e-5, gaps  # fp32: measured 5.1e-7
    assert min(without) > 1e-3, f"DeepStack must move the logits, or the parity above does not cover it: {without}"


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_held_out_shape_equals_hf_transformers(family, request):
    """Odd layer count, heads x head_dim != hidden (Qwen3-VL), vocab not a multiple of 128, non-default M-RoPE
    sections, tied (Qwen2.5-VL) and untied (Qwen3-VL) embeddings: conftest.HELD_OUT_SPECS."""
    from conftest import HELD_OUT_MODELS

    (gaps,) = run_distributed(hf_logit_gap, 1, str(request.getfixturevalue(HELD_OUT_MODELS[family])))
    assert len(gaps) == 3 and max(gaps) <= 1e-5, gaps  # fp32: measured 7.2e-7 (Qwen2.5-VL), 7.7e-7 (Qwen3-VL)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_bf16_actor_keeps_the_vision_rotary_fp32_like_transformers(family, request):
    """bf16 actor (Float16Module) vs transformers loaded in bf16, on the largest image the tiny processor keeps."""
    from conftest import FAMILY_MODELS

    model_dir = str(request.getfixturevalue(FAMILY_MODELS[family]))
    ((vision_gap, logp_gap), rotary) = run_distributed(hf_bf16_vision_gap, 1, model_dir)[0]
    assert rotary == {"torch.float32"}
    assert vision_gap == 0.0  # the same HF module on the same bf16 weights: identical only with fp32 frequencies
    assert logp_gap <= BF16_LOGP_GAP, logp_gap


def test_experience_pass_is_one_schedule_over_paired_micro_batches(tiny_model_dir):
    ((calls, shape, fast, gap),) = run_distributed(schedule_calls, 1, str(tiny_model_dir))
    # 4 rollouts, micro-batch 2: ONE forward-only schedule of 2 micro-batches, each holding both views (2 x 2)
    assert calls == [{"num_microbatches": 2, "micro_batch_size": 4, "forward_only": True}]
    assert shape[0] == 4
    # the perturbed view blackens the encoded patches (every image is at the processor's size), and equals a
    # plain pass over the blackened images
    assert fast == [True] * 4
    assert gap <= 1e-5, gap


@pytest.mark.skipif(transformer_engine_available(), reason="host has Transformer Engine")
@pytest.mark.parametrize(
    "overrides",
    [
        ["model.fp8=hybrid"],
        ["model.fp8=e4m3", "model.fp8_recipe=blockwise"],
        ["model.transformer_impl=transformer_engine"],
    ],
)
def test_fp8_and_te_paths_refuse_clearly_without_transformer_engine(overrides):
    from transformers import AutoConfig  # noqa: F401 - the actor's imports are available

    from vppo_megatron.actor.model import layer_spec_name

    cfg = load(None, overrides)
    with pytest.raises(ConfigError, match="Transformer Engine"):
        cfg.validate()
    if "model.transformer_impl=transformer_engine" in overrides:
        with pytest.raises(ConfigError, match="Transformer Engine"):
            layer_spec_name(cfg)


def test_transformer_config_carries_fp8_settings(tiny_model_dir, monkeypatch):
    """The TE/FP8 TransformerConfig is built from the config (validated here without TE: only the fields)."""
    from transformers import AutoConfig

    from vppo_megatron.actor import model
    from vppo_megatron.parallel.layout import ParallelLayout

    monkeypatch.setattr(model, "layer_spec_name", lambda cfg: "transformer_engine")
    cfg = load(None, ["model.fp8=hybrid", "model.fp8_recipe=tensorwise", "model.dtype=bfloat16"])
    hf_config = AutoConfig.from_pretrained(tiny_model_dir)
    config = model.transformer_config(hf_config, cfg, ParallelLayout(tp=2, cp=2))
    assert (config.fp8, config.fp8_recipe, config.bf16) == ("hybrid", "tensorwise", True)
    assert config.cp_comm_type == "p2p"  # TE ring attention; a2a would need heads % cp == 0
    assert config.mrope_section == [4, 6, 6] and config.num_query_groups == 2 and config.add_qkv_bias
    assert config.calculate_per_token_loss and config.variable_seq_lengths
    assert not config.apply_rope_fusion  # TE's fused THD rope would restart M-RoPE per packed rollout
    assert torch.equal(torch.tensor(config.kv_channels), torch.tensor(32))


def test_bf16_update_runs_with_fp32_main_grads(tiny_model_dir):
    ((old_logp, metrics, moved, dtypes),) = run_distributed(bf16_update, 1, str(tiny_model_dir))
    assert dtypes == {torch.bfloat16}
    assert torch.isfinite(old_logp).all() and (old_logp <= 0).all()
    assert metrics["actor/update_ok"] == 1.0 and moved > 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not transformer_engine_available(), reason="needs Transformer Engine on a CUDA host")
@pytest.mark.parametrize("fp8", ["none", "hybrid"])
def test_transformer_engine_actor_matches_local_spec_on_gpu(tiny_model_dir, fp8):
    ((gap, norm),) = run_distributed(te_vs_local, 1, str(tiny_model_dir), fp8)
    # bf16 TE vs bf16 local spec: rounding-level; FP8 linear layers: a few percent of the logit scale
    assert gap <= (0.05 if fp8 == "none" else 0.25) * max(1.0, norm)


@pytest.mark.parametrize("ranks", [1, 2])
def test_packed_experience_equals_padded_on_one_actor(tiny_model_dir, ranks):
    """trainer.pack_sequences: the four rollouts in one row (THD: attention within each rollout, each with its own
    M-RoPE positions) give the padded micro-batch's per-token results, alone and at TP2 with sequence parallelism
    (gpu_acceptance.sh te_packed: the same on Transformer Engine's THD attention)."""
    results = run_distributed(packed_vs_padded, ranks, str(tiny_model_dir), "local", "float32")
    gaps, shapes, scale = results[0]
    assert all(r[0] == gaps for r in results)  # every TP rank has the whole results
    assert shapes == [(1, shapes[0][1])]  # one micro-batch, one row
    assert scale > 1.0  # the comparison is of real log-probs, not zeros
    assert max(gaps.values()) <= 1e-5, gaps
