"""The Megatron actor: builds the Qwen2.5-VL model for this rank's (TP, PP, CP, DP) coordinates, runs the
experience pass (stage 3) and the policy update (stage 6).

Experience pass: ONE forward-only pipeline schedule over paired micro-batches. Each micro-batch holds its B
rollouts twice, first with the original images, then with the perturbed ones (same ids, same M-RoPE positions;
only pixels differ), so the last stage sees both views' logits together and returns per response token the old
log-prob, the perturbed log-prob, the dependency (algo/ estimators, vocab-parallel) and the entropy. Full
[tokens, vocab] logits are never gathered.

Update: one forward/backward schedule (1F1B under PP) over the micro-batches of a mini-batch. The loss function
returns (sum over local tokens, local token count); with `calculate_per_token_loss` megatron-core sums the counts
over micro-batches, PP and DP x CP and divides the gradients by that global token count: the token-mean of
the VPPO loss, layout-independent. Megatron DDP, the (distributed) optimizer and grad-norm clipping follow.

Legend: B rollouts, S padded sequence length, S_l its CP-local part, T response positions, V_tp vocab shard.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from vppo_megatron import families
from vppo_megatron.actor import batching, weights
from vppo_megatron.actor.cp_attention import zigzag_positions
from vppo_megatron.actor.model import build_chunks, layer_spec, layer_spec_name, transformer_config
from vppo_megatron.actor.offload import ActorOffload, drop_fp8_weight_caches
from vppo_megatron.algo import loss as algo_loss
from vppo_megatron.algo import perception, perturb, vocab_parallel
from vppo_megatron.config import Config, ConfigError
from vppo_megatron.parallel.layout import ParallelGroups
from vppo_megatron.types import ActorSample

FP8_TOKEN_MULTIPLE = 16  # Transformer Engine asserts FP8 GEMM inputs' token dimension is divisible by 8 (16 safe)
FP8_BLOCK = 128  # the blockwise recipe quantizes 1 x 128 blocks: its sequence-parallel all-gather needs rows % 128


def token_multiple(tp: int, cp: int, sequence_parallel: bool, fp8: bool, fp8_recipe: str = "delayed") -> int:
    """The multiple every padded sequence length S is rounded up to. Context parallelism splits S into 2 x CP
    chunks (zigzag) and sequence parallelism splits each rank's S / CP tokens over TP; FP8 GEMMs see the rank's
    local shard, S / (CP x TP) tokens under sequence parallelism (its input before TE's all-gather), which must
    be a multiple of 16: so S is a multiple of 16 x CP x TP, not of 16 (at TP8 that would leave 2 tokens). The
    blockwise recipe also quantizes that shard for the all-gather in 128-row blocks (TE falls back to a bf16
    all-gather, or asserts in TE 2.8-2.13, otherwise): 128 per shard there."""
    shard = cp * (tp if sequence_parallel else 1)
    multiple = 2 * shard if cp > 1 else shard
    if fp8:
        per_shard = FP8_BLOCK if fp8_recipe == "blockwise" and sequence_parallel else FP8_TOKEN_MULTIPLE
        multiple = math.lcm(multiple, per_shard * shard)
    return multiple


@dataclass
class Experience:
    """Per response token results of the experience pass, response-aligned [B, T] (zero past each response)."""

    old_logp_BT: torch.Tensor
    aug_logp_BT: torch.Tensor
    dependency_BT: torch.Tensor
    entropy_BT: torch.Tensor
    response_mask_BT: torch.Tensor


def check_family(family: str, model_type: str, model_dir) -> None:
    """The checkpoint is the configured family, and a registered one."""
    if model_type != family:
        raise ConfigError(
            f"model.family={family} but {model_dir}/config.json is model_type {model_type!r}; "
            f"set model.family={model_type} (or point model.path at a {family} checkpoint)"
        )
    try:
        families.get(family)
    except families.UnknownFamily as exc:
        raise ConfigError(f"model.family={family}: {exc}") from None


class MegatronActor:
    def __init__(
        self,
        cfg: Config,
        groups: ParallelGroups,
        model_dir: str,
        training: bool = True,
        load_weights: bool = True,
        progress: bool = False,
    ):
        """`model_dir` holds the HF config and processor files (and, with load_weights, the weights)."""
        from transformers import AutoConfig

        self.cfg, self.groups = cfg, groups
        self.hf_config = AutoConfig.from_pretrained(model_dir)
        check_family(cfg.model.family, self.hf_config.model_type, model_dir)
        text = self.hf_config.text_config
        groups.layout.validate(
            dist.get_world_size(),
            text.num_hidden_layers,
            text.num_attention_heads,
            text.num_key_value_heads,
            text.vocab_size,
            deepstack_layers=families.Family.deepstack_layers(self.hf_config),
        )
        self.model_dir = model_dir
        self._processor = None  # AutoProcessor of model_dir, loaded on first use (a conversion never needs it)
        self._black = None  # one encoded black patch (_black_patch), made on first use
        self.spec_name = layer_spec_name(cfg)
        self.config = transformer_config(self.hf_config, cfg, groups.layout)
        spec = layer_spec(cfg, self.config, families.get(self.hf_config.model_type))
        self.chunks = build_chunks(self.hf_config, self.config, spec, groups.layout.vpp)
        # megatron-core builds its layers on the current GPU; HF's vision tower is built on the host
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        if self.device is not None:
            for chunk in self.chunks:
                chunk.to(self.device)
        self.rules = weights.family_rules(self.hf_config, self.spec_name)
        self.dims = weights.attention_dims(self.hf_config)
        if load_weights:
            reader = weights.SafetensorsReader(model_dir)
            for chunk in self.chunks:
                weights.load_hf_weights(
                    chunk,
                    reader,
                    self.rules,
                    self.dims,
                    groups.tp_rank,
                    groups.layout.tp,
                    progress=progress and dist.get_rank() == 0,
                )
        self.model = self.chunks
        self.optimizer = None
        if training:
            self._build_training()

    # ------------------------------------------------------------------------------------------ setup

    def _build_training(self) -> None:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.transformer.module import Float16Module

        o = self.cfg.optimizer
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=o.distributed_optimizer
        )
        wrapped = []
        for i, chunk in enumerate(self.chunks):
            module = Float16Module(self.config, chunk) if self.config.bf16 else chunk
            wrapped.append(DistributedDataParallel(self.config, ddp_config, module, disable_bucketing=i > 0))
        self.model = wrapped
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=o.lr,
                weight_decay=o.weight_decay,
                adam_beta1=o.adam_beta1,
                adam_beta2=o.adam_beta2,
                adam_eps=o.adam_eps,
                clip_grad=o.grad_clip,
                bf16=self.config.bf16,
                params_dtype=self.config.params_dtype,
                use_distributed_optimizer=o.distributed_optimizer,
            ),
            wrapped,
        )
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.no_sync_func = [m.no_sync for m in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
        self.updates = 0
        self.residency = ActorOffload(self.model, self.optimizer)

    # ----------------------------------------------------------------------------------- micro-batches

    @property
    def image_processor(self):
        return self._loaded_processor().image_processor

    @property
    def pad_id(self) -> int:
        return self._loaded_processor().tokenizer.pad_token_id

    def _loaded_processor(self):
        if self._processor is None:
            from transformers import AutoProcessor

            self._processor = AutoProcessor.from_pretrained(self.model_dir)
        return self._processor

    def _length_multiple(self) -> int:
        layout = self.groups.layout
        m = self.cfg.model
        return token_multiple(layout.tp, layout.cp, self.config.sequence_parallel, m.fp8 != "none", m.fp8_recipe)

    def _perturb_cell(self) -> int:
        """The perturbation's cell size in pixels: algorithm.perturb_cell_size, else the vision patch size."""
        return self.cfg.algorithm.perturb_cell_size or self.hf_config.vision_config.patch_size

    def _perturbed_images(self, sample: ActorSample, step: int) -> list:
        a, cell = self.cfg.algorithm, self._perturb_cell()
        return [
            perturb.perturb_image(
                torch.from_numpy(image),
                a.perturbation,
                perturb.perturbation_seed(self.cfg.trainer.seed, step, sample.uid, k),
                cell_size=cell,
                probability=a.perturb_probability,
                noise_sigma=a.noise_sigma,
                blur_radius=a.blur_radius,
                grey_value=a.grey_value,
            ).numpy()
            for k, image in enumerate(sample.images)
        ]

    def prepare(
        self,
        samples: list[ActorSample],
        step: int = 0,
        with_perception: bool = True,
        mini_batches: list[slice] | None = None,
    ) -> batching.StepBatch:
        """The step's micro-batches, built once (batching.StepBatch): a prompt's images are encoded once for all
        its rollouts and stored once (the rollouts' micro-batches share the tensor); each rollout's perturbed
        images (every rollout has its own perturbation seed) are made when the dual pass reaches its micro-batch."""
        t = self.cfg.trainer
        multiple = self._length_multiple()
        rows = batching.micro_batch_rows(
            [len(s.prompt_ids) + len(s.response_ids) for s in samples],
            mini_batches or [slice(0, len(samples))],
            t.micro_batch_size,
            t.max_tokens_per_micro_batch,
            multiple,
            t.pack_sequences,
        )
        by_images: dict[int, tuple] = {}  # rollouts of one prompt share its image list
        for s in samples:
            if id(s.images) not in by_images:
                by_images[id(s.images)] = batching.encode_images(self.image_processor, s.images)
        original = [by_images[id(s.images)] for s in samples]
        views = [
            batching.collate(
                self.hf_config,
                samples[r],
                [e[0] for e in original[r]],
                [e[1] for e in original[r]],
                self.pad_id,
                multiple,
                t.pack_sequences,
            )
            for r in rows
        ]
        perturb = partial(self._encode_perturbed, step, by_images) if with_perception else None
        return batching.StepBatch(samples, rows, views, perturb)

    def _encode_perturbed(self, step: int, encoded: dict[int, tuple], samples: list[ActorSample]) -> list[tuple]:
        """Each rollout's perturbed images, encoded (its own seeded mask, as the reference draws one per
        response): built for one micro-batch when the dual pass reaches it. Patch blackening with one cell per
        patch is applied to the prompt's one encoding (`encoded`, by image list) instead of encoding each
        rollout's blackened copy again: the same tensor, without the processor's per-rollout work."""
        out = []
        for s in samples:
            pixels, grid = encoded[id(s.images)]
            if pixels is not None and self._blackens_patches(s.images, grid):
                a, merge = self.cfg.algorithm, self.image_processor.merge_size
                keeps = [
                    perturb.blackening_keep(
                        (h, w), a.perturb_probability, perturb.perturbation_seed(self.cfg.trainer.seed, step, s.uid, k)
                    )
                    for k, (_, h, w) in enumerate(grid.tolist())
                ]
                out.append((batching.blacken_patches(pixels, grid, keeps, merge, self._black_patch()), grid))
            else:
                out.append(batching.encode_images(self.image_processor, self._perturbed_images(s, step)))
        return out

    def _blackens_patches(self, images: list, grid_thw: torch.Tensor) -> bool:
        """Whether this rollout's perturbation can act on its prompt's encoded patches (`_encode_perturbed`)."""
        return (
            self.cfg.algorithm.perturbation == "patch_blackening"
            and self._perturb_cell() == getattr(self.image_processor, "patch_size", None)
            and hasattr(self.image_processor, "merge_size")
            and batching.unresized(self.image_processor, images, grid_thw)
        )

    def _black_patch(self) -> torch.Tensor:
        """One encoded black patch [C * temporal_patch * patch^2] (every black patch encodes the same)."""
        if self._black is None:
            side = self.image_processor.patch_size * self.image_processor.merge_size
            pixels, _ = batching.encode_images(self.image_processor, [np.zeros((side, side, 3), dtype=np.uint8)])
            self._black = pixels[0].clone()
        return self._black

    def _local(self, values_BS: torch.Tensor) -> torch.Tensor:
        """This CP rank's zigzag part of a full-sequence [B, S] tensor."""
        layout = self.groups.layout
        if layout.cp == 1:
            return values_BS
        return values_BS[:, zigzag_positions(values_BS.shape[1], layout.cp, self.groups.cp_rank)]

    def _gather_cp(self, local_BS: torch.Tensor) -> torch.Tensor:
        """Full-sequence [B, S] from every CP rank's zigzag part (forward-only results)."""
        layout = self.groups.layout
        if layout.cp == 1:
            return local_BS
        parts = [torch.empty_like(local_BS) for _ in range(layout.cp)]
        dist.all_gather(parts, local_BS.contiguous(), group=self.groups.cp)
        seq_len = local_BS.shape[1] * layout.cp
        held = torch.cat([zigzag_positions(seq_len, layout.cp, r) for r in range(layout.cp)])
        return torch.cat(parts, dim=1)[:, torch.argsort(held)]

    def _forward(self, model, mb: batching.MicroBatch):
        assert not mb.pixel_parts, "a micro-batch runs materialized (MicroBatch.materialize): its pixels in one tensor"
        attention_mask, packed = None, None
        if mb.packed:  # one row of rollouts: attention within each (THD); no mask tensor
            from megatron.core.packed_seq_params import PackedSeqParams

            bounds, longest = mb.cu_seqlens, mb.longest_segment()  # on the inputs' device (materialize)
            packed = PackedSeqParams(
                qkv_format="thd", cu_seqlens_q=bounds, cu_seqlens_kv=bounds, max_seqlen_q=longest, max_seqlen_kv=longest
            )
        elif self.groups.layout.cp == 1 and self.spec_name == "local":
            seq_len = mb.input_ids_BS.shape[1]
            ones = torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=mb.input_ids_BS.device)
            attention_mask = torch.triu(ones, diagonal=1)
        return model(
            mb.input_ids_BS,
            mb.position_ids_3BS,
            attention_mask,
            mb.pixel_values_NC,
            mb.image_grid_thw,
            mb.image_mask_BS,
            packed_seq_params=packed,
        )

    def _schedule(self, step_func, build, host: list[batching.MicroBatch], forward_only: bool, views: int = 1):
        """One megatron-core schedule over the micro-batches of `host` (on the host); micro-batch i's inputs are
        built (`build(i, with_pixels)`: with `views` copies of its rows) and moved to the device only when the
        schedule asks for it (batching.InputFeed), so one micro-batch's inputs (per virtual stage) sit on the
        device, not the pass's."""
        count = len(host)
        feeds = [batching.InputFeed(build, count, self.device, chunk.pre_process) for chunk in self.chunks]
        self.feeds = feeds  # the last schedule's input accounting (tests, memory measurements)
        iterators = iter(feeds[0])
        if len(self.model) > 1:
            # interleaved: every virtual stage walks the same micro-batches with its own iterator
            iterators = [iter(feed) for feed in feeds]
            self.config.microbatch_group_size_per_vp_stage = self._microbatch_group_size(count)
        return get_forward_backward_func()(
            forward_step_func=step_func,
            data_iterator=iterators,
            model=self.model,
            num_microbatches=count,
            # rows and length fed (p2p shapes go at run time); a packed micro-batch's views share one row
            seq_length=max(mb.input_ids_BS.shape[1] * (views if mb.packed else 1) for mb in host),
            micro_batch_size=(1 if host[0].packed else views) * host[0].input_ids_BS.shape[0],
            forward_only=forward_only,
        )

    def _microbatch_group_size(self, num_microbatches: int) -> int:
        """Micro-batches a virtual stage runs in a row: the pipeline size (megatron-core's default) when it
        divides their number, else all of them (the interleaved schedule accepts any group in [pp, M] that
        leaves no remainder below pp)."""
        pp, vpp = self.groups.layout.pp, self.groups.layout.vpp
        if num_microbatches < pp:
            raise ValueError(
                f"parallel.vpp={vpp}: the interleaved schedule needs at least parallel.pp={pp} micro-batches "
                f"per pass, this rank has {num_microbatches}; lower trainer.micro_batch_size, give each DP "
                "rank more rollouts, or set parallel.vpp=1"
            )
        return pp if num_microbatches % pp == 0 else num_microbatches

    # ------------------------------------------------------------------------------- experience pass

    def _token_log_probs(self, logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        vocab_tp = logits_BSV.shape[-1]
        flat = logits_BSV.reshape(-1, vocab_tp)
        return vocab_parallel.token_log_prob(
            flat, labels_BS.reshape(-1), self.groups.tp_rank * vocab_tp, self.groups.tp
        ).view(labels_BS.shape)

    def _experience_outputs(self, mb: batching.MicroBatch, paired: bool, with_entropy: bool, logits_BSV: torch.Tensor):
        """Last stage: logits [2B, S_l, V_tp] of both views (or [B, ...] of one) -> per-token results [B, S]."""
        with torch.no_grad():
            # scaled in place: Float16Module's output is already fp32 (.float() is the same tensor), and nothing reads
            # it after this; a copy would be one more [2B, S, V_tp] fp32 tensor than the memory plan counts
            logits = logits_BSV.float().div_(self.cfg.rollout.temperature)
            vocab_tp = logits.shape[-1]
            if mb.packed and paired:  # one row holding both views back to back: a row per view
                logits = logits.view(2, -1, vocab_tp)
            batch = logits.shape[0] // 2 if paired else logits.shape[0]
            logp_BS = self._token_log_probs(logits, self._local(mb.labels_BS).view(logits.shape[:2]))
            original_NV = logits[:batch].reshape(-1, vocab_tp)
            results = {"old_logp": logp_BS[:batch]}
            if with_entropy:  # a second pass over the vocabulary: only the entropy TGF signal reads it
                results["entropy"] = vocab_parallel.entropy(original_NV, self.groups.tp).view(batch, -1)
            if paired:
                results["aug_logp"] = logp_BS[batch:]
                results["dependency"] = self._dependency(results, original_NV, logits[batch:].reshape(-1, vocab_tp))
            results = {k: self._gather_cp(v).cpu() for k, v in results.items()}
        device = logits_BSV.device  # the schedule adds these to its own device tensors
        return torch.zeros((), device=device), torch.tensor(1, dtype=torch.int, device=device), results

    def _dependency(self, results, original_NV: torch.Tensor, perturbed_NV: torch.Tensor) -> torch.Tensor:
        estimator, old_BS = self.cfg.algorithm.estimator, results["old_logp"]
        if estimator in perception.SAMPLED_TOKEN_ESTIMATORS:
            return perception.token_dependency(estimator, old_logp_N=old_BS, aug_logp_N=results["aug_logp"])
        return perception.token_dependency(
            estimator, logits_NV_tp=original_NV, aug_logits_NV_tp=perturbed_NV, tp_group=self.groups.tp
        ).view(old_BS.shape)

    @contextlib.contextmanager
    def _experience_precision(self):
        """The experience pass in bf16 unless model.fp8_experience: megatron-core enters Transformer Engine's FP8
        context from the shared TransformerConfig at every forward (TransformerBlock reads `config.fp8`), so the
        pass runs with it cleared and the update with it restored."""
        fp8 = self.config.fp8
        if fp8 and not self.cfg.model.fp8_experience:
            self.config.fp8 = None
        try:
            yield
        finally:
            self.config.fp8 = fp8

    def experience(
        self,
        batch: batching.StepBatch | list[ActorSample],
        step: int = 0,
        with_perception: bool = True,
        with_entropy: bool = True,
    ) -> Experience:
        """Per response token results for this DP rank's rollouts, on every rank of its pipeline.

        `batch` from `prepare` (or samples, prepared here). with_perception=True: the dual pass (old and
        perturbed log-probs, dependency, entropy) in ONE schedule; False: a plain log-prob pass (baselines):
        aug_logp and dependency are zero. with_entropy=False leaves entropy zero (one vocabulary pass less).
        """
        if not isinstance(batch, batching.StepBatch):
            batch = self.prepare(batch, step, with_perception)
        if with_perception and batch.perturb is None:
            raise ValueError("experience(with_perception=True) needs a batch prepared with_perception=True")
        samples = batch.samples
        build = batch.paired if with_perception else batch.original
        for chunk in self.model:
            chunk.eval()

        def step_func(data_iterator, model):
            mb = next(data_iterator)
            return self._forward(model, mb), partial(self._experience_outputs, mb, with_perception, with_entropy)

        with torch.no_grad(), self._experience_precision():
            outputs = self._schedule(step_func, build, batch.views, True, views=2 if with_perception else 1)
        drop_fp8_weight_caches(self.chunks)  # held only while a pass runs (memory.py plans it so)
        num_positions = max(len(s.response_ids) for s in samples)
        names = ("old_logp", "aug_logp", "dependency", "entropy")
        stacked = torch.zeros((len(names), len(samples), num_positions), dtype=torch.float32)
        if self.groups.is_last_stage:
            row = 0
            for out, mb in zip(outputs, batch.views):
                rollouts = len(mb.prompt_lengths)
                for i, name in enumerate(names):
                    if name in out:
                        stacked[i, row : row + rollouts] = mb.response_aligned(out[name], num_positions)
                row += rollouts
        if self.groups.layout.pp > 1:
            on_device = stacked.to(self.device) if self.device is not None else stacked  # NCCL needs device memory
            dist.broadcast(on_device, src=self.groups.pp_last_rank, group=self.groups.pp)
            stacked = on_device.cpu()
        mask = torch.zeros((len(samples), num_positions))
        for b, s in enumerate(samples):
            mask[b, : len(s.response_ids)] = 1.0
        return Experience(*(stacked[i] * mask for i in range(len(names))), response_mask_BT=mask)

    # ------------------------------------------------------------------------------------------ update

    def _policy_loss(self, mb: batching.MicroBatch, logits_BSV: torch.Tensor):
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        a = self.cfg.algorithm
        logits = logits_BSV.float() / self.cfg.rollout.temperature
        # vocab_parallel_cross_entropy works in place on fp32 input: keep the graph's logits intact
        logp_BS = -vocab_parallel_cross_entropy(logits.clone(), self._local(mb.labels_BS))
        e = {k: self._local(v) for k, v in mb.extras_BS.items() if v.dim() == 2}
        response_mask = self._local(mb.response_mask_BS)
        out = algo_loss.policy_loss(
            logp_BS,
            e["old_logp"],
            e.get("advantage", mb.extras_BS["advantage"]),  # per token when packed, per rollout otherwise
            response_mask,
            e["gradient_mask"],
            num_global_tokens=1,  # a sum: megatron-core divides by the global token count
            clip_low=a.clip_ratio_low,
            clip_high=a.clip_ratio_high,
            clip_dual=a.clip_ratio_dual,
            entropy_coef=a.entropy_coef,
            dependency_BT=e.get("dependency"),
        )
        num_tokens = response_mask.sum().to(torch.int)
        sums = dict(out.metric_sums, **{"actor/loss": (out.loss.detach().double(), num_tokens.double())})
        return out.loss, num_tokens, {"metric_sums": sums}

    def _sft_loss(self, mb: batching.MicroBatch, logits_BSV: torch.Tensor):
        """Supervised warm start: sum of -log pi(target) over the response tokens (megatron-core divides by the
        global token count)."""
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        nll_BS = vocab_parallel_cross_entropy(logits_BSV.float().clone(), self._local(mb.labels_BS))
        response_mask = self._local(mb.response_mask_BS)
        loss = (nll_BS * response_mask).sum()
        num_tokens = response_mask.sum().to(torch.int)
        return loss, num_tokens, {"metric_sums": {"sft/nll": (loss.detach().double(), num_tokens.double())}}

    def _optimizer_step(self, micro_batches: list[batching.MicroBatch], loss_fn) -> dict[str, float]:
        """One forward/backward schedule over `micro_batches` with `loss_fn`, then one optimizer step; metrics
        reduced over DP x CP on the last stage and shared with the whole pipeline."""
        for chunk in self.model:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        warmup, lr = self.cfg.optimizer.warmup_steps, self.cfg.optimizer.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr * min(1.0, (self.updates + 1) / warmup) if warmup else lr

        def step_func(data_iterator, model):
            mb = next(data_iterator)
            return self._forward(model, mb), partial(loss_fn, mb)

        outputs = self._schedule(step_func, lambda i, _pixels: micro_batches[i], micro_batches, forward_only=False)
        update_ok, grad_norm, _ = self.optimizer.step()
        drop_fp8_weight_caches(self.chunks)  # FP8 copies of the weights before the step: stale, and memory
        self.updates += 1
        metrics = None
        if self.groups.is_last_stage:
            metrics = algo_loss.reduce_metrics([o["metric_sums"] for o in outputs], group=self.groups.dp_cp)
            metrics.update(
                {
                    "actor/grad_norm": float(grad_norm or 0.0),
                    "actor/update_ok": float(bool(update_ok)),
                    "actor/lr": self.optimizer.param_groups[0]["lr"],
                }
            )
        box = [metrics]
        if self.groups.layout.pp > 1:
            dist.broadcast_object_list(box, src=self.groups.pp_last_rank, group=self.groups.pp)
        return box[0]

    def update(
        self,
        batch: batching.StepBatch | list[ActorSample],
        old_logp_BT: torch.Tensor,
        advantage_B: torch.Tensor,
        gradient_mask_BT: torch.Tensor,
        dependency_BT: torch.Tensor | None = None,
        rows: slice | None = None,
    ) -> dict[str, float]:
        """One policy optimizer step on the micro-batches of `rows` (a mini-batch; default all) of `batch`;
        the per-row tensors cover the whole batch. Returns metrics over DP x CP."""
        if not isinstance(batch, batching.StepBatch):
            batch = self.prepare(batch, with_perception=False)
        rows = rows or slice(0, len(batch.samples))
        micro_batches, covered = [], 0
        for r, mb in zip(batch.micro_rows, batch.views):
            if r.start < rows.start or r.stop > rows.stop:
                continue
            covered += r.stop - r.start
            advantage = advantage_B[r].float()
            if mb.packed:  # rollouts share the row: each token carries its rollout's advantage
                advantage = mb.label_positions(advantage[:, None].expand(-1, old_logp_BT.shape[1]))
            mb.extras_BS = {
                "old_logp": mb.label_positions(old_logp_BT[r]),
                "gradient_mask": mb.label_positions(gradient_mask_BT[r]),
                "advantage": advantage,
            }
            if dependency_BT is not None:
                mb.extras_BS["dependency"] = mb.label_positions(dependency_BT[r])
            micro_batches.append(mb)
        if covered != rows.stop - rows.start:
            raise ValueError(f"rows {rows} are not whole micro-batches of this batch (a mini-batch boundary)")
        return self._optimizer_step(micro_batches, self._policy_loss)

    def sft_update(self, samples: list[ActorSample]) -> dict[str, float]:
        """One supervised optimizer step: the responses are the targets."""
        return self._optimizer_step(self.prepare(samples, with_perception=False).views, self._sft_loss)

    # -------------------------------------------------------------------------------------- residency

    def offload(self, kinds: tuple[str, ...]) -> dict[str, int]:
        """Releases this rank's optimizer state / gradient buffers / weights (actor/offload.py); bytes per kind."""
        return self.residency.offload(kinds)

    def onload(self) -> dict[str, int]:
        """Brings back everything `offload` released; bytes per kind."""
        return self.residency.onload()

    # ------------------------------------------------------------------------------------------ weights

    def unwrapped(self) -> list[torch.nn.Module]:
        return self.chunks

    def hf_tensors(self):
        """(HF name, full tensor) of this pipeline stage's parameters, gathered over TP (collective over TP)."""
        for chunk in self.chunks:
            yield from weights.stage_hf_tensors(chunk, self.rules, self.dims, self.groups.tp)
