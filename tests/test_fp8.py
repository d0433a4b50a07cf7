"""FP8 without a GPU: the token padding per local shard for every recipe's layout, the settings that could not take
effect or would hang refused, the delayed-scaling knobs reaching megatron-core, the experience pass in bf16 unless
asked, and Transformer Engine's FP8 weight caches dropped and planned."""

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vppo_megatron.config import ConfigError, load

RECIPES = sorted(p for p in Path("examples/configs").glob("*.yaml") if p.stem != "tiny_cpu")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_layout_pads_so_each_fp8_shard_is_a_multiple_of_16(recipe):
    from vppo_megatron.actor.engine import token_multiple

    p = load(recipe).parallel
    sp = p.sequence_parallel
    shard = p.cp * (p.tp if sp else 1)  # ranks one sequence's tokens are split over (CP zigzag, then SP over TP)
    multiple = token_multiple(p.tp, p.cp, sp, fp8=True)
    for k in range(1, 40):
        length = k * multiple  # every padded length
        assert length % shard == 0 and (length // shard) % 16 == 0, (recipe.stem, length)
        if p.cp > 1:
            assert length % (2 * p.cp) == 0  # the zigzag's 2 x CP chunks
    assert multiple == 16 * shard  # the smallest such multiple: no more padding than FP8 needs
    blockwise = token_multiple(p.tp, p.cp, sp, fp8=True, fp8_recipe="blockwise")
    assert blockwise == (128 if sp else 16) * shard  # 1 x 128 blocks of the shard TE all-gathers under SP
    # without FP8 only the split itself
    assert token_multiple(p.tp, p.cp, sp, fp8=False) == (2 * shard if p.cp > 1 else shard)
    old = math.lcm(2 * shard if p.cp > 1 else shard, 16)  # the rule before: 16 tokens of the whole sequence
    if shard > 1:  # left each rank a shard that is no multiple of 16 (2 tokens at TP8, below even TE's 8)
        assert (old // shard) % 16 != 0


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["model.fp8=e4m3", "model.transformer_impl=local"], ["model.transformer_impl='local'", "bf16 silently"]),
        (["model.fp8_experience=true"], ["model.fp8_experience", "model.fp8=hybrid or e4m3"]),
        (["model.fp8=e4m3", "model.fp8_recipe=tensorwise", "model.fp8_amax_history_len=16"], ["delayed only"]),
        (["model.fp8=hybrid", "model.fp8_recipe=blockwise", "model.fp8_amax_compute_algo=max"], ["delayed only"]),
        (["model.fp8=e4m3", "model.fp8_amax_history_len=0"], ["fp8_amax_history_len", ">= 1"]),
        (
            ["model.fp8=e4m3", "trainer.max_tokens_per_micro_batch=20000"],
            ["trainer.max_tokens_per_micro_batch", "a hang", "fp8_recipe=tensorwise"],
        ),
    ],
)
def test_fp8_settings_that_cannot_take_effect_or_would_hang_are_refused(overrides, words):
    cfg = load("examples/configs/qwen2_5_vl_7b.yaml", ["model.dtype=bfloat16", *overrides])
    with pytest.raises(ConfigError) as err:
        cfg.validate(check_host=False)
    for word in words:
        assert word in str(err.value)


def test_token_budgets_are_fine_with_current_scaling_or_one_data_parallel_rank():
    base = ["model.fp8=e4m3", "trainer.max_tokens_per_micro_batch=20000"]
    load("examples/configs/qwen2_5_vl_7b.yaml", [*base, "model.fp8_recipe=tensorwise"]).validate(check_host=False)
    one = load("examples/configs/qwen2_5_vl_7b.yaml", [*base, "parallel.world_size=4", "parallel.tp=4"])
    one.validate(check_host=False)  # DP 1: no other rank to wait for


def test_delayed_scaling_knobs_reach_megatron_cores_config():
    from megatron.core.transformer import TransformerConfig

    from vppo_megatron.actor.model import fp8_settings

    knobs = ["model.fp8_amax_history_len=16", "model.fp8_amax_compute_algo=max", "model.fp8_margin=1"]
    settings = fp8_settings(load(None, ["model.fp8=hybrid", *knobs]))
    assert settings == {
        "fp8": "hybrid",
        "fp8_recipe": "delayed",
        "fp8_amax_history_len": 16,
        "fp8_amax_compute_algo": "max",
        "fp8_margin": 1,
    }
    fields = TransformerConfig.__dataclass_fields__
    assert set(settings) <= set(fields)  # each a field of megatron-core's config, under that name
    assert fp8_settings(load(None, ["model.fp8=e4m3", "model.fp8_recipe=tensorwise"])) == {
        "fp8": "e4m3",
        "fp8_recipe": "tensorwise",
    }
    assert fp8_settings(load(None)) == {}
    defaults = load(None).model  # Megatron-LM's defaults, as megatron-core's own config has them
    for name in ("fp8_amax_history_len", "fp8_amax_compute_algo", "fp8_margin"):
        assert getattr(defaults, name) == fields[name].default, name


@pytest.mark.parametrize("fp8_experience, inside", [(False, None), (True, "e4m3")])
def test_the_experience_pass_runs_bf16_unless_asked_and_the_update_keeps_fp8(fp8_experience, inside):
    from vppo_megatron.actor.engine import MegatronActor

    actor = SimpleNamespace(config=SimpleNamespace(fp8="e4m3"), cfg=SimpleNamespace(model=SimpleNamespace()))
    actor.cfg.model.fp8_experience = fp8_experience
    with MegatronActor._experience_precision(actor):
        assert actor.config.fp8 == inside  # megatron-core enters TE's FP8 context only when config.fp8 is set
    assert actor.config.fp8 == "e4m3"
    with pytest.raises(RuntimeError), MegatronActor._experience_precision(actor):
        raise RuntimeError("a failed pass")
    assert actor.config.fp8 == "e4m3"  # restored whatever happens


def test_fp8_weight_caches_are_dropped_and_planned_only_while_an_fp8_pass_runs():
    from vppo_megatron.actor.offload import ActorOffload
    from vppo_megatron.memory import estimate, resolve_arch

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[0]._fp8_workspaces = {"weight": torch.zeros(16, dtype=torch.uint8)}  # as TE's base module keeps them
    model[1]._fp8_workspaces = {}
    offload = ActorOffload([model], optimizer=None)
    assert offload.drop_fp8_weight_caches() == 1 and model[0]._fp8_workspaces == {}

    cfg = load("examples/configs/qwen2_5_vl_7b.yaml")
    arch = resolve_arch(cfg.model.path)[0]
    plain = estimate(cfg, arch)
    fp8 = estimate(load("examples/configs/qwen2_5_vl_7b.yaml", ["model.fp8=e4m3"]), arch)
    fp8_exp = estimate(
        load("examples/configs/qwen2_5_vl_7b.yaml", ["model.fp8=e4m3", "model.fp8_experience=true"]), arch
    )
    cache = arch.layers * arch.layer_params(cfg.parallel.tp) * 2 / 2**30
    assert plain["fp8_weight_cache"] == 0 and fp8["fp8_weight_cache"] == pytest.approx(cache)
    assert fp8["update_phase"] == pytest.approx(plain["update_phase"] + cache)
    assert fp8["experience_phase"] == pytest.approx(plain["experience_phase"])  # bf16 experience: no cache
    assert fp8_exp["experience_phase"] == pytest.approx(plain["experience_phase"] + cache)
    assert fp8["rollout_phase"] == pytest.approx(plain["rollout_phase"])  # dropped before the engines wake
