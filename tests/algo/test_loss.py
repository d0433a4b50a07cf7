import math
import subprocess
import sys

import torch

from vppo_megatron.algo.loss import clipped_policy_gradient, policy_loss, reduce_metrics
from vppo_megatron.testing import run_distributed


def test_clipping_hand_values():
    ratio = torch.tensor([1.5, 0.5, 5.0, 0.5, 1.1])
    advantage = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0])
    pg, clipped, dual = clipped_policy_gradient(ratio, advantage, 0.2, 0.28, 3.0)
    expected = torch.tensor(
        [
            -1.28,  # A > 0, r = 1.5 > 1.28: max(-1.5, -1.28) = -1.28 (clip-higher)
            -0.5,  # A > 0, r = 0.5: max(-0.5, -0.8) = -0.5 (no clip below for a positive advantage)
            3.0,  # A < 0, r = 5: max(5, 1.28) = 5 exceeds C = 3: dual clip -> 3
            0.8,  # A < 0, r = 0.5 < 0.8: max(0.5, 0.8) = 0.8
            -1.1,  # inside the trust region
        ]
    )
    torch.testing.assert_close(pg, expected)
    assert clipped.tolist() == [True, False, False, True, False]
    assert dual.tolist() == [False, False, True, False, False]


def test_loss_hand_value_with_mask_entropy_and_global_denominator():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9]]))
    old = logp.clone()  # ratio 1 everywhere
    advantage = torch.tensor([2.0])
    response_mask = torch.tensor([[1.0, 1.0, 0.0]])  # third position is padding
    grad_mask = torch.tensor([[1.0, 0.0, 0.0]])
    out = policy_loss(logp, old, advantage, response_mask, grad_mask, num_global_tokens=10, entropy_coef=0.06)
    # PG: only token 0: -A * 1 = -2. Entropy: 0.06 * (ln 2 + ln 4) over both valid tokens. Divide by N = 10.
    expected = (-2.0 + 0.06 * (math.log(2) + math.log(4))) / 10
    torch.testing.assert_close(out.loss, torch.tensor(expected))
    metrics = reduce_metrics([out.metric_sums])
    assert metrics["vppo/selected_fraction"] == 0.5  # 1 of 2 valid tokens
    assert math.isclose(metrics["actor/neg_logp"], (math.log(2) + math.log(4)) / 2, rel_tol=1e-6)
    assert metrics["actor/pg_clipfrac"] == 0.0 and metrics["actor/ppo_kl"] == 0.0


def test_gradient_is_zero_outside_the_mask_except_the_entropy_share():
    generator = torch.Generator().manual_seed(0)
    old = torch.log(torch.rand(4, 6, generator=generator))
    logp = (old + 0.1 * torch.randn(4, 6, generator=generator)).requires_grad_()
    advantage = torch.randn(4, generator=generator)
    response_mask = torch.ones(4, 6)
    response_mask[3, 4:] = 0
    grad_mask = (torch.rand(4, 6, generator=generator) > 0.5).float() * response_mask
    for coef in (0.0, 0.06):
        logp.grad = None
        policy_loss(
            logp, old, advantage, response_mask, grad_mask, num_global_tokens=50, entropy_coef=coef
        ).loss.backward()
        outside = (grad_mask == 0) & (response_mask == 1)
        # d/d logp of coef * (-logp) / N = -coef / N: the entropy term alone reaches unselected tokens
        # (exactly 0 without it; with it, equal up to fp32 rounding of coef / N)
        expected = torch.full_like(logp.grad[outside], -coef / 50)
        torch.testing.assert_close(logp.grad[outside], expected, rtol=0, atol=0 if coef == 0 else 1e-9)
        assert torch.equal(logp.grad[response_mask == 0], torch.zeros(2))  # padding: nothing at all
        assert (logp.grad[grad_mask == 1] != -coef / 50).any()  # selected tokens get the PG (unless clipped)


def test_dependency_metrics_split_selected_and_rejected():
    logp = torch.zeros(1, 4)
    out = policy_loss(
        logp,
        logp,
        torch.ones(1),
        torch.ones(1, 4),
        torch.tensor([[1.0, 1.0, 0.0, 0.0]]),
        num_global_tokens=4,
        dependency_BT=torch.tensor([[4.0, 2.0, 1.0, 0.0]]),
    )
    metrics = reduce_metrics([out.metric_sums])
    assert metrics["vppo/dependency_selected"] == 3.0  # (4 + 2) / 2
    assert metrics["vppo/dependency_rejected"] == 0.5  # (1 + 0) / 2


def test_micro_batches_sum_to_the_full_batch_loss():
    generator = torch.Generator().manual_seed(1)
    old = torch.log(torch.rand(4, 5, generator=generator))
    logp = old + 0.3 * torch.randn(4, 5, generator=generator)
    advantage, response_mask = torch.randn(4, generator=generator), torch.ones(4, 5)
    grad_mask = (torch.rand(4, 5, generator=generator) > 0.4).float()
    full = policy_loss(logp, old, advantage, response_mask, grad_mask, num_global_tokens=20)
    halves = [
        policy_loss(logp[s], old[s], advantage[s], response_mask[s], grad_mask[s], num_global_tokens=20)
        for s in (slice(0, 2), slice(2, 4))
    ]
    torch.testing.assert_close(halves[0].loss + halves[1].loss, full.loss)
    full_metrics, split_metrics = reduce_metrics([full.metric_sums]), reduce_metrics([h.metric_sums for h in halves])
    for name, value in full_metrics.items():
        assert math.isclose(split_metrics[name], value, rel_tol=1e-6, abs_tol=1e-9), name  # fp32 partial sums


def _metrics_rank(rank, world_size, sums):
    import torch.distributed as dist

    return reduce_metrics([sums[rank]], group=dist.group.WORLD)


def test_reduce_metrics_over_ranks_equals_serial():
    sums = [
        {"a": (torch.tensor(3.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))},
        {"a": (torch.tensor(1.0, dtype=torch.float64), torch.tensor(6.0, dtype=torch.float64))},
    ]
    assert reduce_metrics(sums) == {"a": 0.5}  # (3 + 1) / (2 + 6)
    assert run_distributed(_metrics_rank, 2, sums) == [{"a": 0.5}, {"a": 0.5}]


BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("megatron", "ray", "vllm"):
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
import pkgutil, importlib, vppo_megatron.algo as algo
for info in pkgutil.iter_modules(algo.__path__):
    importlib.import_module(f"vppo_megatron.algo.{info.name}")
assert not any(m.split(".")[0] in ("megatron", "ray", "vllm") for m in sys.modules)
print("ok")
"""


def test_algo_imports_with_megatron_ray_and_vllm_blocked():
    proc = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
