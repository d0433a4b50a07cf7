"""A rank of the parallel-parity runs: the same rollouts, advantages and masks through one actor layout.

Importable by spawned ranks (tests/actor is on sys.path while pytest runs), kept apart from the test module so
that ranks do not import pytest fixtures.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

SEED = 7
NUM_SAMPLES = 4


def make_samples(model_dir):
    from transformers import AutoProcessor

    from vppo_megatron.types import ActorSample

    processor = AutoProcessor.from_pretrained(model_dir)
    rng = np.random.default_rng(SEED)
    text = json.loads((Path(model_dir) / "config.json").read_text())["text_config"]
    vocab = min(700, text["vocab_size"])  # a held-out model's vocabulary is smaller
    samples = []
    for i in range(NUM_SAMPLES):
        height, width = [(112, 112), (56, 84), (84, 112), (112, 56)][i]
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Question {i}?"}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0].tolist()
        # response tokens include <|image_pad|> (id 5) once: a sampled special token must stay text
        response = rng.integers(8, vocab, 3 + 2 * i).tolist() + ([5] if i == 1 else [])
        samples.append(ActorSample(f"s{i}", prompt_ids, response, [image]))
    return samples


def family_of(model_dir) -> str:
    """The checkpoint's model_type, which model.family must name."""
    return json.loads((Path(model_dir) / "config.json").read_text())["model_type"]


def fixed_training_inputs(num_samples, num_positions):
    generator = torch.Generator().manual_seed(SEED)
    advantage = torch.randn(num_samples, generator=generator)
    gradient_mask = (torch.rand(num_samples, num_positions, generator=generator) > 0.4).float()
    return advantage, gradient_mask


def run_layout(rank, world_size, model_dir, layout, overrides):
    from vppo_megatron.actor.engine import MegatronActor
    from vppo_megatron.config import load
    from vppo_megatron.parallel.layout import ParallelLayout, destroy, initialize

    cfg = load(
        None,
        [
            "model.dtype=float32",
            "model.transformer_impl=local",
            "trainer.micro_batch_size=2",
            "optimizer.lr=0.1",
            "optimizer.adam_eps=1.0",
            "optimizer.weight_decay=0.0",
            "algorithm.entropy_coef=0.06",
            f"model.family={family_of(model_dir)}",
            *overrides,
        ],
    )
    groups = initialize(ParallelLayout(**layout), seed=1)
    actor = MegatronActor(cfg, groups, model_dir)
    samples = make_samples(model_dir)
    num_positions = max(len(s.response_ids) for s in samples)
    advantage, gradient_mask = fixed_training_inputs(len(samples), num_positions)
    dp = layout.get("dp", 1)
    shard = slice(groups.dp_rank * len(samples) // dp, (groups.dp_rank + 1) * len(samples) // dp)
    experience = actor.experience(samples[shard], step=3)
    width = experience.old_logp_BT.shape[1]
    metrics = actor.update(
        samples[shard], experience.old_logp_BT, advantage[shard], gradient_mask[shard, :width], experience.dependency_BT
    )
    params = {}
    for name, tensor in actor.hf_tensors():  # collective over TP: every rank iterates
        if groups.tp_rank == 0 and groups.cp_rank == 0 and groups.dp_rank == 0:
            params[name] = tensor.clone()
    destroy()
    result = {
        name: getattr(experience, name)
        for name in ("old_logp_BT", "aug_logp_BT", "dependency_BT", "entropy_BT", "response_mask_BT")
    }
    return {
        "dp_rank": groups.dp_rank,
        "experience": result,
        "metrics": metrics,
        "params": params,
        "shard": (shard.start, shard.stop),
    }


def hf_logits(hf, ids, pixels, grid, mb):
    """transformers' logits for one sequence; it needs mm_token_type_ids, or it silently falls back to 1-D
    positions."""
    return hf(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=pixels,
        image_grid_thw=grid,
        mm_token_type_ids=mb.image_mask_BS[:, : ids.shape[1]].long(),
    ).logits


def hf_logit_gap(rank, world_size, model_dir, without_deepstack=False):
    """Max |Megatron logits - HF logits| on text + image inputs, weights through the mapping (serial).
    `without_deepstack`: also the gaps when the actor's layers ignore the DeepStack features (must be large)."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from vppo_megatron import families
    from vppo_megatron.actor import batching
    from vppo_megatron.actor.engine import MegatronActor
    from vppo_megatron.actor.model import DeepStackLayer
    from vppo_megatron.config import load
    from vppo_megatron.parallel.layout import ParallelLayout, destroy, initialize

    family = family_of(model_dir)
    cfg = load(None, ["model.dtype=float32", "model.transformer_impl=local", f"model.family={family}"])
    actor = MegatronActor(cfg, initialize(ParallelLayout(), seed=1), model_dir, training=False)
    device = actor.device or torch.device("cpu")  # both models on the actor's device (a GPU where there is one)
    hf = families.get(family).model_class().from_pretrained(model_dir).eval().to(device)
    samples = [s for s in make_samples(model_dir) if 5 not in s.response_ids]  # HF counts any id 5 as image
    gaps, without = [], []
    for sample in samples:
        pixels, grid = (t.to(device) for t in batching.encode_images(actor.image_processor, sample.images))
        mb = batching.collate(actor.hf_config, [sample], [pixels.cpu()], [grid.cpu()], actor.pad_id).materialize(device)
        ids = torch.tensor([sample.prompt_ids + sample.response_ids], device=device)
        with torch.no_grad():
            ours = actor._forward(actor.model[0], mb)[:, : ids.shape[1]]
            reference = hf_logits(hf, ids, pixels, grid, mb)
            if without_deepstack:
                DeepStackLayer.forward, real = TransformerLayer.forward, DeepStackLayer.forward
                plain = actor._forward(actor.model[0], mb)[:, : ids.shape[1]]
                DeepStackLayer.forward = real
                without.append((plain - reference).abs().max().item())
        gaps.append((ours - reference).abs().max().item())
    destroy()
    return (gaps, without) if without_deepstack else gaps


def schedule_calls(rank, world_size, model_dir):
    """Runs one experience pass with a counting wrapper around megatron-core's schedule factory."""
    from vppo_megatron.actor import engine
    from vppo_megatron.config import load
    from vppo_megatron.parallel.layout import ParallelLayout, destroy, initialize

    calls = []
    real = engine.get_forward_backward_func

    def counting():
        schedule = real()

        def run(**kwargs):
            calls.append({k: kwargs[k] for k in ("num_microbatches", "micro_batch_size", "forward_only")})
            return schedule(**kwargs)

        return run

    engine.get_forward_backward_func = counting
    cfg = load(None, ["model.dtype=float32", "model.transformer_impl=local", "trainer.micro_batch_size=2"])
    actor = engine.MegatronActor(cfg, initialize(ParallelLayout(), seed=1), model_dir, training=False)
    samples = make_samples(model_dir)
    experience = actor.experience(samples, step=0)
    dual_calls = list(calls)
    # the dual pass blackens each prompt's encoded patches; a plain pass over the blackened images themselves
    # (the perturbation as the reference applies it, before the processor) must give the same log-probs
    fast = [actor._blackens_patches(s.images, actor.prepare([s]).views[0].image_grid_thw) for s in samples]
    blackened = [dataclasses.replace(s, images=actor._perturbed_images(s, 0)) for s in samples]
    plain = actor.experience(blackened, step=0, with_perception=False)
    gap = (plain.old_logp_BT - experience.aug_logp_BT).abs().max().item()
    destroy()
    return dual_calls, experience.dependency_BT.shape, fast, gap


def bf16_update(rank, world_size, model_dir):
    """One experience pass + update in bf16 (Float16Module + fp32 main grads): finite, and the weights move."""
    from vppo_megatron.actor.engine import MegatronActor
    from vppo_megatron.config import load
    from vppo_megatron.parallel.layout import ParallelLayout, destroy, initialize

    cfg = load(
        None,
        ["model.dtype=bfloat16", "model.transformer_impl=local", "trainer.micro_batch_size=2", "optimizer.lr=1e-2"],
    )
    actor = MegatronActor(cfg, initialize(ParallelLayout(), seed=1), model_dir)
    samples = make_samples(model_dir)
    before = {n: t.float().clone() for n, t in actor.hf_tensors()}
    experience = actor.experience(samples, step=0)
    advantage, gradient_mask = fixed_training_inputs(len(samples), experience.old_logp_BT.shape[1])
    metrics = actor.update(samples, experience.old_logp_BT, advantage, gradient_mask)
    moved = max((t.float() - before[n]).abs().max().item() for n, t in actor.hf_tensors())
    dtypes = {t.dtype for _, t in actor.hf_tensors()}
    destroy()
    return experience.old_logp_BT, metrics, moved, dtypes


def te_vs_local(rank, world_size, model_dir, fp8):
    """GPU only: logits of the Transformer Engine actor (optionally FP8) against the local-spec actor."""
    import torch.distributed as dist

    from vppo_megatron.actor import batching
    from vppo_megatron.actor.engine import MegatronActor
    from vppo_megatron.config import load
    from vppo_megatron.parallel.layout import ParallelLayout, destroy, initialize

    sample = make_samples(model_dir)[0]
    logits = {}
    for impl in ("local", "transformer_engine"):
        cfg = load(
            None,
            [
                "model.dtype=bfloat16",
                f"model.family={family_of(model_dir)}",
                f"model.transformer_impl={impl}",
                f"model.fp8={fp8 if impl == 'transformer_engine' else 'none'}",
            ],
        )
        actor = MegatronActor(cfg, initialize(ParallelLayout(), seed=1), model_dir, training=False)
        for chunk in actor.chunks:
            chunk.cuda()
        pixels, grid = batching.encode_images(actor.image_processor, sample.images)
        mb = batching.collate(actor.hf_config, [sample], [pixels], [grid], actor.pad_id, length_multiple=16)
        mb = mb.materialize(torch.device("cuda"))
        with torch.no_grad():
            logits[impl] = actor._forward(actor.model[0], mb).float().cpu()
        destroy()
    dist.barrier()
    return (logits["local"] - logits["transformer_engine"]).abs().max().item(), logits["local"].abs().max().item()


def packed_vs_padded(rank, world_size, model_dir, impl, dtype, overrides=()):
    """The dual-pass experience of the same rollouts on one actor, padded and then packed (trainer.pack_sequences,
    all four in one row): max |gap| per result over the response tokens, and the packed micro-batches' shapes.
    The local spec is built for packing (its own attention), which also runs the padded rows. world_size 2: TP2
    with sequence parallelism."""
    from vppo_megatron.actor.engine import MegatronActor
    from vppo_megatron.config import load
    from vppo_megatron.parallel.layout import ParallelLayout, destroy, initialize

    cfg = load(
        None,
        [
            f"model.dtype={dtype}",
            f"model.family={family_of(model_dir)}",
            f"model.transformer_impl={impl}",
            "trainer.micro_batch_size=4",
            "trainer.pack_sequences=true",
            *([f"parallel.tp={world_size}", "parallel.sequence_parallel=true"] if world_size > 1 else []),
            *overrides,
        ],
    )
    actor = MegatronActor(cfg, initialize(ParallelLayout(tp=world_size), seed=1), model_dir, training=False)
    samples = make_samples(model_dir)
    cfg.trainer.pack_sequences = False
    padded = actor.experience(samples, step=3)
    cfg.trainer.pack_sequences = True
    batch = actor.prepare(samples, step=3)
    packed = actor.experience(batch, step=3)
    destroy()
    names = ("old_logp_BT", "aug_logp_BT", "dependency_BT", "entropy_BT")
    gaps = {name: (getattr(packed, name) - getattr(padded, name)).abs().max().item() for name in names}
    return gaps, [tuple(view.input_ids_BS.shape) for view in batch.views], padded.old_logp_BT.abs().max().item()


def te_tp2_sp_vs_serial(rank, world_size, model_dir):
    """GPU only, 2 ranks: the Transformer Engine actor at TP2 with sequence parallelism against the serial TE actor
    (TP1, on each rank) on the same sample: (max |logit gap| over this rank's vocabulary shard, max |logit|)."""
    import torch.distributed as dist

    from vppo_megatron.actor import batching
    from vppo_megatron.actor.engine import MegatronActor
    from vppo_megatron.config import load
    from vppo_megatron.parallel.layout import ParallelLayout, destroy, initialize

    sample = make_samples(model_dir)[0]
    logits = {}
    base = ["model.dtype=bfloat16", "model.transformer_impl=transformer_engine", f"model.family={family_of(model_dir)}"]
    for name, layout, extra in (
        ("serial", ParallelLayout(dp=2), []),
        ("tp2_sp", ParallelLayout(tp=2), ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    ):
        actor = MegatronActor(load(None, [*base, *extra]), initialize(layout, seed=1), model_dir, training=False)
        pixels, grid = batching.encode_images(actor.image_processor, sample.images)
        mb = batching.collate(actor.hf_config, [sample], [pixels], [grid], actor.pad_id, length_multiple=16)
        with torch.no_grad():
            logits[name] = actor._forward(actor.model[0], mb.materialize(actor.device)).float().cpu()
        destroy()
    shard = logits["tp2_sp"].shape[-1]
    serial = logits["serial"][..., rank * shard : (rank + 1) * shard]
    dist.barrier()
    return (serial - logits["tp2_sp"]).abs().max().item(), serial.abs().max().item()


def hf_bf16_vision_gap(rank, world_size, model_dir, cast_rotary=False):
    """The bf16 actor (Float16Module, as it trains) against transformers loaded in bf16, on the largest image the
    tiny processor keeps: (max |vision-tower output gap|, max |response log-prob gap|, rotary dtypes).
    `cast_rotary`: cast the tower's rotary frequencies to bf16 as a plain `.to(bf16)` would (the defect)."""
    from vppo_megatron import families
    from vppo_megatron.actor import batching
    from vppo_megatron.actor.engine import MegatronActor
    from vppo_megatron.config import load
    from vppo_megatron.parallel.layout import ParallelLayout, destroy, initialize

    family = family_of(model_dir)
    cfg = load(None, ["model.dtype=bfloat16", "model.transformer_impl=local", f"model.family={family}"])
    actor = MegatronActor(cfg, initialize(ParallelLayout(), seed=1), model_dir)
    vision = actor.chunks[0].vision
    if cast_rotary:
        for module in vision.modules():
            if "inv_freq" in module._buffers:
                module._buffers["inv_freq"] = module._buffers["inv_freq"].bfloat16()
    hf = families.get(family).model_class().from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    processor = actor.image_processor
    side = int(processor.size["longest_edge"] ** 0.5)  # the largest square image (pixels) the processor keeps
    image = np.random.default_rng(SEED).integers(0, 256, (side, side, 3), dtype=np.uint8)
    sample = next(s for s in make_samples(model_dir) if 5 not in s.response_ids)
    pixels, grid = batching.encode_images(processor, [image])
    prompt_ids = processor_prompt(model_dir, image)
    sample = type(sample)("big", prompt_ids, sample.response_ids, [image])
    device = actor.device  # the actor's GPU on a CUDA host (the GPU acceptance's vision_precision step)
    if device is not None:
        hf, pixels, grid = hf.to(device), pixels.to(device), grid.to(device)
    mb = batching.collate(actor.hf_config, [sample], [pixels.cpu()], [grid.cpu()], actor.pad_id).materialize(device)
    ids = torch.tensor([sample.prompt_ids + sample.response_ids], device=device)
    with torch.no_grad():
        ours_vision = vision(pixels.to(torch.bfloat16), grid_thw=grid).pooler_output
        hf_vision = hf.model.visual(pixels.to(torch.bfloat16), grid_thw=grid).pooler_output
        ours = actor._forward(actor.model[0], mb)[:, : ids.shape[1]].float().cpu()
        reference = hf_logits(hf, ids, pixels, grid, mb).float().cpu()
        ids = ids.cpu()
    response = slice(len(sample.prompt_ids) - 1, ids.shape[1] - 1)  # positions that predict response tokens
    targets = ids[0, response.start + 1 : response.stop + 1]

    def token_logp(logits):
        return torch.log_softmax(logits[0, response], -1).gather(-1, targets[:, None])

    rotary = {str(b.dtype) for m in vision.modules() for n, b in m._buffers.items() if n == "inv_freq"}
    vision_gap = (ours_vision.float() - hf_vision.float()).abs().max().item()
    gaps = (vision_gap, (token_logp(ours) - token_logp(reference)).abs().max().item())
    destroy()
    return gaps, rotary


def processor_prompt(model_dir, image):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0].tolist()
