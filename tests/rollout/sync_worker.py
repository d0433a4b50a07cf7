"""Trainer ranks of the weight-sync test: a TP=2 Megatron actor whose weights change, synced to a live engine."""

import os
from pathlib import Path

import numpy as np
import torch

# the test fleets hold 1024 tokens: a run attaching to them must need no more
FLEET_LIMITS = ["data.max_prompt_length=960", "rollout.max_response_length=64"]


def probe_samples(model_dir):
    from transformers import AutoProcessor

    from vppo_megatron.types import ActorSample

    processor = AutoProcessor.from_pretrained(model_dir)
    rng = np.random.default_rng(3)
    samples, texts = [], []
    for i in range(3):
        image = rng.integers(0, 256, (56 + 28 * i, 84, 3), dtype=np.uint8)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"What is {i}?"}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0].tolist()
        samples.append(ActorSample(f"p{i}", prompt_ids, rng.integers(10, 700, 6 + i).tolist(), [image]))
        texts.append(text)
    return samples, texts


def _trainer(rank, model_dir, ray_address, overrides=()):
    """A TP=2 actor on every rank; the fleet (attached to the running engine) on rank 0; the weight sync."""
    from vppo_megatron.actor.engine import MegatronActor
    from vppo_megatron.config import load
    from vppo_megatron.parallel.layout import ParallelLayout, initialize
    from vppo_megatron.sync.weight_sync import WeightSync

    cfg = load(None, ["model.dtype=float32", "rollout.sync_bucket_mb=1", *overrides, *FLEET_LIMITS])
    groups = initialize(ParallelLayout(tp=2), seed=1)
    actor = MegatronActor(cfg, groups, model_dir, training=False)
    fleet = None
    if rank == 0:
        from vppo_megatron.rollout.fleet import RolloutFleet, connect

        connect(ray_address)
        fleet = RolloutFleet(cfg, model_dir, start=False)
    return actor, groups, fleet, WeightSync(cfg, actor, fleet)


def sync_rank(rank, world_size, model_dir, ray_address, overrides):
    import zlib

    from vppo_megatron.parallel.layout import destroy

    actor, groups, fleet, sync = _trainer(rank, model_dir, ray_address, overrides)
    samples, texts = probe_samples(model_dir)
    before = (
        fleet.sequence_log_probs(
            [{"prompt": t, "images": s.images, "response_ids": s.response_ids} for s, t in zip(samples, texts)]
        )
        if fleet
        else None
    )
    with torch.no_grad():  # "training": a deterministic change, identical on both TP ranks for replicated tensors
        for name, param in actor.chunks[0].named_parameters():
            # TP-sharded tensors: each rank changes its own slice; replicated ones change identically on both
            shard = groups.tp_rank if getattr(param, "tensor_model_parallel", False) else "replicated"
            generator = torch.Generator().manual_seed(zlib.crc32(f"{name}/{shard}".encode()))
            param.add_(0.2 * torch.randn(param.shape, generator=generator) * param.abs().mean().clamp_min(1e-3))
    metrics = sync.push()
    probe = sync.probe(samples, texts)
    versions = fleet.versions() if fleet else None
    after = (
        fleet.sequence_log_probs(
            [{"prompt": t, "images": s.images, "response_ids": s.response_ids} for s, t in zip(samples, texts)]
        )
        if fleet
        else None
    )
    sync.close()
    destroy()
    return {"metrics": metrics, "probe": probe, "versions": versions, "before": before, "after": after}


def failing_sync_rank(rank, world_size, model_dir, ray_address):
    """A good sync (version 1), then a sync whose bucket the engine rejects: engines must stay on version 1. Then
    two syncs during which engine 0 is killed, then stopped (VPPO_FAULT): both complete on a restarted engine."""
    from vppo_megatron.parallel.layout import destroy
    from vppo_megatron.sync.weight_sync import SyncError

    actor, _, fleet, sync = _trainer(rank, model_dir, ray_address)
    samples, texts = probe_samples(model_dir)
    sequences = [{"prompt": t, "images": s.images, "response_ids": s.response_ids} for s, t in zip(samples, texts)]
    sync.push()
    good = fleet.sequence_log_probs(sequences) if fleet else None
    with torch.no_grad():
        for param in actor.chunks[0].parameters():
            param.mul_(1.5)
    real = actor.hf_tensors

    def with_bogus_tensor():
        yield from real()
        yield "model.layers.0.self_attn.bogus.weight", torch.zeros(2)

    actor.hf_tensors = with_bogus_tensor
    message = None
    try:
        sync.push()
    except SyncError as exc:
        message = str(exc)
    after = fleet.sequence_log_probs(sequences) if fleet else None
    versions = fleet.versions() if fleet else None
    actor.hf_tensors = real
    engine_faults = {}
    for fault in ("kill_engine", "stop_engine"):  # engine 0 killed / stopped once the sync's first bucket is out
        _perturb(actor, actor.groups)
        os.environ["VPPO_FAULT"] = f"{fault}@sync_load"
        configured = fleet.timeout_s if fleet is not None else None
        if fleet is not None:
            fleet.timeout_s = 8.0  # rollout.request_timeout_s: a stopped engine is taken for hung after 8 s
        try:
            metrics = sync.push()
        finally:
            del os.environ["VPPO_FAULT"]
            if fleet is not None:  # the probe's first request to the restarted engine may take longer on a busy host
                fleet.timeout_s = configured
        engine_faults[fault] = {
            "metrics": metrics,
            "probe": sync.probe(samples, texts),
            "versions": fleet.versions() if fleet else None,
            "restarts": fleet.restarts if fleet else None,
        }
    sync.close()
    destroy()
    return {"message": message, "versions": versions, "good": good, "after": after, "engine_faults": engine_faults}


def _perturb(actor, groups, scale=0.2):
    import zlib

    with torch.no_grad():  # each rank changes its own slice of TP-sharded tensors; replicated ones identically
        for name, param in actor.chunks[0].named_parameters():
            shard = groups.tp_rank if getattr(param, "tensor_model_parallel", False) else "replicated"
            generator = torch.Generator().manual_seed(zlib.crc32(f"{name}/{shard}/{groups.pp_rank}".encode()))
            param.add_(scale * torch.randn(param.shape, generator=generator) * param.abs().mean().clamp_min(1e-3))


def two_node_rank(rank, world_size, model_dir, ray_address):
    """Two simulated nodes of one rank each (parallel.gpus_per_node=1), PP2 across them, one engine per node:
    sync, a failed sync rolled back, a restart of node 1's engine; after each, every engine's log-probs against
    the actor's, and which staging directories the engines and ranks touched."""
    import ray
    from ray.util.placement_group import remove_placement_group

    from vppo_megatron.actor.engine import MegatronActor
    from vppo_megatron.config import load
    from vppo_megatron.parallel.layout import ParallelLayout, destroy, initialize
    from vppo_megatron.sync.weight_sync import SyncError, WeightSync

    overrides = ["model.dtype=float32", "rollout.sync_bucket_mb=1", "parallel.gpus_per_node=1", "parallel.pp=2"]
    cfg = load(None, [*overrides, "rollout.num_engines=2", *FLEET_LIMITS])
    groups = initialize(ParallelLayout(pp=2), seed=1)
    actor = MegatronActor(cfg, groups, model_dir, training=False)
    fleet = None
    if rank == 0:
        from vppo_megatron.rollout.fleet import RolloutFleet, connect

        connect(ray_address)
        fleet = RolloutFleet(cfg, model_dir, start="missing")  # the module's engine 0 + an engine for node 1
    sync = WeightSync(cfg, actor, fleet)
    samples, texts = probe_samples(model_dir)
    sequences = [{"prompt": t, "images": s.images, "response_ids": s.response_ids} for s, t in zip(samples, texts)]

    def gaps(reference):
        if fleet is None:
            return None
        out = []
        for engine in range(2):
            values = fleet.sequence_log_probs(sequences, engine=engine)
            out.append(max((reference[b, : len(v)] - torch.tensor(v)).abs().max().item() for b, v in enumerate(values)))
        return out

    out = {"topology": (sync.topology.engine_nodes, [sync.topology.receivers(pp) for pp in range(2)])}
    try:
        _perturb(actor, groups)
        sync.push()
        version1 = actor.experience(samples, step=0, with_perception=False, with_entropy=False).old_logp_BT
        out["after_sync"] = gaps(version1)
        out["files"] = {}
        for path in sorted(Path(p) for p in sync._mapped):  # the staging files this rank wrote
            out["files"].setdefault(path.parent.name, []).append(path.name)
        with torch.no_grad():
            for param in actor.chunks[0].parameters():
                param.mul_(1.5)
        real = actor.hf_tensors

        def with_bogus_tensor():  # stage 1's last bucket is refused by both engines
            yield from real()
            yield "model.layers.1.self_attn.bogus.weight", torch.zeros(2)

        if groups.pp_rank == 1:
            actor.hf_tensors = with_bogus_tensor
        try:
            sync.push()
        except SyncError as exc:
            out["failed"] = str(exc)
        actor.hf_tensors = real
        out["after_rollback"] = gaps(version1)
        if fleet is not None:
            fleet.restart(1)  # re-synced from node 1's own snapshot
            out["after_restart"] = gaps(version1)
            out["versions"] = fleet.versions()
            out["reads"] = [fleet.call_one(e, "staging_reads") for e in range(2)]
            out["dirs"] = [str(sync._node_dir(n)) for n in range(2)]
        out["pid"] = os.getpid()
    finally:
        sync.close()
        if fleet is not None:
            ray.kill(fleet.engines[1], no_restart=True)
            if fleet.groups[1] is not None:
                remove_placement_group(fleet.groups[1])
        destroy()
    return out
