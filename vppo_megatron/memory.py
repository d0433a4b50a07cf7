"""Per-GPU memory estimate of a run's layout, printed by `vppo train --dry-run` before anyone books a cluster.

Parameter counts come from the model's `config.json` when `model.path` exists on this host, otherwise from the
architecture table below (public model cards / config.json values). The arithmetic follows GPU_PATH.md section 7:

* model state per parameter: bf16 weight (2 B) + fp32 main gradient (4 B) + Adam fp32 master, m, v (12 B), the
  last sharded over DP x CP by the distributed optimizer; everything split by TP, layers by PP (the vision tower
  and embedding on the first stage, the output layer on the last);
* activations per micro-batch (Korthikanti et al. 2022, flash attention, sequence parallel):
  34 * s * b * h / TP bytes per layer held, or 2 * s * b * h / TP per layer with full recompute plus one layer
  recomputed; 1F1B keeps up to PP micro-batches in flight on the first stage;
* the logits path: fp32 logits, their softmax and their gradient, 3 * 4 * s * b * V / TP bytes;
* colocated vLLM engines hold bf16 weights / rollout TP next to the actor (asleep during the update; the KV cache
  takes `rollout.gpu_memory_utilization` of the device while awake).

It is an estimate, not a measurement: allocator fragmentation, NCCL buffers and the CUDA context (~2-4 GiB) are
covered only by the headroom the report asks for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30


@dataclass(frozen=True)
class Arch:
    """The dimensions that decide memory: the language model and the vision tower's parameter count."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied_embeddings: bool
    qwen3: bool  # Qwen3 text layers: QK-norm, no QKV bias
    vision_params: int

    def layer_params(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        qkv = self.hidden * (q + 2 * kv) + (2 * self.head_dim if self.qwen3 else q + 2 * kv)
        return qkv + q * self.hidden + 3 * self.hidden * self.ffn + 2 * self.hidden

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def total_params(self) -> int:
        heads = 1 if self.tied_embeddings else 2
        return self.layers * self.layer_params() + heads * self.embedding_params() + self.hidden + self.vision_params


def _vision_params(
    depth: int, hidden: int, ffn: int, out_hidden: int, patch: int, qwen3: bool, deepstack: int = 0, positions: int = 0
) -> int:
    """Exact parameter count of the ViT: Qwen2.5-VL (RMSNorm, gated MLP) or Qwen3-VL (LayerNorm, GELU MLP,
    learned position embeddings, DeepStack mergers)."""
    attention = 3 * hidden * hidden + 3 * hidden + hidden * hidden + hidden
    mlp = 2 * hidden * ffn + ffn + hidden if qwen3 else 3 * hidden * ffn + 2 * ffn + hidden
    block = attention + mlp + (4 if qwen3 else 2) * hidden
    merged = 4 * hidden  # 2 x 2 spatial merge
    merger_mlp = merged * merged + merged + merged * out_hidden + out_hidden
    embed = 3 * 2 * patch * patch * hidden + (hidden if qwen3 else 0)
    mergers = merger_mlp + (2 if qwen3 else 1) * hidden + deepstack * (merger_mlp + 2 * merged)
    return depth * block + embed + mergers + positions * hidden


# Public configurations (config.json of each Hugging Face repository).
KNOWN: dict[str, Arch] = {
    "Qwen2.5-VL-7B-Instruct": Arch(
        28, 3584, 28, 4, 128, 18944, 152064, False, False, _vision_params(32, 1280, 3420, 3584, 14, False)
    ),
    "Qwen2.5-VL-32B-Instruct": Arch(
        64, 5120, 40, 8, 128, 27648, 152064, False, False, _vision_params(32, 1280, 3456, 5120, 14, False)
    ),
    "Qwen3-VL-8B-Instruct": Arch(
        36, 4096, 32, 8, 128, 12288, 151936, False, True, _vision_params(27, 1152, 4304, 4096, 16, True, 3, 2304)
    ),
}


def arch_from_hf(config: dict) -> Arch:
    """Arch of an HF Qwen2.5-VL or Qwen3-VL config.json dict."""
    text, vision = config.get("text_config", config), config["vision_config"]
    qwen3 = config.get("model_type") == "qwen3_vl"
    return Arch(
        layers=text["num_hidden_layers"],
        hidden=text["hidden_size"],
        heads=text["num_attention_heads"],
        kv_heads=text["num_key_value_heads"],
        head_dim=text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"],
        ffn=text["intermediate_size"],
        vocab=text["vocab_size"],
        tied_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        qwen3=qwen3,
        vision_params=_vision_params(
            vision["depth"],
            vision["hidden_size"],
            vision["intermediate_size"],
            vision.get("out_hidden_size") or text["hidden_size"],
            vision.get("patch_size", 14),
            qwen3,
            deepstack=len(vision.get("deepstack_visual_indexes", [])) if qwen3 else 0,
            positions=vision.get("num_position_embeddings", 0) if qwen3 else 0,
        ),
    )


def resolve_arch(model_path: str) -> tuple[Arch, str] | None:
    """(Arch, where it came from) for `model_path`, or None when neither its config.json nor the table knows it."""
    config = Path(model_path) / "config.json"
    if config.exists():
        try:
            return arch_from_hf(json.loads(config.read_text())), str(config)
        except KeyError as exc:
            raise ValueError(f"{config} lacks {exc}: not a Qwen2.5-VL or Qwen3-VL config") from None
    name = Path(model_path).name
    if name in KNOWN:
        return KNOWN[name], f"built-in table ({name})"
    return None


def estimate(cfg, arch: Arch) -> dict[str, float]:
    """Peak GiB per GPU of the actor's heaviest pipeline stage during the update, and its parts."""
    p = cfg.parallel
    tp, pp, cp = p.tp, p.pp, p.cp
    dp = p.world_size // (tp * pp * cp)
    layers_per_stage = -(-arch.layers // pp)
    first_stage = (
        layers_per_stage * arch.layer_params()
        + arch.embedding_params()
        + arch.vision_params
        + (arch.embedding_params() if pp == 1 and not arch.tied_embeddings else 0)
    )
    params = first_stage / tp
    weight_bytes = 2 if cfg.model.dtype == "bfloat16" else 4
    sharding = dp * cp if cfg.optimizer.distributed_optimizer else 1
    seq = (cfg.data.max_prompt_length + cfg.rollout.max_response_length) / cp
    b, h = cfg.trainer.micro_batch_size, arch.hidden
    sp = tp if p.sequence_parallel else 1
    full = cfg.model.recompute == "full"  # a 2-byte checkpoint per layer, plus the one layer being recomputed
    per_micro = (layers_per_stage * (2 if full else 34) + (34 if full else 0)) * seq * b * h / sp
    in_flight = pp  # 1F1B: up to PP micro-batches in flight on the first stage
    parts = {
        "weights": params * weight_bytes / GIB,
        "gradients": params * 4 / GIB,
        "optimizer": params * 12 / sharding / GIB,
        "activations": per_micro * in_flight / GIB,
        "logits": 3 * 4 * seq * b * arch.vocab / tp / GIB,
    }
    parts["actor_peak"] = sum(parts.values())
    parts["vllm_weights"] = arch.total_params() * 2 / cfg.rollout.tensor_parallel_size / GIB
    return parts


HEADROOM = 0.9  # CUDA context, NCCL buffers and allocator fragmentation take the rest


def report(cfg) -> tuple[str, bool]:
    """The dry-run's memory section and whether the estimated actor peak fits `parallel.device_memory_gib`."""
    found = resolve_arch(cfg.model.path)
    if found is None:
        return (
            f"memory: no estimate ({cfg.model.path}/config.json is not on this host and "
            f"{Path(cfg.model.path).name!r} is not in vppo_megatron/memory.py KNOWN)",
            True,
        )
    arch, source = found
    parts = estimate(cfg, arch)
    lines = [
        f"memory estimate per GPU (first pipeline stage, update phase; {arch.total_params() / 1e9:.2f}B params "
        f"from {source}):"
    ]
    lines += [f"  {name:<13} {value:8.1f} GiB" for name, value in parts.items()]
    if cfg.rollout.placement == "colocated":
        lines.append("  vLLM engines sleep during the update (weights offloaded, KV cache freed)")
    budget = cfg.parallel.device_memory_gib * HEADROOM
    fits = not budget or parts["actor_peak"] <= budget
    if not fits:
        lines.append(
            f"error: the actor peak {parts['actor_peak']:.1f} GiB exceeds {HEADROOM:.0%} of "
            f"parallel.device_memory_gib={cfg.parallel.device_memory_gib:g}; lower trainer.micro_batch_size, set "
            "parallel.sequence_parallel=true or model.recompute=full, or raise parallel.tp / parallel.pp"
        )
    return "\n".join(lines), fits
