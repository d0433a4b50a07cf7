import pytest
import torch

from vppo_megatron.algo.shaping import shaped_advantages, tas_scale
from vppo_megatron.testing import run_distributed

S = torch.tensor([0.1, 0.2, 0.3, 0.5], dtype=torch.float64)
VALID = torch.ones(4, dtype=torch.bool)


def test_segment_scope_hand_values():
    # lo = 0.1, hi = 0.5 over the rank's mini-batch: u = [0, 0.25, 0.5, 1]
    # segment 0 = {0, 1}: mean u = 0.125 -> alpha = 0.9 + 0.1 u / 0.125 = [0.9, 1.1]
    # segment 1 = {2, 3}: mean u = 0.75  -> alpha = [0.9 + 0.1 * 0.5 / 0.75, 0.9 + 0.1 / 0.75]
    alpha = tas_scale(S, VALID, scope="segment", segment_ids_B=torch.tensor([0, 0, 1, 1]))
    expected = torch.tensor([0.9, 1.1, 0.9 + 0.1 * 0.5 / 0.75, 0.9 + 0.1 / 0.75], dtype=torch.float64)
    torch.testing.assert_close(alpha, expected, atol=1e-7, rtol=0)  # the 1e-8 in mean(u) + 1e-8


def test_all_equal_dependencies_give_alpha_one():
    alpha = tas_scale(torch.full((4,), 0.3), VALID, scope="segment", segment_ids_B=torch.zeros(4).long())
    assert torch.equal(alpha, torch.ones(4))


def test_single_valid_response_and_empty_responses():
    valid = torch.tensor([True, False, False, False])
    alpha = tas_scale(S, valid, scope="segment", segment_ids_B=torch.zeros(4).long())
    assert torch.equal(alpha, torch.ones(4, dtype=torch.float64))  # one valid rollout: no spread -> 1
    valid = torch.tensor([True, True, False, True])
    alpha = tas_scale(S, valid, scope="segment", segment_ids_B=torch.zeros(4).long())
    # rollout 2 is empty: alpha 1, not in the stats: u = [0, 0.25, -, 1], mean 5/12 over the three valid
    expected = torch.tensor([0.9, 0.9 + 0.1 * 0.25 / (5 / 12), 1.0, 0.9 + 0.1 / (5 / 12)], dtype=torch.float64)
    torch.testing.assert_close(alpha, expected, atol=1e-7, rtol=0)


@pytest.mark.parametrize("segment", [2, 4, 8])
def test_segment_mean_is_one_and_bounds_hold(segment):
    generator = torch.Generator().manual_seed(segment)
    s = torch.rand(32, generator=generator, dtype=torch.float64) ** 3
    ids = torch.arange(32) // segment
    alpha = tas_scale(s, torch.ones(32, dtype=torch.bool), scope="segment", segment_ids_B=ids)
    for m in ids.unique():
        part = alpha[ids == m]
        if (part > 0.9 + 1e-9).any():  # a segment whose rollouts all sit at lo has alpha = beta_min (reference)
            # exactly 1 up to the reference's "+ 1e-8" in mean(u): off by 0.1 * 1e-8 / mean(u)
            torch.testing.assert_close(part.mean(), torch.tensor(1.0, dtype=torch.float64), atol=1e-6, rtol=0)
    assert alpha.min() >= 0.9 - 1e-12 and alpha.max() <= 0.9 + 0.1 * segment + 1e-9


def test_fixed_range_and_group_scope():
    # fixed [0.9, 1.1]: alpha = 0.9 + 0.2 u with u = [0, 0.25, 0.5, 1]
    alpha = tas_scale(S, VALID, scope="global", tas_range="fixed", beta_min=0.9, beta_max=1.1)
    torch.testing.assert_close(alpha, torch.tensor([0.9, 0.95, 1.0, 1.1], dtype=torch.float64))
    # group scope: groups {0, 1} and {2, 3} each have u = [0, 1], mean 0.5 -> alpha = [0.9, 1.1] in each
    alpha = tas_scale(S, VALID, scope="group", group_ids_B=torch.tensor([0, 0, 1, 1]))
    torch.testing.assert_close(alpha, torch.tensor([0.9, 1.1, 0.9, 1.1], dtype=torch.float64), atol=1e-7, rtol=0)


def test_scope_arguments_are_checked():
    with pytest.raises(ValueError, match="segment_ids_B"):
        tas_scale(S, VALID, scope="segment")
    with pytest.raises(ValueError, match="group_ids_B"):
        tas_scale(S, VALID, scope="group")


def _global_rank(rank, world_size, s, valid):
    import torch.distributed as dist

    part = slice(rank * len(s) // world_size, (rank + 1) * len(s) // world_size)
    return tas_scale(s[part], valid[part], scope="global", dp_group=dist.group.WORLD)


def test_global_scope_is_identical_for_dp1_and_dp2():
    generator = torch.Generator().manual_seed(3)
    s = torch.rand(16, generator=generator, dtype=torch.float64)
    valid = torch.ones(16, dtype=torch.bool)
    valid[5] = False
    dp1 = tas_scale(s, valid, scope="global")
    torch.testing.assert_close(dp1[valid].mean(), torch.tensor(1.0, dtype=torch.float64))  # mean alpha = 1
    dp2 = torch.cat(run_distributed(_global_rank, 2, s, valid))
    # the only difference is the order of one fp64 sum (two partial sums all-reduced)
    torch.testing.assert_close(dp2, dp1, atol=1e-12, rtol=0)


def test_shaped_advantages_targets():
    reward = torch.tensor([1.0, 0.0], dtype=torch.float64)
    groups = torch.tensor([0, 0])
    scale = torch.tensor([1.1, 0.9], dtype=torch.float64)
    base = torch.tensor([0.5, -0.5], dtype=torch.float64) / (0.5**0.5 + 1e-6)  # mean 0.5, std 0.70711
    torch.testing.assert_close(shaped_advantages(reward, groups, scale, "advantage"), scale * base)
    torch.testing.assert_close(shaped_advantages(reward, groups, scale, "none"), base)
    # reward shaping: R' = [1.1, 0]: mean 0.55, std 0.77782 -> +-0.55 / 0.77782
    expected = torch.tensor([0.55, -0.55], dtype=torch.float64) / (1.1 / 2**0.5 + 1e-6)
    torch.testing.assert_close(shaped_advantages(reward, groups, scale, "reward"), expected)
