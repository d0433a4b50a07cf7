"""Experience-pass cost, measured side by side in one run (serial actor, CPU or GPU):

  fused      one forward-only schedule over paired micro-batches (original + perturbed image): VPPO's pass
  two-pass   two forward-only schedules, original then perturbed (what the reference's deep copy amounts to)
  plain      one forward-only log-prob pass (DAPO/GRPO need only this)

Prints seconds per pass (median of --repeats) and the ratios fused/plain, two-pass/plain, fused/two-pass.
Then, on a second actor built for packing (the same attention code for both arms), the fused pass with padded
micro-batches against packed ones (trainer.pack_sequences), with the share of the padded micro-batches' tokens
that is padding. --spread draws each response's length from [(1 - spread) x length, length].

  python benchmarks/bench_experience.py --model runs/demo/tiny-qwen2_5_vl [--rollouts 32 --response-length 64]
  python benchmarks/bench_experience.py --model runs/demo/tiny-qwen2_5_vl --spread 0.9 --response-length 256
"""

from __future__ import annotations

import argparse
import statistics
import time


def _run(rank, world_size, args):
    import numpy as np
    import torch
    from transformers import AutoProcessor

    from vppo_megatron.actor.engine import MegatronActor
    from vppo_megatron.algo import perturb
    from vppo_megatron.config import load
    from vppo_megatron.parallel.layout import ParallelLayout, destroy, initialize
    from vppo_megatron.types import ActorSample

    torch.set_num_threads(args.threads)
    cfg = load(None, ["model.dtype=float32", f"trainer.micro_batch_size={args.micro_batch_size}"])
    actor = MegatronActor(cfg, initialize(ParallelLayout(), seed=1), args.model, training=False)
    processor = AutoProcessor.from_pretrained(args.model)
    rng = np.random.default_rng(0)
    samples = []
    for i in range(args.rollouts):
        image = rng.integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count the shapes."}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0].tolist()
        length = int(rng.integers(max(1, round((1 - args.spread) * args.response_length)), args.response_length + 1))
        samples.append(ActorSample(f"r{i}", prompt, rng.integers(8, 600, length).tolist(), [image]))
    cell = actor.hf_config.vision_config.patch_size
    perturbed = [
        ActorSample(
            s.uid,
            s.prompt_ids,
            s.response_ids,
            [
                perturb.perturb_image(
                    torch.from_numpy(im), "patch_blackening", perturb.perturbation_seed(1, 0, s.uid, k), cell_size=cell
                ).numpy()
                for k, im in enumerate(s.images)
            ],
        )
        for s in samples
    ]

    def fused():
        actor.experience(samples, step=0)

    def two_pass():
        actor.experience(samples, step=0, with_perception=False)
        actor.experience(perturbed, step=0, with_perception=False)

    def plain():
        actor.experience(samples, step=0, with_perception=False)

    def median_s(fn) -> float:
        fn()  # warm-up
        runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - start)
        return statistics.median(runs)

    timings = {name: median_s(fn) for name, fn in (("fused", fused), ("two-pass", two_pass), ("plain", plain))}
    destroy()

    cfg.trainer.pack_sequences = True  # the local spec's packing attention, used by both arms below
    actor = MegatronActor(cfg, initialize(ParallelLayout(), seed=1), args.model, training=False)

    def fused_with(packed: bool):
        def run():
            cfg.trainer.pack_sequences = packed
            actor.experience(samples, step=0)

        return run

    timings["padded"] = median_s(fused_with(False))
    timings["packed"] = median_s(fused_with(True))
    cfg.trainer.pack_sequences = False
    timings["padding_share"] = actor.prepare(samples, 0).padding_share()
    destroy()
    return timings


def main() -> None:
    from vppo_megatron.testing import run_distributed

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--rollouts", type=int, default=32)
    parser.add_argument("--response-length", type=int, default=64)
    parser.add_argument("--spread", type=float, default=0.0, help="response lengths vary by this fraction")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    (t,) = run_distributed(_run, 1, args, timeout_s=3600)
    print(
        f"rollouts={args.rollouts} response_length={args.response_length} image={args.image_size}px "
        f"micro_batch={args.micro_batch_size}"
    )
    for name in ("fused", "two-pass", "plain"):
        print(f"  {name:9s} {t[name]:8.3f} s")
    print(f"  fused / plain     = {t['fused'] / t['plain']:.2f}x  (cost of the perception pass)")
    print(f"  two-pass / plain  = {t['two-pass'] / t['plain']:.2f}x")
    print(f"  fused / two-pass  = {t['fused'] / t['two-pass']:.2f}x")
    print(f"packing (spread {args.spread:g}: {t['padding_share']:.1%} of the padded micro-batches' tokens are padding)")
    print(f"  padded    {t['padded']:8.3f} s")
    print(f"  packed    {t['packed']:8.3f} s")
    print(f"  packed / padded   = {t['packed'] / t['padded']:.2f}x")


if __name__ == "__main__":
    main()
