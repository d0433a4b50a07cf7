"""Stages 4 and 5 for the trainer: rewards + experience -> shaped advantages, and the gradient mask.

    stage 4: GRPO group normalisation (both bases), scaled by TAS when algorithm.trajectory_shaping != none
    stage 5: TGF's top-k (or soft) mask by algorithm.token_filter's score, or every valid token (none)

The plain DAPO / GRPO baselines are both mechanisms off; nothing here depends on algorithm.base (the base decides
sampling and clipping, read by rollout/collect.py and the loss).

Legend: B rollouts on this data-parallel rank, T response positions.
"""

from __future__ import annotations

import torch

from vppo_megatron.algo import filtering, perception, shaping


def shaped_advantages(
    cfg,
    reward_B: torch.Tensor,
    group_ids_B: torch.Tensor,
    dependency_BT: torch.Tensor,
    response_mask_BT: torch.Tensor,
    dp_group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantage_B, TAS scale alpha_B) of one mini-batch (this rank's rows, in order) for `cfg` (the
    AlgorithmConfig); alpha = 1 without TAS. Segment scope: rows [0, tas_segment) are segment 0, and so on; the
    range is taken per window of tas_range_rollouts rows (0: all of them)."""
    scale_B = torch.ones_like(reward_B)
    if cfg.trajectory_shaping != "none":
        scale_B = shaping.tas_scale(
            perception.trajectory_dependency(dependency_BT, response_mask_BT),
            response_mask_BT.sum(-1) > 0,
            scope=cfg.tas_scope,
            tas_range=cfg.tas_range,
            beta_min=cfg.beta_min,
            beta_max=cfg.beta_max,
            segment_ids_B=torch.arange(len(reward_B)) // cfg.tas_segment,
            group_ids_B=group_ids_B,
            range_ids_B=torch.arange(len(reward_B)) // cfg.tas_range_rollouts if cfg.tas_range_rollouts else None,
            dp_group=dp_group,
        ).to(reward_B.dtype)
    advantage_B = shaping.shaped_advantages(reward_B, group_ids_B, scale_B, cfg.trajectory_shaping, cfg.advantage_eps)
    return advantage_B, scale_B


def token_mask(
    cfg, dependency_BT: torch.Tensor, entropy_BT: torch.Tensor, response_mask_BT: torch.Tensor, seed: int
) -> torch.Tensor:
    """gradient_mask_BT: TGF by cfg.token_filter's score, or every valid token (token_filter=none)."""
    if cfg.token_filter == "none":
        return response_mask_BT.float()
    scores = {
        "dependency": lambda: dependency_BT,
        "entropy": lambda: entropy_BT,
        "random": lambda: filtering.random_scores(response_mask_BT, seed),
    }
    return filtering.gradient_mask(
        scores[cfg.token_filter](), response_mask_BT, cfg.token_fraction, cfg.token_mask, cfg.token_count
    )


def dependency_metrics(dependency_BT: torch.Tensor, response_mask_BT: torch.Tensor) -> dict[str, float]:
    """Mean trajectory dependency S_bar over this rank's non-empty responses."""
    valid_B = response_mask_BT.sum(-1) > 0
    trajectory_B = perception.trajectory_dependency(dependency_BT, response_mask_BT)
    return {"vppo/trajectory_dependency_mean": trajectory_B[valid_B].mean().item() if valid_B.any() else 0.0}
