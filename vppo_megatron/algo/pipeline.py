"""Stages 4-5 composed: rewards + experience -> shaped advantages and the gradient mask, per algorithm.

    vppo: GRPO advantages scaled by TAS (algorithm.trajectory_shaping), TGF mask (algorithm.token_filter)
    dapo: GRPO advantages, every valid token
    grpo: GRPO advantages, every valid token (the trainer also skips dynamic sampling and uses symmetric clip)

Legend: B rollouts on this data-parallel rank, T response positions.
"""

from __future__ import annotations

import torch

from vppo_megatron.algo import filtering, perception, shaping
from vppo_megatron.algo.advantage import grpo_advantages


def advantages_and_mask(
    cfg,
    reward_B: torch.Tensor,
    group_ids_B: torch.Tensor,
    dependency_BT: torch.Tensor,
    entropy_BT: torch.Tensor,
    response_mask_BT: torch.Tensor,
    micro_batch_ids_B: torch.Tensor,
    seed: int,
    dp_group=None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """(advantage_B, gradient_mask_BT, metrics) for `cfg` (the AlgorithmConfig)."""
    valid_B = response_mask_BT.sum(-1) > 0
    if cfg.name != "vppo":
        return grpo_advantages(reward_B, group_ids_B, cfg.advantage_eps), response_mask_BT.float(), {}
    trajectory_B = perception.trajectory_dependency(dependency_BT, response_mask_BT)
    scale_B = torch.ones_like(reward_B)
    if cfg.trajectory_shaping != "none":
        scale_B = shaping.tas_scale(
            trajectory_B,
            valid_B,
            scope=cfg.tas_scope,
            tas_range=cfg.tas_range,
            beta_min=cfg.beta_min,
            beta_max=cfg.beta_max,
            micro_batch_ids_B=micro_batch_ids_B,
            group_ids_B=group_ids_B,
            dp_group=dp_group,
        )
    advantage_B = shaping.shaped_advantages(
        reward_B, group_ids_B, scale_B.to(reward_B.dtype), cfg.trajectory_shaping, cfg.advantage_eps
    )
    scores = {
        "dependency": dependency_BT,
        "entropy": entropy_BT,
        "random": filtering.random_scores(response_mask_BT, seed),
    }
    if cfg.token_filter == "none":
        mask_BT = response_mask_BT.float()
    else:
        mask_BT = filtering.gradient_mask(
            scores[cfg.token_filter], response_mask_BT, cfg.token_fraction, cfg.token_mask
        )
    metrics = {
        "vppo/trajectory_dependency_mean": trajectory_B[valid_B].mean().item() if valid_B.any() else 0.0,
        "vppo/shaping_scale_max": scale_B.max().item(),
        "vppo/shaping_scale_min": scale_B.min().item(),
    }
    return advantage_B, mask_BT, metrics
