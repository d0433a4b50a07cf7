"""One gloo rank running the trainer's stages 2-6 (vppo_megatron/trainer.py) on hand-made rollout groups: the
image encodings of a step, ppo_epochs, token-budget micro-batching against fixed-count, and a weights-only resume.
Every scenario starts from the same checkpoint weights."""

import numpy as np
import torch

PROMPTS, SAMPLES = 4, 2
RESPONSE_LENGTHS = [3, 9, 5, 2, 7, 4, 8, 6]  # one per rollout: uneven, so token budgets split rows unevenly


def make_groups(model_dir):
    """PROMPTS prompt groups of SAMPLES rollouts, one image each; rewards mixed within every group."""
    from transformers import AutoProcessor

    from vppo_megatron.rollout.collect import Group
    from vppo_megatron.types import PromptSample, RolloutResult

    processor = AutoProcessor.from_pretrained(model_dir)
    rng = np.random.default_rng(5)
    groups = []
    for p in range(PROMPTS):
        image = rng.integers(0, 256, (56, 56 + 28 * (p % 2), 3), dtype=np.uint8)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Count {p}."}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0].tolist()
        rollouts = [
            RolloutResult(
                p, j, prompt_ids, rng.integers(10, 700, RESPONSE_LENGTHS[p * SAMPLES + j]).tolist(), [], "", "stop", 0
            )
            for j in range(SAMPLES)
        ]
        rewards = [float((p + j) % 2) for j in range(SAMPLES)]
        groups.append(Group(PromptSample(f"q{p}", text, [image], "1"), rollouts, rewards, rewards))
    return groups


def _trainer(model_dir, out_dir, overrides):
    import torch.distributed as dist

    from vppo_megatron.actor.engine import MegatronActor
    from vppo_megatron.config import load
    from vppo_megatron.lifecycle import Lifecycle
    from vppo_megatron.trainer import Trainer

    cfg = load(
        "examples/configs/tiny_cpu.yaml",
        [
            f"model.path={model_dir}",
            f"trainer.output_dir={out_dir}",
            f"trainer.prompts_per_step={PROMPTS}",
            "trainer.prompts_per_update=2",
            "trainer.micro_batch_size=2",
            "algorithm.tas_segment=4",  # a mini-batch: 2 prompts x 2 samples
            "parallel.tp=1",
            "parallel.world_size=1",
            *overrides,
        ],
    ).validate(1)
    lifecycle = Lifecycle(cfg, None, None, dist.barrier)
    actor, _ = lifecycle.start_up(lambda: MegatronActor(cfg, _groups(), model_dir), lambda actor: None)
    lifecycle.first_sync(dict)  # no engines: the transitions alone
    return Trainer(cfg, actor.groups, actor, None, lifecycle, None)


_GROUPS = []


def _groups():
    from vppo_megatron.parallel.layout import ParallelLayout, initialize

    if not _GROUPS:
        _GROUPS.append(initialize(ParallelLayout(), seed=1))
    return _GROUPS[0]


def run_step(trainer, groups, inputs: bool = False):
    """Stages 2-6 as train_step runs them; returns what the tests compare (`inputs`: and the experience pass's
    input accounting against bytes computed here)."""
    from vppo_megatron.actor import batching

    data = trainer.distribute(groups, step=0)
    experience, _ = trainer.experience(data)
    feed, batch = trainer.actor.feeds[0], data.prepared
    prompts = {id(s.images): s.images for s in batch.samples}  # the rollouts of a prompt share its image list
    encoded = lambda images: batching.encode_images(trainer.actor.image_processor, images)[0].nbytes  # noqa: E731
    inputs = inputs and {
        "moved": feed.moved,
        "peak_live": feed.peak_live,
        "live_after": feed.live,
        "expected": [batch.paired(i).materialize().input_bytes() for i in range(len(batch.views))],
        "pixel_bytes": batch.pixel_bytes(),
        "per_prompt": sum(encoded(images) for images in prompts.values()),
        "per_rollout": sum(encoded(s.images) for s in batch.samples),
    }
    advantage_B, _ = trainer.advantages(data, experience)
    mask_BT = trainer.token_filter(experience, step=0)
    metrics = trainer.update(data, experience, advantage_B, mask_BT)
    params = {n: p.detach().clone() for n, p in trainer.actor.chunks[0].named_parameters()}
    return {
        "micro_rows": [(r.start, r.stop) for r in data.prepared.micro_rows],
        "old_logp": experience.old_logp_BT,
        "dependency": experience.dependency_BT,
        "metrics": metrics,
        "params": params,
        "updates": trainer.actor.updates,
        "inputs": inputs,
    }


def _adam_moments(actor) -> list[torch.Tensor]:
    state = actor.optimizer.state_dict()
    states = state if isinstance(state, list) else [state]  # a chained optimizer: one per parameter group set
    return [
        t.clone()
        for s in states
        for per_param in s.get("optimizer", s)["state"].values()  # mixed precision nests torch's state
        for name, t in per_param.items()
        if name == "exp_avg"
    ]


def trainer_stages(rank, world_size, model_dir, out_dir):
    from vppo_megatron.actor import batching
    from vppo_megatron.resume import resume, save

    groups = make_groups(model_dir)
    calls = []
    encode = batching.encode_images

    def counted(processor, images):
        calls.append(len(images))
        return encode(processor, images)

    batching.encode_images = counted
    results = {}
    try:
        results["epochs2"] = run_step(_trainer(model_dir, f"{out_dir}/a", ["algorithm.ppo_epochs=2"]), groups)
    finally:
        batching.encode_images = encode
    results["encoded_images"] = sum(calls)
    results["encode_calls"] = len(calls)

    # fixed count vs token budget: TAS global scope (the segment scope would give the same: it ignores the split)
    common = ["algorithm.tas_scope=global"]
    fixed = _trainer(model_dir, f"{out_dir}/fixed", common)
    results["fixed"] = run_step(fixed, groups, inputs=True)
    budget = ["trainer.max_tokens_per_micro_batch=130", *common]
    results["budget"] = run_step(_trainer(model_dir, f"{out_dir}/budget", budget), groups)
    packed = ["trainer.pack_sequences=true", "trainer.max_tokens_per_micro_batch=160", *common]
    results["packed"] = run_step(_trainer(model_dir, f"{out_dir}/packed", packed), groups)

    # checkpoint the fixed-count actor after its update, then resume with and without the optimizer
    save(fixed.cfg, fixed.actor, step=0, version=1, loader_state=None)
    results["saved_moments"] = _adam_moments(fixed.actor)
    for load_optimizer in (True, False):
        resumed = _trainer(model_dir, f"{out_dir}/fixed", [*common, f"checkpoint.load_optimizer={load_optimizer}"])
        restored = resume(resumed.cfg, resumed.actor)
        results[f"resumed_{load_optimizer}"] = {
            "step": restored.step,
            "optimizer": restored.optimizer,
            "params": {n: p.detach().clone() for n, p in resumed.actor.chunks[0].named_parameters()},
            "moments": _adam_moments(resumed.actor),
            "after_update": run_step(resumed, groups)["params"],
        }
    results["faults"] = checkpoint_faults(fixed)
    return results


def checkpoint_faults(trainer) -> dict:
    """On the fixed-count trainer's step_1 checkpoint: a dead writer's temporary directory, a full disk during
    the step-3 save, a corrupted shard of step_2 (resume auto falls back; resume named fails)."""
    import contextlib
    import io
    import os
    import time
    import types
    from pathlib import Path

    from vppo_megatron.actor import integrity
    from vppo_megatron.resume import CheckpointWriteError, checkpoint_root, resume

    root = checkpoint_root(trainer.cfg)
    out = {}
    trainer.sync = types.SimpleNamespace(version=1)  # no engines here: the served version the checkpoint records
    trainer.cfg.checkpoint.keep_last = 2
    stale = root / ".step_9.tmp-p999999999-0123abcd"  # a pid no process has: its writer is gone
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"x" * 1000)
    trainer.checkpoint(step=1)  # step_2; removes the dead writer's directory
    out["stale_left"] = stale.exists()
    out["manifest"] = (root / "step_2" / integrity.MANIFEST).exists()

    os.environ["VPPO_FAULT"] = "disk_full@checkpoint:*:all"
    try:
        trainer.checkpoint(step=2)
    except CheckpointWriteError as exc:
        out["disk_full"] = str(exc)
    finally:
        del os.environ["VPPO_FAULT"]
    out["after_disk_full"] = sorted(p.name for p in root.iterdir())

    shard = max((root / "step_2").glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, different bytes
    shard.write_bytes(bytes(data))
    out["corrupted"] = str(shard)
    err = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err):
        restored = resume(trainer.cfg, trainer.actor)
    out["fallback_s"] = time.perf_counter() - start
    out["fallback"] = (restored.path.name, restored.step, err.getvalue())
    out["after_fallback"] = sorted(p.name for p in root.iterdir())
    trainer.cfg.checkpoint.resume = str(root / "damaged-step_2")
    try:
        resume(trainer.cfg, trainer.actor)
    except integrity.DamagedCheckpoint as exc:
        out["named"] = str(exc)
    finally:
        trainer.cfg.checkpoint.resume = "auto"
    out["damaged_path"] = str(Path(root / "damaged-step_2" / shard.name))
    return out
