"""Rule-based rewards: the VPPO math reward and loading of user reward functions."""

from vppo_megatron.reward.loading import load_reward_function, score_batch
from vppo_megatron.reward.math import compute_score, compute_score_math_verify, extract_last_boxed, grade_answer

__all__ = [
    "compute_score",
    "compute_score_math_verify",
    "extract_last_boxed",
    "grade_answer",
    "load_reward_function",
    "score_batch",
]
