"""The weight sync's topology (vppo_megatron/topology.py): for every shipped recipe, each engine is fed by ranks on
its own node, each stage's buckets reach exactly the ranks that need them and are not of the stage, and no rank holds
more than a few buckets (never the model). The dry run prints it."""

from pathlib import Path

import pytest

from vppo_megatron.config import ConfigError, load
from vppo_megatron.memory import resolve_arch, sync_bucket_bytes, sync_plan

RECIPES = sorted(p for p in Path("examples/configs").glob("*.yaml") if p.stem != "tiny_cpu")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
@pytest.mark.parametrize("placement", ["colocated", "disaggregated"])
def test_every_recipe_feeds_each_engine_from_its_own_node_and_no_rank_holds_the_model(recipe, placement):
    cfg = load(recipe, [f"rollout.placement={placement}"])
    topo = sync_plan(cfg)
    assert topo.transport == ("cuda_ipc" if placement == "colocated" else "nccl")
    arch, _ = resolve_arch(cfg.model.path)
    model = arch.total_params() * 2
    for i, feeders in enumerate(topo.feeders):
        if placement == "colocated":  # one rank per engine worker, each on the worker's node
            assert len(feeders) == cfg.rollout.tensor_parallel_size
            assert {topo.node_of(r) for r in feeders} == {topo.engine_nodes[i]}
        else:
            assert topo.engine_nodes[i] is None and len(feeders) == 1
    fed = {r for feeders in topo.feeders for r in feeders}
    for pp in range(topo.pp):
        stage = set(topo.stage_ranks(pp))
        assert set(topo.receivers(pp)) == fed - stage  # a stage's own ranks gathered its tensors already
        assert topo.writer(pp) in stage and topo.writer(pp) % (topo.tp * topo.cp * topo.dp) == 0
    peak = max(topo.rank_peak_buckets(r) for r in range(topo.world)) * sync_bucket_bytes(cfg, arch)
    assert 0 < peak < model / 4, (peak, model)
    if topo.nodes > 1 and placement == "colocated":
        assert len(set(topo.engine_nodes)) == topo.nodes  # every node's GPUs carry engines


def test_shm_nodes_each_get_one_writer_per_stage_and_only_cross_nodes_when_they_must():
    # the two-simulated-node test's layout: 2 ranks, PP2, one rank per node, one engine per node
    cfg = load(None, ["parallel.gpus_per_node=1", "parallel.pp=2", "parallel.world_size=2", "rollout.num_engines=2"])
    topo = sync_plan(cfg, cuda=False)
    assert (topo.transport, topo.nodes, topo.engine_nodes) == ("shm", 2, (0, 1))
    assert [topo.node_writer(pp, n) for pp in (0, 1) for n in (0, 1)] == [0, 1, 0, 1]
    assert [topo.receivers(pp) for pp in (0, 1)] == [[1], [0]]
    # the same ranks on one node: each stage writes its own buckets, nothing is passed
    one = sync_plan(load(None, ["parallel.pp=2", "parallel.world_size=2", "rollout.num_engines=2"]), cuda=False)
    assert one.nodes == 1 and [one.receivers(pp) for pp in (0, 1)] == [[], []]
    assert [one.node_writer(pp, 0) for pp in (0, 1)] == [0, 1]


def test_impossible_placements_are_refused_with_the_setting_to_change():
    cfg = load("examples/configs/qwen3_vl_8b.yaml", ["rollout.num_engines=16"])
    with pytest.raises(ConfigError, match="rollout.num_engines"):
        sync_plan(cfg)
    with pytest.raises(ConfigError, match="parallel.gpus_per_node=3"):
        sync_plan(load("examples/configs/qwen3_vl_8b.yaml", ["parallel.gpus_per_node=3"]))


def test_the_dry_run_prints_the_sync_topology_and_the_most_a_rank_holds(capsys):
    from vppo_megatron.plan import dry_run

    assert dry_run(load("examples/configs/qwen2_5_vl_72b.yaml")) == 0
    out = capsys.readouterr().out
    assert "weight sync (cuda_ipc): 16 engines, 8 trainer nodes of 8 ranks" in out
    assert "node 7: engine 14 <- ranks 56-59; engine 15 <- ranks 60-63" in out
    assert "stage 3 (ranks 48-63): buckets passed by rank 48 to ranks 0-47" in out
    assert "most any rank holds during a sync: 6.96 GiB (5.1% of the 136.7 GiB model)" in out


def test_the_nccl_rendezvous_is_this_hosts_address_and_a_port_held_open():
    """The disaggregated NCCL sync's store address (rollout/nccl.py) through vLLM's own helper, on any host."""
    import socket

    from vppo_megatron.rollout.nccl import rendezvous_address

    host, port, listener = rendezvous_address()
    try:
        assert host and port == listener.getsockname()[1] > 0
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # held open: the store can bind it
    finally:
        listener.close()
