"""ActorSamples -> padded micro-batch tensors for the Megatron actor, and per-token results back.

Sequences are [prompt | response | padding] (right padding): with causal attention, valid tokens never see
padding, so no padding mask is needed. Per-token values live at *label positions*: position t predicts token
t + 1, so response token j of a rollout with P prompt tokens sits at label position P - 1 + j.

With context parallelism the padded length is a multiple of 2 * cp (the zigzag split); with sequence
parallelism also of tp.

Legend: B rollouts in the micro-batch, S padded sequence length, T response positions, N image patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vppo_megatron import families
from vppo_megatron.types import ActorSample


@dataclass
class MicroBatch:
    input_ids_BS: torch.Tensor
    position_ids_3BS: torch.Tensor
    labels_BS: torch.Tensor
    response_mask_BS: torch.Tensor
    """1 at the label positions of response tokens."""
    image_mask_BS: torch.Tensor
    """True at the prompt's image-pad tokens (where the vision tower's embeddings go)."""
    pixel_values_NC: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    prompt_lengths: list[int]
    response_lengths: list[int]
    extras_BS: dict[str, torch.Tensor]
    """Per-token training inputs at label positions (old_logp, gradient_mask, ...) and per-rollout ones."""

    def to(self, device: torch.device) -> MicroBatch:
        """The same micro-batch with every tensor on `device` (the batch is built on the host)."""
        moved = {
            name: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for name, value in vars(self).items()
        }
        moved["extras_BS"] = {k: v.to(device, non_blocking=True) for k, v in self.extras_BS.items()}
        return MicroBatch(**moved)


@dataclass
class StepBatch:
    """One step's rollouts on this rank, prepared once: the experience pass and every update (each ppo epoch)
    read these micro-batches, so images are encoded once per view and M-RoPE positions computed once."""

    samples: list[ActorSample]
    micro_rows: list[slice]
    """Consecutive row ranges, one per micro-batch, never across a mini-batch boundary."""
    views: list[MicroBatch]
    """The original view of each micro-batch (the update's input; extras_BS filled per update)."""
    perturbed: list[tuple[torch.Tensor | None, torch.Tensor | None]] | None
    """(pixel_values_NC, image_grid_thw) of each micro-batch's perturbed images; None without the dual pass."""

    def paired(self, i: int) -> MicroBatch:
        """Micro-batch i with its rollouts twice: original images, then perturbed (same ids and positions)."""
        mb, (pixels, grids) = self.views[i], self.perturbed[i]
        twice = {
            name: torch.cat([getattr(mb, name)] * 2, dim=1 if name == "position_ids_3BS" else 0)
            for name in ("input_ids_BS", "position_ids_3BS", "labels_BS", "response_mask_BS", "image_mask_BS")
        }
        present = [t for t in (mb.pixel_values_NC, pixels) if t is not None]
        present_grids = [t for t in (mb.image_grid_thw, grids) if t is not None]
        return MicroBatch(
            **twice,
            pixel_values_NC=torch.cat(present) if present else None,
            image_grid_thw=torch.cat(present_grids) if present_grids else None,
            prompt_lengths=mb.prompt_lengths * 2,
            response_lengths=mb.response_lengths * 2,
            extras_BS={},
        )


def micro_batch_rows(
    lengths: list[int], mini_batches: list[slice], size: int, max_tokens: int = 0, multiple: int = 1
) -> list[slice]:
    """The one micro-batching rule: consecutive rows inside each mini-batch, `size` rows each, or (max_tokens > 0)
    as many rows as fit rows x padded length <= max_tokens (one row at least: a longer sequence runs alone)."""
    out = []
    for mini in mini_batches:
        start = mini.start
        while start < mini.stop:
            stop, longest = start + 1, lengths[start]
            while stop < mini.stop:
                longest_next = max(longest, lengths[stop])
                if max_tokens:
                    fits = (stop + 1 - start) * padded_length(longest_next, multiple) <= max_tokens
                else:
                    fits = stop - start < size
                if not fits:
                    break
                stop, longest = stop + 1, longest_next
            out.append(slice(start, stop))
            start = stop
    return out


def encode_images(image_processor, images: list[np.ndarray]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """pixel_values [N, C * temporal_patch * patch^2] and image_grid_thw [num_images, 3] (HF processor layout)."""
    if not images:
        return None, None
    out = image_processor(images=images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def image_token_mask(hf_config, input_ids_S: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """Image tokens are the prompt's <|image_pad|> tokens; a sampled response token never counts as one."""
    mask = input_ids_S == hf_config.image_token_id
    mask[prompt_length:] = False
    return mask


def mrope_positions(
    hf_config, input_ids_S: torch.Tensor, image_grid_thw: torch.Tensor | None, prompt_length: int
) -> torch.Tensor:
    """M-RoPE position ids [3, S] of one unpadded sequence, computed by the family's HF get_rope_index."""
    token_type = image_token_mask(hf_config, input_ids_S, prompt_length).to(torch.int32)
    family = families.get(hf_config.model_type)
    return family.rope_positions(hf_config, input_ids_S[None], token_type[None], image_grid_thw)[:, 0]


def padded_length(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def collate(
    hf_config,
    samples: list[ActorSample],
    pixel_values: list[torch.Tensor | None],
    image_grid_thw: list[torch.Tensor | None],
    pad_id: int,
    length_multiple: int = 1,
) -> MicroBatch:
    """Pads a list of rollouts into one micro-batch; pixel values are given per rollout (original or perturbed)."""
    sequences = [torch.tensor(s.prompt_ids + s.response_ids, dtype=torch.long) for s in samples]
    seq_len = padded_length(max(len(s) for s in sequences), length_multiple)
    batch = len(samples)
    input_ids = torch.full((batch, seq_len), pad_id, dtype=torch.long)
    positions = torch.zeros((3, batch, seq_len), dtype=torch.long)
    labels = torch.full((batch, seq_len), pad_id, dtype=torch.long)
    response_mask = torch.zeros((batch, seq_len), dtype=torch.float32)
    image_mask = torch.zeros((batch, seq_len), dtype=torch.bool)
    for b, (sample, seq, grid) in enumerate(zip(samples, sequences, image_grid_thw)):
        length, prompt_len = len(seq), len(sample.prompt_ids)
        input_ids[b, :length] = seq
        positions[:, b, :length] = mrope_positions(hf_config, seq, grid, prompt_len)
        image_mask[b, :length] = image_token_mask(hf_config, seq, prompt_len)
        # padding continues the text positions so every position id stays in range
        positions[:, b, length:] = positions[:, b, length - 1 : length].amax() + 1
        labels[b, : length - 1] = seq[1:]
        response_mask[b, prompt_len - 1 : length - 1] = 1.0
    present_pixels = [p for p in pixel_values if p is not None]
    present_grids = [g for g in image_grid_thw if g is not None]
    return MicroBatch(
        input_ids_BS=input_ids,
        position_ids_3BS=positions,
        labels_BS=labels,
        response_mask_BS=response_mask,
        image_mask_BS=image_mask,
        pixel_values_NC=torch.cat(present_pixels) if present_pixels else None,
        image_grid_thw=torch.cat(present_grids) if present_grids else None,
        prompt_lengths=[len(s.prompt_ids) for s in samples],
        response_lengths=[len(s.response_ids) for s in samples],
        extras_BS={},
    )


def to_response_aligned(values_BS: torch.Tensor, prompt_lengths: list[int], num_positions: int) -> torch.Tensor:
    """[B, S] label-position values -> [B, T] response-aligned (zero past each response)."""
    out = torch.zeros((values_BS.shape[0], num_positions), dtype=values_BS.dtype)
    for b, prompt_len in enumerate(prompt_lengths):
        width = min(num_positions, values_BS.shape[1] - (prompt_len - 1))
        out[b, :width] = values_BS[b, prompt_len - 1 : prompt_len - 1 + width]
    return out


def to_label_positions(values_BT: torch.Tensor, prompt_lengths: list[int], seq_len: int) -> torch.Tensor:
    """[B, T] response-aligned -> [B, S] label positions (inverse of `to_response_aligned`)."""
    out = torch.zeros((values_BT.shape[0], seq_len), dtype=values_BT.dtype)
    for b, prompt_len in enumerate(prompt_lengths):
        width = min(values_BT.shape[1], seq_len - (prompt_len - 1))
        out[b, prompt_len - 1 : prompt_len - 1 + width] = values_BT[b, :width]
    return out
