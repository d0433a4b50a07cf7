import dataclasses
import typing
from pathlib import Path

import pytest

from vppo_megatron import config as config_lib
from vppo_megatron.config import Config, ConfigError, load

EXAMPLES = sorted((Path(__file__).parents[1] / "examples" / "configs").glob("*.yaml"))


def _sections():
    hints = typing.get_type_hints(Config)
    return [Config] + [hints[f.name] for f in dataclasses.fields(Config)]


@pytest.mark.parametrize("cls", _sections(), ids=lambda c: c.__name__)
def test_every_field_has_a_docstring(cls):
    docs = config_lib.field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name, "").strip()]
    assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_defaults_are_the_reference_recipe():
    cfg = Config()
    a = cfg.algorithm
    # the paper's recipe: k3 estimator, k = 0.4, beta_min 0.9, clip 0.2/0.28, dual clip 3, lambda 0.06, eps 1e-6
    assert (a.estimator, a.token_fraction, a.beta_min) == ("k3", 0.4, 0.9)
    assert (a.clip_ratio_low, a.clip_ratio_high, a.clip_ratio_dual) == (0.2, 0.28, 3.0)
    assert (a.entropy_coef, a.advantage_eps, a.tas_scope) == (0.06, 1e-6, "segment")
    assert (a.accuracy_low, a.accuracy_high, a.perturb_probability) == (0.01, 0.99, 0.5)
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.optimizer.grad_clip) == (1e-6, 0.01, 1.0)
    assert (cfg.rollout.num_samples_per_prompt, cfg.rollout.top_p) == (8, 0.99)
    assert (cfg.trainer.prompts_per_step, cfg.trainer.prompts_per_update) == (384, 128)
    assert cfg.validate() is cfg


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algorithm:\n  token_fraction: 0.3\nparallel:\n  tp: 2\n")
    cfg = load(
        path,
        [
            "algorithm.token_fraction=0.5",
            "data.train_files=[a.parquet, b.parquet]",
            "trainer.seed=7",
            "algorithm.dynamic_sampling=false",
            "optimizer.lr=2e-5",
        ],
    )
    assert cfg.algorithm.token_fraction == 0.5  # the override wins over the file
    assert cfg.parallel.tp == 2
    assert cfg.data.train_files == ["a.parquet", "b.parquet"]
    assert cfg.trainer.seed == 7 and cfg.algorithm.dynamic_sampling is False
    assert cfg.optimizer.lr == 2e-5 and isinstance(cfg.optimizer.lr, float)
    # a scalar for a list field becomes a one-element list
    assert load(None, ["data.val_files=v.parquet"]).data.val_files == ["v.parquet"]


@pytest.mark.parametrize(
    "override, words",
    [
        ("algorithm.tas_scop=global", ["algorithm.tas_scop", "did you mean algorithm.tas_scope"]),
        ("algorithm.tas_scope=everywhere", ["algorithm.tas_scope", "segment | global | group"]),
        ("algorithm.estimator=kl", ["algorithm.estimator", "k3 | full_kl"]),
        ("trainer.seed=abc", ["trainer.seed", "integer"]),
        ("algorithm.dynamic_sampling=maybe", ["algorithm.dynamic_sampling", "true or false"]),
        ("optimizer.lr=.nan", ["optimizer.lr", "finite"]),
        ("nosection.x=1", ["unknown config key nosection"]),
        ("algorithm=3", ["algorithm", "mapping"]),
        ("justtext", ["section.field=value"]),
    ],
)
def test_bad_values_name_the_field(override, words):
    with pytest.raises(ConfigError) as err:
        load(None, [override])
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize(
    "overrides, world_size, words",
    [
        (["parallel.tp=3"], 8, ["world size 8 is not divisible by tp*pp*cp = 3"]),
        (["parallel.tp=2", "parallel.pp=2", "parallel.dp=4"], 8, ["parallel.dp=4", "set parallel.dp=2"]),
        (["parallel.vpp=2"], None, ["parallel.vpp", "pp > 1"]),
        (["parallel.first_stage_layers=1"], None, ["parallel.first_stage_layers=1", "pp > 1"]),
        (["parallel.pp=2", "parallel.last_stage_layers=-2"], None, ["parallel.last_stage_layers=-2", ">= 0"]),
        (
            ["parallel.pp=2", "parallel.vpp=2", "parallel.first_stage_layers=3"],
            None,
            ["parallel.first_stage_layers=3", "multiple of parallel.vpp=2"],
        ),
        (["parallel.sequence_parallel=true"], None, ["sequence_parallel", "tp > 1"]),
        (
            ["trainer.pack_sequences=true", "parallel.cp=2"],
            None,
            ["trainer.pack_sequences=True", "context parallelism (parallel.cp=2)", "parallel.cp=1"],
        ),
        (["algorithm.token_fraction=0"], None, ["algorithm.token_fraction", "(0, 1]"]),
        (
            ["algorithm.tas_range=fixed", "algorithm.beta_max=0.5"],
            None,
            ["algorithm.beta_max", ">= algorithm.beta_min"],
        ),
        (["trainer.prompts_per_step=10", "trainer.prompts_per_update=4"], None, ["must divide"]),
        (["algorithm.reward_function=nocolon"], None, ["algorithm.reward_function", "module:function"]),
        (["data.min_pixels=10", "data.max_pixels=5"], None, ["data.min_pixels"]),
        (["rollout.num_samples_per_prompt=1"], None, [">= 2 samples"]),
        # no batch is floored, dropped or re-sized at run time: each is a ConfigError with the nearest valid sizes
        (
            ["trainer.prompts_per_step=12", "trainer.prompts_per_update=6"],
            4,
            ["trainer.prompts_per_update=6", "multiple of the data-parallel size 4", "nearest: 4 or 8"],
        ),
        (
            ["trainer.prompts_per_step=8", "trainer.prompts_per_update=4", "trainer.micro_batch_size=3"],
            2,  # a rank's update: 4 / dp 2 x 8 samples = 16 rollouts
            ["trainer.micro_batch_size=3", "= 16", "nearest: 2 or 4"],
        ),
        (["algorithm.tas_segment=1"], None, ["algorithm.tas_segment=1", ">= 2 rollouts"]),
        (
            ["trainer.prompts_per_step=8", "trainer.prompts_per_update=4", "algorithm.tas_segment=12"],
            2,
            ["algorithm.tas_segment=12", "divide a rank's rollouts per update (16)", "nearest: 8 or 16"],
        ),
        (["trainer.prompts_per_step=10", "trainer.prompts_per_update=4"], None, ["nearest: 2 or 5"]),
        (
            ["trainer.prompts_per_step=8", "trainer.prompts_per_update=4", "algorithm.tas_range_rollouts=24"],
            1,  # a rank's update: 4 x 8 = 32 rollouts, segments of 16
            ["algorithm.tas_range_rollouts=24", "whole TAS segments (16)", "per update (32)", "nearest: 16 or 32"],
        ),
    ],
)
def test_validate_rejects_inconsistent_settings(overrides, world_size, words):
    cfg = load(None, overrides)
    with pytest.raises(ConfigError) as err:
        cfg.validate(world_size)
    for word in words:
        assert word in str(err.value)


def test_sizes_that_need_no_segment_or_fixed_count_are_not_checked_for_them():
    load(None, ["algorithm.tas_segment=1", "algorithm.trajectory_shaping=none"]).validate(8)  # TAS off
    load(None, ["algorithm.tas_segment=3", "algorithm.tas_scope=global"]).validate(8)
    load(None, ["trainer.micro_batch_size=7", "trainer.max_tokens_per_micro_batch=4096"]).validate(8)  # token budget


def test_replaced_tas_scope_value_says_what_replaced_it():
    with pytest.raises(ConfigError, match="tas_scope=segment and algorithm.tas_segment"):
        load(None, ["algorithm.tas_scope=micro_batch"])


def test_layout_that_fits_validates():
    load(None, ["parallel.tp=2", "parallel.pp=2", "parallel.cp=2"]).validate(16)  # dp derived as 2
    load(None, ["parallel.tp=2", "parallel.pp=2", "parallel.dp=2"]).validate(8)
    load(None, ["parallel.pp=2", "parallel.vpp=2", "parallel.first_stage_layers=2"]).validate(2)
    load(None, ["parallel.pp=2", "parallel.first_stage_layers=1", "parallel.last_stage_layers=2"]).validate(2)


@pytest.mark.skipif(config_lib.transformer_engine_available(), reason="host has Transformer Engine")
@pytest.mark.parametrize("override", ["model.fp8=hybrid", "model.transformer_impl=transformer_engine"])
def test_fp8_or_te_without_transformer_engine_is_a_config_error(override):
    cfg = load(None, [override])
    with pytest.raises(ConfigError, match="Transformer Engine"):
        cfg.validate()
    cfg.validate(check_host=False)  # the same config is valid for a GPU cluster (dry run)


def test_fp8_needs_bf16():
    with pytest.raises(ConfigError, match="model.dtype=bfloat16"):
        load(None, ["model.fp8=e4m3", "model.dtype=float32"]).validate(check_host=False)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_validate_at_their_world_size(path):
    cfg = load(path)
    assert cfg.parallel.world_size > 0, "every example states the world size it targets"
    cfg.validate(check_host=False)


def test_examples_exist():
    assert {p.name for p in EXAMPLES} >= {"tiny_cpu.yaml", "qwen2_5_vl_7b.yaml", "qwen2_5_vl_32b.yaml"}


def test_describe_lists_every_leaf():
    rows = config_lib.describe()
    names = {name for name, _, _ in rows}
    assert {"algorithm.token_fraction", "parallel.tp", "model.fp8_recipe"} <= names
    assert all(doc for _, _, doc in rows)
