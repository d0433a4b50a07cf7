"""Rehearsal of a target layout on this host, with the model code that will run: checks memory.py against it.

Parameters (`rehearse`): for each pipeline-stage role of the layout (memory.stages: first / middle / last, or
only when PP = 1) a fresh process joins a fake process group of the target world size at one rank of that
stage (`backend="fake"`: no communication), creates megatron-core's groups for the layout and builds the
actor's own model (actor/model.py `transformer_config`, `layer_spec`, `VLModel`, one per virtual stage,
then `Float16Module` as the actor's training setup does) for the real architecture on the meta device. The
layer spec is the local one (Transformer Engine cannot import without CUDA); the TE spec has the same parameter
shapes, only the RMSNorm weights live inside the fused linear (`linear_qkv.layer_norm_weight`, ...). Sequence
parallelism changes no parameter shape, so roles build without it (the local spec's torch norm refuses it).

Activations (`measure_activations`): one transformer layer at a TP rank's widths (full hidden, heads / TP query
heads, KV heads / TP groups, ffn / TP), built the same way on a fake TP group and run forward + backward on CPU
in bf16 at the target (or a shorter) sequence. Every unique storage autograd saves for backward is counted with
`saved_tensors_hooks` (parameters excluded). Megatron-core's local attention materialises the [b * heads, s, s]
scores, softmax and mask, which flash attention on GPU never holds: tensors whose last two dims are (s, s) are
reported apart. With sequence parallelism the local spec's torch RMSNorm refuses to build, so the measurement
swaps in the same torch.nn.RMSNorm without that assertion (on GPU Transformer Engine's norms run SP); the fake
group's all-gathers leave their outputs unwritten, which changes values, not the shapes that are counted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from vppo_megatron import families, memory
from vppo_megatron.config import Config, ConfigError
from vppo_megatron.parallel.layout import ParallelLayout
from vppo_megatron.processes import cuda_hidden, fresh_process_context


def published_hf_config(cfg: Config, num_layers: int | None = None):
    """transformers' config of `model.path`: its config.json on this host, else the family's published excerpt."""
    from transformers import AutoConfig

    path = Path(cfg.model.path)
    if (path / "config.json").exists():
        hf = AutoConfig.from_pretrained(path)
    elif path.name in memory.PUBLISHED:
        excerpt = memory.PUBLISHED[path.name]
        hf = families.get(excerpt["model_type"]).hf_config_from_excerpt(excerpt)
    else:
        raise ConfigError(
            f"model.path={cfg.model.path}: no config.json on this host and {path.name!r} is not in "
            "published configs of vppo_megatron/families"
        )
    if num_layers is not None:
        hf.text_config.num_hidden_layers = num_layers
    return hf


def _local(cfg: Config, **parallel) -> Config:
    """`cfg` built with the local spec (what runs on this host) and the given parallel fields."""
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, transformer_impl="local"),
        parallel=dataclasses.replace(cfg.parallel, **parallel),
    )


def _init_fake(rank: int, world: int, tp: int, pp: int, cp: int, vpp: int) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from vppo_megatron.parallel import cpu_backend

    dist.init_process_group(backend="fake", store=FakeStore(), rank=rank, world_size=world)
    cpu_backend.apply()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        context_parallel_size=cp,
        create_gloo_process_groups=False,
    )
    model_parallel_cuda_manual_seed(1)


# ------------------------------------------------------------------------------------------- parameters


def _padded_numel(chunk: torch.nn.Module, dp_cp: int) -> int:
    """Elements of the chunk's contiguous grad (and bf16 param) buffer under the distributed optimizer: megatron's
    own layout (64-element parameter starts, buffer end padded to lcm(DP x CP, 128); one bucket, no overlap)."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    params = [p for p in chunk.parameters() if p.requires_grad]
    layout = DistributedOptimizer.compute_full_param_layout(params, None, dp_cp, ddp)
    return sum(buffer.bucket_indices[-1][1] for buffer in layout.layouts.values())


def _part(name: str) -> str:
    if name.startswith("vision."):
        return "vision"
    if ".decoder.layers." in name:
        return "layers"
    if ".embedding." in name:
        return "embedding"
    return "output"  # output_layer and the final norm


def build_role(cfg: Config, rank: int, world: int) -> dict:
    """In a fresh process: builds global rank `rank`'s model chunks on the meta device; what they hold."""
    from megatron.core import parallel_state
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from vppo_megatron.actor.model import build_chunks, layer_spec, transformer_config

    start = time.perf_counter()
    p = cfg.parallel
    layout = ParallelLayout.from_config(p, world)
    _init_fake(rank, world, p.tp, p.pp, p.cp, p.vpp)
    local = _local(cfg, sequence_parallel=False)
    hf = published_hf_config(cfg)
    config = transformer_config(hf, local, layout)
    spec = layer_spec(local, config, families.get(hf.model_type))
    with torch.device("meta"):  # MegatronActor's own chunk builder
        chunks = [Float16Module(config, c) if config.bf16 else c for c in build_chunks(hf, config, spec, layout.vpp)]
    parts = {"layers": 0, "vision": 0, "embedding": 0, "output": 0, "replicated": 0}
    weight_bytes = 0
    for chunk in chunks:
        for name, param in chunk.module.named_parameters() if config.bf16 else chunk.named_parameters():
            parts[_part(name)] += param.numel()
            parts["replicated"] += 0 if getattr(param, "tensor_model_parallel", False) else param.numel()
            weight_bytes += param.numel() * param.element_size()
    parts["total"] = sum(parts[k] for k in ("layers", "vision", "embedding", "output"))
    layer_numbers = [[m.layer_number for m in chunk.modules() if isinstance(m, TransformerLayer)] for chunk in chunks]
    return {
        "rank": rank,
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "params": parts,
        "weight_bytes": weight_bytes,
        "padded_numel": sum(_padded_numel(chunk, layout.dp * layout.cp) for chunk in chunks),
        "layer_numbers": [(nums[0], nums[-1]) if nums else None for nums in layer_numbers],
        "layers": sum(len(nums) for nums in layer_numbers),
        "seconds": time.perf_counter() - start,
    }


# Imported once by the fork server, so every fresh role process starts with them loaded.
_PRELOAD = [
    "vppo_megatron.actor.rehearsal",
    "vppo_megatron.actor.model",
    "megatron.core.optimizer.distrib_optimizer",
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
    "transformers.models.qwen3_vl.modeling_qwen3_vl",
]


@contextlib.contextmanager
def _pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """Fresh processes, one task each (megatron-core's groups and torch.distributed are per process), forked from
    a fork server that has only imported the libraries (spawned on a CUDA host). They never see a GPU: a stage is
    built on the meta device and its activations measured on the host, as on a login node (megatron-core would
    otherwise place every weight of a full-size stage on the GPU)."""
    with (
        cuda_hidden(torch.cuda.is_available()),
        ProcessPoolExecutor(workers, mp_context=fresh_process_context(_PRELOAD), max_tasks_per_child=1) as pool,
    ):
        yield pool


def rehearse(cfg: Config, workers: int | None = None) -> list[dict]:
    """Builds every pipeline-stage role of `cfg`'s layout (parallel.world_size ranks) and sets it beside
    memory.py's figures for the same role."""
    arch = memory.arch_from_hf(published_hf_config(cfg).to_dict())
    p = cfg.parallel
    world = p.world_size
    if not world:
        raise ConfigError("parallel.world_size=0: the rehearsal needs the target's rank count; set it")
    dp = world // (p.tp * p.pp * p.cp)
    roles = memory.stages(arch, p)
    per_stage = p.tp * p.cp * dp
    # the stage's last rank: TP, CP and DP ranks all non-zero when those axes exist
    ranks = [stage.pp_rank * per_stage + per_stage - 1 for stage in roles]
    with _pool(workers or min(len(roles), os.cpu_count() or 1)) as pool:
        built = list(pool.map(build_role, [cfg] * len(roles), ranks, [world] * len(roles)))
    sharding = dp * p.cp if cfg.optimizer.distributed_optimizer else 1
    weight_bytes = 2 if cfg.model.dtype == "bfloat16" else 4
    rows = []
    for stage, result in zip(roles, built):
        expected = stage.params(arch, p.tp)
        n, padded = result["params"]["total"], result["padded_numel"]
        rows.append(
            {
                "role": stage.role,
                **result,
                "expected": expected,
                "expected_layers": stage.layers,
                "matches": result["params"] == expected
                and result["layers"] == stage.layers
                and result["weight_bytes"] == weight_bytes * expected["total"],
                "grad_bytes": memory.FP32 * n,
                "optimizer_bytes": memory.ADAM_BYTES * n / sharding,
                "padded_grad_bytes": memory.FP32 * padded,
                "padded_optimizer_bytes": memory.ADAM_BYTES * padded / sharding,
            }
        )
    return rows


def format_rehearsal(cfg: Config, rows: list[dict]) -> str:
    p = cfg.parallel
    dp = p.world_size // (p.tp * p.pp * p.cp)
    gib = memory.GIB
    lines = [
        f"{Path(cfg.model.path).name}: TP{p.tp} PP{p.pp} VPP{p.vpp} CP{p.cp} DP{dp} on {p.world_size} ranks "
        "(built on the meta device, local spec; per rank)",
        f"  {'role':<7}{'rank':>5}{'layers':>8}{'params':>15}{'replicated':>13}{'vision':>12}{'embed+out':>12}"
        f"{'bf16 GiB':>10}{'grad GiB':>10}{'Adam GiB':>10}{'padding':>9}  {'layer numbers':<16}memory.py",
    ]
    for r in rows:
        q = r["params"]
        padding = r["padded_numel"] - q["total"]
        numbers = ",".join(f"{a}-{b}" for a, b in filter(None, r["layer_numbers"]))
        lines.append(
            f"  {r['role']:<7}{r['rank']:>5}{r['layers']:>8}{q['total']:>15,}{q['replicated']:>13,}"
            f"{q['vision']:>12,}{q['embedding'] + q['output']:>12,}{r['weight_bytes'] / gib:>10.2f}"
            f"{r['grad_bytes'] / gib:>10.2f}{r['optimizer_bytes'] / gib:>10.2f}{padding:>9,}  {numbers:<16}"
            + (
                "equal"
                if r["matches"]
                else f"DIFFERS: {r['expected']['total']:,} params, {r['expected_layers']} layers"
            )
        )
    lines.append(
        "  params = bf16 weights x 2 B, fp32 main grads x 4 B, Adam (fp32 master, m, v) x 12 B / (DP x CP); "
        "padding = extra elements of megatron's distributed-optimizer buffers (also in grads and Adam)"
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ activations


class _SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """The local spec's norm (megatron-core's WrappedTorchNorm builds torch.nn.RMSNorm) without its refusal of
    sequence parallelism, which is about the weight's gradient all-reduce, not about what autograd saves."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__(hidden_size, eps=eps)


def _count_saved(forward, excluded: set[int]) -> dict[int, tuple[int, tuple[int, ...], str]]:
    """Runs `forward()` and returns every storage autograd saved for backward: data_ptr -> (bytes, shape, dtype)."""
    saved: dict[int, tuple[int, tuple[int, ...], str]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved.setdefault(storage.data_ptr(), (storage.nbytes(), tuple(tensor.shape), str(tensor.dtype)))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return saved


def _measure_case(cfg: Config, seq: int, micro_batch: int, recompute: str, sequence_parallel: bool) -> dict:
    """One layer at one TP rank's widths, forward + backward; megatron's groups are already initialised."""
    from megatron.core.transformer.module import Float16Module

    from vppo_megatron.actor.model import VLModel, layer_spec, transformer_config

    tp = cfg.parallel.tp
    local = _local(cfg, sequence_parallel=sequence_parallel, pp=1, vpp=1, cp=1)
    local = dataclasses.replace(local, model=dataclasses.replace(local.model, recompute=recompute))
    hf = published_hf_config(cfg, num_layers=1)
    config = transformer_config(hf, local, ParallelLayout(tp=tp))
    spec = layer_spec(local, config, families.get(hf.model_type))
    if sequence_parallel:
        spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = _SequenceParallelRMSNorm
    model = VLModel(hf, config, spec, pre_process=False, post_process=False)
    model = Float16Module(config, model) if config.bf16 else model
    with torch.no_grad():  # perform_initialization=False leaves torch.empty memory: give it sane values
        for name, param in model.named_parameters():
            param.fill_(1.0) if "norm" in name else param.normal_(0.0, 0.02)
    h = hf.text_config.hidden_size
    tokens_local = seq // tp if sequence_parallel else seq
    x = torch.randn(tokens_local, micro_batch, h, dtype=config.params_dtype, requires_grad=True)
    position_ids = torch.arange(seq).expand(3, micro_batch, seq)
    model.set_input_tensor(x)
    outputs = []
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    start = time.perf_counter()
    saved = _count_saved(lambda: outputs.append(model(None, position_ids, None)), params)
    forward_s = time.perf_counter() - start
    outputs[0].float().sum().backward()
    backward_s = time.perf_counter() - start - forward_s
    scores = sum(size for size, shape, _ in saved.values() if shape[-2:] == (seq, seq))
    total = sum(size for size, _, _ in saved.values())
    return {
        "recompute": recompute,
        "sequence_parallel": sequence_parallel,
        "seq": seq,
        "micro_batch": micro_batch,
        "saved_bytes": total - scores,
        "scores_bytes": scores,
        "tensors": sorted(saved.values(), reverse=True),
        "forward_s": forward_s,
        "backward_s": backward_s,
    }


def _measure_all(cfg: Config, seq: int, micro_batch: int, cases: list[tuple[str, bool]]) -> list[dict]:
    tp = cfg.parallel.tp
    _init_fake(0, tp, tp, 1, 1, 1)
    torch.manual_seed(0)
    return [_measure_case(cfg, seq, micro_batch, recompute, sp) for recompute, sp in cases]


def measure_activations(
    cfg: Config, seq: int | None = None, micro_batch: int | None = None, cases: list[tuple[str, bool]] | None = None
) -> list[dict]:
    """Measured bytes saved for backward by one layer of `cfg`'s model on one TP rank (a fresh process), per
    (recompute, sequence_parallel) case, beside memory.layer_activation_bytes for the local spec (what ran) and
    for Transformer Engine (what the dry run assumes on GPU). Defaults: the target sequence per CP rank and
    micro-batch; the configured recompute and SP, plus no recompute without SP."""
    seq = seq or (cfg.data.max_prompt_length + cfg.rollout.max_response_length) // cfg.parallel.cp
    micro_batch = micro_batch or memory.rollouts_per_micro_batch(cfg)
    if cfg.parallel.sequence_parallel and seq % cfg.parallel.tp:
        raise ValueError(f"sequence length {seq} must be a multiple of parallel.tp={cfg.parallel.tp} with SP")
    cases = cases or list(dict.fromkeys([("none", False), (cfg.model.recompute, cfg.parallel.sequence_parallel)]))
    with _pool(1) as pool:
        results = pool.submit(_measure_all, cfg, seq, micro_batch, cases).result()
    arch = memory.arch_from_hf(published_hf_config(cfg).to_dict())
    dtype_bytes = 2 if cfg.model.dtype == "bfloat16" else 4
    for r in results:
        args = (arch, seq, micro_batch, cfg.parallel.tp, r["sequence_parallel"], r["recompute"])
        local = memory.layer_activation_bytes(*args, "local", dtype_bytes)
        shared = memory.shared_rope_bytes(arch, seq, micro_batch) if r["recompute"] == "full" else 0
        r["estimate_bytes"] = sum(v for k, v in local.items() if k != "scores") + shared
        r["estimate_scores_bytes"] = local.get("scores", 0)
        te = memory.layer_activation_bytes(*args, dtype_bytes=dtype_bytes)
        r["transformer_engine_bytes"] = sum(te.values()) + shared
    return results


def format_activations(cfg: Config, results: list[dict]) -> str:
    p, mib = cfg.parallel, 2**20
    r0 = results[0]
    lines = [
        f"one layer of {Path(cfg.model.path).name} on a TP{p.tp} rank, s={r0['seq']} b={r0['micro_batch']}, "
        f"{cfg.model.dtype}, local spec on CPU, forward + backward (MiB saved for backward):",
        f"  {'recompute':<10}{'SP':<4}{'measured':>10}{'memory.py':>11}{'ratio':>7}{'s x s':>9}{'(memory.py)':>12}"
        f"{'TE on GPU':>11}{'fwd s':>7}{'bwd s':>7}",
    ]
    for r in results:
        ratio = r["saved_bytes"] / r["estimate_bytes"]
        lines.append(
            f"  {r['recompute']:<10}{'yes' if r['sequence_parallel'] else 'no':<4}{r['saved_bytes'] / mib:>10.1f}"
            f"{r['estimate_bytes'] / mib:>11.1f}{ratio:>7.3f}{r['scores_bytes'] / mib:>9.1f}"
            f"{r['estimate_scores_bytes'] / mib:>12.1f}{r['transformer_engine_bytes'] / mib:>11.1f}"
            f"{r['forward_s']:>7.1f}{r['backward_s']:>7.1f}"
        )
    lines.append(
        "  measured: unique storages saved for backward, parameters and the s x s scores/softmax/mask excluded "
        "(s x s listed apart; flash attention on GPU holds none); memory.py: layer_activation_bytes(local) "
        "(+ the shared fp32 M-RoPE frequencies under full recompute); TE on GPU: the dry run's figure, same rules"
    )
    return "\n".join(lines)
