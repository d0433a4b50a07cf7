import math

import pytest
import torch

from vppo_megatron.algo.filtering import (
    gradient_mask,
    num_selected,
    random_scores,
    select_top_tokens,
    soft_token_weights,
)


def test_top_tokens_hand_example():
    score = torch.tensor([[0.1, 0.5, 0.3, 0.9, 0.2]])
    mask = torch.ones(1, 5)
    # L = 5, k = 0.4: ceil(2.0) = 2 tokens: the 0.9 (position 3) and the 0.5 (position 1)
    assert select_top_tokens(score, mask, 0.4).tolist() == [[False, True, False, True, False]]


def test_ties_keep_earlier_positions_and_padding_is_never_selected():
    assert select_top_tokens(torch.ones(1, 4), torch.ones(1, 4), 0.5).tolist() == [[True, True, False, False]]
    score = torch.tensor([[0.1, 100.0, 50.0]])
    mask = torch.tensor([[1, 0, 0]])
    # L = 1: one token, the only valid one, although padding has larger scores
    assert select_top_tokens(score, mask, 0.4).tolist() == [[True, False, False]]


def test_edge_cases_empty_fraction_one_and_minimum_one():
    score = torch.rand(3, 10, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(3, 10)
    mask[1, :3] = 1  # L = 3
    mask[2, :] = 1  # L = 10
    assert not select_top_tokens(score, mask, 0.4)[0].any()  # empty response: nothing
    assert torch.equal(select_top_tokens(score, mask, 1.0), mask.bool())  # fraction 1.0: every valid token
    assert select_top_tokens(score, mask, 0.1)[1].sum() == 1  # ceil(0.3) = 1: at least one token
    # 0.7 * 10 = 7.000000000000001 in floats: still 7 tokens, not 8
    assert select_top_tokens(score, mask, 0.7)[2].sum() == 7
    assert num_selected(mask, 0.7).tolist() == [0, 3, 7]  # ceil(2.1) = 3 for L = 3


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.4, 0.5, 0.9])
def test_keeps_exactly_ceil_k_l_tokens(fraction):
    generator = torch.Generator().manual_seed(7)
    score = torch.rand(16, 40, generator=generator)
    lengths = torch.randint(0, 41, (16,), generator=generator)
    mask = torch.arange(40)[None, :] < lengths[:, None]
    selected = select_top_tokens(score, mask, fraction)
    expected = [0 if n == 0 else max(1, math.ceil(round(fraction * n, 9))) for n in lengths.tolist()]
    assert selected.sum(-1).tolist() == expected
    assert not (selected & ~mask).any()
    # every selected score is >= every rejected valid score of its row
    for row in range(16):
        if 0 < selected[row].sum() < mask[row].sum():
            assert score[row][selected[row]].min() >= score[row][mask[row] & ~selected[row]].max()


def test_soft_mask_mean_is_k_and_monotone():
    score = torch.tensor([[0.1, 0.5, 0.3, 0.9, 0.0, 0.0], [0.2, 0.2, 0.2, 0.2, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]])
    weights = soft_token_weights(score, mask, 0.4)
    torch.testing.assert_close(weights[:, :4].mean(-1), torch.tensor([0.4, 0.4]))
    assert torch.equal(weights[:, 4:], torch.zeros(2, 2))  # padding weight 0
    order = torch.argsort(score[0, :4])
    assert (weights[0, order].diff() > 0).all()  # higher dependency, higher weight
    torch.testing.assert_close(weights[1, :4], torch.full((4,), 0.4))  # all equal: z = 0, w = k


def test_random_scores_are_seeded_and_dispatch():
    mask = torch.ones(2, 8)
    assert torch.equal(random_scores(mask, 3), random_scores(mask, 3))
    assert not torch.equal(random_scores(mask, 3), random_scores(mask, 4))
    assert gradient_mask(random_scores(mask, 3), mask, 0.5).sum() == 8
    assert gradient_mask(random_scores(mask, 3), mask, 0.5, "soft").dtype == torch.float32
    with pytest.raises(ValueError, match="unknown token_mask"):
        gradient_mask(mask, mask, 0.5, "fuzzy")


def test_token_count_follows_the_reference_float32_product_by_default_and_exact_on_request():
    # float32(0.3) * 50 = 15.000001 -> 16 tokens in the reference; exactly 0.3 * 50 = 15
    lengths = torch.tensor([50, 25, 10, 3])
    mask = (torch.arange(50) < lengths[:, None]).float()
    assert num_selected(mask, 0.3).tolist() == [16, 8, 3, 1]
    assert num_selected(mask, 0.3, count="exact").tolist() == [15, 8, 3, 1]
    assert num_selected(mask, 0.6).tolist() == [31, 16, 6, 2]  # 0.6 * 50 and 0.6 * 25 one more
    assert num_selected(mask, 0.6, count="exact").tolist() == [30, 15, 6, 2]
    assert select_top_tokens(torch.rand(4, 50), mask, 0.3).sum(-1).tolist() == [16, 8, 3, 1]
