"""The parallel layout of the Megatron actor: one object owns every axis and hands out explicit process groups.

Rank order (megatron-core's default "tp-cp-ep-dp-pp"): TP varies fastest, then CP, then DP, then PP. So TP
groups are consecutive ranks (inside a node), and the last pipeline stage holds the highest ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vppo_megatron.config import ConfigError, ParallelConfig


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    vpp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> ParallelLayout:
        model_parallel = cfg.tp * cfg.pp * cfg.cp
        if world_size % model_parallel:
            raise ConfigError(f"parallel: tp*pp*cp = {model_parallel} does not divide the world size {world_size}")
        dp = cfg.dp or world_size // model_parallel
        layout = cls(cfg.tp, cfg.pp, cfg.cp, dp, cfg.vpp)
        layout.validate(world_size)
        return layout

    def validate(
        self,
        world_size: int,
        num_layers: int | None = None,
        num_heads: int | None = None,
        num_kv_heads: int | None = None,
        vocab_size: int | None = None,
    ) -> None:
        """Raises ConfigError naming the axis when the layout cannot run this model on `world_size` ranks."""
        if self.world_size != world_size:
            raise ConfigError(
                f"parallel: tp*pp*cp*dp = {self.tp}*{self.pp}*{self.cp}*{self.dp} = {self.world_size} "
                f"but {world_size} ranks were launched"
            )
        if self.vpp > 1 and self.pp == 1:
            raise ConfigError(f"parallel.vpp={self.vpp}: virtual stages need parallel.pp > 1")
        checks = [
            ("num_attention_heads", num_heads, self.tp),
            ("num_key_value_heads", num_kv_heads, self.tp),
            ("vocab_size", vocab_size, self.tp),
            ("num_hidden_layers", num_layers, self.pp * self.vpp),
        ]
        for name, value, divisor in checks:
            if value is not None and value % divisor:
                axis = "parallel.tp" if divisor == self.tp else "parallel.pp * parallel.vpp"
                raise ConfigError(
                    f"{axis} = {divisor} does not divide the model's {name} = {value}; choose a divisor of {value}"
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

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1


def init_distributed(backend: str | None = None) -> None:
    """Initialises torch.distributed from torchrun's environment (single process if absent)."""
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))


def initialize(layout: ParallelLayout, seed: int) -> ParallelGroups:
    """Creates the Megatron groups for `layout` (torch.distributed must be initialised) and seeds TP RNGs."""
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
    )
    model_parallel_cuda_manual_seed(seed)
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
    )


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
