"""VPPO math, pure torch (stages 3-5 of a step): perturbation, token dependency, advantages, TAS, TGF, loss.

Nothing here imports megatron, ray or vllm (tests/test_import_boundaries.py and
tests/algo/test_loss.py::test_algo_imports_with_megatron_ray_and_vllm_blocked). The maths: docs/algorithm.md.
"""

from vppo_megatron.algo.advantage import dynamic_sampling_keep, grpo_advantages
from vppo_megatron.algo.filtering import gradient_mask, random_scores, select_top_tokens, soft_token_weights
from vppo_megatron.algo.loss import LossOutput, policy_loss, reduce_metrics
from vppo_megatron.algo.perception import k3_dependency, token_dependency, trajectory_dependency
from vppo_megatron.algo.perturb import perturb_image, perturbation_seed
from vppo_megatron.algo.shaping import shaped_advantages, tas_scale

__all__ = [
    "LossOutput",
    "dynamic_sampling_keep",
    "gradient_mask",
    "grpo_advantages",
    "k3_dependency",
    "perturb_image",
    "perturbation_seed",
    "policy_loss",
    "random_scores",
    "reduce_metrics",
    "select_top_tokens",
    "shaped_advantages",
    "soft_token_weights",
    "tas_scale",
    "token_dependency",
    "trajectory_dependency",
]
