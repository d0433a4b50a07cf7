import math

import pytest
import torch

from vppo_megatron.algo import vocab_parallel
from vppo_megatron.algo.perception import (
    k3_dependency,
    prob_drop_dependency,
    token_dependency,
    trajectory_dependency,
)
from vppo_megatron.testing import run_distributed


def test_k3_hand_values_and_clamps():
    old = torch.tensor([-1.0, -2.0, -1.0, -1.0, -31.0])
    aug = torch.tensor([-1.0, -1.0, -2.0, -31.0, -1.0])
    expected = torch.tensor(
        [
            0.0,  # d = 0: exp(0) - 0 - 1 = 0
            math.e - 2.0,  # d = 1: e - 1 - 1 = 0.71828
            math.exp(-1.0),  # d = -1: e^-1 + 1 - 1 = 0.36788
            10.0,  # d = -30 -> clamp -20: e^-20 + 19 = 19.0 -> clamp to 10
            10.0,  # d = 30 -> clamp 20: e^20 - 21 -> clamp to 10
        ]
    )
    torch.testing.assert_close(k3_dependency(old, aug), expected)


def test_prob_drop_hand_value():
    # pi(o|I) = 0.5, pi(o|I') = 0.2 -> drop 0.3; the reverse is negative
    old, aug = torch.log(torch.tensor([0.5, 0.2])), torch.log(torch.tensor([0.2, 0.5]))
    torch.testing.assert_close(prob_drop_dependency(old, aug), torch.tensor([0.3, -0.3]))


def test_full_kl_and_js_hand_values():
    p = torch.tensor([[0.0, 0.0]])  # uniform: [0.5, 0.5]
    q = torch.tensor([[math.log(3.0), 0.0]])  # [0.75, 0.25]
    # KL(p||q) = 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25) = 0.5 (-0.405465) + 0.5 (0.693147) = 0.143841
    kl = token_dependency("full_kl", logits_NV_tp=p, aug_logits_NV_tp=q)
    torch.testing.assert_close(kl, torch.tensor([0.143841]), atol=1e-6, rtol=0)
    # m = [0.625, 0.375]; KL(p||m) = 0.032269, KL(q||m) = 0.035375; JS = mean = 0.033822
    js = token_dependency("js", logits_NV_tp=p, aug_logits_NV_tp=q)
    torch.testing.assert_close(js, torch.tensor([0.033822]), atol=1e-6, rtol=0)
    # entropy of the uniform over 2 = ln 2; log-prob of token 0 under q = ln 0.75
    torch.testing.assert_close(vocab_parallel.entropy(p), torch.tensor([math.log(2.0)]))
    torch.testing.assert_close(vocab_parallel.token_log_prob(q, torch.tensor([0])), torch.tensor([math.log(0.75)]))


@pytest.mark.parametrize("estimator", ["k3", "prob_drop", "full_kl", "js"])
def test_dependency_is_zero_when_the_image_changes_nothing(estimator):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=generator) * 3
    logp = torch.log_softmax(logits, -1)[:, 0]
    out = token_dependency(
        estimator, old_logp_N=logp, aug_logp_N=logp.clone(), logits_NV_tp=logits, aug_logits_NV_tp=logits.clone()
    )
    assert torch.equal(out, torch.zeros(6))


def test_unknown_estimator():
    with pytest.raises(ValueError, match="unknown estimator 'kl'"):
        token_dependency("kl", old_logp_N=torch.zeros(1), aug_logp_N=torch.zeros(1))


def test_trajectory_dependency_is_the_masked_mean():
    dependency = torch.tensor([[1.0, 3.0, 100.0], [2.0, 2.0, 2.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    # row 0: (1 + 3) / 2 = 2 (padding's 100 ignored); row 1: 2; row 2: empty response -> 0
    torch.testing.assert_close(trajectory_dependency(dependency, mask), torch.tensor([2.0, 2.0, 0.0]))


def _vocab_parallel_rank(rank, world_size, logits, aug_logits, targets):
    import torch.distributed as dist

    shard = logits.shape[-1] // world_size
    cols = slice(rank * shard, (rank + 1) * shard)
    group = dist.group.WORLD
    return {
        "kl": vocab_parallel.kl_divergence(logits[:, cols], aug_logits[:, cols], group),
        "js": vocab_parallel.js_divergence(logits[:, cols], aug_logits[:, cols], group),
        "entropy": vocab_parallel.entropy(logits[:, cols], group),
        "logp": vocab_parallel.token_log_prob(logits[:, cols], targets, rank * shard, group),
        "full_kl": token_dependency(
            "full_kl", logits_NV_tp=logits[:, cols], aug_logits_NV_tp=aug_logits[:, cols], tp_group=group
        ),
    }


def test_vocab_parallel_tp2_equals_serial():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 64, generator=generator) * 4
    aug_logits = logits + torch.randn(7, 64, generator=generator)
    targets = torch.tensor([0, 5, 31, 32, 40, 63, 17])  # ids in both halves of the vocabulary
    serial = _vocab_parallel_rank(0, 1, logits, aug_logits, targets)
    torch.testing.assert_close(serial["logp"], torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0])
    reference_kl = torch.nn.functional.kl_div(
        torch.log_softmax(aug_logits, -1), torch.log_softmax(logits, -1), log_target=True, reduction="none"
    ).sum(-1)
    torch.testing.assert_close(serial["kl"], reference_kl)
    for rank_result in run_distributed(_vocab_parallel_rank, 2, logits, aug_logits, targets):
        for name, value in serial.items():
            torch.testing.assert_close(rank_result[name], value, atol=1e-6, rtol=1e-6, msg=name)
