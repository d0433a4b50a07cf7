"""Moving weights between HF checkpoints and the (TP/PP-sharded) Megatron actor, through convert/'s one mapping.

Local parameter names use stage-local layer indices; `global_names` translates them to the global indices the
mapping tables use (from each layer's 1-based `layer_number`). Loading reads one HF tensor at a time from the
safetensors files, so host memory is bounded by the largest tensor, not the model.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open

from vppo_megatron import families
from vppo_megatron.convert import mapping

_LAYER = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.")


def attention_dims(hf_config) -> mapping.AttentionDims:
    text = hf_config.text_config
    return mapping.AttentionDims(text.num_attention_heads, text.num_key_value_heads, families.Family.head_dim(text))


def family_rules(hf_config, spec: str) -> list[mapping.ExpandedRule]:
    """The expanded rules of the checkpoint's family (its model_type) for a layer spec."""
    family = families.get(hf_config.model_type)
    with torch.device("meta"):
        vision_names = list(family.vision_tower()._from_config(hf_config.vision_config).state_dict())
    rules = family.rules(spec, vision_names, tied_embeddings(hf_config))
    return mapping.expand_rules(rules, hf_config.text_config.num_hidden_layers)


def tied_embeddings(hf_config) -> bool:
    """Whether the output layer reuses the embedding (the top-level flag; Qwen3-VL also sets it on text_config)."""
    return bool(getattr(hf_config, "tie_word_embeddings", False))


def global_names(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Global-layer-indexed name -> parameter of this stage's (unwrapped) model."""
    offsets = {}
    if getattr(model.language_model, "decoder", None) is not None:
        offsets = {i: layer.layer_number - 1 for i, layer in enumerate(model.language_model.decoder.layers)}
    out = {}
    for name, param in model.named_parameters():
        match = _LAYER.match(name)
        if match:
            name = f"language_model.decoder.layers.{offsets[int(match.group(1))]}." + name[match.end() :]
        out[name] = param
    return out


TIED_HEAD = "language_model.output_layer.weight"
EMBEDDING = "language_model.embedding.word_embeddings.weight"


def stage_rules(rules, params: dict) -> tuple[dict[str, mapping.ExpandedRule], set[str]]:
    """(Megatron name -> rule for this stage's parameters, the names that are copies HF does not hold). With tied
    embeddings and pipeline stages, megatron-core keeps a copy of the embedding as the last stage's output layer
    (kept equal by the all-reduce of both gradients over the embedding group): it loads from the embedding's HF
    tensor and is never exported (the first stage exports the embedding)."""
    by_name = {r.megatron: r for r in rules}
    copies = set()
    if TIED_HEAD in params and TIED_HEAD not in by_name and EMBEDDING in by_name:
        by_name[TIED_HEAD] = dataclasses.replace(by_name[EMBEDDING], megatron=TIED_HEAD)
        copies.add(TIED_HEAD)
    return by_name, copies


class SafetensorsReader:
    """Lazy access to the tensors of an HF checkpoint directory (single file or sharded with an index)."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (model_dir / "model.safetensors").exists():
            with safe_open(model_dir / "model.safetensors", "pt") as f:
                weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise FileNotFoundError(f"{model_dir} has no model.safetensors or model.safetensors.index.json")
        self.model_dir, self.weight_map = model_dir, weight_map
        self._files: dict[str, object] = {}  # file name -> open safe_open handle (each file's header read once)

    def keys(self) -> set[str]:
        return set(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        file = self.weight_map[name]
        if file not in self._files:
            self._files[file] = safe_open(self.model_dir / file, "pt")
        return self._files[file].get_tensor(name)


def load_hf_weights(
    model: torch.nn.Module, reader: SafetensorsReader, rules, dims, tp_rank: int, tp_size: int, progress: bool = False
):
    """Copies this stage's TP shard of every mapped tensor into `model`; raises on any gap in either direction."""
    from tqdm import tqdm

    params = global_names(model)
    needed_hf = {name for r in rules for name in r.hf}
    problems = [f"checkpoint lacks {name}" for name in sorted(needed_hf - reader.keys())]
    problems += [f"no rule maps checkpoint tensor {name}" for name in sorted(reader.keys() - needed_hf)]
    by_name, _ = stage_rules(rules, params)
    problems += [f"no rule maps model parameter {name}" for name in sorted(set(params) - set(by_name))]
    if problems:
        raise KeyError(
            f"{reader.model_dir} does not match the {model.family.display} mapping: "
            + "; ".join(problems[:10])
            + (f" ... ({len(problems)} problems)" if len(problems) > 10 else "")
        )
    with torch.no_grad():
        for name, param in tqdm(params.items(), desc="loading HF weights", disable=not progress):
            rule = by_name[name]
            hf_tensors = [reader.get(h) for h in rule.hf]
            mapping.load_shard(dataclasses.replace(rule.rule, megatron=name), hf_tensors, dims, param, tp_rank, tp_size)


def stage_hf_tensors(model: torch.nn.Module, rules, dims, tp_group) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for every parameter of this pipeline stage, gathered over TP (a collective: every
    TP rank of the stage must iterate it to the end)."""
    params = global_names(model)
    by_name, copies = stage_rules(rules, params)
    tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
    for name, param in params.items():
        if name in copies:
            continue
        rule = by_name[name]
        local = param.detach()
        if rule.rule.tp_dim is not None and tp_size > 1:
            shards = [torch.empty_like(local) for _ in range(tp_size)]
            dist.all_gather(shards, local.contiguous(), group=tp_group)
            full = mapping.unshard(rule.rule, shards)
        else:
            full = local
        yield from zip(rule.hf, mapping.split(rule.rule, full, dims))
