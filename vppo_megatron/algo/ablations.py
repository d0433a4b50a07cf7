"""The paper's ablations as config overrides: one entry per row of Tables 2-7, 11 and 12 (Qwen2.5-VL-7B, avg@8).

`vppo train --config X $(python -m vppo_megatron.algo.ablations table4/entropy)` reproduces a row; the numbers
are the paper's, for comparison, not something this code has measured. Every entry spells out what it changes
from the default (VPPO = TAS + TGF on the DAPO base); tests/algo/test_ablations.py checks each resolves to what
its name says.
"""

from __future__ import annotations

import sys

PLAIN = ["algorithm.trajectory_shaping=none", "algorithm.token_filter=none"]  # neither VPPO mechanism

ABLATIONS: dict[str, tuple[list[str], float | None]] = {
    # The main table's GRPO baseline, then Table 2: the components
    "main/grpo": (["algorithm.base=grpo", *PLAIN], 53.1),
    "table2/dapo": (PLAIN, 55.0),
    "table2/tas_only": (["algorithm.token_filter=none"], 56.3),
    "table2/tgf_only": (["algorithm.trajectory_shaping=none"], 57.1),
    "table2/vppo": ([], 57.5),
    "table2/vppo_on_grpo": (["algorithm.base=grpo"], 54.8),
    # Table 3: TAS range
    "table3/fixed_0.8_1.2": (["algorithm.tas_range=fixed", "algorithm.beta_min=0.8", "algorithm.beta_max=1.2"], None),
    "table3/fixed_0.9_1.1": (["algorithm.tas_range=fixed", "algorithm.beta_min=0.9", "algorithm.beta_max=1.1"], None),
    # Table 4: token selection signal (TGF only)
    "table4/random": (["algorithm.trajectory_shaping=none", "algorithm.token_filter=random"], 54.8),
    "table4/entropy": (["algorithm.trajectory_shaping=none", "algorithm.token_filter=entropy"], 56.0),
    "table4/dependency": (["algorithm.trajectory_shaping=none"], 57.1),
    # Table 5: token fraction k (peaks at 0.4)
    **{f"table5/k_{k}": ([f"algorithm.token_fraction={k}"], None) for k in (0.2, 0.3, 0.4, 0.5, 0.6, 0.8)},
    # Table 6: shaping target
    "table6/reward_shaping": (["algorithm.trajectory_shaping=reward"], None),
    # Table 7 / App. I: soft mask
    "table7/soft_mask": (["algorithm.token_mask=soft"], 56.2),
    # Table 11: perturbation type
    "table11/patch_blackening": ([], 57.5),
    "table11/gaussian_noise": (["algorithm.perturbation=gaussian_noise"], None),
    "table11/gaussian_blur": (["algorithm.perturbation=gaussian_blur"], None),
    "table11/grey": (["algorithm.perturbation=grey"], None),
    # Table 12: dependency metric
    "table12/kl": (["algorithm.estimator=full_kl"], 57.5),
    "table12/js": (["algorithm.estimator=js"], 56.9),
    "table12/prob_drop": (["algorithm.estimator=prob_drop"], 50.3),
}


def overrides(name: str) -> list[str]:
    if name not in ABLATIONS:
        raise ValueError(f"unknown ablation {name!r}; known: {', '.join(ABLATIONS)}")
    return ABLATIONS[name][0]


if __name__ == "__main__":
    print(" ".join(overrides(sys.argv[1])) if len(sys.argv) > 1 else "\n".join(ABLATIONS))
