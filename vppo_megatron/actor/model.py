"""A Qwen vision-language family as a Megatron model: HF's vision tower + merger on the first pipeline stage,
megatron-core's GPTModel (M-RoPE, GQA, RMSNorm, SwiGLU, vocab-parallel embedding and output layer) for the
language, built from the family's registry record (vppo_megatron/families): QKV bias (Qwen2.5-VL) or per-head
QK-norm (Qwen3-VL), contiguous or interleaved M-RoPE sections, and DeepStack.

DeepStack (Qwen3-VL): the vision tower also returns merged features of a few intermediate ViT layers; feature k
is added to the output of LLM layer k at the image tokens. The features travel as the decoder's `context`
argument, stacked densely as [S, B, K, H] with zeros away from the image tokens (x + 0 is exact, so this equals
HF's masked add): megatron-core hands `context` to every layer and, under full recompute, through its checkpoint
as an input, so the recomputed layers see the same micro-batch's features and the gradient reaches the vision
tower. The dense tensor is split like the hidden states: zigzag chunks under CP, sequence shards under SP. The
layers that receive features must be on the first stage's first chunk (ParallelLayout.validate refuses other
splits): carrying the features along the pipeline would widen every p2p message by K hidden states.

The vision tower is HF's own module (Megatron-Bridge's design), replicated over TP ranks; its gradients are
identical across TP (every TP rank sees the same hidden-state gradient) and are averaged over TP by
megatron-core's finalize step (`average_gradients_across_tp_domain`), so they stay consistent in any case.
A TP-sharded Megatron ViT is a later optimisation.

Layer specs: Transformer Engine on GPU (FP8 through TransformerConfig.fp8 / fp8_recipe; the vision tower,
embedding and output layer stay in bf16), the local spec on CPU, with `ContextParallelAttention` as the core
attention when CP > 1 (megatron-core's local attention refuses CP).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from megatron.core.enums import ModelType
from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank
from megatron.core.models.common.embeddings.rotary_pos_embedding import MultimodalRotaryEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer

from vppo_megatron import families
from vppo_megatron.actor.cp_attention import ContextParallelAttention, zigzag_positions
from vppo_megatron.config import Config, ConfigError, transformer_engine_available
from vppo_megatron.parallel.layout import ParallelLayout


def layer_spec_name(cfg: Config) -> str:
    """local | transformer_engine, from model.transformer_impl and the host."""
    impl = cfg.model.transformer_impl
    if impl == "auto":
        return "transformer_engine" if transformer_engine_available() else "local"
    if impl == "transformer_engine" and not transformer_engine_available():
        raise ConfigError("model.transformer_impl=transformer_engine needs Transformer Engine on a CUDA host")
    return impl


def fp8_settings(cfg: Config) -> dict:
    """The FP8 fields of megatron-core's TransformerConfig (none without FP8; the delayed-scaling knobs only for
    the delayed recipe, which alone reads them)."""
    m = cfg.model
    if m.fp8 == "none":
        return {}
    settings = {"fp8": m.fp8, "fp8_recipe": m.fp8_recipe}
    if m.fp8_recipe == "delayed":
        settings.update(
            fp8_amax_history_len=m.fp8_amax_history_len,
            fp8_amax_compute_algo=m.fp8_amax_compute_algo,
            fp8_margin=m.fp8_margin,
        )
    return settings


def transformer_config(hf_config, cfg: Config, layout: ParallelLayout) -> TransformerConfig:
    """megatron-core's TransformerConfig for the language model of an HF config of a registered family."""
    family = families.get(hf_config.model_type)
    text = hf_config.text_config
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    te = layer_spec_name(cfg) == "transformer_engine"
    fp8 = fp8_settings(cfg)
    recompute = {}
    if cfg.model.recompute != "none":
        recompute = (
            {"recompute_granularity": cfg.model.recompute, "recompute_method": "uniform", "recompute_num_layers": 1}
            if cfg.model.recompute == "full"
            else {"recompute_granularity": "selective"}
        )
    return TransformerConfig(
        num_layers=text.num_hidden_layers,
        hidden_size=text.hidden_size,
        ffn_hidden_size=text.intermediate_size,
        num_attention_heads=text.num_attention_heads,
        num_query_groups=text.num_key_value_heads,
        kv_channels=family.head_dim(text),
        normalization="RMSNorm",
        layernorm_epsilon=text.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=family.qkv_bias,
        qk_layernorm=family.qk_layernorm,
        mrope_section=list(text.rope_parameters["mrope_section"]),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        # unfused rope also for packed rows (trainer.pack_sequences): it reads each position's M-RoPE frequency,
        # where TE's fused THD rope restarts every sequence of the row at frequency row 0 (wrong for M-RoPE)
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        num_layers_in_first_pipeline_stage=layout.first_stage_layers or None,  # None: megatron-core's even split
        num_layers_in_last_pipeline_stage=layout.last_stage_layers or None,
        sequence_parallel=cfg.parallel.sequence_parallel,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=False,  # the actor always loads weights (HF or checkpoint): random init is waste
        variable_seq_lengths=True,  # prompt + response lengths change every micro-batch
        moe_token_dispatcher_type="alltoall",  # a dense model; the default "allgather" refuses variable lengths
        calculate_per_token_loss=True,  # loss = sum / global token count (finalize_model_grads divides)
        attention_softmax_in_fp32=True,
        cp_comm_type="p2p" if te and layout.cp > 1 else None,
        **fp8,
        **recompute,
    )


def layer_spec(cfg: Config, config: TransformerConfig, family: families.Family):
    if layer_spec_name(cfg) == "transformer_engine":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=family.qk_layernorm)
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=family.qk_layernorm)
        if config.context_parallel_size > 1 or cfg.trainer.pack_sequences:  # local attention does neither
            spec.submodules.self_attention.submodules.core_attention = ContextParallelAttention
        if config.sequence_parallel:
            layer, attention = spec.submodules, spec.submodules.self_attention.submodules
            for owner, name in [(layer, "input_layernorm"), (layer, "pre_mlp_layernorm")] + [
                (attention, "q_layernorm"),
                (attention, "k_layernorm"),
            ]:
                if getattr(owner, name) is WrappedTorchNorm:
                    setattr(owner, name, SequenceParallelNorm)
    spec.module = DeepStackLayer
    return spec


class DeepStackLayer(TransformerLayer):
    """A transformer layer that adds DeepStack feature k (`context[:, :, k]`, [S, B, K, H]) to its output when it
    is LLM layer k < K. With no features (`context` None: other families, text-only batches, later stages) it is
    megatron-core's layer unchanged; its cross-attention slot is the identity, so `context` is read only here."""

    def forward(self, *args, **kwargs):
        output, context = super().forward(*args, **kwargs)
        index = self.layer_number - 1
        if context is not None and index < context.shape[2]:
            output = output + context[:, :, index]
        return output, context


class SequenceParallelNorm:
    """megatron-core's torch norm (the local spec's norm without Apex) under sequence parallelism, which megatron's
    own wrapper refuses. Each TP rank normalises its own slice of the sequence, so each holds a partial gradient
    of the (replicated) norm weight: marked `sequence_parallel`, megatron-core's finalize_model_grads all-reduces
    it over the TP group, as it does for Transformer Engine's and Apex's norms."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_) -> torch.nn.Module:
        norms = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}
        norm = norms[config.normalization](normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def block_spec(config: TransformerConfig, spec, vp_stage: int | None):
    """The decoder's spec: the layer spec as it is, or under sequence parallelism on the local spec the same layers
    with a final norm that accepts it (megatron-core would build its own wrapper, which refuses it)."""
    if not config.sequence_parallel or spec.submodules.input_layernorm is not SequenceParallelNorm:
        return spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * layers, layer_norm=SequenceParallelNorm)


ROTARY_BUFFERS = ("inv_freq", "original_inv_freq")  # transformers' rotary embeddings' frequency buffers


def keep_rotary_fp32(module: torch.nn.Module) -> None:
    """Keeps the rotary frequencies of `module`'s submodules fp32 through every later cast (`.to(bf16)`, megatron's
    Float16Module), moving them between devices only. transformers and vLLM compute the vision tower's rotary
    angles from fp32 frequencies; cast to bf16 they lose ~3 digits, and the angle error grows with the patch's
    row / column, so the actor's log-probs would drift from the engine's, more for larger images."""
    for sub in module.modules():
        if any(isinstance(sub._buffers.get(name), torch.Tensor) for name in ROTARY_BUFFERS):
            sub._apply = types.MethodType(_apply_keeping_rotary_fp32, sub)


def _apply_keeping_rotary_fp32(self: torch.nn.Module, fn, recurse: bool = True):
    kept = {name: self._buffers[name] for name in ROTARY_BUFFERS if isinstance(self._buffers.get(name), torch.Tensor)}
    type(self)._apply(self, fn, recurse)
    for name, fp32 in kept.items():
        self._buffers[name] = fp32.to(self._buffers[name].device)
    return self


class InterleavedMRoPE(MultimodalRotaryEmbedding):
    """Qwen3-VL's M-RoPE: rotary frequency j follows the height position when j % 3 == 1 and j < 3 * section[1],
    the width position when j % 3 == 2 and j < 3 * section[2], the temporal one otherwise (transformers'
    Qwen3VLTextRotaryEmbedding), instead of three contiguous sections. Same output layout and CP split as
    megatron-core's MultimodalRotaryEmbedding, which it replaces in the GPTModel."""

    def forward(self, position_ids: torch.Tensor, mrope_section: list[int], cp_group=None) -> torch.Tensor:
        freqs_3BSF = position_ids.to(self.inv_freq.device, torch.float32)[..., None] * self.inv_freq
        freqs_BSF = freqs_3BSF[0].clone()
        for axis in (1, 2):
            picked = slice(axis, 3 * mrope_section[axis], 3)
            freqs_BSF[..., picked] = freqs_3BSF[axis, ..., picked]
        emb = torch.cat((freqs_BSF, freqs_BSF), dim=-1)[..., None, :].transpose(0, 1).contiguous()  # [S, B, 1, D]
        cp_group = cp_group if cp_group is not None else self.cp_group
        if cp_group is not None and cp_group.size() > 1:
            emb = get_pos_emb_on_this_cp_rank(emb, 0, cp_group)
        return emb


def _no_init_weights():
    """transformers' context that builds a model without running its weight initialisation (buffers such as the
    rotary frequencies are still computed; parameters hold uninitialised memory until weights are loaded)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


class VLModel(MegatronModule):
    """One pipeline stage (or virtual stage) of the actor, for any registered family."""

    def __init__(
        self,
        hf_config,
        config: TransformerConfig,
        spec,
        pre_process: bool,
        post_process: bool,
        vp_stage: int | None = None,
    ):
        super().__init__(config=config)
        self.family = families.get(hf_config.model_type)
        self.pre_process, self.post_process = pre_process, post_process
        self.model_type = ModelType.encoder_or_decoder  # read by the pipeline schedules
        self.image_token_id = hf_config.image_token_id
        self.vision = None
        if pre_process:
            vision_config = hf_config.vision_config
            vision_config._attn_implementation = "sdpa"
            # built in the actor's dtype (no fp32 copy of a bf16 tower) and not initialised: the actor always loads
            # the tower's weights, so HF's random init of every parameter would be wasted work
            with _no_init_weights():
                self.vision = self.family.vision_tower()._from_config(vision_config, dtype=config.params_dtype)
            keep_rotary_fp32(self.vision)
            self.vision.to(config.params_dtype)
            if config.recompute_granularity == "full":
                # the tower keeps ~2 MiB per patch for backward (a max-pixels image: ~10 GiB); checkpointing each
                # block keeps only the block inputs (HF's non-reentrant gradient checkpointing, no dropout to replay)
                self.vision.gradient_checkpointing_enable({"use_reentrant": False})
            for param in self.vision.parameters():
                param.average_gradients_across_tp_domain = True
        text = hf_config.text_config
        self.language_model = GPTModel(
            config=config,
            transformer_layer_spec=block_spec(config, spec, vp_stage),
            vocab_size=text.vocab_size,
            max_sequence_length=text.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=hf_config.tie_word_embeddings,
            position_embedding_type="mrope",
            rotary_base=text.rope_parameters["rope_theta"],
            scatter_embedding_sequence_parallel=False,  # image embeddings are merged first, then scattered
            vp_stage=vp_stage,
        )
        if self.family.mrope_interleaved:
            base = self.language_model.rotary_pos_emb
            self.language_model.rotary_pos_emb = InterleavedMRoPE(
                config.kv_channels, 1.0, rotary_base=text.rope_parameters["rope_theta"], cp_group=base.cp_group
            )

    # megatron-core's finalize_model_grads reads these off each model chunk (tied-embedding all-reduce over PP)
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def embed(
        self,
        input_ids_BS: torch.Tensor,
        image_mask_BS: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        image_grid_thw: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token embeddings with the vision tower's output placed at the image tokens, [S, B, H], and the
        DeepStack features at the same tokens, [S, B, K, H] (None without images or DeepStack)."""
        embeds_BSH = self.language_model.embedding(input_ids=input_ids_BS, position_ids=None).transpose(0, 1)
        if pixel_values is None:
            return embeds_BSH.transpose(0, 1).contiguous(), None
        vision = self.vision(pixel_values.to(self.config.params_dtype), grid_thw=image_grid_thw)
        image_embeds = vision.pooler_output.to(embeds_BSH.dtype)
        is_image_BS = image_mask_BS if image_mask_BS is not None else input_ids_BS == self.image_token_id
        if int(is_image_BS.sum()) != image_embeds.shape[0]:
            raise ValueError(
                f"{int(is_image_BS.sum())} image tokens but the vision tower produced "
                f"{image_embeds.shape[0]} embeddings: image_grid_thw does not match the prompt"
            )
        # scatter in [B, S] order: image embeddings are batch-major
        where_BSH = is_image_BS.unsqueeze(-1).expand_as(embeds_BSH)
        embeds_BSH = embeds_BSH.masked_scatter(where_BSH, image_embeds)
        deepstack = getattr(vision, "deepstack_features", None)
        deepstack_SBKH = None
        if deepstack:
            zeros_BSH = embeds_BSH.new_zeros(embeds_BSH.shape)
            features = [zeros_BSH.masked_scatter(where_BSH, f.to(embeds_BSH.dtype)) for f in deepstack]
            deepstack_SBKH = torch.stack(features, dim=2).transpose(0, 1).contiguous()
        return embeds_BSH.transpose(0, 1).contiguous(), deepstack_SBKH

    def _split_like_hidden_states(self, tensor_S: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full-sequence [S, ...] tensor: its zigzag chunks under CP, its shard under SP."""
        cp = self.config.context_parallel_size
        if cp > 1:
            from megatron.core import parallel_state

            tensor_S = tensor_S[zigzag_positions(tensor_S.shape[0], cp, parallel_state.get_context_parallel_rank())]
        if self.config.sequence_parallel:
            tensor_S = scatter_to_sequence_parallel_region(tensor_S)
        return tensor_S

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        packed_seq_params=None,
    ):
        """input_ids [B, S] and position_ids [3, B, S] are full sequences; with CP each rank keeps its zigzag
        chunks; packed_seq_params: one row of packed sequences (THD). Returns logits [B, S_local, V / tp] on the
        last stage, hidden states otherwise."""
        decoder_input, block_kwargs = None, None
        if self.pre_process:
            decoder_input, deepstack_SBKH = self.embed(input_ids, image_mask, pixel_values, image_grid_thw)
            decoder_input = self._split_like_hidden_states(decoder_input)
            if deepstack_SBKH is not None:
                block_kwargs = {"context": self._split_like_hidden_states(deepstack_SBKH)}
        return self.language_model(
            input_ids=None,
            position_ids=position_ids,
            attention_mask=attention_mask,
            decoder_input=decoder_input,
            extra_block_kwargs=block_kwargs,
            packed_seq_params=packed_seq_params,
        )


def build_chunks(hf_config, config: TransformerConfig, spec, vpp: int) -> list[VLModel]:
    """This rank's model chunks: one per virtual pipeline stage (one chunk when vpp == 1), each told whether it
    holds the first stage's vision tower and embedding or the last stage's output layer."""
    from megatron.core import parallel_state

    chunks = []
    for vp_stage in range(vpp) if vpp > 1 else [None]:
        first = parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
        chunks.append(VLModel(hf_config, config, spec, first, last, vp_stage))
    return chunks
