import torch

from vppo_megatron.algo.advantage import dynamic_sampling_keep, grpo_advantages


def test_grpo_hand_values():
    reward = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    # group 0: mean 0.25; unbiased std = sqrt((0.75^2 + 3 * 0.25^2) / 3) = sqrt(0.25) = 0.5
    #   A = (1 - 0.25) / 0.5 = 1.5 and (0 - 0.25) / 0.5 = -0.5
    # group 1: all equal -> std 0 -> A = 0 / (0 + 1e-6) = 0
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.0, 0.0]) / torch.tensor([0.5 + 1e-6] * 4 + [1e-6] * 2)
    torch.testing.assert_close(grpo_advantages(reward, groups), expected)


def test_groups_need_not_be_contiguous_and_singletons_use_mean_0_std_1():
    reward = torch.tensor([1.0, 3.0, 0.0, 2.0])
    groups = torch.tensor([7, 9, 7, 4])
    # group 7: {1, 0}: mean 0.5, std sqrt(0.5) = 0.70711 -> +-0.70711
    # group 9 and group 4 have one rollout: mean 0, std 1 (EasyR1) -> A = R / (1 + 1e-6)
    expected = torch.tensor([0.5 / (0.5**0.5 + 1e-6), 3.0 / (1 + 1e-6), -0.5 / (0.5**0.5 + 1e-6), 2.0 / (1 + 1e-6)])
    torch.testing.assert_close(grpo_advantages(reward, groups), expected)


def test_dynamic_sampling_keeps_only_mixed_groups():
    accuracy = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3, 3])
    # group means: 1.0 (drop), 0.0 (drop), 0.5 (keep), 0.75 (keep)
    expected = torch.tensor([False, False, False, False, True, True, True, True, True, True])
    assert torch.equal(dynamic_sampling_keep(accuracy, groups), expected)
    # bounds are exclusive: a group mean of exactly 0.5 is dropped with low=0.5
    assert not dynamic_sampling_keep(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), low=0.5).any()
