"""What FP8 does to VPPO's perception signal, emulated on CPU (serial actor, the local spec).

Every linear layer of the language model's transformer layers (the ones Transformer Engine runs in FP8; the vision
tower and the output layer stay in high precision) gets its GEMM inputs, activation and weight, rounded through a
number format on the way in:

  bf16           the inputs rounded to bfloat16 (the precision the experience pass runs in by default)
  fp8-current    float8 e4m3 with a per-tensor scale from the tensor itself (TE's tensorwise recipe)
  fp8-delayed    float8 e4m3 with a per-tensor scale from the previous call's amax (TE's delayed recipe with
                 amax history 1, most recent: Megatron-LM's defaults); values beyond the range saturate

Against the fp32 actor on the same rollouts it prints, per format (mean +- std over --seeds rollout sets):
  rank corr    Spearman correlation of token dependency over each response's tokens
  TGF overlap  the share of TGF's selected tokens (top algorithm.token_fraction by dependency) that fp32 selects
  ratio        the PPO ratio at theta_old, |exp(logp_update - old_logp) - 1| (mean and max over tokens), for an
               experience pass in this format followed by an FP8 (delayed) update forward over the same rollouts:
               1 exactly when both passes compute the same numbers

  python benchmarks/bench_fp8_signal.py --model runs/demo/tiny-qwen2_5_vl [--seeds 0,1,2 --rollouts 16]
"""

from __future__ import annotations

import argparse
import statistics

E4M3_MAX = 448.0


def _rank(values):
    import torch

    order = torch.argsort(values, stable=True)
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(len(values), dtype=values.dtype)
    return ranks


def spearman(a, b) -> float:
    import torch

    ra, rb = _rank(a.double()), _rank(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / torch.sqrt((ra * ra).sum() * (rb * rb).sum()).clamp_min(1e-30))


class Rounding:
    """Forward hooks on the transformer layers' linear modules that round their GEMM inputs through a format."""

    def __init__(self, modules, mode: str):
        self.mode, self.handles, self.amax = mode, [], {}
        for module in modules:
            self.handles.append(module.register_forward_pre_hook(self._before))
            self.handles.append(module.register_forward_hook(self._after))

    def _round(self, key, tensor):
        import torch

        if self.mode == "bf16":
            return tensor.to(torch.bfloat16).to(tensor.dtype)
        amax = tensor.abs().max().clamp_min(1e-12)
        if self.mode == "fp8-delayed":  # the scale from the previous call's amax; this call's amax is recorded
            amax, self.amax[key] = self.amax.get(key, amax), amax
        scale = E4M3_MAX / amax
        scaled = (tensor * scale).clamp(-E4M3_MAX, E4M3_MAX)  # saturation, as TE casts
        return scaled.to(torch.float8_e4m3fn).to(tensor.dtype) / scale

    def _before(self, module, args):
        module._kept_weight = module.weight.data
        module.weight.data = self._round((id(module), "w"), module.weight.data)
        return (self._round((id(module), "x"), args[0]), *args[1:])

    def _after(self, module, args, output):
        module.weight.data = module._kept_weight
        del module._kept_weight

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _run(rank, world_size, args):
    import numpy as np
    import torch
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from transformers import AutoProcessor

    from vppo_megatron.actor.engine import MegatronActor
    from vppo_megatron.algo.filtering import select_top_tokens
    from vppo_megatron.config import load
    from vppo_megatron.parallel.layout import ParallelLayout, destroy, initialize
    from vppo_megatron.types import ActorSample

    torch.set_num_threads(args.threads)
    cfg = load(None, ["model.dtype=float32", "trainer.micro_batch_size=4"])
    actor = MegatronActor(cfg, initialize(ParallelLayout(), seed=1), args.model, training=False)
    processor = AutoProcessor.from_pretrained(args.model)
    decoder = actor.chunks[0].language_model.decoder
    linears = [m for m in decoder.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    fraction = cfg.algorithm.token_fraction
    results = {mode: {"corr": [], "overlap": [], "ratio_mean": [], "ratio_max": []} for mode in args.modes}
    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        samples = []
        for i in range(args.rollouts):
            image = rng.integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8)
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count the shapes."}]}]
            text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            prompt = processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0].tolist()
            response = rng.integers(8, 600, args.response_length).tolist()
            samples.append(ActorSample(f"s{seed}r{i}", prompt, response, [image]))
        reference = actor.experience(samples, step=seed)
        mask = reference.response_mask_BT.bool()
        selected_ref = select_top_tokens(reference.dependency_BT, mask, fraction)
        for mode in args.modes:
            hooks = Rounding(linears, mode)
            experience = actor.experience(samples, step=seed)  # the dual pass: original, perturbed per micro-batch
            hooks.remove()
            update = Rounding(linears, "fp8-delayed")  # the update's FP8 forward, scales carried over
            update.amax = dict(hooks.amax) if mode == "fp8-delayed" else {}
            logp_update = actor.experience(samples, step=seed, with_perception=False).old_logp_BT
            update.remove()
            corr = [
                spearman(reference.dependency_BT[b][mask[b]], experience.dependency_BT[b][mask[b]])
                for b in range(len(samples))
            ]
            selected = select_top_tokens(experience.dependency_BT, mask, fraction)
            ratio = (torch.exp(logp_update - experience.old_logp_BT) - 1).abs()[mask]
            r = results[mode]
            r["corr"].append(statistics.mean(corr))
            r["overlap"].append(float((selected & selected_ref).sum() / selected_ref.sum()))
            r["ratio_mean"].append(float(ratio.mean()))
            r["ratio_max"].append(float(ratio.max()))
    destroy()
    return results


def main() -> None:
    from vppo_megatron.testing import run_distributed

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rollouts", type=int, default=16)
    parser.add_argument("--response-length", type=int, default=48)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--modes", default="bf16,fp8-current,fp8-delayed")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.modes = args.modes.split(",")
    (results,) = run_distributed(_run, 1, args, timeout_s=3600)

    def cell(values, digits=3):
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.{digits}f} +- {spread:.{digits}f}"

    print(f"against fp32, {args.rollouts} rollouts x {len(args.seeds)} seeds ({args.model}):")
    print(f"  {'experience':<12}{'rank corr':>18}{'TGF overlap':>18}{'|ratio-1| mean':>22}{'|ratio-1| max':>20}")
    for mode, r in results.items():
        print(
            f"  {mode:<12}{cell(r['corr']):>18}{cell(r['overlap']):>18}"
            f"{cell(r['ratio_mean'], 4):>22}{cell(r['ratio_max'], 4):>20}"
        )
    print("  (ratio: that experience pass, then an FP8 delayed-scaling update forward over the same rollouts)")


if __name__ == "__main__":
    main()
