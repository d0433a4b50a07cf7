"""Megatron distributed checkpoints (torch_dist) of the actor: layout-independent, written atomically.

A checkpoint directory holds megatron-core's sharded tensors (each with its global shape and offset, so any TP/PP
layout can load it), `vppo_checkpoint.json` (format, model family, the layout it was written at, whether
optimizer state is included) and `hf/` (the HF config, tokenizer and processor files, so an export needs nothing
else). Everything is written into a hidden temporary directory that is renamed into place after the metadata,
the last file, is complete: an interrupted save never leaves a directory that loads.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from vppo_megatron import faults
from vppo_megatron.actor import integrity

FORMAT = "vppo-megatron/v1"
METADATA = "vppo_checkpoint.json"
HF_FILES = "hf"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".index.json")


def read_metadata(ckpt_dir: str | Path, family: str | None = None) -> dict:
    """The checkpoint's metadata; a clear error for a directory that is not a complete checkpoint of ours, or
    (with `family`) one of another model family."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} does not exist")
    path = ckpt_dir / METADATA
    if not path.exists():
        raise ValueError(
            f"{ckpt_dir} is not a complete vppo-megatron checkpoint ({METADATA} missing): an "
            "interrupted save, or a directory of another format"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{ckpt_dir}: checkpoint format {meta.get('format')!r}, this code reads {FORMAT!r}")
    if not (ckpt_dir / "metadata.json").exists() or not (ckpt_dir / HF_FILES / "config.json").exists():
        raise ValueError(f"{ckpt_dir} is incomplete: megatron metadata.json or {HF_FILES}/config.json missing")
    if family is not None and meta.get("family") != family:
        raise ValueError(
            f"{ckpt_dir} holds a {meta.get('family')} checkpoint but the model is {family}: "
            "wrong checkpoint (or set model.family and model.path to that family)"
        )
    return meta


def copy_hf_files(hf_dir: str | Path, out_dir: str | Path) -> None:
    """Config, tokenizer, processor and chat-template files of an HF model directory (no weights)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in Path(hf_dir).iterdir():
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(path, out_dir / path.name)


def check_output_dir(out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output path {out_dir} is a file, not a directory; choose a new directory path")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"output directory {out_dir} is not empty; choose a new path or remove it")


def atomic_directory(out_dir: str | Path) -> Path:
    """A hidden temporary directory next to `out_dir`, the same on every rank (collective)."""
    out_dir = Path(out_dir)
    # the writer's pid in the name: a later run removes the directories of writers that are gone
    name = [f".{out_dir.name}.tmp-p{os.getpid()}-{uuid.uuid4().hex[:8]}" if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(name, src=0)
    tmp = out_dir.parent / name[0]
    if dist.get_rank() == 0:
        tmp.mkdir(parents=True)
    dist.barrier()
    return tmp


def publish(tmp: Path, out_dir: str | Path) -> None:
    """Renames the finished temporary directory to `out_dir` (rank 0, after every rank is done)."""
    dist.barrier()
    if dist.get_rank() == 0:
        out_dir = Path(out_dir)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked before writing)
        os.replace(tmp, out_dir)
    dist.barrier()


# The local spec keeps the two RMSNorms as modules; Transformer Engine fuses them into the next linear layer.
# Checkpoints always use TE's names, so a checkpoint converted on a CPU host trains on a GPU cluster and back.
_NORM_KEYS = [
    (".input_layernorm.weight", ".self_attention.linear_qkv.layer_norm_weight"),
    (".pre_mlp_layernorm.weight", ".mlp.linear_fc1.layer_norm_weight"),
]


def canonical_sharded_state_dict(model) -> dict:
    """The model's sharded state dict with spec-independent (Transformer Engine) tensor keys."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    state = model.sharded_state_dict()
    for value in state.values():
        if isinstance(value, ShardedBase):
            for local, te in _NORM_KEYS:
                if value.key.endswith(local):
                    value.key = value.key[: -len(local)] + te
    return state


def _state_names(model_chunks) -> list[str]:
    """megatron-core's names for the chunks' states: "model", or "model0", "model1", ... with virtual stages."""
    return ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]


def model_state(model_chunks) -> dict:
    """Every model chunk's sharded state. The names are only a container: tensors are matched by their global
    keys (layer offsets included), so a checkpoint written at any TP/PP/VPP split loads at any other."""
    return {name: canonical_sharded_state_dict(c) for name, c in zip(_state_names(model_chunks), model_chunks)}


def _loaded_in_place(value, target) -> bool:
    """True when a loaded value already is `target`'s memory: the distributed load reads into the tensors of the
    sharded state it is given (the parameters), so these need no copy. A list: a factory's parts left unmerged,
    views that tile `target` (SwiGLU fc1's two halves)."""
    if not isinstance(target, torch.Tensor):
        return False
    if isinstance(value, torch.Tensor):
        return (
            value.data_ptr() == target.data_ptr()
            and value.shape == target.shape
            and value.stride() == target.stride()
            and value.dtype == target.dtype
        )
    parts = value if isinstance(value, (list, tuple)) else []
    base = target.untyped_storage().data_ptr()
    return (
        bool(parts)
        and all(isinstance(p, torch.Tensor) and p.untyped_storage().data_ptr() == base for p in parts)
        and sum(p.numel() for p in parts) == target.numel()
        and len({p.data_ptr() for p in parts}) == len(parts)
    )


def load_model_state(model_chunks, loaded: dict, ckpt_dir) -> None:
    """Copies the loaded `model_state` into the chunks (skipping what was loaded in place); raises on any
    parameter the checkpoint lacks."""
    problems = {"missing": [], "unexpected": []}
    for name, chunk in zip(_state_names(model_chunks), model_chunks):
        own = chunk.state_dict(keep_vars=True)
        state = loaded[name]
        copies = {k: v for k, v in state.items() if not _loaded_in_place(v, own.get(k))}
        chunk.load_state_dict(copies, strict=False)
        problems["missing"] += [k for k in own if k not in state and not k.endswith("_extra_state")]
        problems["unexpected"] += [k for k in state if k not in own]
    if problems["missing"] or problems["unexpected"]:
        raise KeyError(
            f"{ckpt_dir}: checkpoint does not fit the model: missing {problems['missing'][:10]}, "
            f"unexpected {problems['unexpected'][:10]}"
        )


def layout_metadata(layout) -> dict:
    """How the layers were split when a checkpoint was written: any split loads the weights; a dp_reshardable
    optimizer state loads only at the same model-parallel split (`check_optimizer_layout`)."""
    return {
        "tp": layout.tp,
        "pp": layout.pp,
        "cp": layout.cp,
        "dp": layout.dp,
        "vpp": layout.vpp,
        "first_stage_layers": layout.first_stage_layers,
        "last_stage_layers": layout.last_stage_layers,
    }


def _in_process_write_results() -> None:
    """megatron-core collects its shard writers' results in a multiprocessing Manager queue: a spawned server
    process that imports the trainer's main module again (~550 MB, seconds to start) and outlives a trainer that is
    killed. These saves are synchronous (the writer threads run in this process), so an in-process queue does the
    same job; megatron-core creates its queue only when none exists yet."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def save(model_chunks, out_dir: str | Path, hf_dir: str | Path, metadata: dict, extra_state: dict | None = None):
    """Writes the model's sharded state (plus `extra_state`, e.g. optimizer) to `out_dir` atomically."""
    from megatron.core import dist_checkpointing

    check_output_dir(out_dir)
    tmp = atomic_directory(out_dir)
    state = model_state(model_chunks)
    state.update(extra_state or {})
    _in_process_write_results()
    dist_checkpointing.save(state, str(tmp))
    faults.at("checkpoint_write")
    if dist.get_rank() == 0:
        copy_hf_files(hf_dir, tmp / HF_FILES)
        (tmp / METADATA).write_text(json.dumps({"format": FORMAT, **metadata}, indent=2) + "\n")
    publish(tmp, out_dir)


def load(model_chunks, ckpt_dir: str | Path) -> dict:
    """Loads the model weights (at this rank's layout; optimizer state, if any, is left alone)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory, apply_factories

    meta = read_metadata(ckpt_dir, model_chunks[0].family.model_type)
    state = model_state(model_chunks)
    factories = {(n, k): v for n, s in state.items() for k, v in s.items() if isinstance(v, ShardedTensorFactory)}
    # built here, so the load reads each part into its view of the parameter and megatron-core does not merge
    # them into a new tensor to be copied back (SwiGLU fc1: a full copy of every MLP's largest weight, twice)
    apply_factories(state)
    loaded = dist_checkpointing.load(state, str(ckpt_dir))
    for (name, key), factory in factories.items():
        parts = loaded[name][key]
        if not _loaded_in_place(parts, factory.data):  # a build that copies: merged as megatron-core would
            loaded[name][key] = factory.merge_fn(parts)
    load_model_state(model_chunks, loaded, ckpt_dir)
    return meta


def write_hf_shards(tensors, out_dir: Path, stage: int, max_bytes: int) -> dict[str, str]:
    """Writes (HF name, tensor) pairs into safetensors files of at most `max_bytes`; returns name -> file."""
    from safetensors.torch import save_file

    weight_map, pending, size, part = {}, {}, 0, 0

    def flush():
        nonlocal pending, size, part
        if pending:
            file_name = f"model-stage{stage:03d}-{part:05d}.safetensors"
            save_file(pending, str(out_dir / file_name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(pending, file_name))
            pending, size, part = {}, 0, part + 1

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if pending and size + nbytes > max_bytes:
            flush()
        pending[name] = tensor.contiguous()
        size += nbytes
    flush()
    return weight_map


def export_hf(
    actor, out_dir: str | Path, hf_files: str | Path, max_shard_bytes: int = 4 * 2**30, progress: bool = False
) -> int:
    """The actor's weights as an HF model directory (safetensors + index + config/tokenizer/processor files),
    written atomically; collective over all ranks. Each pipeline stage's writer (TP = CP = DP rank 0) writes its
    own shards, one TP-gathered tensor at a time. Returns the bytes written (on rank 0)."""
    from tqdm import tqdm

    check_output_dir(out_dir)
    tmp = atomic_directory(out_dir)
    g = actor.groups
    tensors = actor.hf_tensors()  # a TP collective: every rank walks it
    weight_map = {}
    if g.tp_rank == 0 and g.dp_rank == 0 and g.cp_rank == 0:
        tensors = tqdm(tensors, desc=f"stage {g.pp_rank} export", disable=not progress or dist.get_rank() != 0)
        weight_map = write_hf_shards(tensors, tmp, g.pp_rank, max_shard_bytes)
    else:
        for _ in tensors:
            pass
    maps = [None] * dist.get_world_size()
    dist.all_gather_object(maps, weight_map)
    total = 0
    if dist.get_rank() == 0:
        merged = {k: v for m in maps for k, v in m.items()}
        total = sum((tmp / f).stat().st_size for f in set(merged.values()))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(merged.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        copy_hf_files(hf_files, tmp)
    publish(tmp, out_dir)
    return total


TRAINER_STATE = "trainer_state.json"
STEP_PREFIX = "step_"

# How the optimizer state is sharded in a checkpoint (recorded in its metadata, read back at load):
# - model_space: the plain (not distributed) optimizer, one state tensor per parameter like the weights: any layout.
# - dp_reshardable: megatron-core's distributed optimizer format: each rank writes its own slice of the flat
#   gradient buckets, no gather. The buckets follow the model-parallel split, so it loads at any DP size but only
#   at the TP / PP / CP / VPP split (and stage sizes) it was written at. (megatron-core 0.19's default for the
#   distributed optimizer, fully_sharded_model_space, is deprecated and refused by its own validation.)
# - unstepped: the plain optimizer before its first step holds no state; it is saved as nothing and resumes as a
#   fresh optimizer, which is exactly what it was.
MODEL_SPACE, DP_RESHARDABLE, UNSTEPPED = "model_space", "dp_reshardable", "unstepped"
# the layout fields a dp_reshardable optimizer state must be loaded at (DP is free)
MODEL_PARALLEL_FIELDS = ("tp", "pp", "cp", "vpp", "first_stage_layers", "last_stage_layers")


def optimizer_sharding(actor) -> str:
    return DP_RESHARDABLE if actor.cfg.optimizer.distributed_optimizer else MODEL_SPACE


def _unstepped(optimizer) -> bool:
    return not any(getattr(c, "optimizer", c).state for c in getattr(optimizer, "chained_optimizers", [optimizer]))


def optimizer_sharded_state(actor, models: dict, sharding: str, is_loading: bool = False) -> dict:
    """The optimizer's sharded state in `sharding`'s format (see MODEL_SPACE, DP_RESHARDABLE)."""
    materialize_adam_state(actor.optimizer)
    metadata = {"distrib_optim_sharding_type": DP_RESHARDABLE} if sharding == DP_RESHARDABLE else None
    return actor.optimizer.sharded_state_dict(models, is_loading=is_loading, metadata=metadata)


def materialize_adam_state(optimizer) -> None:
    """Gives a torch Adam that has not stepped yet its initial state (step 0, zero moments), exactly what its
    first step would create. megatron-core's distributed optimizer reads the step count from that state to save
    or load, and fails on an empty one where the optimizer is torch's (no Apex / Transformer Engine: CPU hosts):
    a checkpoint before the first optimizer step (every group filtered by dynamic sampling) or a resume into a
    fresh process. Fused GPU optimizers keep their own state, and the plain optimizer saves an empty state as it
    is: both are left alone."""
    import torch
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(chained, "optimizer", None)
        torch_adam = isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))
        if not isinstance(chained, DistributedOptimizer) or not torch_adam or inner.state:
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                inner.state[param] = {
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                }


def restore_adam_steps(optimizer) -> None:
    """Gives each parameter's torch Adam state its own step counter, at the saved count. Where the optimizer is
    torch's (no Apex / Transformer Engine: CPU hosts), megatron-core's distributed optimizer loads ONE step tensor
    shared by every parameter (torch increments each parameter's counter in place: one more step would add the
    number of parameters to it) and then overwrites it with the loading side's own counter. The saved count is in
    the loaded param groups' "step"."""
    import torch

    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(chained, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state.get(param, {})
                if isinstance(state.get("step"), torch.Tensor):
                    saved = group.get("step")
                    state["step"] = torch.tensor(float(saved)) if saved is not None else state["step"].clone()


def check_optimizer_layout(meta: dict, layout, ckpt_dir) -> None:
    """A dp_reshardable optimizer state loads at the model-parallel split it was written at; else a clear error."""
    if meta.get("optimizer_sharding", MODEL_SPACE) != DP_RESHARDABLE:
        return
    written = {"cp": 1, **meta["written_at"]}  # cp is recorded since dp_reshardable exists; before it, 1
    now = layout_metadata(layout)
    differ = [f"{k} {written[k]} -> {now[k]}" for k in MODEL_PARALLEL_FIELDS if written[k] != now[k]]
    if differ:
        raise ValueError(
            f"{ckpt_dir}: its distributed-optimizer state (dp_reshardable) loads at any DP size but only at the "
            f"model-parallel split it was written at ({', '.join(differ)}): resume at that split, or set "
            "checkpoint.load_optimizer=false to resume the weights with fresh optimizer state"
        )


def save_training(actor, out_dir: str | Path, hf_dir: str | Path, trainer_state: dict) -> None:
    """A resumable checkpoint: model + optimizer (sharded), trainer state (step, data position, versions, RNG),
    written atomically like every checkpoint (collective)."""
    import torch

    if dist.get_rank() == 0:
        integrity.remove_stale_temporaries(out_dir, any_name=True)  # saves of killed runs
    check_output_dir(out_dir)
    tmp = atomic_directory(out_dir)
    models = model_state(actor.chunks)
    sharding = optimizer_sharding(actor)
    if sharding == MODEL_SPACE and _unstepped(actor.optimizer):
        sharding = UNSTEPPED
    state = dict(models)
    if sharding != UNSTEPPED:
        state["optimizer"] = optimizer_sharded_state(actor, models, sharding)
    from megatron.core import dist_checkpointing

    _in_process_write_results()
    dist_checkpointing.save(state, str(tmp))
    faults.at("checkpoint_write")
    if dist.get_rank() == 0:
        copy_hf_files(hf_dir, tmp / HF_FILES)
        full_state = dict(trainer_state, updates=actor.updates, torch_rng=torch.get_rng_state().tolist())
        (tmp / TRAINER_STATE).write_text(json.dumps(full_state) + "\n")
        meta = {
            "format": FORMAT,
            "family": actor.hf_config.model_type,
            "written_at": layout_metadata(actor.groups.layout),
            "dtype": actor.cfg.model.dtype,
            "optimizer": True,
            "optimizer_sharding": sharding,
            "step": trainer_state["step"],
        }
        (tmp / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    integrity.write_manifest(tmp)  # every file's size and CRC32, checked before a resume loads them
    publish(tmp, out_dir)


def load_training(actor, ckpt_dir: str | Path, optimizer: bool = True) -> dict:
    """Restores model, optimizer (unless `optimizer=False`: weights only, fresh Adam moments) and RNG from a
    resumable checkpoint; returns the trainer state."""
    import torch
    from megatron.core import dist_checkpointing

    meta = read_metadata(ckpt_dir, actor.hf_config.model_type)
    models = model_state(actor.chunks)
    state = dict(models)
    sharding = meta.get("optimizer_sharding", MODEL_SPACE)
    fresh = sharding == UNSTEPPED  # a fresh optimizer is exactly the saved one
    if optimizer and not fresh:
        if sharding != optimizer_sharding(actor):
            raise ValueError(
                f"{ckpt_dir}: its optimizer state is {sharding} but this run's optimizer.distributed_optimizer="
                f"{str(actor.cfg.optimizer.distributed_optimizer).lower()} needs {optimizer_sharding(actor)}: "
                "set optimizer.distributed_optimizer as it was when saved, or checkpoint.load_optimizer=false"
            )
        check_optimizer_layout(meta, actor.groups.layout, ckpt_dir)
        state["optimizer"] = optimizer_sharded_state(actor, models, sharding, is_loading=True)
    loaded = dist_checkpointing.load(state, str(ckpt_dir))
    load_model_state(actor.chunks, loaded, ckpt_dir)
    if optimizer and not fresh:
        with torch.no_grad():  # the distributed optimizer's fp32 main params are views of the trained weights
            actor.optimizer.load_state_dict(loaded["optimizer"])
        restore_adam_steps(actor.optimizer)
    else:  # mixed precision keeps fp32 main copies of the weights: refresh them from the loaded ones
        actor.optimizer.reload_model_params()
    trainer_state = json.loads((Path(ckpt_dir) / TRAINER_STATE).read_text())
    actor.updates = trainer_state["updates"]
    torch.set_rng_state(torch.tensor(trainer_state["torch_rng"], dtype=torch.uint8))
    return trainer_state


def complete(checkpoint_root: str | Path) -> list[Path]:
    """The complete checkpoints under `checkpoint_root`, newest first (temporary or incomplete ones are ignored)."""
    root = Path(checkpoint_root)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.name.startswith(STEP_PREFIX)
        and p.name[len(STEP_PREFIX) :].isdigit()
        and (p / METADATA).exists()
        and (p / TRAINER_STATE).exists()
    ]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX) :]), reverse=True)


def latest(checkpoint_root: str | Path) -> Path | None:
    """The newest complete checkpoint under `checkpoint_root`."""
    return next(iter(complete(checkpoint_root)), None)


def prune(checkpoint_root: str | Path, keep_last: int) -> None:
    """Deletes all but the newest `keep_last` complete checkpoints (rank 0)."""
    root = Path(checkpoint_root)
    for old in complete(root)[max(keep_last, 1) :]:  # never the one just written
        shutil.rmtree(old)
