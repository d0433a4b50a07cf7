"""The one typed configuration tree.

Every field carries a docstring (the string literal under it; `field_docs()` reads them back and a test makes sure
none is missing). Choices are `Literal` enums. `load(path, overrides)` reads YAML plus dotted CLI overrides
(`algorithm.token_fraction=0.4`), rejects unknown keys, coerces types; `Config.validate()` checks cross-field
rules. Both raise `ConfigError` naming the field, the offending value and the allowed values.

Defaults are the reference recipe (the VPPO paper's Qwen2.5-VL-7B run on 8 x H800) except where a field says otherwise.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vppo_megatron import families


class ConfigError(ValueError):
    """A configuration value is unknown, malformed or inconsistent; the message names the field and the fix."""


@dataclass
class ModelConfig:
    path: str = "runs/tiny-qwen2_5_vl"
    """Hugging Face model directory (config, weights, tokenizer, processor). Never a hub id: runs are offline."""
    family: str = "qwen2_5_vl"
    """Model family, the checkpoint's HF model_type: qwen2_5_vl | qwen3_vl (vppo_megatron/families registers them)."""
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """Parameter/compute dtype of the actor. float32 for exact parity tests on CPU."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Layer implementation: Transformer Engine on GPU, megatron-core's local spec on CPU; auto picks by host."""
    fp8: Literal["none", "hybrid", "e4m3"] = "none"
    """FP8 format for Transformer Engine linear layers (Hopper). Vision tower and output layer stay bf16."""
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise"] = "delayed"
    """FP8 scaling recipe (Transformer Engine): delayed scaling, per-tensor current scaling, or 1x128 blocks."""
    fp8_experience: bool = False
    """Run the no-grad experience pass (old log-probs and the dual-pass perception scores) in FP8 too. Off: that
    pass runs in bf16 and only the update's GEMMs use FP8; the perception score is a difference of two forwards,
    which e4m3's coarse spacing blurs (docs/gpu_path.md#fp8 has the measurement behind the default)."""
    fp8_amax_history_len: int = 1
    """Delayed scaling: how many steps of amax history a tensor's scale is computed from (Megatron-LM's default)."""
    fp8_amax_compute_algo: Literal["most_recent", "max"] = "most_recent"
    """Delayed scaling: the scale from the most recent amax or the history's max (Megatron-LM's default first)."""
    fp8_margin: int = 0
    """Delayed scaling: the scale backs off by 2**margin (Megatron-LM's default 0)."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation in the actor: none, selective (attention core) or full (every layer)."""


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=lambda: ["runs/data/train.parquet"])
    """Training parquet/jsonl files with the ViRL39K schema (problem, answer, images): files, directories (their
    data files, sorted) or globs (`hub/data/train-*.parquet`, shards as Hugging Face ships them)."""
    val_files: list[str] = field(default_factory=lambda: ["runs/data/validation.parquet"])
    """Validation parquet/jsonl files, directories or globs, same schema."""
    prompt_key: str = "problem"
    """Column holding the question text with one `<image>` placeholder per image."""
    answer_key: str = "answer"
    """Column holding the ground-truth answer string."""
    image_key: str = "images"
    """Column holding the images: a list of bytes, of {bytes, path} structs, or of file paths."""
    format_prompt: str = (
        "You first think through the reasoning process as an internal monologue, enclosed within <think> </think> "
        "tags. Then, provide your final answer enclosed within \\boxed{}."
    )
    """Instruction appended to every problem after a blank line (the VPPO prompt). Empty string disables it."""
    min_pixels: int = 200_704
    """Smallest image area (pixels) after smart resize; images below are upscaled (VPPO recipe: 200,704)."""
    max_pixels: int = 1_003_520
    """Largest image area (pixels) after smart resize; images above are downscaled (VPPO recipe: 1,003,520)."""
    max_prompt_length: int = 4096
    """Prompts longer than this many tokens (image tokens included) are skipped and counted."""
    image_resize: Literal["reference", "smart"] = "reference"
    """reference: the reference code's two steps (scale into min..max_pixels, then the processor's rounding to the
    patch grid; its image token counts); smart: Qwen2-VL's smart_resize within min..max_pixels at once."""
    image_decoder: Literal["auto", "dali", "pillow"] = "auto"
    """Image decoding backend: DALI CPU/GPU pipelines when installed (auto), or Pillow."""
    shuffle: bool = True
    """Shuffle training rows each epoch (seeded by trainer.seed and the epoch)."""


@dataclass
class RolloutConfig:
    num_engines: int = 1
    """Number of vLLM engines (Ray actors) in the rollout fleet."""
    tensor_parallel_size: int = 1
    """Tensor-parallel size of each vLLM engine."""
    placement: Literal["colocated", "disaggregated"] = "colocated"
    """colocated: engines share the trainer GPUs (sleep/wake, CUDA IPC); disaggregated: own GPUs (NCCL)."""
    num_samples_per_prompt: int = 8
    """Responses sampled per prompt (the GRPO group size n)."""
    temperature: float = 1.0
    """Sampling temperature for training rollouts."""
    top_p: float = 0.99
    """Nucleus sampling threshold for training rollouts."""
    max_response_length: int = 2048
    """Maximum number of generated tokens per response."""
    val_temperature: float = 1.0
    """Sampling temperature for validation (VPPO protocol: avg@8 at T = 1.0)."""
    val_top_p: float = 1.0
    """Nucleus sampling threshold for validation."""
    val_num_samples: int = 8
    """Samples per validation prompt (accuracy is averaged: avg@k)."""
    gpu_memory_utilization: float = 0.6
    """Fraction of GPU memory each vLLM engine may take (GPU only)."""
    sync_transport: Literal["auto", "shm", "cuda_ipc", "nccl"] = "auto"
    """Weight-sync transport: shared memory on CPU, CUDA IPC colocated, NCCL broadcast disaggregated."""
    sync_bucket_mb: int = 512
    """Upper bound on one weight-sync bucket, in MiB."""
    verify_sync_every: int = 0
    """Every N weight syncs, score a fixed probe set with the engines and the actor and raise SyncError when
    the largest per-token log-prob difference exceeds verify_sync_tolerance; 0 = never."""
    verify_sync_tolerance: float = 0.05
    """Largest engine-vs-actor per-token log-prob difference verify_sync_every accepts."""
    request_timeout_s: float = 600.0
    """Deadline of one control call to an engine (sleep, wake, a weight-sync bucket, its version, a progress
    probe); a call past it raises instead of hanging. Generation has no overall deadline: see stall_timeout_s."""
    stall_timeout_s: float = 300.0
    """An engine whose generation makes no progress (not one engine step) for this long, or does not answer a
    progress probe, is hung: killed, restarted, re-synced, its requests retried. A long round that keeps
    producing tokens (a 200-prompt x 8-sample validation) never trips it."""


DAPO_CLIP_HIGH = 0.28  # DAPO's clip-higher epsilon (the reference recipe)


@dataclass
class AlgorithmConfig:
    base: Literal["dapo", "grpo"] = "dapo"
    """The base estimator under VPPO's two mechanisms (trajectory_shaping = TAS, token_filter = TGF): dapo
    (dynamic sampling on, clip-higher 0.2 / 0.28) or grpo (one sampling round, symmetric clip). It fills
    dynamic_sampling and clip_ratio_high when they are unset; a value that contradicts grpo is a ConfigError.
    Plain DAPO / GRPO = this base with trajectory_shaping=none token_filter=none (see algo/ablations.py)."""
    estimator: Literal["k3", "full_kl", "js", "prob_drop"] = "k3"
    """Token dependency: k3 on the sampled token (reference), full_kl (paper Def. 3.1), js, prob_drop (Table 12)."""
    perturbation: Literal["patch_blackening", "gaussian_noise", "gaussian_blur", "grey"] = "patch_blackening"
    """How the image I' is perturbed (paper Table 11)."""
    perturb_probability: float = 0.5
    """Probability that each patch cell is blackened (patch_blackening)."""
    perturb_cell_size: int = 0
    """Cell size in pixels for patch blackening; 0 = the vision tower's patch size (14 Qwen2.5-VL, 16 Qwen3-VL)."""
    noise_sigma: float = 189.0
    """Standard deviation of the additive Gaussian noise, on the 0..255 scale (gaussian_noise)."""
    blur_radius: float = 6.0
    """Gaussian blur radius in pixels (gaussian_blur)."""
    grey_value: int = 128
    """Fill value of the complete grey mask (grey)."""
    trajectory_shaping: Literal["advantage", "reward", "none"] = "advantage"
    """TAS: scale advantages (paper), scale rewards before normalisation (ablation), or off (TGF only)."""
    tas_scope: Literal["segment", "global", "group"] = "segment"
    """TAS statistics: min/max over this rank's mini-batch and the mean per segment of tas_segment rollouts
    (reference-exact), over the whole global mini-batch (layout-independent), or within each prompt group."""
    tas_segment: int = 16
    """Rollouts per TAS segment (tas_scope=segment): the reference's update micro-batch, a statistic and not a
    memory setting (16 in its 7B script, 4 in its 8B one). Consecutive rollouts of a rank's mini-batch; it must
    divide that mini-batch's rollouts and hold at least 2 (one rollout has no range: alpha would always be 1)."""
    tas_range_rollouts: int = 0
    """Rollouts whose trajectory dependency sets TAS's range (min, max) under tas_scope=segment: consecutive
    windows of a rank's mini-batch, whole TAS segments each; 0 = the rank's whole mini-batch. The reference's window
    is its per-GPU mini-batch: prompts per update x samples / GPUs (128 in its 7B and 8B scripts on 8 GPUs), which
    a model-parallel layout (fewer data-parallel ranks) would otherwise widen."""
    tas_range: Literal["dynamic", "fixed"] = "dynamic"
    """dynamic: beta_max chosen so mean alpha = 1 (reference); fixed: alpha in [beta_min, beta_max] (Table 3)."""
    beta_min: float = 0.9
    """Lower bound of the TAS scale alpha."""
    beta_max: float = 1.1
    """Upper bound of alpha when tas_range = fixed."""
    token_filter: Literal["dependency", "random", "entropy", "none"] = "dependency"
    """TGF selection signal: token dependency (VPPO), random or entropy (ablations), none (all tokens)."""
    token_fraction: float = 0.4
    """k: fraction of each response's tokens that receive gradient (ceil(k * L), at least 1)."""
    token_count: Literal["reference", "exact"] = "reference"
    """How ceil(k * L) is computed: reference (a float32 product, one token more for some k and L, e.g. k = 0.3,
    L = 50 keeps 16) or exact (15)."""
    token_mask: Literal["hard", "soft"] = "hard"
    """hard: top-k binary mask; soft: sigmoid of the within-trajectory z-score with mean weight k (App. I)."""
    clip_ratio_low: float = 0.2
    """PPO clip epsilon below 1 (ratio >= 1 - eps)."""
    clip_ratio_high: float | None = None
    """PPO clip epsilon above 1; unset = the base's: 0.28 (dapo, clip-higher) or clip_ratio_low (grpo)."""
    clip_ratio_dual: float = 3.0
    """Dual-clip constant C for negative advantages."""
    entropy_coef: float = 0.06
    """lambda of the entropy penalty lambda * mean(-log pi) over all valid tokens (0.06 for 7B, 0.12 for 8B)."""
    advantage_eps: float = 1e-6
    """Epsilon in (R - mean) / (std + eps), GRPO group normalisation."""
    dynamic_sampling: bool | None = None
    """Keep only groups with accuracy_low < mean accuracy < accuracy_high; regenerate until the batch is full.
    Unset = the base's: true (dapo), false (grpo)."""
    accuracy_low: float = 0.01
    """Dynamic sampling lower bound on a group's mean accuracy (exclusive)."""
    accuracy_high: float = 0.99
    """Dynamic sampling upper bound on a group's mean accuracy (exclusive)."""
    max_sampling_tries: int = 8
    """Rollout rounds allowed to fill one batch under dynamic sampling before training on what was kept."""
    max_skipped_steps: int = 5
    """Consecutive steps with no group kept (every group scored alike) before the run stops with an error naming
    the likely causes; each skipped step warns. 0: never stop."""
    ppo_epochs: int = 1
    """Passes over each rollout batch; every pass reuses the step's old log-probs, dependency, TAS and TGF."""
    reward_function: str = "vppo_megatron.reward.math:compute_score"
    """Reward function as "module:function" or "path/to/file.py:function"."""

    def __post_init__(self) -> None:
        """Fills the base's sampling and clipping where they are unset (validate() rejects contradictions)."""
        if self.dynamic_sampling is None:
            self.dynamic_sampling = self.base == "dapo"
        if self.clip_ratio_high is None:
            self.clip_ratio_high = DAPO_CLIP_HIGH if self.base == "dapo" else self.clip_ratio_low

    @property
    def needs_perception(self) -> bool:
        """The experience pass runs the perturbed view: TAS or the dependency TGF reads token dependency."""
        return self.trajectory_shaping != "none" or self.token_filter == "dependency"


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size of the Megatron actor."""
    pp: int = 1
    """Pipeline-parallel size."""
    cp: int = 1
    """Context-parallel size (sequence split, load-balanced)."""
    dp: int = 0
    """Data-parallel size; 0 = derived as world_size / (tp * pp * cp)."""
    vpp: int = 1
    """Virtual pipeline stages per rank (interleaved 1F1B); > 1 needs pp > 1."""
    first_stage_layers: int = 0
    """Language-model layers on the first pipeline stage (which also holds the vision tower); 0 = even split."""
    last_stage_layers: int = 0
    """Language-model layers on the last pipeline stage (which also holds the output layer); 0 = even split."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism with TP: the norm / dropout regions split the sequence over the TP ranks
    (Transformer Engine's norms on GPU, actor/model.py SequenceParallelNorm on the local spec)."""
    world_size: int = 0
    """Expected number of trainer ranks; 0 = the torchrun world size at start (set for --dry-run)."""
    device_memory_gib: float = 80.0
    """Memory of one accelerator; `--dry-run` fails when the estimated actor peak exceeds 90% of it (0: no check)."""
    gpus_per_node: int = 8
    """Accelerators (trainer ranks) per node: how many ranks share one node's host memory."""
    host_memory_gib: float = 1024.0
    """Host memory of one node; `--dry-run` fails when the busiest node's estimate (pinned offload buffers,
    vLLM sleep copies, the weight sync's staging, the step batch) exceeds 90% of it (0: no check)."""
    timeout_s: float = 3600.0
    """Deadline of every collective between trainer ranks (the process groups' timeout): a rank that waits longer
    fails naming the stage it waited in. The other ranks wait for trainer rank 0's rollout, validation and
    engine restarts: keep it above the longest of those."""


@dataclass
class ActorConfig:
    offload: Literal["auto", "none", "optimizer", "optimizer+grads", "all"] = "auto"
    """What the actor moves to host memory while the rollout engines generate (colocated placement): optimizer
    state, + gradient buffers, + weights (all). auto = all when colocated on a CUDA host, none otherwise."""


@dataclass
class OptimizerConfig:
    lr: float = 1e-6
    """AdamW learning rate (constant after warm-up)."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up in optimizer steps."""
    distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (Megatron distributed optimizer)."""


@dataclass
class TrainerConfig:
    seed: int = 1
    """Seed of every random source (data order, perturbation masks, sampling, init)."""
    total_steps: int = 200
    """Rollout steps to run."""
    prompts_per_step: int = 384
    """Prompts per rollout step (each sampled num_samples_per_prompt times)."""
    prompts_per_update: int = 128
    """Prompts per optimizer step (the mini-batch); prompts_per_step / prompts_per_update updates per step."""
    micro_batch_size: int = 4
    """Rollouts per micro-batch on each data-parallel rank (the bound when max_tokens_per_micro_batch is 0)."""
    max_tokens_per_micro_batch: int = 0
    """Token budget of a micro-batch (rows x padded length, prompt + response; with pack_sequences the padded sum
    of the rollouts' lengths): consecutive rollouts are taken while they fit, like the reference's dynamic
    batching; 0 = micro_batch_size rollouts each."""
    pack_sequences: bool = False
    """Each micro-batch's rollouts run back to back in one row (megatron-core's THD format: attention stays inside
    each rollout, each keeps its own positions) instead of each padded to the longest: the same results, no
    compute on padding. Needs parallel.cp=1."""
    val_every: int = 5
    """Validate every N steps (and before the first); 0 disables."""
    val_prompts: int = 0
    """Validation prompts per evaluation; 0 = the whole validation set."""
    output_dir: str = "runs/vppo"
    """Where metrics, curves and checkpoints go."""


@dataclass
class SftConfig:
    steps: int = 0
    """Supervised warm-start optimizer steps (`vppo sft`); 0 skips the warm start."""
    batch_size: int = 32
    """Prompts per supervised step (one target response each)."""
    lr: float = 1e-4
    """Learning rate of the warm start (the RL phase uses optimizer.lr)."""
    warmup_steps: int = 10
    """Linear learning-rate warm-up of the warm start (the RL phase uses optimizer.warmup_steps)."""
    target_template: str = "<think> I look at the image carefully. </think> \\boxed{{{answer}}}"
    """Target response for a row; {answer} is replaced by the row's answer."""
    target_field: str = ""
    """A string column holding each row's whole target response (e.g. `solution`, the synthetic largest_value
    task's worked steps), used instead of target_template; empty: target_template."""
    output_dir: str = "runs/sft"
    """Where the warm-started HF model is written (the RL phase's model.path)."""


@dataclass
class CheckpointConfig:
    save_every: int = 20
    """Save a checkpoint every N steps; 0 disables."""
    keep_last: int = 2
    """Checkpoints kept (at least 1); older ones are deleted after a newer one is complete."""
    resume: str = "auto"
    """auto (latest complete checkpoint in output_dir, if any), none, or a checkpoint directory."""
    load_optimizer: bool = True
    """Restore optimizer state on resume (false: weights only)."""


@dataclass
class LoggingConfig:
    console: bool = True
    """Print one metrics line per step."""
    jsonl: bool = True
    """Append metrics to output_dir/metrics.jsonl."""
    tensorboard: bool = True
    """Write TensorBoard events to output_dir/tensorboard."""
    wandb_project: str = ""
    """Weights & Biases project; empty disables wandb."""
    progress_bars: bool = True
    """tqdm progress bars for long phases (rollout, experience pass, update)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Datasets, prompts and image preprocessing."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """The vLLM rollout fleet and weight synchronisation."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """VPPO / DAPO / GRPO objective and its ablation switches."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Megatron parallel layout of the actor."""
    actor: ActorConfig = field(default_factory=ActorConfig)
    """The Megatron actor's memory residency across a step's phases."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW settings."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Loop sizes, seed, validation cadence and output directory."""
    sft: SftConfig = field(default_factory=SftConfig)
    """The supervised warm start (`vppo sft`) that gives a small model a non-zero success rate."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence and resume."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metric sinks."""

    def validate(self, world_size: int | None = None, check_host: bool = True) -> Config:
        """Checks cross-field rules; `world_size` (or parallel.world_size) enables the layout checks.

        `check_host=False` validates for the target cluster from any machine (a dry run on a laptop): the checks
        that this host can run the config (Transformer Engine, FP8, CUDA) are skipped.
        """
        _check_ranges(self)
        _check_parallel(self.parallel, world_size or self.parallel.world_size)
        _check_batches(self, world_size or self.parallel.world_size)
        _check_precision(self.model, check_host)
        _check_fp8(self, world_size or self.parallel.world_size)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- validation


def _fail(path: str, value: Any, fix: str) -> typing.NoReturn:
    raise ConfigError(f"{path}={value!r}: {fix}")


def _check_ranges(cfg: Config) -> None:
    a, r = cfg.algorithm, cfg.rollout
    if cfg.model.family not in families.NAMES:
        _fail("model.family", cfg.model.family, f"must be one of {', '.join(families.NAMES)} (a registered family)")
    for path, value in [
        ("algorithm.token_fraction", a.token_fraction),
        ("algorithm.perturb_probability", a.perturb_probability),
    ]:
        if not 0.0 < value <= 1.0:
            _fail(path, value, "must be in (0, 1]")
    if not 0.0 < a.beta_min <= 1.0:
        _fail("algorithm.beta_min", a.beta_min, "must be in (0, 1] (alpha's lower bound; the reference uses 0.9)")
    if a.tas_range == "fixed" and a.beta_max < a.beta_min:
        _fail("algorithm.beta_max", a.beta_max, f"must be >= algorithm.beta_min ({a.beta_min})")
    if not 0.0 <= a.accuracy_low < a.accuracy_high <= 1.0:
        _fail("algorithm.accuracy_low", a.accuracy_low, "need 0 <= accuracy_low < accuracy_high <= 1")
    if a.perturb_cell_size < 0:
        _fail("algorithm.perturb_cell_size", a.perturb_cell_size, "must be >= 0 (0 = the vision patch size)")
    _resolve_callable_spec("algorithm.reward_function", a.reward_function)
    for path, value in [
        ("rollout.num_engines", r.num_engines),
        ("rollout.tensor_parallel_size", r.tensor_parallel_size),
        ("rollout.num_samples_per_prompt", r.num_samples_per_prompt),
        ("rollout.max_response_length", r.max_response_length),
        ("rollout.sync_bucket_mb", r.sync_bucket_mb),
        ("trainer.micro_batch_size", cfg.trainer.micro_batch_size),
    ]:
        if value < 1:
            _fail(path, value, "must be >= 1")
    _check_base(a)
    if a.max_sampling_tries < 1:
        _fail("algorithm.max_sampling_tries", a.max_sampling_tries, "must be >= 1 (rollout rounds per step)")
    if a.max_skipped_steps < 0:
        _fail("algorithm.max_skipped_steps", a.max_skipped_steps, "must be >= 0 (0: never stop)")
    if a.ppo_epochs < 1:
        _fail("algorithm.ppo_epochs", a.ppo_epochs, "must be >= 1")
    for path, value in [
        ("rollout.request_timeout_s", r.request_timeout_s),
        ("rollout.stall_timeout_s", r.stall_timeout_s),
        ("parallel.timeout_s", cfg.parallel.timeout_s),
    ]:
        if value <= 0:
            _fail(path, value, "must be > 0 seconds")
    if r.verify_sync_every < 0 or r.verify_sync_tolerance <= 0:
        _fail("rollout.verify_sync_every", r.verify_sync_every, "needs every >= 0 and verify_sync_tolerance > 0")
    if cfg.trainer.max_tokens_per_micro_batch < 0:
        _fail("trainer.max_tokens_per_micro_batch", cfg.trainer.max_tokens_per_micro_batch, "must be >= 0")
    if r.num_samples_per_prompt < 2:
        _fail(
            "rollout.num_samples_per_prompt",
            r.num_samples_per_prompt,
            "group-normalised advantages need >= 2 samples per prompt",
        )
    if r.placement == "disaggregated" and cfg.actor.offload not in ("auto", "none"):
        _fail(
            "actor.offload",
            cfg.actor.offload,
            "offloading frees the actor's GPUs for colocated engines; with rollout.placement=disaggregated the "
            "engines have their own GPUs: set actor.offload=none (or auto)",
        )
    if cfg.data.min_pixels > cfg.data.max_pixels:
        _fail("data.min_pixels", cfg.data.min_pixels, f"must be <= data.max_pixels ({cfg.data.max_pixels})")


def _check_base(a: AlgorithmConfig) -> None:
    """grpo samples once per prompt and clips symmetrically; a setting that says otherwise cannot run as written."""
    if a.base != "grpo":
        return
    if a.dynamic_sampling:
        _fail(
            "algorithm.dynamic_sampling",
            True,
            "algorithm.base=grpo samples one round without dynamic sampling; unset it (or set false), or use "
            "algorithm.base=dapo",
        )
    if a.clip_ratio_high != a.clip_ratio_low:
        _fail(
            "algorithm.clip_ratio_high",
            a.clip_ratio_high,
            f"algorithm.base=grpo clips symmetrically: unset it or set it to clip_ratio_low ({a.clip_ratio_low}), "
            "or use algorithm.base=dapo",
        )


def _check_parallel(p: ParallelConfig, world_size: int) -> None:
    for name in ("tp", "pp", "cp", "vpp"):
        if getattr(p, name) < 1:
            _fail(f"parallel.{name}", getattr(p, name), "must be >= 1")
    if p.vpp > 1 and p.pp == 1:
        _fail("parallel.vpp", p.vpp, "virtual pipeline stages need parallel.pp > 1")
    for name in ("first_stage_layers", "last_stage_layers"):
        value = getattr(p, name)
        if value < 0:
            _fail(f"parallel.{name}", value, "must be >= 0 (0 = an even split)")
        if value and p.pp == 1:
            _fail(f"parallel.{name}", value, "an uneven pipeline split needs parallel.pp > 1")
        if value % p.vpp:
            _fail(f"parallel.{name}", value, f"must be a multiple of parallel.vpp={p.vpp} (equal virtual stages)")
    if p.sequence_parallel and p.tp == 1:
        _fail("parallel.sequence_parallel", True, "sequence parallelism needs parallel.tp > 1")
    if not world_size:
        return
    model_parallel = p.tp * p.pp * p.cp
    if world_size % model_parallel:
        _fail(
            "parallel",
            f"tp={p.tp} pp={p.pp} cp={p.cp}",
            f"world size {world_size} is not divisible by tp*pp*cp = {model_parallel}; "
            f"choose sizes whose product divides {world_size}",
        )
    if p.dp and p.dp * model_parallel != world_size:
        _fail(
            "parallel.dp",
            p.dp,
            f"tp*pp*cp*dp = {p.dp * model_parallel} != world size {world_size}; "
            f"set parallel.dp={world_size // model_parallel} or 0 to derive it",
        )


def _nearest_multiples(value: int, of: int) -> str:
    below, above = value // of * of, (value // of + 1) * of
    return " or ".join(str(v) for v in (below, above) if v >= 1)


def _nearest_divisors(value: int, of: int, multiple_of: int = 1) -> str:
    """The divisors of `of` (multiples of `multiple_of`) closest to `value` from below and above."""
    divisors = [d for d in range(1, of + 1) if of % d == 0 and d % multiple_of == 0]
    below = max((d for d in divisors if d <= value), default=None)
    above = min((d for d in divisors if d >= value), default=None)
    return " or ".join(str(v) for v in dict.fromkeys((below, above)) if v is not None)


def _check_batches(cfg: Config, world_size: int) -> None:
    """Every batch size divides the one above it exactly: nothing is floored, dropped or re-sized at run time.

    step (prompts) = k x update (prompts); update = dp x groups per rank; a rank's update rollouts (groups x n) =
    whole micro-batches (fixed count) and whole TAS segments."""
    t, a, p = cfg.trainer, cfg.algorithm, cfg.parallel
    if t.pack_sequences and p.cp > 1:
        _fail(
            "trainer.pack_sequences",
            True,
            f"packed rollouts are not split for context parallelism (parallel.cp={p.cp}); set "
            "trainer.pack_sequences=false, or parallel.cp=1 (packing suits many short rollouts, CP one long one)",
        )
    if t.prompts_per_step < 1 or t.prompts_per_update < 1:
        _fail("trainer.prompts_per_update", t.prompts_per_update, "prompt counts must be >= 1")
    if t.prompts_per_step % t.prompts_per_update:
        _fail(
            "trainer.prompts_per_update",
            t.prompts_per_update,
            f"must divide trainer.prompts_per_step ({t.prompts_per_step}); nearest: "
            f"{_nearest_divisors(t.prompts_per_update, t.prompts_per_step)}",
        )
    segment = a.trajectory_shaping != "none" and a.tas_scope == "segment"
    if a.tas_range_rollouts < 0:
        _fail("algorithm.tas_range_rollouts", a.tas_range_rollouts, "must be >= 0 (0: the rank's whole mini-batch)")
    if segment and a.tas_segment < 2:
        _fail(
            "algorithm.tas_segment",
            a.tas_segment,
            "a TAS segment needs >= 2 rollouts (one rollout has no range, so alpha would always be 1)",
        )
    model_parallel = p.tp * p.pp * p.cp
    if not world_size or world_size % model_parallel:
        return
    dp = p.dp or world_size // model_parallel
    if t.prompts_per_update % dp:
        _fail(
            "trainer.prompts_per_update",
            t.prompts_per_update,
            f"must be a multiple of the data-parallel size {dp} (prompt groups stay whole on one rank); "
            f"nearest: {_nearest_multiples(t.prompts_per_update, dp)}",
        )
    rollouts = t.prompts_per_update // dp * cfg.rollout.num_samples_per_prompt
    if not t.max_tokens_per_micro_batch and rollouts % t.micro_batch_size:
        _fail(
            "trainer.micro_batch_size",
            t.micro_batch_size,
            f"must divide a rank's rollouts per update ({t.prompts_per_update} prompts / dp {dp} x "
            f"{cfg.rollout.num_samples_per_prompt} samples = {rollouts}); nearest: "
            f"{_nearest_divisors(t.micro_batch_size, rollouts)}",
        )
    if segment and rollouts % a.tas_segment:
        _fail(
            "algorithm.tas_segment",
            a.tas_segment,
            f"must divide a rank's rollouts per update ({rollouts}); "
            f"nearest: {_nearest_divisors(a.tas_segment, rollouts)}",
        )
    window = a.tas_range_rollouts
    if segment and window and (window % a.tas_segment or rollouts % window):
        _fail(
            "algorithm.tas_range_rollouts",
            window,
            f"must be whole TAS segments ({a.tas_segment}) and divide a rank's rollouts per update ({rollouts}); "
            f"nearest: {_nearest_divisors(window, rollouts, a.tas_segment)}",
        )


def engine_context_length(cfg: Config) -> int:
    """Tokens a rollout engine must hold (its vLLM max_model_len): data.max_prompt_length (image tokens included)
    + rollout.max_response_length."""
    return cfg.data.max_prompt_length + cfg.rollout.max_response_length


def transformer_engine_available() -> bool:
    """Transformer Engine importable and a CUDA device present (it cannot even import without CUDA)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    import torch

    return torch.cuda.is_available()


def _check_precision(m: ModelConfig, check_host: bool) -> None:
    wants_te = m.transformer_impl == "transformer_engine" or m.fp8 != "none"
    if check_host and wants_te and not transformer_engine_available():
        what = "model.fp8" if m.fp8 != "none" else "model.transformer_impl"
        _fail(
            what,
            m.fp8 if m.fp8 != "none" else m.transformer_impl,
            "needs Transformer Engine on a CUDA host (pip install 'transformer-engine[pytorch]' on a GPU "
            "node, or the NGC PyTorch container); on this host use model.fp8=none model.transformer_impl=auto",
        )
    if m.fp8 != "none" and m.dtype != "bfloat16":
        _fail("model.fp8", m.fp8, "FP8 training keeps bf16 master compute; set model.dtype=bfloat16")


DELAYED_ONLY = {"fp8_amax_history_len": 1, "fp8_amax_compute_algo": "most_recent", "fp8_margin": 0}


def _check_fp8(cfg: Config, world_size: int) -> None:
    """FP8 settings that could not take effect, or would hang, are refused."""
    m, p = cfg.model, cfg.parallel
    if m.fp8 == "none":
        if m.fp8_experience:
            _fail("model.fp8_experience", True, "needs model.fp8=hybrid or e4m3 (there is no FP8 to run it in)")
        return
    if m.transformer_impl == "local":
        _fail(
            "model.transformer_impl",
            "local",
            f"model.fp8={m.fp8} needs Transformer Engine layers (the local spec would train in bf16 silently); "
            "set model.transformer_impl=transformer_engine or auto",
        )
    if m.fp8_recipe != "delayed":
        for name, default in DELAYED_ONLY.items():
            if getattr(m, name) != default:
                fix = f"applies to model.fp8_recipe=delayed only, not {m.fp8_recipe}"
                _fail(f"model.{name}", getattr(m, name), fix)
    if m.fp8_amax_history_len < 1:
        _fail("model.fp8_amax_history_len", m.fp8_amax_history_len, "must be >= 1")
    dp = world_size // (p.tp * p.pp * p.cp) if world_size else 1
    if m.fp8_recipe == "delayed" and cfg.trainer.max_tokens_per_micro_batch and dp > 1:
        _fail(
            "trainer.max_tokens_per_micro_batch",
            cfg.trainer.max_tokens_per_micro_batch,
            "with model.fp8_recipe=delayed every forward all-reduces its amax over the data-parallel ranks, and "
            "token-budget micro-batches can differ in number between them (a hang); use a fixed "
            "trainer.micro_batch_size (max_tokens_per_micro_batch=0) or model.fp8_recipe=tensorwise",
        )


def _resolve_callable_spec(path: str, spec: str) -> None:
    module, sep, func = spec.rpartition(":")
    if not sep or not module or not func.isidentifier():
        _fail(path, spec, 'expected "package.module:function" or "path/to/file.py:function"')


# -------------------------------------------------------------------------------------- loading / overrides


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Builds a Config from an optional YAML file and dotted `key=value` overrides (YAML-typed values)."""
    raw: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        raw = yaml.safe_load(text) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected section.field=value, e.g. algorithm.token_fraction=0.4")
        node = raw
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is a value, not a section")
        node[leaf] = yaml.safe_load(value) if value.strip() else ""
    return _build(Config, raw, "")


# Keys earlier versions read, and what says the same now.
REPLACED = {
    "algorithm.name": "VPPO = algorithm.base=dapo (the default) with trajectory_shaping and token_filter on; "
    "DAPO = algorithm.trajectory_shaping=none algorithm.token_filter=none; GRPO = that with algorithm.base=grpo "
    "(python -m vppo_megatron.algo.ablations lists every combination)",
    "rollout.verify_sync": "set rollout.verify_sync_every=N (probe every N syncs; 0 = never) and "
    "rollout.verify_sync_tolerance",
}

# Values earlier versions accepted, and what says the same now.
REPLACED_VALUES = {
    ("algorithm.tas_scope", "micro_batch"): "the reference's TAS statistic is now independent of the memory "
    "micro-batch: set algorithm.tas_scope=segment and algorithm.tas_segment=<rollouts> (16 in the reference's 7B "
    "script, 4 in its 8B one)",
}


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if f"{prefix}{key}" in REPLACED:
            raise ConfigError(f"config key {prefix}{key} was replaced: {REPLACED[f'{prefix}{key}']}")
        if isinstance(value, str) and (f"{prefix}{key}", value) in REPLACED_VALUES:
            raise ConfigError(f"{prefix}{key}={value} was replaced: {REPLACED_VALUES[(f'{prefix}{key}', value)]}")
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(f"unknown config key {prefix}{key}{hint} (known: {', '.join(names)})")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path + ".")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            _fail(path, value, f"allowed values: {' | '.join(map(str, allowed))}")
        return value
    if origin in (list, tuple):
        (item_hint, *_) = typing.get_args(hint)
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce(item_hint, v, f"{path}[{i}]") for i, v in enumerate(items)]
    if origin in (typing.Union, types.UnionType):  # `X | None`: unset, or an X
        (inner,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return None if value is None else _coerce(inner, value, path)
    if hint is bool:
        if not isinstance(value, bool):
            _fail(path, value, "expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            _fail(path, value, "expected an integer")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                _fail(path, value, "expected a finite number")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            _fail(path, value, "expected a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            _fail(path, value, "expected a string")
        return str(value)
    raise AssertionError(f"unsupported config type {hint} at {path}")


def field_docs(cls: type = Config) -> dict[str, str]:
    """Maps every field of `cls` to its docstring (the string literal below it in the source)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)
    return docs


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted name, default, docstring) for every leaf field: the reference table `vppo config` prints."""
    rows = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", getattr(default, f.name), docs.get(f.name, "")))
    return rows
