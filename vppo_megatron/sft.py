"""Supervised warm start on the Megatron actor: teaches a small model the answer format (and what it can of the
task) so the RL phase starts from a non-zero success rate. Writes an HF model directory (sft.output_dir).

    torchrun --nproc-per-node N -m vppo_megatron.sft --config X [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def supervised_samples(cfg, loader, processor, cache: dict) -> list[tuple]:
    """(uid, prompt ids, target ids, images) for the loader's next batch; the target follows sft.target_template,
    or is the row's sft.target_field column. Token ids depend only on the text and the image sizes, so they are
    cached on those: epochs revisit rows, and the processor is a third of a tiny model's step."""
    tokenizer = processor.tokenizer
    out = []
    for sample in loader.next_batch():
        text = target_text(cfg.sft, sample)
        key = (sample.prompt_text, text, tuple(image.shape for image in sample.images))
        if key not in cache:
            prompt_ids = processor(text=[sample.prompt_text], images=sample.images)["input_ids"][0]
            target = tokenizer.encode(text, add_special_tokens=False)
            cache[key] = (list(prompt_ids), target + [tokenizer.eos_token_id])
        out.append((sample.uid, *cache[key], sample.images))
    return out


def target_text(sft, sample) -> str:
    """The target response of one row: its sft.target_field column when set, else sft.target_template."""
    if not sft.target_field:
        return sft.target_template.format(answer=sample.answer)
    text = sample.extra.get(sft.target_field)
    if not text:
        raise ValueError(
            f"sft.target_field={sft.target_field}: row {sample.uid} has no string '{sft.target_field}' column "
            "value; give every row one, or unset sft.target_field to use sft.target_template"
        )
    return text


def main(argv=None) -> int:
    import torch.distributed as dist
    from transformers import AutoProcessor

    from vppo_megatron.actor import checkpoint
    from vppo_megatron.actor.engine import MegatronActor
    from vppo_megatron.config import load
    from vppo_megatron.data.dataset import PromptDataset, PromptLoader
    from vppo_megatron.metrics import MetricsLogger, Progress
    from vppo_megatron.parallel.layout import ParallelLayout, init_distributed, initialize
    from vppo_megatron.types import ActorSample

    parser = argparse.ArgumentParser(prog="vppo sft", description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    sft = load(args.config, args.overrides).sft
    cfg = load(args.config, [*args.overrides, f"optimizer.lr={sft.lr}", f"optimizer.warmup_steps={sft.warmup_steps}"])
    init_distributed()
    cfg.validate(dist.get_world_size())
    groups = initialize(ParallelLayout.from_config(cfg.parallel, dist.get_world_size()), cfg.trainer.seed)
    actor = MegatronActor(cfg, groups, cfg.model.path)
    loader = logger = processor = None
    if dist.get_rank() == 0:
        processor = AutoProcessor.from_pretrained(cfg.model.path)
        dataset = PromptDataset.for_processor(cfg.data.train_files, cfg.data, processor)
        loader = PromptLoader(dataset, cfg.sft.batch_size, cfg.trainer.seed, cfg.data.shuffle)
        logger = MetricsLogger(cfg, Path(cfg.sft.output_dir + ".logs"))
    dp, dp_rank, cache = groups.layout.dp, groups.dp_rank, {}
    progress = Progress(cfg.sft.steps, 0, "vppo sft", cfg.logging.progress_bars and logger is not None)
    for step in range(cfg.sft.steps):
        box = [supervised_samples(cfg, loader, processor, cache) if loader is not None else None]
        dist.broadcast_object_list(box, src=0)
        rows = box[0][dp_rank::dp]
        metrics = actor.sft_update([ActorSample(*row) for row in rows])
        if logger is not None:
            logger.log(step, metrics, console=(step + 1) % 20 == 0 or step + 1 == cfg.sft.steps)
        progress.advance(metrics, keys=("sft/nll", "actor/grad_norm"))
    progress.close()
    checkpoint.export_hf(actor, cfg.sft.output_dir, cfg.model.path)
    if dist.get_rank() == 0:
        print(f"warm-started model: {cfg.sft.output_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
