"""The parallel layout of the Megatron actor: one object owns every axis and hands out explicit process groups.

Rank order (megatron-core's default "tp-cp-ep-dp-pp"): TP varies fastest, then CP, then DP, then PP. So TP
groups are consecutive ranks (inside a node), and the last pipeline stage holds the highest ranks.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from vppo_megatron.config import ConfigError, ParallelConfig
from vppo_megatron.processes import HOST_AND_DEVICE_BACKEND


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    vpp: int = 1
    first_stage_layers: int = 0
    """Language-model layers on the first pipeline stage (all its virtual stages together); 0 = even split."""
    last_stage_layers: int = 0
    """Language-model layers on the last pipeline stage (all its virtual stages together); 0 = even split."""

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> ParallelLayout:
        model_parallel = cfg.tp * cfg.pp * cfg.cp
        if world_size % model_parallel:
            raise ConfigError(f"parallel: tp*pp*cp = {model_parallel} does not divide the world size {world_size}")
        dp = cfg.dp or world_size // model_parallel
        layout = cls(cfg.tp, cfg.pp, cfg.cp, dp, cfg.vpp, cfg.first_stage_layers, cfg.last_stage_layers)
        layout.validate(world_size)
        return layout

    def validate(
        self,
        world_size: int,
        num_layers: int | None = None,
        num_heads: int | None = None,
        num_kv_heads: int | None = None,
        vocab_size: int | None = None,
        deepstack_layers: int = 0,
    ) -> None:
        """Raises ConfigError naming the axis when the layout cannot run this model on `world_size` ranks.
        `deepstack_layers`: how many of the first LLM layers receive DeepStack features (Qwen3-VL), which exist
        only where the vision tower runs, so they must sit in the first pipeline stage's first model chunk."""
        if self.world_size != world_size:
            raise ConfigError(
                f"parallel: tp*pp*cp*dp = {self.tp}*{self.pp}*{self.cp}*{self.dp} = {self.world_size} "
                f"but {world_size} ranks were launched"
            )
        if self.vpp > 1 and self.pp == 1:
            raise ConfigError(f"parallel.vpp={self.vpp}: virtual stages need parallel.pp > 1")
        for name, value in [
            ("num_attention_heads", num_heads),
            ("num_key_value_heads", num_kv_heads),
            ("vocab_size", vocab_size),
        ]:
            if value is not None and value % self.tp:
                raise ConfigError(
                    f"parallel.tp = {self.tp} does not divide the model's {name} = {value}; choose a divisor of {value}"
                )
        self._validate_stage_layers(num_layers)
        if deepstack_layers and num_layers is not None and self.first_chunk_layers(num_layers) < deepstack_layers:
            raise ConfigError(
                f"the model adds DeepStack vision features to its first {deepstack_layers} LLM layers, but the first "
                f"pipeline stage's first model chunk holds {self.first_chunk_layers(num_layers)}: the features exist "
                "only where the vision tower runs; give the first stage more layers (parallel.first_stage_layers), "
                "or lower parallel.pp / parallel.vpp"
            )

    def first_chunk_layers(self, num_layers: int) -> int:
        """Language-model layers of the first pipeline stage's first (virtual) chunk, the one with the vision tower."""
        if self.first_stage_layers:
            return self.first_stage_layers // self.vpp
        if self.last_stage_layers:  # the rest spread evenly over the other pp - 1 stages
            return (num_layers - self.last_stage_layers) // ((self.pp - 1) * self.vpp)
        return num_layers // (self.pp * self.vpp)

    def _validate_stage_layers(self, num_layers: int | None) -> None:
        """The pipeline split of the language-model layers: even over pp * vpp chunks, or the given first/last
        stage counts with the rest even over the other stages (megatron-core's uneven split)."""
        first, last = self.first_stage_layers, self.last_stage_layers
        for name, value in [("first_stage_layers", first), ("last_stage_layers", last)]:
            if value < 0:
                raise ConfigError(f"parallel.{name}={value}: must be >= 0 (0 = an even split)")
            if value and self.pp == 1:
                raise ConfigError(f"parallel.{name}={value}: an uneven pipeline split needs parallel.pp > 1")
            if value % self.vpp:
                raise ConfigError(
                    f"parallel.{name}={value}: must be a multiple of parallel.vpp={self.vpp} "
                    "(each virtual stage of the rank holds an equal share)"
                )
        if first and last and self.pp == 2 and self.vpp > 1:
            # megatron-core's interleaved uneven split divides by the number of middle stages (0 here)
            raise ConfigError(
                f"parallel.first_stage_layers={first} with parallel.last_stage_layers={last} at pp=2 x vpp="
                f"{self.vpp}: with no middle stage the two determine each other, and megatron-core's interleaved "
                "split cannot take both; set only parallel.first_stage_layers (the last stage takes the rest)"
            )
        if num_layers is None:
            return
        if not first and not last:
            if num_layers % (self.pp * self.vpp):
                raise ConfigError(
                    f"parallel.pp * parallel.vpp = {self.pp * self.vpp} does not divide the model's "
                    f"num_hidden_layers = {num_layers}; choose a divisor of {num_layers}, or an uneven split "
                    "(parallel.first_stage_layers / parallel.last_stage_layers)"
                )
            return
        given = " + ".join(
            f"parallel.{n}={v}" for n, v in [("first_stage_layers", first), ("last_stage_layers", last)] if v
        )
        other_stages = self.pp - bool(first) - bool(last)
        rest = num_layers - first - last
        if other_stages == 0 and rest:
            raise ConfigError(
                f"{given} must sum to the model's num_hidden_layers = {num_layers} with parallel.pp={self.pp}; "
                "give both so that they do, or only one of them"
            )
        if other_stages and (rest <= 0 or rest % (other_stages * self.vpp)):
            raise ConfigError(
                f"{given} leaves {rest} of the model's num_hidden_layers = {num_layers} for the other "
                f"{other_stages} pipeline stage(s) x parallel.vpp={self.vpp}; the rest must be a positive "
                f"multiple of {other_stages * self.vpp}"
            )


@dataclass(frozen=True)
class ParallelGroups:
    """Explicit process groups and this rank's coordinates; code receives these, never parallel_state."""

    layout: ParallelLayout
    tp: dist.ProcessGroup
    pp: dist.ProcessGroup
    cp: dist.ProcessGroup
    dp: dist.ProcessGroup
    dp_cp: dist.ProcessGroup
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int
    pp_last_rank: int
    """Global rank of the last pipeline stage in this rank's pipeline (results live there)."""
    replica: dist.ProcessGroup | None = None
    """gloo group of every rank of this rank's model replica (its TP x CP x PP ranks, one DP index): rollouts
    arrive at the replica's leader (TP = CP = PP rank 0) and are broadcast over it."""
    replica_leader: int = 0
    """Global rank of this replica's leader."""
    leaders: dist.ProcessGroup | None = None
    """gloo group of the replica leaders (one per DP rank, rank 0 first); None on the other ranks."""
    host_world: dist.ProcessGroup | None = None
    """gloo group of every trainer rank, for the long waits on trainer rank 0 (engines starting, sleeping, waking):
    a gloo wait that passes parallel.timeout_s raises in the waiting rank, where NCCL's watchdog would abort it."""

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> None:
    """Initialises torch.distributed from torchrun's environment (single process if absent); `timeout_s`
    (parallel.timeout_s): how long any collective of the default group waits for the other ranks."""
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if torch.cuda.is_available():  # one GPU per local rank, before NCCL binds the process to a device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(seconds=timeout_s) if timeout_s else None
    dist.init_process_group(
        backend or (HOST_AND_DEVICE_BACKEND if torch.cuda.is_available() else "gloo"), timeout=timeout
    )


def initialize(layout: ParallelLayout, seed: int, timeout_s: float | None = None) -> ParallelGroups:
    """Creates the Megatron groups for `layout` (torch.distributed must be initialised) and seeds TP RNGs;
    `timeout_s` (parallel.timeout_s) bounds every collective of every group (megatron-core's in whole minutes)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from vppo_megatron.parallel import cpu_backend

    cpu_backend.apply()
    layout.validate(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        distributed_timeout_minutes=math.ceil(timeout_s / 60) if timeout_s else 30,
    )
    model_parallel_cuda_manual_seed(seed)
    timeout = timedelta(seconds=timeout_s) if timeout_s else None
    replica, leader, leaders, world = _object_groups(layout, parallel_state.get_data_parallel_rank(), timeout)
    return ParallelGroups(
        layout=layout,
        tp=parallel_state.get_tensor_model_parallel_group(),
        pp=parallel_state.get_pipeline_model_parallel_group(),
        cp=parallel_state.get_context_parallel_group(),
        dp=parallel_state.get_data_parallel_group(),
        dp_cp=parallel_state.get_data_parallel_group(with_context_parallel=True),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        cp_rank=parallel_state.get_context_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        pp_last_rank=parallel_state.get_pipeline_model_parallel_last_rank(),
        replica=replica,
        replica_leader=leader,
        leaders=leaders,
        host_world=world,
    )


def replica_ranks(layout: ParallelLayout, dp_rank: int) -> list[int]:
    """Global ranks of DP index `dp_rank`'s model replica, leader first (megatron-core's tp-cp-ep-dp-pp order:
    rank = tp + TP * (cp + CP * (dp + DP * pp)))."""
    t, c, d = layout.tp, layout.cp, layout.dp
    return [tp + t * (cp + c * (dp_rank + d * pp)) for pp in range(layout.pp) for cp in range(c) for tp in range(t)]


def _object_groups(layout: ParallelLayout, my_dp_rank: int, timeout: timedelta | None = None):
    """gloo groups for Python-object traffic (rollouts) and long waits: every replica, the replica leaders, all
    ranks. Every rank creates every group, in the same order (torch.distributed.new_group's rule)."""
    me = dist.get_rank()
    replicas = [replica_ranks(layout, d) for d in range(layout.dp)]
    assert me in replicas[my_dp_rank], (me, my_dp_rank, replicas)  # the rank order above is megatron-core's
    mine = None
    for d, ranks in enumerate(replicas):
        group = dist.new_group(ranks, backend="gloo", timeout=timeout)
        if d == my_dp_rank:
            mine = group
    leader_ranks = [ranks[0] for ranks in replicas]
    leaders = dist.new_group(leader_ranks, backend="gloo", timeout=timeout)
    world = dist.new_group(list(range(dist.get_world_size())), backend="gloo", timeout=timeout)
    return mine, replicas[my_dp_rank][0], leaders if me in leader_ranks else None, world


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
