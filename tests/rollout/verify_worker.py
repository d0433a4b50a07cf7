"""One trainer rank of the verify_sync test: an actor attached to the live engine, the fixed probe set, then a
good sync, a sync measured against a tolerance below fp32 noise, and engines left on stale weights."""

import numpy as np
import torch

# the test fleets hold 1024 tokens: a run attaching to them must need no more
FLEET_LIMITS = ["data.max_prompt_length=960", "rollout.max_response_length=64"]


def verify_rank(rank, world_size, model_dir, ray_address):
    from transformers import AutoProcessor

    from vppo_megatron.actor.engine import MegatronActor
    from vppo_megatron.config import load
    from vppo_megatron.parallel.layout import ParallelLayout, destroy, initialize
    from vppo_megatron.rollout.fleet import RolloutFleet, connect
    from vppo_megatron.sync.weight_sync import SyncError, WeightSync
    from vppo_megatron.types import PromptSample

    cfg = load(None, ["model.dtype=float32", "rollout.verify_sync_every=2", "rollout.sync_bucket_mb=1", *FLEET_LIMITS])
    actor = MegatronActor(cfg, initialize(ParallelLayout(), seed=1), model_dir, training=False)
    connect(ray_address)
    sync = WeightSync(cfg, actor, RolloutFleet(cfg, model_dir, start=False))
    processor = AutoProcessor.from_pretrained(model_dir)
    image = np.random.default_rng(1).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    sync.set_probe([PromptSample("v0", text, [image], "1")], processor)
    out = {"due": []}
    for _ in range(2):  # versions 1 and 2: the probe runs every 2nd sync
        sync.push()
        out["due"].append(sync.verify_due())
    sync.score_probe_with_actor()
    out["good"] = sync.verify()
    cfg.rollout.verify_sync_tolerance = -1.0  # below any gap: the measured value must be reported
    try:
        sync.verify()
    except SyncError as exc:
        out["strict"] = str(exc)
    cfg.rollout.verify_sync_tolerance = 0.05
    with torch.no_grad():  # the actor moves on, but the engines are not sent the new weights
        for param in actor.chunks[0].parameters():
            param.mul_(1.5)
    sync.score_probe_with_actor()
    try:
        sync.verify()
    except SyncError as exc:
        out["stale"] = str(exc)
    sync.close()
    destroy()
    return out
