"""The trainer's state and its seven stages, one method each (train.py calls them in order).

`Trainer` lives on every rank: the actor, its process groups, the weight sync and the memory lifecycle.
`Driver` lives on trainer rank 0 only (`Trainer.driver`, None elsewhere): the rollout fleet, the prompt loader,
the reward function, the metrics logger and the validation prompts. A stage that rank 0 drives says so; every
other stage is collective over all ranks.

Legend: B rollouts on this data-parallel rank, T response positions.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from vppo_megatron import batch as batching
from vppo_megatron import faults
from vppo_megatron.metrics import Progress
from vppo_megatron.resume import Restored, resume, save

SYNC_PROBE_PROMPTS = 2  # validation prompts in the fixed verify_sync probe set
_stage = ["start-up"]  # the stage this rank is in (`stage`): what a collective timeout names
WAITS_FOR = {
    "start-up": "the engines to start and sleep (trainer rank 0), the checkpoint load or the first weight sync",
    "validation": "trainer rank 0's validation round",
    "rollout": "trainer rank 0's rollout, reward and dynamic sampling",
    "distribute": "trainer rank 0's rollout, reward and dynamic sampling, then the scatter of the rollouts",
    "experience": "the engines to sleep, then the other ranks' experience pass",
    "advantages": "the other data-parallel ranks' TAS statistics",
    "update": "the other ranks' forward / backward and the optimizer step",
    "sync": "the weight sync (engines waking, buckets loading) or the verify_sync probe",
    "checkpoint": "the other ranks writing their checkpoint shards",
}


def stage(name: str):
    """Marks a Trainer method as stage `name`: while it runs, a collective that times out names it."""

    def mark(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            _stage[0] = name
            with faults.injected(name):  # VPPO_FAULT: the reliability tests' injection point
                return method(self, *args, **kwargs)

        return run

    return mark


COLLECTIVE_TIMEOUTS = (  # what torch.distributed's backends say (lower case): gloo, NCCL (blocking wait), the store
    "timed out waiting",
    "application timeout caused pair closure",
    "collective operation timeout",
    "socket timeout",
)


def collective_timeout(exc: BaseException, timeout_s: float) -> str | None:
    """One line naming the stage this rank waited in, when `exc` is a collective that timed out
    (`COLLECTIVE_TIMEOUTS`; an engine's stall or any other error is not one); else None."""
    text = str(exc)
    if not any(pattern in text.lower() for pattern in COLLECTIVE_TIMEOUTS):
        return None
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    name = _stage[0]
    return (
        f"trainer rank {rank} waited more than parallel.timeout_s={timeout_s:g} s for the other ranks in stage "
        f"'{name}' (waiting for {WAITS_FOR.get(name, 'the other ranks')}); if that stage is this slow, raise "
        f"parallel.timeout_s; otherwise a rank failed or hung there: see its log. ({text.splitlines()[0][:200]})"
    )


@dataclass
class Driver:
    """Trainer rank 0's components."""

    fleet: object
    """RolloutFleet: the vLLM engines on Ray."""
    loader: object
    """PromptLoader over the training prompts."""
    reward_fn: Callable[[str, str], dict[str, float]]
    logger: object
    """MetricsLogger: console, jsonl, TensorBoard, wandb."""
    val_samples: list
    """The validation PromptSamples (trainer.val_prompts of them)."""
    processor: object
    """The model's HF processor (tokenizer + image processor)."""


@dataclass
class StepData:
    """Stage 2's output on this rank: its DP shard, micro-batches built once for both passes."""

    rollouts: batching.RankBatch
    prepared: object
    """actor.batching.StepBatch: encoded images, positions and padding of every micro-batch."""
    mini_batches: list[slice]
    """Row ranges of this rank's mini-batches (one optimizer step each)."""


class Trainer:
    def __init__(self, cfg, groups, actor, sync, lifecycle, driver: Driver | None):
        self.cfg, self.groups, self.actor, self.sync, self.lifecycle = cfg, groups, actor, sync, lifecycle
        self.driver = driver
        self.start_step = 0
        self.skipped_in_a_row = 0
        self.step_alpha_B: torch.Tensor | None = None  # TAS alpha of the step (stage 4), for its diagnostics
        self.step_histograms: dict = {}  # the step's perception histograms, logged with its metrics (rank 0)
        self.progress = Progress(cfg.trainer.total_steps, 0, "vppo train", enabled=False)  # main() sets the bars

    @property
    def is_driver(self) -> bool:
        """Trainer rank 0: drives the fleet, logs, validates."""
        return self.driver is not None

    # ---------------------------------------------------------------------------------------- build

    @classmethod
    def build(cls, cfg, alongside: Trainer | None = None) -> Trainer:
        """Every component of a run; resumes (checkpoint.resume) and serves the actor's weights to the engines.

        `alongside`: a second trainer (its own actor and sync) on the first one's process groups and driver
        (fleet, data, reward): benchmarks run two configs side by side on the same warm engines."""
        import torch.distributed as dist

        from vppo_megatron.actor.engine import MegatronActor
        from vppo_megatron.lifecycle import Lifecycle
        from vppo_megatron.parallel.layout import ParallelLayout, init_distributed, initialize
        from vppo_megatron.sync.weight_sync import WeightSync

        _stage[0] = "start-up"
        if alongside is None:
            init_distributed(timeout_s=cfg.parallel.timeout_s)
            cfg.validate(dist.get_world_size())
            layout = ParallelLayout.from_config(cfg.parallel, dist.get_world_size())
            groups = initialize(layout, cfg.trainer.seed, cfg.parallel.timeout_s)
            driver = cls._driver(cfg) if dist.get_rank() == 0 else None
        else:
            cfg.validate(dist.get_world_size())
            groups, driver = alongside.groups, alongside.driver
        # start-up order (lifecycle.py): the engines (started by _driver) sleep before any rank builds the actor
        barrier = partial(dist.barrier, group=groups.host_world)  # gloo: a timeout here names its stage
        lifecycle = Lifecycle(cfg, None, driver.fleet if driver else None, barrier)
        actor, restored = lifecycle.start_up(
            lambda: MegatronActor(cfg, groups, cfg.model.path), lambda actor: resume(cfg, actor)
        )
        sync = WeightSync(cfg, actor, driver.fleet if driver else None)
        if cfg.rollout.verify_sync_every:
            probe = driver.val_samples[:SYNC_PROBE_PROMPTS] if driver else None
            sync.set_probe(probe, driver.processor if driver else None)
        trainer = cls(cfg, groups, actor, sync, lifecycle, driver)
        trainer.restore(restored)
        lifecycle.first_sync(sync.push)  # engines serve exactly the actor's weights from the first rollout on
        return trainer

    @staticmethod
    def _driver(cfg) -> Driver:
        from transformers import AutoProcessor

        from vppo_megatron.data.dataset import PromptDataset, PromptLoader
        from vppo_megatron.metrics import MetricsLogger
        from vppo_megatron.reward.loading import load_reward_function
        from vppo_megatron.rollout.fleet import RolloutFleet, connect, watch_cluster

        processor = AutoProcessor.from_pretrained(cfg.model.path)
        train = PromptDataset.for_processor(cfg.data.train_files, cfg.data, processor)
        val = PromptDataset.for_processor(cfg.data.val_files, cfg.data, processor)
        connect()
        watch_cluster(partial(_cluster_lost, cfg))
        driver = Driver(
            fleet=RolloutFleet.create_or_attach(cfg, cfg.model.path),
            loader=PromptLoader(train, cfg.trainer.prompts_per_step, cfg.trainer.seed, cfg.data.shuffle),
            reward_fn=load_reward_function(cfg.algorithm.reward_function),
            logger=MetricsLogger(cfg, Path(cfg.trainer.output_dir)),
            val_samples=val.head(cfg.trainer.val_prompts),
            processor=processor,
        )
        return driver

    def restore(self, restored: Restored | None) -> None:
        """Applies what a resume restored: the next step, the served version, rank 0's data position."""
        if restored is None:
            return
        self.start_step = restored.step
        self.sync.version = restored.version - 1  # the start-up push re-serves the saved version, same number
        if self.is_driver:
            self.driver.loader.load_state_dict(restored.loader)
            weights = "" if restored.optimizer else " (weights only: checkpoint.load_optimizer=false)"
            print(f"resumed from {restored.path} at step {restored.step}{weights}", flush=True)

    @stage("checkpoint")
    def checkpoint(self, step: int) -> Path:
        """A resumable checkpoint after `step` (collective), with everything resident while it is written."""
        with self.lifecycle.everything_resident():
            loader = self.driver.loader.state_dict() if self.is_driver else None
            return save(self.cfg, self.actor, step, self.sync.version, loader)

    # ------------------------------------------------------------------------------------ the stages

    @stage("rollout")
    def rollout(self, step: int) -> tuple[list | None, dict[str, float]]:
        """Stage 1 (rank 0): rollouts on the fleet, rewards and dynamic sampling until the batch is full."""
        if not self.is_driver:
            return None, {}
        from vppo_megatron.rollout.collect import collect

        d = self.driver
        groups, metrics = collect(d.fleet, d.loader, self.cfg, step, d.reward_fn)
        groups, dropped = batching.trim_to_dp(groups, self.groups.layout.dp)
        if self.cfg.algorithm.needs_perception:  # where each answer is, for the perception diagnostics
            from vppo_megatron.algo.diagnostics import answer_span

            for group in groups:
                for r in group.rollouts:
                    r.answer_span = answer_span(d.processor.tokenizer, r.response_ids)
        metrics.update({"rollout/kept_groups": float(len(groups)), "rollout/dropped_groups": float(dropped)})
        metrics["data/skipped_rows"] = float(d.loader.dataset.report.total)  # since this launch (counted once)
        return groups, metrics

    @stage("distribute")
    def distribute(self, groups: list | None, step: int) -> StepData:
        """Stage 2: this DP rank's groups (scattered from rank 0), cut into mini-batches and micro-batches once:
        images encoded once per view, positions computed once, for the experience pass and every update."""
        rollouts = batching.distribute(groups, self.groups)
        groups_per_update = self.cfg.trainer.prompts_per_update // self.groups.layout.dp  # exact: config.validate
        mini_batches = batching.mini_batches(rollouts, groups_per_update)
        prepared = self.actor.prepare(
            rollouts.samples, step, with_perception=self.cfg.algorithm.needs_perception, mini_batches=mini_batches
        )
        return StepData(rollouts, prepared, mini_batches)

    @stage("experience")
    def experience(self, data: StepData):
        """Stage 3: the experience pass; the dual pass (both views in one schedule) when TAS or TGF reads token
        dependency, a plain log-prob pass otherwise. Engines sleep and the actor's state comes back first."""
        metrics = self.lifecycle.enter("experience")
        metrics["actor/padding_share"] = data.prepared.padding_share()  # this rank's micro-batches
        a = self.cfg.algorithm
        experience = self.actor.experience(
            data.prepared, with_perception=a.needs_perception, with_entropy=a.token_filter == "entropy"
        )
        return experience, metrics

    @stage("advantages")
    def advantages(self, data: StepData, experience) -> tuple[torch.Tensor, dict[str, float]]:
        """Stage 4: GRPO advantages per group, shaped by TAS within each mini-batch; advantage_B."""
        from vppo_megatron.algo.pipeline import dependency_metrics, shaped_advantages

        r = data.rollouts
        advantage_B = torch.zeros_like(r.reward_B)
        scale_B = torch.ones_like(r.reward_B)
        for rows in data.mini_batches:
            advantage_B[rows], scale_B[rows] = shaped_advantages(
                self.cfg.algorithm,
                r.reward_B[rows],
                r.group_ids_B[rows],
                experience.dependency_BT[rows],
                experience.response_mask_BT[rows],
                dp_group=self.groups.dp,
            )
        self.step_alpha_B = scale_B  # for the step's perception diagnostics (after stage 5)
        if not self.cfg.algorithm.needs_perception:
            return advantage_B, {}
        metrics = dependency_metrics(experience.dependency_BT, experience.response_mask_BT)
        if self.cfg.algorithm.trajectory_shaping != "none":
            metrics.update(
                {"vppo/shaping_scale_max": scale_B.max().item(), "vppo/shaping_scale_min": scale_B.min().item()}
            )
        return advantage_B, metrics

    def token_filter(self, experience, step: int) -> torch.Tensor:
        """Stage 5: TGF's gradient mask, fixed for the step (it reads only the stored experience); mask_BT."""
        from vppo_megatron.algo.pipeline import token_mask

        return token_mask(
            self.cfg.algorithm,
            experience.dependency_BT,
            experience.entropy_BT,
            experience.response_mask_BT,
            seed=self.cfg.trainer.seed * 7919 + step,
        )

    def diagnose(self, data: StepData, experience, mask_BT: torch.Tensor) -> dict[str, float]:
        """The step's perception diagnostics (algo/diagnostics.py; collective over DP): scalars returned, the
        histograms kept for rank 0's log of this step. Nothing without the dual pass."""
        self.step_histograms = {}
        if not self.cfg.algorithm.needs_perception:
            return {}
        from vppo_megatron.algo.diagnostics import answer_mask, perception_diagnostics

        response_mask_BT = experience.response_mask_BT
        spans = [s.answer_span for s in data.rollouts.samples]
        metrics, self.step_histograms = perception_diagnostics(
            experience.dependency_BT,
            response_mask_BT,
            mask_BT,
            self.step_alpha_B,
            answer_mask(spans, response_mask_BT.shape),
            dp_group=self.groups.dp,
        )
        return metrics

    @stage("update")
    def update(self, data: StepData, experience, advantage_B, mask_BT) -> dict[str, float]:
        """Stage 6: algorithm.ppo_epochs passes, one optimizer step per mini-batch each; every pass reuses the
        step's old log-probs, dependency, advantages and mask."""
        self.lifecycle.enter("update")
        per_step = []
        for _ in range(self.cfg.algorithm.ppo_epochs):
            for rows in data.mini_batches:
                per_step.append(
                    self.actor.update(
                        data.prepared,
                        experience.old_logp_BT,
                        advantage_B,
                        mask_BT,
                        experience.dependency_BT if self.cfg.algorithm.needs_perception else None,
                        rows=rows,
                    )
                )
        return dict(mean_over_steps(per_step), **{"actor/optimizer_steps": float(self.actor.updates)})

    @stage("sync")
    def push_weights(self) -> dict[str, float]:
        """Stage 7: optimizer state (+ grads) leave, the engines' weights wake, the sync, then the engines' KV
        cache wakes (and the weights leave, offload=all); every rollout.verify_sync_every syncs, the probe."""
        metrics = self.lifecycle.enter("sync")
        metrics.update(self.sync.push())
        verify = self.sync.verify_due()
        if verify:
            self.sync.score_probe_with_actor()  # the actor's side while its weights are resident
        metrics.update(self.lifecycle.enter("rollout"))
        if verify:
            metrics.update(self.sync.verify())
        return metrics

    # ---------------------------------------------------------------------------------- around a step

    @stage("validation")
    def validate(self) -> dict[str, float]:
        """avg@k on the validation prompts (rank 0 drives the fleet; nothing elsewhere)."""
        if not self.is_driver:
            return {}
        from vppo_megatron.rollout.collect import validate

        d = self.driver
        return validate(d.fleet, d.val_samples, self.cfg, d.reward_fn)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.is_driver:
            self.driver.logger.log(step, metrics)
            self.driver.logger.log_histograms(step, self.step_histograms)
        self.step_histograms = {}

    def check_skipped(self, step: int, metrics: dict[str, float]) -> None:
        """A step that trained on nothing warns (rank 0) with the reason; algorithm.max_skipped_steps of them in a
        row stop the run (StalledRun on every rank: each saw the same empty batch)."""
        if not metrics.get("actor/skipped_step"):
            self.skipped_in_a_row = 0
            return
        self.skipped_in_a_row += 1
        reason = "see rank 0"  # the rollout metrics that say why live on the driver
        if self.is_driver:
            from tqdm import tqdm

            reason = skip_reason(metrics)
            tqdm.write(f"warning: step {step} trained on nothing: {reason}", file=sys.stderr)
        limit = self.cfg.algorithm.max_skipped_steps
        if limit and self.skipped_in_a_row >= limit:
            raise StalledRun(
                f"{self.skipped_in_a_row} steps in a row trained on nothing (the last, step {step}: {reason}). "
                "Likely causes: the reward function (algorithm.reward_function) does not grade these "
                "answers; the responses miss the answer format the prompt asks for (data.format_prompt); the model "
                "is not warm-started (vppo sft). algorithm.max_skipped_steps=0 never stops"
            )

    def finish(self) -> None:
        """Final validation and the accuracy curve (rank 0), then the sync's shared memory is released."""
        if self.is_driver:
            total = self.cfg.trainer.total_steps
            self.driver.logger.log(total, self.validate())
            curve = self.driver.logger.plot(Path(self.cfg.trainer.output_dir) / "accuracy.png")
            print(f"metrics: {self.driver.logger.path}\ncurve: {curve}", flush=True)
            perception = self.driver.logger.plot_perception(Path(self.cfg.trainer.output_dir) / "perception.png")
            if perception is not None:
                print(f"perception diagnostics: {perception}", flush=True)
            print(f"training data: {self.driver.loader.dataset.report.summary()}", flush=True)
        self.sync.close()


def _cluster_lost(cfg, address: str) -> None:
    """Trainer rank 0, the Ray watchdog's verdict: one error line, then the process ends (its main thread may be
    blocked in a Ray call that would wait out its own timeout); torchrun stops the other ranks. A checkpoint being
    written needs no Ray: it is finished first."""
    while _stage[0] == "checkpoint":
        time.sleep(0.5)
    message = cluster_lost_line(cfg, address, wait=True)  # the main thread may be saying it already
    # on a line of its own: a progress bar may be mid-line
    print(f"\nvppo train: error: {message} (stage '{_stage[0]}')", file=sys.stderr, flush=True)
    os._exit(EXIT_CLUSTER_LOST)


def cluster_lost_line(cfg, address: str, wait: bool) -> str | None:
    """The line saying that the Ray cluster at `address` is gone, naming the newest checkpoint, for whichever of
    the watchdog and the main thread asks first; None for the other (`wait=False`)."""
    from vppo_megatron.actor.checkpoint import latest
    from vppo_megatron.resume import checkpoint_root
    from vppo_megatron.rollout.fleet import cluster_lost_message

    if not CLUSTER_LOST_SAID.acquire(blocking=wait):
        return None
    return cluster_lost_message(address, latest(checkpoint_root(cfg)))


EXIT_CLUSTER_LOST = 1
CLUSTER_LOST_SAID = threading.Lock()  # held by whichever says that the Ray cluster is gone: the watchdog or main


class StalledRun(RuntimeError):
    """algorithm.max_skipped_steps steps in a row with no group kept: the run learns nothing."""


def skip_reason(m: dict[str, float]) -> str:
    """Why a step had no rollouts to train on, from its rollout metrics (rank 0)."""
    if m.get("rollout/dropped_groups"):
        return (
            f"dynamic sampling kept {m['rollout/dropped_groups']:g} group(s), fewer than the data-parallel size "
            "(more prompts per step, or a wider accuracy window, keep more)"
        )
    return (
        f"dynamic sampling kept no group of {m.get('rollout/sampled_prompts', 0):g} prompts in "
        f"{m.get('rollout/sampling_rounds', 0):g} round(s): reward/accuracy {m.get('reward/accuracy', 0):.3f}, "
        f"{m.get('rollout/filtered_wrong_groups', 0):g} group(s) all wrong, "
        f"{m.get('rollout/filtered_right_groups', 0):g} all right"
    )


def mean_over_steps(per_step: list[dict[str, float]]) -> dict[str, float]:
    """A rollout step's actor metrics: the mean of each over its optimizer steps (every epoch and mini-batch), as
    the reference logs them."""
    names = dict.fromkeys(name for metrics in per_step for name in metrics)
    return {name: sum(m[name] for m in per_step if name in m) / sum(name in m for m in per_step) for name in names}


class StageTimer:
    """time/<stage>_s of each stage of a step, and the step's total."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.metrics: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.metrics[f"time/{stage}_s"] = now - self.last
        self.last = now

    def total(self) -> dict[str, float]:
        return dict(self.metrics, **{"time/step_s": time.perf_counter() - self.start})
