"""Per-GPU memory estimate of a run's layout, printed by `vppo train --dry-run` before anyone books a cluster.

Architectures come from the model's `config.json` when `model.path` exists on this host, otherwise from the
published config.json excerpts below. Every pipeline-stage role of the layout (first / middle / last; `only`
when PP = 1) is estimated separately and the fit check uses the heaviest. `vppo plan` (actor/rehearsal.py) builds
each role with the actor's own model code on the meta device and checks the parameter counts below exactly.

* Parameters held by one rank (what actor/model.py builds): its language-model layers (all of its virtual
  stages) with the attention and MLP weights and the QKV bias split by TP and both RMSNorm weights replicated;
  the vision tower, HF's module, whole on every TP rank of the first stage; the vocab-parallel embedding
  (first) and output layer plus final norm (last). Uneven splits follow parallel.first_stage_layers /
  last_stage_layers with megatron-core's rule (the remaining layers spread evenly over the other stages).
* Model state per parameter: bf16 weight (2 B) + fp32 main gradient (4 B) + Adam fp32 master, m, v (12 B), the
  last sharded over DP x CP by the distributed optimizer. Counted on the exact parameters: megatron-core pads
  each parameter to 64 elements and each buffer to lcm(DP x CP, 128), which `vppo plan` reports (< 0.01 %).
* Activations: per layer, the tensors autograd saves for backward, derived below from hidden, heads, KV heads,
  head_dim, ffn (SwiGLU), dropout 0, sequence parallelism and the recompute mode (`layer_activation_bytes`; the
  local-spec figure is measured by `vppo plan --measure`). With full recompute a layer keeps its input and the
  one layer being recomputed holds everything. 1F1B keeps PP - rank micro-batches in flight (interleaved:
  2 (PP - rank - 1) + (VPP - 1) PP + 1 virtual-stage micro-batches; `in_flight` replays the schedule).
* The logits path on the last stage: fp32 logits, their softmax and their gradient, 3 * 4 * s * b * V / TP.
* Colocated vLLM engines hold bf16 weights / rollout TP next to the actor (asleep during the update).

Listed beside the actor peak but not in it: the vision tower's activations on the first stage (HF's module is
not recomputed; data-dependent, shown for one image of data.max_pixels per rollout). Not counted (the 10%
headroom covers them): pipeline p2p buffers, NCCL buffers, the CUDA context (~2-4 GiB), fragmentation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from vppo_megatron import families
from vppo_megatron.lifecycle import OFFLOAD_KINDS, resident, resolve_offload

GIB = 2**30
FP32 = 4
ADAM_BYTES = 3 * FP32  # fp32 master weight, exp_avg, exp_avg_sq


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
    qk_norm: bool  # per-head q/k RMSNorms (Qwen3 text layers)
    qkv_bias: bool  # bias on q, k, v (Qwen2 text layers)
    vision_params: int
    vision_depth: int = 0
    vision_hidden: int = 0
    vision_ffn: int = 0
    vision_patch: int = 14
    deepstack_layers: int = 0  # first LLM layers receiving DeepStack features (Qwen3-VL)

    def _sharded_layer_params(self) -> int:
        """Per layer, the parameters megatron-core splits over TP (QKV weight and bias, proj, fc1, fc2)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        qkv_bias = q + 2 * kv if self.qkv_bias else 0
        return self.hidden * (q + 2 * kv) + qkv_bias + q * self.hidden + 3 * self.hidden * self.ffn

    def replicated_layer_params(self) -> int:
        """Per layer, the parameters every TP rank holds whole: two RMSNorms (+ the QK-norms)."""
        return 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)

    def layer_params(self, tp: int = 1) -> int:
        """One transformer layer's parameters on one of `tp` ranks."""
        return self._sharded_layer_params() // tp + self.replicated_layer_params()

    def embedding_params(self, tp: int = 1) -> int:
        return self.vocab // tp * self.hidden

    def total_params(self) -> int:
        heads = 1 if self.tied_embeddings else 2
        return self.layers * self.layer_params() + heads * self.embedding_params() + self.hidden + self.vision_params

    def check_tp(self, tp: int) -> None:
        """megatron-core splits heads, KV groups, ffn and vocab evenly over TP."""
        for name, value in [
            ("num_attention_heads", self.heads),
            ("num_key_value_heads", self.kv_heads),
            ("intermediate_size", self.ffn),
            ("vocab_size", self.vocab),
        ]:
            if value % tp:
                raise ValueError(f"parallel.tp={tp} does not divide the model's {name}={value}; choose a divisor")


# Public configurations (config.json of each Hugging Face repository), from every family's registry entry.
PUBLISHED: dict[str, dict] = families.published()


def arch_from_hf(config: dict) -> Arch:
    """Arch of an HF config.json dict of any registered family (vppo_megatron/families)."""
    text, vision = config.get("text_config", config), config["vision_config"]
    family = families.get(config.get("model_type", "qwen2_5_vl"))
    return Arch(
        layers=text["num_hidden_layers"],
        hidden=text["hidden_size"],
        heads=text["num_attention_heads"],
        kv_heads=text["num_key_value_heads"],
        head_dim=text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"],
        ffn=text["intermediate_size"],
        vocab=text["vocab_size"],
        tied_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        qk_norm=family.qk_layernorm,
        qkv_bias=family.qkv_bias,
        vision_params=family.vision_params(vision, text["hidden_size"]),
        vision_depth=vision["depth"],
        vision_hidden=vision["hidden_size"],
        vision_ffn=vision["intermediate_size"],
        vision_patch=vision.get("patch_size", family.patch_size),
        deepstack_layers=len(vision.get("deepstack_visual_indexes", [])),
    )


KNOWN: dict[str, Arch] = {name: arch_from_hf(config) for name, config in PUBLISHED.items()}


def resolve_arch(model_path: str) -> tuple[Arch, str] | None:
    """(Arch, where it came from) for `model_path`, or None when neither its config.json nor the table knows it."""
    config = Path(model_path) / "config.json"
    if config.exists():
        try:
            return arch_from_hf(json.loads(config.read_text())), str(config)
        except KeyError as exc:
            raise ValueError(f"{config} lacks {exc}: not a Qwen2.5-VL or Qwen3-VL config") from None
        except families.UnknownFamily as exc:
            raise ValueError(f"{config}: {exc}") from None
    name = Path(model_path).name
    if name in KNOWN:
        return KNOWN[name], f"built-in table ({name})"
    return None


# ------------------------------------------------------------------------------------ pipeline-stage roles


@dataclass(frozen=True)
class Stage:
    """One pipeline-stage role of a layout, as each of its ranks holds it."""

    role: str  # first | middle | last, or only (PP = 1)
    pp_rank: int  # the rank the role is estimated at (middle: the one with the most micro-batches in flight)
    layers: int  # language-model layers on this rank, over all of its virtual stages
    first: bool  # vision tower + embedding (on virtual stage 0)
    last: bool  # final norm + output layer (on the last virtual stage)

    def params(self, arch: Arch, tp: int) -> dict[str, int]:
        """Parameters on one TP rank, by part; `replicated` = those every TP rank holds whole."""
        parts = {"layers": self.layers * arch.layer_params(tp), "vision": 0, "embedding": 0, "output": 0}
        if self.first:
            parts["vision"] = arch.vision_params
            parts["embedding"] = arch.embedding_params(tp)
        if self.last:
            # a tied output layer reuses the embedding on the same chunk; on a later stage it is a copy
            untied = not arch.tied_embeddings or not self.first
            parts["output"] = arch.hidden + (arch.embedding_params(tp) if untied else 0)
        parts["replicated"] = (
            self.layers * arch.replicated_layer_params()
            + (arch.vision_params if self.first else 0)
            + (arch.hidden if self.last else 0)
        )
        parts["total"] = parts["layers"] + parts["vision"] + parts["embedding"] + parts["output"]
        return parts


def layers_per_rank(num_layers: int, pp: int, vpp: int, first_layers: int = 0, last_layers: int = 0) -> list[int]:
    """Language-model layers on each pipeline rank (megatron-core's get_num_layers_to_build, summed over VPP)."""
    if pp == 1 and (first_layers or last_layers):
        raise ValueError("parallel.first_stage_layers / last_stage_layers need parallel.pp > 1")
    rest, others = num_layers - first_layers - last_layers, pp - (first_layers > 0) - (last_layers > 0)
    if rest < 0 or (others == 0 and rest) or (others and rest % others):
        raise ValueError(
            f"parallel.first_stage_layers={first_layers} last_stage_layers={last_layers}: the other "
            f"{others} stage(s) must split the remaining {rest} of {num_layers} layers evenly"
        )
    even = rest // others if others else 0
    counts = [even] * pp
    counts[0] = first_layers or counts[0]
    counts[-1] = last_layers or counts[-1]
    for rank, count in enumerate(counts):
        if count % vpp or count == 0:
            name = "parallel.pp"
            if rank == 0 and first_layers:
                name = "parallel.first_stage_layers"
            elif rank == pp - 1 and last_layers:
                name = "parallel.last_stage_layers"
            raise ValueError(
                f"{name}: pipeline rank {rank} would hold {count} layers, which parallel.vpp={vpp} virtual "
                "stages cannot split evenly (each needs at least one layer)"
            )
    return counts


def stages(arch: Arch, parallel) -> list[Stage]:
    """The distinct pipeline-stage roles of `parallel` (a ParallelConfig): first, middle, last (or only)."""
    pp = parallel.pp
    counts = layers_per_rank(arch.layers, pp, parallel.vpp, parallel.first_stage_layers, parallel.last_stage_layers)
    if pp == 1:
        return [Stage("only", 0, counts[0], True, True)]
    roles = [Stage("first", 0, counts[0], True, False)]
    if pp > 2:
        roles.append(Stage("middle", 1, counts[1], False, False))
    return roles + [Stage("last", pp - 1, counts[-1], False, True)]


def in_flight(pp: int, vpp: int, pp_rank: int, num_microbatches: int) -> tuple[int, int]:
    """(virtual-stage micro-batches, of them on virtual stage 0) whose activations rank `pp_rank` holds at the
    peak of megatron-core's 1F1B schedule: warm-up forwards (PP - rank - 1; interleaved 2 (PP - rank - 1) +
    (VPP - 1) PP, microbatch group size PP), then one forward and one backward at a time; backward walks the
    virtual stages in reverse."""
    total = num_microbatches * vpp
    warmup = pp - pp_rank - 1 if vpp == 1 else 2 * (pp - pp_rank - 1) + (vpp - 1) * pp
    held = [0] * vpp  # micro-batches in flight per virtual stage
    peak = peak_first = forwards = 0
    for backwards in range(total):
        while forwards < total and forwards <= min(warmup, total - 1) + backwards:
            held[(forwards // pp) % vpp] += 1
            forwards += 1
        peak, peak_first = max(peak, sum(held)), max(peak_first, held[0])
        held[vpp - 1 - (backwards // pp) % vpp] -= 1
    return peak, peak_first


# ------------------------------------------------------------------------------------------- activations


def layer_activation_bytes(
    arch: Arch,
    seq: int,
    micro_batch: int,
    tp: int,
    sequence_parallel: bool,
    recompute: str,
    implementation: str = "transformer_engine",
    dtype_bytes: int = 2,
) -> dict[str, int]:
    """Bytes one TP rank keeps for backward per transformer layer and micro-batch, by part.

    `implementation`: transformer_engine (GPU: fused RMSNorm + linear saves its input and normed output; flash
    attention saves q, k, v, the output and the fp32 logsumexp) or local (megatron-core's local spec, what runs
    on CPU: torch's RMSNorm saves an fp32 copy of its input and the fp32 normalised value; the attention repeats
    K and V to every query head and materialises the [b, heads, s, s] scores and softmax, listed as `scores`).
    Both: M-RoPE's cos/sin for q and k per layer; the QKV projection's output is kept whole because v stays a
    view of it; SwiGLU keeps fc1's output (2 f), silu's output, the linear half + glu_linear_offset copy and the
    product (f each); no dropout masks (dropout 0). Sequence parallelism splits only the norm-region tensors.
    Full recompute keeps the layer input alone (`layer_activation_bytes(..., "none")` is the recomputed layer).
    Qwen3's per-head QK-norms (arch.qk_norm) save their q and k inputs and the rstd like the other norms
    (`qk_norm`).
    """
    n = seq * micro_batch  # tokens of a micro-batch
    n_sp = n // tp if sequence_parallel else n  # tokens in the norm region of one TP rank
    a, g, d, f, h = arch.heads // tp, max(arch.kv_heads // tp, 1), arch.head_dim, arch.ffn // tp, arch.hidden
    if recompute == "full":
        return {"checkpoint": n_sp * h * dtype_bytes}
    local = implementation == "local"
    per_norm = n_sp * h * (2 * FP32 + dtype_bytes if local else 2 * dtype_bytes) + n_sp * FP32  # + rstd
    parts = {
        "norms": 2 * per_norm,
        "rope": 4 * n * d * dtype_bytes,
        "mlp": 5 * n * f * dtype_bytes,
    }
    if arch.qk_norm:
        qk = n * (a + g) * d
        parts["qk_norm"] = qk * (2 * FP32 + dtype_bytes if local else dtype_bytes) + n * (a + g) * FP32
    if recompute == "selective":  # core attention recomputed from its saved inputs q, k, v
        parts["attention"] = n * d * (a + g + (a + 2 * g) + a) * dtype_bytes
    elif local:  # q, k and v repeated to a heads, the context (the projection's input)
        parts["attention"] = 4 * n * a * d * dtype_bytes
        # the fp32 softmax, its cast to the compute dtype (none in fp32: the same tensor), the mask
        probs = dtype_bytes if dtype_bytes != FP32 else 0
        parts["scores"] = micro_batch * a * seq * seq * (FP32 + probs) + seq * seq
    else:  # q, k, QKV output (v's storage), the context; logsumexp [b, a, s] fp32
        parts["attention"] = n * d * (a + g + (a + 2 * g) + a) * dtype_bytes + n * a * FP32
    return parts


def shared_rope_bytes(arch: Arch, seq: int, micro_batch: int) -> int:
    """M-RoPE's fp32 frequencies [s, b, 1, d]: computed once per micro-batch, kept by every layer's full-recompute
    checkpoint (without recompute each layer keeps its own bf16 cos/sin instead)."""
    return seq * micro_batch * arch.head_dim * FP32


def vision_activation_bytes(arch: Arch, patches: int, recompute: bool = False, dtype_bytes: int = 2) -> int:
    """What HF's vision tower keeps for backward per image of `patches` patches. Without recompute, per block and
    patch 8 ffn (gate and up outputs, silu, product) + 30 hidden bytes (fp32 RMSNorm copies, q, k, v, attention
    output, residual stream); measured on CPU in bf16 (sdpa, 1024 patches): 2.03 MiB per patch for Qwen2.5-VL's
    ViT, this formula within 1.5 %. With model.recompute=full the actor checkpoints every block (HF gradient
    checkpointing): each block's input is kept, plus one block recomputed at a time. Every TP rank of the first
    stage runs the whole tower."""
    block = patches * (8 * arch.vision_ffn + 30 * arch.vision_hidden)
    if recompute:
        return patches * arch.vision_depth * arch.vision_hidden * dtype_bytes + block
    return arch.vision_depth * block


# ---------------------------------------------------------------------------------------------- estimate


def rollouts_per_micro_batch(cfg) -> int:
    """Rows of the largest micro-batch: trainer.micro_batch_size, or with a token budget as many longest
    sequences (prompt + response limits) as fit it, at least one: the budget's tokens, the activations' driver.
    Packed micro-batches (trainer.pack_sequences) have the same worst case: that many longest rollouts in one row,
    each attending to itself (Transformer Engine's THD attention, and the local spec's own), so the padded
    estimate bounds them."""
    t = cfg.trainer
    if t.max_tokens_per_micro_batch:
        return max(1, t.max_tokens_per_micro_batch // (cfg.data.max_prompt_length + cfg.rollout.max_response_length))
    return t.micro_batch_size


def _num_microbatches(cfg, dp: int) -> int:
    t = cfg.trainer
    return max(1, t.prompts_per_update * cfg.rollout.num_samples_per_prompt // (dp * rollouts_per_micro_batch(cfg)))


def engine_gib_per_gpu(cfg) -> float:
    """Device memory of the colocated vLLM workers on one trainer GPU while awake: each worker takes
    rollout.gpu_memory_utilization of the device (its weights, activations and KV cache together)."""
    r, world = cfg.rollout, cfg.parallel.world_size or 1
    workers_per_gpu = -(-r.num_engines * r.tensor_parallel_size // world)
    return workers_per_gpu * r.gpu_memory_utilization * cfg.parallel.device_memory_gib


def optimizer_bytes_per_param(weight_bytes: int) -> int:
    """Adam's bytes per parameter: exp_avg and exp_avg_sq in fp32, plus an fp32 master copy of bf16 weights (an
    fp32 weight is its own master)."""
    return 2 * FP32 + (FP32 if weight_bytes != FP32 else 0)


def experience_bytes(
    arch: Arch,
    seq: int,
    micro_batch: int,
    tp: int,
    sequence_parallel: bool,
    impl: str,
    dtype_bytes: int,
    last: bool,
    vision_patches: int = 0,
) -> float:
    """Bytes the experience pass holds beyond the actor's state, no_grad: one micro-batch of both views (2b rows)
    passes one layer at a time (that layer's working set, the hidden states in and out); on the first stage
    (`vision_patches` per image) the vision tower's working set of one block for the 2b images; on the last stage
    the fp32 logits of both views with their log-softmax and the estimator's difference (3 x 4 B x 2b x s x V/TP)."""
    rows = 2 * micro_batch
    layer = sum(layer_activation_bytes(arch, seq, rows, tp, sequence_parallel, "none", impl, dtype_bytes).values())
    hidden = 2 * rows * seq * arch.hidden * dtype_bytes
    vision = rows * vision_patches * (8 * arch.vision_ffn + 30 * arch.vision_hidden)
    logits = 3 * FP32 * rows * seq * arch.vocab / tp if last else 0
    return layer + hidden + vision + logits


def actor_phase_gib(cfg, parts: dict[str, float]) -> dict[str, float]:
    """GiB the actor alone holds on one trainer GPU in each phase of a run (`phase_peaks` adds the engines'):
    startup (engines asleep, the actor's state built), resume (that plus the checkpoint's optimizer state loaded
    beside it, then copied in; the weights load in place), rollout (the actor's offloaded parts gone),
    experience (the state plus one micro-batch of both views in flight), update (everything of the actor),
    checkpoint (the state; the writer copies to host), sync (the actor's weights resident). From lifecycle.py's
    residency table; `actor.offload: auto` resolved as on the target's CUDA hosts."""
    placement = cfg.rollout.placement
    offload = resolve_offload(cfg.actor.offload, placement, cuda=True)
    state = {"actor_weights": "weights", "actor_grads": "gradients", "actor_optimizer": "optimizer"}
    whole = parts["weights"] + parts["gradients"] + parts["optimizer"]
    gib = {"startup": whole, "resume": whole + parts["optimizer"], "checkpoint": whole}
    for phase in ("rollout", "experience", "update", "sync"):
        held = resident(phase, offload, placement)
        gib[phase] = sum(parts[part] for key, part in state.items() if held[key])
        if held["actor_activations"]:
            gib[phase] += parts["activations"] + parts["logits"] + parts["vision_activations"]
            gib[phase] += parts.get("fp8_weight_cache", 0.0)
        elif phase == "experience":
            gib[phase] += parts["experience_activations"]
            if cfg.model.fp8_experience:
                gib[phase] += parts.get("fp8_weight_cache", 0.0)
    return gib


def phase_peaks(cfg, parts: dict[str, float]) -> dict[str, float]:
    """GiB on one trainer GPU in each phase of a run: the actor's (`actor_phase_gib`) plus the colocated
    engines' where they are awake (rollout: their whole share of the device; sync: their weights), and in the sync
    the buckets the rank holds (`sync_buffers`)."""
    offload = resolve_offload(cfg.actor.offload, cfg.rollout.placement, cuda=True)
    peaks = {}
    for phase, gib in actor_phase_gib(cfg, parts).items():
        held = resident(phase, offload, cfg.rollout.placement) if phase in ("rollout", "sync") else {}
        if held.get("engine_kv_cache"):
            gib += engine_gib_per_gpu(cfg)
        elif held.get("engine_weights"):
            gib += parts["vllm_weights"]
        if phase == "sync":  # the buckets this rank packs, receives or still feeds (topology.py)
            gib += parts["sync_buffers"]
        peaks[f"{phase}_phase"] = gib
    return peaks


def next_power_of_two(nbytes: float) -> float:
    return 2 ** math.ceil(math.log2(nbytes)) if nbytes > 0 else 0.0


def engine_worker_sleep_bytes(arch: Arch, tp: int, dtype_bytes: int = 2) -> float:
    """Host bytes one vLLM worker (rollout TP rank) keeps through a level-1 sleep: a pinned backup of every weight
    tensor it holds, each rounded up to a power of two by the caching host allocator. The language model's
    tensors in vLLM's fused layout (qkv, o, gate_up, down, norms; the embedding and an untied head); the vision
    tower at twice its bytes (the rounding's upper bound: its shapes are the family's)."""
    q, kv, h, f = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim, arch.hidden, arch.ffn
    layer = [(q + 2 * kv) * h // tp, q * h // tp, 2 * f * h // tp, f * h // tp, h, h]
    layer += [(q + 2 * kv) // tp] if arch.qkv_bias else []
    layer += [arch.head_dim, arch.head_dim] if arch.qk_norm else []
    heads = [arch.vocab * h // tp] * (1 if arch.tied_embeddings else 2) + [h]
    rounded = arch.layers * sum(next_power_of_two(n * dtype_bytes) for n in layer)
    rounded += sum(next_power_of_two(n * dtype_bytes) for n in heads)
    return rounded + 2 * arch.vision_params * dtype_bytes / tp


def sync_plan(cfg, cuda: bool = True):
    """The weight sync's topology (topology.py) on the target: the transport `auto` picks there."""
    from types import SimpleNamespace

    from vppo_megatron import topology

    p, r = cfg.parallel, cfg.rollout
    transport = r.sync_transport
    if transport == "auto":
        transport = "shm" if not cuda else ("cuda_ipc" if r.placement == "colocated" else "nccl")
    world = p.world_size or p.tp * p.pp * p.cp
    layout = SimpleNamespace(tp=p.tp, pp=p.pp, cp=p.cp, dp=world // (p.tp * p.pp * p.cp), world_size=world)
    return topology.plan(cfg, layout, transport)


def sync_bucket_bytes(cfg, arch: Arch, dtype_bytes: int = 2) -> float:
    """The most one sync bucket holds: rollout.sync_bucket_mb, or the largest whole unit (a transformer layer, the
    embedding) where that is larger (a unit is never split: sync/buckets.py)."""
    largest = max(arch.layer_params(), arch.embedding_params()) * dtype_bytes
    return max(cfg.rollout.sync_bucket_mb * 2**20, largest)


def sync_buffers_gib(cfg, arch: Arch) -> float:
    """GiB of full-tensor buckets the busiest trainer rank holds during a sync (never the model)."""
    topo = sync_plan(cfg)
    peak = max(topo.rank_peak_buckets(rank) for rank in range(topo.world))
    return peak * sync_bucket_bytes(cfg, arch) / GIB


def host_per_node(cfg, arch: Arch, parts: dict[str, float]) -> dict[str, float]:
    """GiB of host memory on the busiest node (trainer rank 0's, parallel.gpus_per_node ranks), by item:
    - `offload_buffers`: each rank's host copy of what actor.offload moves (weights, optimizer state; gradients
      are dropped, not copied): one buffer per kind (actor/offload.py), pinned on CUDA hosts, where the caching
      host allocator rounds it up to a power of two (an 8.4 GiB buffer takes 16 GiB);
    - `engine_sleep_copies`: vLLM's level-1 sleep keeps every colocated engine worker's weights in pinned host
      memory, one rounded backup per tensor (`engine_worker_sleep_bytes`);
    - `sync_staging`: the weight sync's two slots in the node's shared memory (the last good version, the node's
      snapshot for rollbacks and engine restarts, and the version being synced): two copies of the model in the
      engines' dtype on every node that hosts engines (topology.py);
    - `step_batch`: each rank's encoded pixels of the step's prompts (fp32, once per prompt) and its data loader's
      images of the step (uint8).
    The heaviest pipeline-stage role's state stands for every rank of the node."""
    p, r = cfg.parallel, cfg.rollout
    ranks = min(p.gpus_per_node, p.world_size or 1)
    colocated = r.placement == "colocated"
    offload = resolve_offload(cfg.actor.offload, r.placement, cuda=True)
    kinds = [k for k in OFFLOAD_KINDS[offload] if k != "grads"] if colocated else []
    per_rank = sum(next_power_of_two(parts[k] * GIB) / GIB for k in kinds)
    model = arch.total_params() * 2 / GIB
    patches = cfg.data.max_pixels // arch.vision_patch**2
    pixel_bytes = patches * 3 * 2 * arch.vision_patch**2 * FP32  # C x temporal patch x patch^2 per patch, fp32
    dp = p.world_size // (p.tp * p.pp * p.cp) if p.world_size else 1
    prompts = cfg.trainer.prompts_per_step / dp
    sleep = ranks * engine_worker_sleep_bytes(arch, r.tensor_parallel_size) / GIB if colocated else 0.0
    return {
        "offload_buffers": ranks * per_rank,
        "engine_sleep_copies": sleep,
        "sync_staging": 2 * model,
        "step_batch": ranks * prompts * (pixel_bytes + cfg.data.max_pixels * 3) / GIB,
    }


def estimate_stages(cfg, arch: Arch) -> dict[str, dict[str, float]]:
    """GiB per GPU for every pipeline-stage role of the layout, each a dict of named parts: weights, gradients,
    optimizer, activations, logits, vision_activations (one image of data.max_pixels per rollout), their sum
    actor_peak (the update), vllm_weights, and the peak of each phase of a step (`phase_peaks`)."""
    p = cfg.parallel
    tp, pp, cp, vpp = p.tp, p.pp, p.cp, p.vpp
    arch.check_tp(tp)
    dp = p.world_size // (tp * pp * cp) if p.world_size else 1
    weight_bytes = 2 if cfg.model.dtype == "bfloat16" else 4
    sharding = dp * cp if cfg.optimizer.distributed_optimizer else 1
    seq = (cfg.data.max_prompt_length + cfg.rollout.max_response_length) // cp
    b, full = rollouts_per_micro_batch(cfg), cfg.model.recompute == "full"
    impl = "local" if cfg.model.transformer_impl == "local" else "transformer_engine"
    args = (arch, seq, b, tp, p.sequence_parallel)
    held = sum(layer_activation_bytes(*args, cfg.model.recompute, impl, weight_bytes).values())
    per_micro_batch = shared_rope_bytes(arch, seq, b) if full else 0
    recomputed = sum(layer_activation_bytes(*args, "none", impl, weight_bytes).values()) if full else 0
    patches = cfg.data.max_pixels // arch.vision_patch**2
    micro = _num_microbatches(cfg, dp)
    result = {}
    for stage in stages(arch, p):
        params = stage.params(arch, tp)["total"]
        chunks, first_chunks = in_flight(pp, vpp, stage.pp_rank, micro)  # each chunk: stage.layers / vpp layers
        parts = {
            "weights": params * weight_bytes / GIB,
            "gradients": params * FP32 / GIB,
            "optimizer": params * optimizer_bytes_per_param(weight_bytes) / sharding / GIB,
            "activations": (chunks * (stage.layers // vpp * held + per_micro_batch) + recomputed) / GIB,
            "logits": 3 * FP32 * seq * b * arch.vocab / tp / GIB if stage.last else 0.0,
        }
        vision = first_chunks * b * vision_activation_bytes(arch, patches, full, weight_bytes) if stage.first else 0
        parts["vision_activations"] = vision / GIB
        # Transformer Engine's FP8 copy of every linear weight and its transpose, held while an FP8 pass runs
        parts["fp8_weight_cache"] = stage.layers * arch.layer_params(tp) * 2 / GIB if cfg.model.fp8 != "none" else 0
        parts["actor_peak"] = sum(parts.values())
        parts["experience_activations"] = (
            experience_bytes(
                arch, seq, b, tp, p.sequence_parallel, impl, weight_bytes, stage.last, patches if stage.first else 0
            )
            / GIB
        )
        parts["vllm_weights"] = arch.total_params() * 2 / cfg.rollout.tensor_parallel_size / GIB
        parts["sync_buffers"] = sync_buffers_gib(cfg, arch)
        parts.update(phase_peaks(cfg, parts))
        result[stage.role] = parts
    return result


def estimate(cfg, arch: Arch, role: str | None = None) -> dict[str, float]:
    """Peak GiB per GPU during the update of pipeline-stage `role` (default: the heaviest), and its parts."""
    per_stage = estimate_stages(cfg, arch)
    if role is None:
        role = max(per_stage, key=lambda r: per_stage[r]["actor_peak"])
    return per_stage[role]


HEADROOM = 0.9  # CUDA context, NCCL buffers and allocator fragmentation take the rest


PHASES = (
    "startup_phase",
    "resume_phase",
    "rollout_phase",
    "experience_phase",
    "update_phase",
    "checkpoint_phase",
    "sync_phase",
)
FIXES = {
    "startup_phase": "raise parallel.tp / parallel.pp, or set optimizer.distributed_optimizer=true",
    "resume_phase": "raise parallel.tp / parallel.pp, or set optimizer.distributed_optimizer=true",
    "checkpoint_phase": "raise parallel.tp / parallel.pp, or set optimizer.distributed_optimizer=true",
    "rollout_phase": "set actor.offload=all or lower rollout.gpu_memory_utilization",
    "experience_phase": "lower trainer.micro_batch_size (or trainer.max_tokens_per_micro_batch), or raise parallel.tp",
    "update_phase": "lower trainer.micro_batch_size, set parallel.sequence_parallel=true or model.recompute=full, "
    "or raise parallel.tp / parallel.pp",
    "sync_phase": "lower rollout.sync_bucket_mb, or raise rollout.tensor_parallel_size",
}
STATE_PARTS = ("weights", "gradients", "optimizer")


def _resident_items(cfg, parts: dict[str, float], phase: str) -> str:
    """The largest items a phase holds on one GPU, for the refusal message."""
    items = {k: parts[k] for k in STATE_PARTS}
    if phase == "resume_phase":
        items["loaded optimizer state"] = parts["optimizer"]
    elif phase == "experience_phase":
        items["experience_activations"] = parts["experience_activations"]
    elif phase == "update_phase":
        items.update({k: parts[k] for k in ("activations", "logits", "vision_activations")})
    elif phase in ("rollout_phase", "sync_phase"):
        offload = resolve_offload(cfg.actor.offload, cfg.rollout.placement, cuda=True)
        held = resident(phase.removesuffix("_phase"), offload, cfg.rollout.placement)
        keys = {"weights": "actor_weights", "gradients": "actor_grads", "optimizer": "actor_optimizer"}
        items = {k: v for k, v in items.items() if held[keys[k]]}
        items["engines"] = parts[phase] - sum(items.values())
    top = sorted(((k, v) for k, v in items.items() if v > 0), key=lambda kv: -kv[1])[:5]
    return ", ".join(f"{k} {v:.1f}" for k, v in top)


def report(cfg) -> tuple[str, bool]:
    """The dry-run's memory section: every phase of a run per pipeline-stage role (one column each) on one GPU,
    the host memory of the busiest node, and whether every phase fits `parallel.device_memory_gib` and the host
    fits `parallel.host_memory_gib`."""
    found = resolve_arch(cfg.model.path)
    if found is None:
        return (
            f"memory: no estimate ({cfg.model.path}/config.json is not on this host and "
            f"{Path(cfg.model.path).name!r} is not in vppo_megatron/memory.py KNOWN)",
            True,
        )
    arch, source = found
    per_stage = estimate_stages(cfg, arch)
    worst = {role: max(parts[phase] for phase in PHASES) for role, parts in per_stage.items()}
    heaviest = max(worst, key=worst.get)
    parts = per_stage[heaviest]
    phase = max(PHASES, key=lambda name: parts[name])
    p = cfg.parallel
    counts = {s.role: s.layers for s in stages(arch, p)}
    offload = resolve_offload(cfg.actor.offload, cfg.rollout.placement, cuda=True)
    lines = [
        f"memory estimate per GPU ({arch.total_params() / 1e9:.2f}B params from {source}; GiB per pipeline-stage "
        f"role; {cfg.rollout.placement} engines, actor.offload={offload}):",
        f"  {'stage':<22}" + "".join(f"{f'{role} ({counts[role]} layers)':>22}" for role in per_stage),
    ]
    for name in parts:
        lines.append(f"  {name:<22}" + "".join(f"{values[name]:22.1f}" for values in per_stage.values()))
    lines.append(
        f"  heaviest: {heaviest} stage, {phase.removesuffix('_phase')} phase, {parts[phase]:.1f} GiB. "
        "actor_peak is the update (engines asleep); rollout_phase adds the awake engines' "
        "rollout.gpu_memory_utilization of the device to what actor.offload leaves resident (lifecycle.py)"
    )
    budget = p.device_memory_gib * HEADROOM
    fits = True
    for name in PHASES:
        role = max(per_stage, key=lambda r: per_stage[r][name])
        need = per_stage[role][name]
        if budget and need > budget:
            fits = False
            lines.append(
                f"error: the {name.replace('_', ' ')} needs {need:.1f} GiB on the {role} stage "
                f"({_resident_items(cfg, per_stage[role], name)} GiB), more than {HEADROOM:.0%} of "
                f"parallel.device_memory_gib={p.device_memory_gib:g}; {FIXES[name]}"
            )
    host = host_per_node(cfg, arch, parts)
    total = sum(host.values())
    lines.append(
        f"host memory of the busiest node (trainer rank 0's, {min(p.gpus_per_node, p.world_size or 1)} ranks; "
        f"GiB): " + ", ".join(f"{k} {v:.1f}" for k, v in host.items()) + f"; total {total:.1f}"
    )
    if p.host_memory_gib and total > p.host_memory_gib * HEADROOM:
        fits = False
        top = sorted(host.items(), key=lambda kv: -kv[1])
        lines.append(
            f"error: the host memory of a node needs {total:.1f} GiB ({', '.join(f'{k} {v:.1f}' for k, v in top)} "
            f"GiB), more than {HEADROOM:.0%} of parallel.host_memory_gib={p.host_memory_gib:g}; set "
            "actor.offload=optimizer+grads (no pinned weight copies) or spread the engines (rollout.placement)"
        )
    return "\n".join(lines), fits
