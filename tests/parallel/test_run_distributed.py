"""vppo_megatron.testing.run_distributed: results by rank, a failing rank's traceback, a rank that dies without
reporting, and the spawn start method that CUDA hosts use."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from vppo_megatron import testing
from vppo_megatron.testing import run_distributed


def _sum_of_ranks(rank, world_size, scale):
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    return scale * value.item()


def _rank_one_dies(rank, world_size):
    if rank == 1:
        os._exit(3)  # no result, no traceback: as a segfault or the OOM killer
    return rank


def _rank_one_raises(rank, world_size):
    if rank == 1:
        raise ValueError("bad shard")
    return rank


def test_results_come_back_by_rank_and_a_raising_rank_fails_with_its_traceback():
    assert run_distributed(_sum_of_ranks, 2, 10.0) == [30.0, 30.0]
    with pytest.raises(RuntimeError, match="rank 1 failed:(.|\n)*ValueError: bad shard"):
        run_distributed(_rank_one_raises, 2)


def test_a_rank_that_dies_without_reporting_fails_the_run_at_once():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 exited with code 3 before reporting"):
        run_distributed(_rank_one_dies, 2, timeout_s=300)
    assert time.monotonic() - start < 60  # not the timeout


def test_cuda_hosts_spawn_their_ranks(monkeypatch):
    """Where CUDA is available the forkserver (whose imports initialise the driver) is not used: ranks are spawned
    and still return their results."""
    monkeypatch.setattr(testing.torch.cuda, "is_available", lambda: True)
    assert testing.fresh_process_context(testing.PRELOAD).get_start_method() == "spawn"
    assert run_distributed(_sum_of_ranks, 2, 1.0) == [3.0, 3.0]


def _visible_devices(rank, world_size):
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_ranks_that_would_share_a_gpu_see_none(monkeypatch):
    """More ranks than GPUs: gloo cannot carry device tensors between ranks on one GPU, so the ranks run on the
    host; the caller's own environment is left as it was."""
    monkeypatch.setattr(testing.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(testing.torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert run_distributed(_visible_devices, 2) == ["", ""]
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    monkeypatch.setattr(testing.torch.cuda, "device_count", lambda: 2)  # a GPU each: nothing hidden
    assert run_distributed(_visible_devices, 2) == [None, None]
