"""Every ablation entry runs what its name says: its overrides pass config validation and resolve to the settings
the row of the paper's table changes (and nothing else)."""

import pytest

from vppo_megatron.algo.ablations import ABLATIONS, overrides
from vppo_megatron.config import Config, ConfigError, load

DEFAULT = Config().algorithm
VPPO = {"base": "dapo", "trajectory_shaping": "advantage", "token_filter": "dependency", "dynamic_sampling": True}
DAPO_CLIP = {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28}
GRPO_CLIP = {"clip_ratio_low": 0.2, "clip_ratio_high": 0.2}

# name -> the resolved algorithm settings that entry must have (fields not named keep their defaults)
EXPECTED = {
    "main/grpo": dict(
        VPPO, base="grpo", trajectory_shaping="none", token_filter="none", dynamic_sampling=False, **GRPO_CLIP
    ),
    "table2/dapo": dict(VPPO, trajectory_shaping="none", token_filter="none", **DAPO_CLIP),
    "table2/tas_only": dict(VPPO, token_filter="none"),
    "table2/tgf_only": dict(VPPO, trajectory_shaping="none"),
    "table2/vppo": dict(VPPO, **DAPO_CLIP),
    "table2/vppo_on_grpo": dict(VPPO, base="grpo", dynamic_sampling=False, **GRPO_CLIP),
    "table3/fixed_0.8_1.2": dict(VPPO, tas_range="fixed", beta_min=0.8, beta_max=1.2),
    "table3/fixed_0.9_1.1": dict(VPPO, tas_range="fixed", beta_min=0.9, beta_max=1.1),
    "table4/random": dict(VPPO, trajectory_shaping="none", token_filter="random"),
    "table4/entropy": dict(VPPO, trajectory_shaping="none", token_filter="entropy"),
    "table4/dependency": dict(VPPO, trajectory_shaping="none"),
    **{f"table5/k_{k}": dict(VPPO, token_fraction=k) for k in (0.2, 0.3, 0.4, 0.5, 0.6, 0.8)},
    "table6/reward_shaping": dict(VPPO, trajectory_shaping="reward"),
    "table7/soft_mask": dict(VPPO, token_mask="soft"),
    "table11/patch_blackening": dict(VPPO, perturbation="patch_blackening"),
    "table11/gaussian_noise": dict(VPPO, perturbation="gaussian_noise"),
    "table11/gaussian_blur": dict(VPPO, perturbation="gaussian_blur"),
    "table11/grey": dict(VPPO, perturbation="grey"),
    "table12/kl": dict(VPPO, estimator="full_kl"),
    "table12/js": dict(VPPO, estimator="js"),
    "table12/prob_drop": dict(VPPO, estimator="prob_drop"),
}


def test_every_ablation_has_an_expectation():
    assert set(EXPECTED) == set(ABLATIONS)


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_ablation_resolves_to_what_its_name_says(name):
    algorithm = load("examples/configs/tiny_cpu.yaml", overrides(name)).validate(world_size=2).algorithm
    expected = EXPECTED[name]
    for field, value in vars(DEFAULT).items():
        if field == "entropy_coef":  # the example config sets its own
            continue
        assert getattr(algorithm, field) == expected.get(field, value), (name, field)
    # the dual pass runs exactly when a mechanism reads token dependency
    uses_dependency = expected["trajectory_shaping"] != "none" or expected["token_filter"] == "dependency"
    assert algorithm.needs_perception == uses_dependency


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        (["algorithm.dynamic_sampling=true"], "algorithm.dynamic_sampling"),
        (["algorithm.clip_ratio_high=0.28"], "algorithm.clip_ratio_high"),
    ],
)
def test_grpo_refuses_settings_it_would_not_run_as_written(extra, field):
    with pytest.raises(ConfigError, match=field):
        load(None, ["algorithm.base=grpo", *extra]).validate()


def test_explicit_settings_win_over_the_base_defaults_and_the_old_key_says_what_replaced_it():
    a = load(None, ["algorithm.dynamic_sampling=false", "algorithm.clip_ratio_high=0.3"]).validate().algorithm
    assert (a.base, a.dynamic_sampling, a.clip_ratio_high) == ("dapo", False, 0.3)
    a = load(None, ["algorithm.base=grpo", "algorithm.clip_ratio_low=0.25"]).validate().algorithm
    assert a.clip_ratio_high == 0.25
    with pytest.raises(ConfigError, match="algorithm.name was replaced.*trajectory_shaping=none"):
        load(None, ["algorithm.name=dapo"])
