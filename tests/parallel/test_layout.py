"""ParallelLayout.validate: every impossible split is a ConfigError naming the field that breaks it."""

import os

import pytest

from vppo_megatron.config import ConfigError
from vppo_megatron.parallel.layout import ParallelLayout

# the tiny model's shape: 4 heads, 2 KV heads, vocab 1024 (the layer count varies per case)
HEADS = {"num_heads": 4, "num_kv_heads": 2, "vocab_size": 1024}


@pytest.mark.parametrize(
    "layout, num_layers",
    [
        ({"pp": 2, "vpp": 2}, 4),
        ({"tp": 2, "pp": 2}, 4),
        ({"pp": 2, "first_stage_layers": 1, "last_stage_layers": 2}, 3),
        ({"pp": 2, "first_stage_layers": 1}, 3),  # the last stage takes the other 2
        ({"pp": 4, "first_stage_layers": 1, "last_stage_layers": 1}, 6),  # 2 + 2 in the middle
        ({"pp": 4, "vpp": 2, "first_stage_layers": 2, "last_stage_layers": 2}, 8),  # 1 per middle virtual stage
    ],
)
def test_splits_that_fit(layout, num_layers):
    layout = ParallelLayout(**layout)
    layout.validate(layout.world_size, num_layers, **HEADS)


@pytest.mark.parametrize(
    "layout, num_layers, words",
    [
        # tp == pp * vpp: the message names the axis that fails, not the one whose size happens to be equal
        ({"tp": 2, "pp": 2}, 3, ["parallel.pp * parallel.vpp = 2", "num_hidden_layers = 3"]),
        ({"pp": 2, "vpp": 2}, 6, ["parallel.pp * parallel.vpp = 4", "num_hidden_layers = 6"]),
        ({"pp": 2, "first_stage_layers": 1, "last_stage_layers": 1}, 3, ["must sum to", "num_hidden_layers = 3"]),
        (
            {"pp": 4, "first_stage_layers": 1, "last_stage_layers": 1},
            5,
            ["parallel.first_stage_layers=1 + parallel.last_stage_layers=1", "leaves 3", "multiple of 2"],
        ),
        ({"pp": 3, "last_stage_layers": 4}, 4, ["parallel.last_stage_layers=4", "leaves 0", "positive"]),
        ({"first_stage_layers": 1}, 2, ["parallel.first_stage_layers=1", "needs parallel.pp > 1"]),
        ({"pp": 2, "vpp": 2, "last_stage_layers": 3}, 4, ["parallel.last_stage_layers=3", "multiple of parallel.vpp"]),
        ({"pp": 2, "first_stage_layers": -1}, 2, ["parallel.first_stage_layers=-1", ">= 0"]),
        ({"vpp": 2}, 2, ["parallel.vpp=2", "pp > 1"]),
        # found by `vppo miniature` on the 72B recipe: megatron-core divides by the middle stages' count (0)
        (
            {"pp": 2, "vpp": 2, "first_stage_layers": 2, "last_stage_layers": 4},
            6,
            ["pp=2 x vpp=2", "set only parallel.first_stage_layers"],
        ),
    ],
)
def test_splits_that_cannot_run_name_the_field(layout, num_layers, words):
    layout = ParallelLayout(**layout)
    with pytest.raises(ConfigError) as err:
        layout.validate(layout.world_size, num_layers, **HEADS)
    for word in words:
        assert word in str(err.value)


def test_tensor_parallel_errors_name_tp():
    with pytest.raises(ConfigError, match=r"parallel.tp = 3 does not divide the model's num_attention_heads = 4"):
        ParallelLayout(tp=3).validate(3, 3, **HEADS)


@pytest.mark.parametrize(
    "layout, num_layers, first_chunk, fits",
    [
        ({"pp": 2}, 4, 2, True),  # the tiny Qwen3-VL: both DeepStack layers on the first stage
        ({"pp": 2, "vpp": 2}, 4, 1, False),  # the first virtual chunk holds one layer
        ({"pp": 2, "first_stage_layers": 1, "last_stage_layers": 3}, 4, 1, False),
        ({"pp": 2, "last_stage_layers": 2}, 4, 2, True),
        ({"pp": 4, "vpp": 2, "first_stage_layers": 4}, 16, 2, True),
        ({"pp": 4, "last_stage_layers": 1}, 7, 2, True),  # 6 left over 3 stages
    ],
)
def test_deepstack_layers_must_sit_in_the_first_chunk(layout, num_layers, first_chunk, fits):
    layout = ParallelLayout(**layout)
    assert layout.first_chunk_layers(num_layers) == first_chunk
    if fits:
        layout.validate(layout.world_size, num_layers, **HEADS, deepstack_layers=2)
    else:
        with pytest.raises(ConfigError, match="DeepStack vision features to its first 2 LLM layers.*holds 1"):
            layout.validate(layout.world_size, num_layers, **HEADS, deepstack_layers=2)


def _waits_in_distribute(rank, world_size):
    """TP2 ranks whose groups carry a 2 s timeout: rank 0 is slow in its rollout, rank 1 waits for its rollouts
    in the real scatter; returns the line rank 1's timeout gives (rank 0's own error is not a timeout)."""
    import time

    import torch.distributed as dist

    from vppo_megatron import batch
    from vppo_megatron.parallel.layout import ParallelLayout, destroy, initialize
    from vppo_megatron.trainer import collective_timeout, stage

    groups = initialize(ParallelLayout(tp=2), seed=1, timeout_s=2.0)

    class Ranks:
        @stage("rollout")
        def rollout(self):
            time.sleep(8)  # longer than the timeout: a slow rollout on trainer rank 0

        @stage("distribute")
        def distribute(self):
            return batch.distribute([] if rank == 0 else None, groups)

    line = None
    try:
        if rank == 0:
            Ranks().rollout()
        Ranks().distribute()
    except RuntimeError as exc:
        line = collective_timeout(exc, 2.0)
    destroy()
    dist.barrier()
    return line


def test_a_collective_past_parallel_timeout_s_names_the_stage_that_waited():
    from vppo_megatron.testing import run_distributed

    _, waited = run_distributed(_waits_in_distribute, 2, timeout_s=120)
    assert waited.startswith("trainer rank 1 waited more than parallel.timeout_s=2 s for the other ranks in stage ")
    assert "'distribute' (waiting for trainer rank 0's rollout" in waited and "raise parallel.timeout_s" in waited


def test_only_the_backends_timeouts_are_taken_for_a_collective_timeout():
    from vppo_megatron.trainer import collective_timeout

    stalled = RuntimeError("rollout engine 0 failed 3 times: engine 0 made no progress (rollout.stall_timeout_s=300)")
    assert collective_timeout(stalled, 60.0) is None  # an engine's stall names its own setting
    gloo = RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 2000ms for recv operation")
    assert "parallel.timeout_s=60 s" in collective_timeout(gloo, 60.0)


def test_gpu_ranks_reduce_host_tensors_over_gloo_and_device_tensors_over_nccl(monkeypatch):
    """The trainer reduces some tensors on the host (advantage statistics over DP, metrics): on a CUDA host the
    default group has a gloo side for them beside NCCL, which an NCCL-only group would refuse."""
    import torch
    import torch.distributed as dist

    from vppo_megatron.parallel import layout

    calls = []
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):  # init_distributed sets them: not for later
        monkeypatch.setenv(name, "")  # tests (a leaked WORLD_SIZE makes the converters skip torchrun); setenv first:
        monkeypatch.delenv(name)  # delenv alone records nothing to undo for a variable that is not set
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout=None: calls.append(backend))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    for cuda, backend in ((True, "cpu:gloo,cuda:nccl"), (False, "gloo")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        layout.init_distributed()
        assert calls.pop() == backend
    assert os.environ["WORLD_SIZE"] == "1"  # set here, removed again when the test ends
