"""ActorSamples -> padded micro-batch tensors for the Megatron actor, and per-token results back.

Sequences are [prompt | response | padding] (right padding): with causal attention, valid tokens never see
padding, so no padding mask is needed. Per-token values live at *label positions*: position t predicts token
t + 1, so response token j of a rollout with P prompt tokens sits at label position P - 1 + j.

Packed (`trainer.pack_sequences`): a micro-batch is ONE row, its rollouts back to back and the padding once at
the end ([r1 | r2 | ... | padding]); `cu_seqlens` bounds each rollout (and the padding, a segment of its own), and
attention stays inside a segment (megatron-core's THD format). Each rollout keeps its own M-RoPE positions, so a
packed rollout computes what it computes alone.

With context parallelism the padded length is a multiple of 2 * cp (the zigzag split); with sequence
parallelism also of tp.

Legend: B rollouts in the micro-batch, S padded sequence length, T response positions, N image patches.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

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
    """The micro-batch's image patches in one tensor: only on the copy a schedule runs (`materialize`)."""
    image_grid_thw: torch.Tensor | None
    prompt_lengths: list[int]
    response_lengths: list[int]
    extras_BS: dict[str, torch.Tensor]
    """Per-token training inputs at label positions (old_logp, gradient_mask, ...) and per-rollout ones."""
    pixel_parts: list[torch.Tensor] = field(default_factory=list)
    """Each rollout's image patches [N_r, C] on the host: its prompt's own tensor, shared by the prompt's rollouts
    (not a copy per rollout)."""
    cu_seqlens: torch.Tensor | None = None
    """Packed micro-batches only: int32 [segments + 1], each rollout's start in the one row, then the padding's
    (a segment of its own when there is any), then the row's length. None: one rollout per row."""

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def _responses(self) -> list[tuple[int, int, int]]:
        """(row, first label position, length) of each rollout's response (of a view: a paired micro-batch's results
        are split per view first)."""
        n = len(self.prompt_lengths)
        starts = self.cu_seqlens.tolist()[:n] if self.packed else [0] * n
        rows = [0] * n if self.packed else range(n)
        return [
            (row, start + p - 1, r)
            for row, start, p, r in zip(rows, starts, self.prompt_lengths, self.response_lengths)
        ]

    def response_aligned(self, values_BS: torch.Tensor, num_positions: int) -> torch.Tensor:
        """[rows, S] label-position values -> [B, T] response-aligned, one row per rollout (zero past each
        response)."""
        out = torch.zeros((len(self.prompt_lengths), num_positions), dtype=values_BS.dtype)
        for b, (row, first, length) in enumerate(self._responses()):
            width = min(num_positions, length)
            out[b, :width] = values_BS[row, first : first + width]
        return out

    def label_positions(self, values_BT: torch.Tensor) -> torch.Tensor:
        """[B, T] response-aligned -> [rows, S] label positions of this micro-batch (inverse of
        `response_aligned`; zero outside the responses)."""
        out = torch.zeros(self.input_ids_BS.shape, dtype=values_BT.dtype)
        for b, (row, first, length) in enumerate(self._responses()):
            width = min(values_BT.shape[1], length)
            out[row, first : first + width] = values_BT[b, :width]
        return out

    def longest_segment(self) -> int:
        """An upper bound of the longest cu_seqlens segment, from host values (no device read): the longest rollout
        or all of the row's padding."""
        lengths = [p + r for p, r in zip(self.prompt_lengths, self.response_lengths)]
        return max(*lengths, self.input_ids_BS.shape[1] - sum(lengths))

    def materialize(self, device: torch.device | None = None, with_pixels: bool = True) -> MicroBatch:
        """What a schedule runs: every tensor on `device` (None: stays on the host) and the rollouts' pixel parts
        concatenated there, the only copy of them per micro-batch (`InputFeed` makes one at a time).
        with_pixels=False (a model chunk without the vision tower): no image inputs at all."""
        move = (lambda t: t.to(device, non_blocking=True)) if device is not None else (lambda t: t)
        fields = {name: move(v) if isinstance(v, torch.Tensor) else v for name, v in vars(self).items()}
        fields["extras_BS"] = {k: move(v) for k, v in self.extras_BS.items()}
        if self.pixel_parts and with_pixels:
            fields["pixel_values_NC"] = torch.cat([move(p) for p in self.pixel_parts])
        if not with_pixels:
            fields["pixel_values_NC"] = fields["image_grid_thw"] = None
        fields["pixel_parts"] = []
        return MicroBatch(**fields)

    def input_bytes(self) -> int:
        """Bytes of every tensor this micro-batch holds (on a materialized one: what sits on the device)."""
        tensors = [v for v in vars(self).values() if isinstance(v, torch.Tensor)]
        tensors += list(self.extras_BS.values()) + list(self.pixel_parts)
        return sum(t.nbytes for t in tensors)


class InputFeed:
    """The schedule's data iterator: micro-batch i is built (`build(i)`) and materialized on the device only when
    the schedule asks for it, and released when the schedule drops it (after its forward; its backward keeps what
    autograd saved, the activations). Counts the input bytes it moved and how many were live at once."""

    def __init__(
        self, build: Callable[[int, bool], MicroBatch], count: int, device: torch.device | None, with_pixels: bool
    ):
        """`build(i, with_pixels)`; with_pixels: whether the model chunk this feeds runs the vision tower."""
        self.build, self.count, self.device, self.with_pixels = build, count, device, with_pixels
        self.moved: list[int] = []
        """Input bytes of each micro-batch handed out, in order."""
        self.live = 0
        self.peak_live = 0
        """The most input bytes handed out and not yet released at any moment."""

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __iter__(self) -> Iterator[MicroBatch]:
        for i in range(self.count):
            mb = self.build(i, self.with_pixels).materialize(self.device, self.with_pixels)
            nbytes = mb.input_bytes()
            self.moved.append(nbytes)
            self.live += nbytes
            self.peak_live = max(self.peak_live, self.live)
            weakref.finalize(mb, self._release, nbytes)
            yield mb
            del mb


@dataclass
class StepBatch:
    """One step's rollouts on this rank, prepared once: the experience pass and every update (each ppo epoch)
    read these micro-batches, so images are encoded once per view and M-RoPE positions computed once."""

    samples: list[ActorSample]
    micro_rows: list[slice]
    """Consecutive row ranges, one per micro-batch, never across a mini-batch boundary."""
    views: list[MicroBatch]
    """The original view of each micro-batch (the update's input; extras_BS filled per update); its pixel parts
    are each prompt's one encoding, shared by the prompt's rollouts."""
    perturb: Callable[[list[ActorSample]], list[tuple[torch.Tensor | None, torch.Tensor | None]]] | None
    """Rollouts -> each one's perturbed images encoded (pixel values, grid): run for one micro-batch when the dual
    pass reaches it, never stored for the step; None without the dual pass."""

    def original(self, i: int, with_pixels: bool = True) -> MicroBatch:
        """Micro-batch i's original view (`with_pixels` is for `paired`'s signature: views hold references)."""
        return self.views[i]

    def paired(self, i: int, with_pixels: bool = True) -> MicroBatch:
        """Micro-batch i with its rollouts twice: original images, then perturbed (same ids and positions).
        with_pixels=False (no vision tower on this chunk): the perturbed images are not made."""
        mb = self.views[i]
        perturbed = self.perturb(self.samples[self.micro_rows[i]]) if with_pixels else []
        along = 1 if mb.packed else 0  # a packed micro-batch's two views are one row twice as long
        twice = {
            name: torch.cat([getattr(mb, name)] * 2, dim=along + 1 if name == "position_ids_3BS" else along)
            for name in ("input_ids_BS", "position_ids_3BS", "labels_BS", "response_mask_BS", "image_mask_BS")
        }
        cu_seqlens = None
        if mb.packed:
            cu_seqlens = torch.cat([mb.cu_seqlens, mb.cu_seqlens[1:] + mb.cu_seqlens[-1]])
        grids = [t for t in [mb.image_grid_thw] + [g for _, g in perturbed] if t is not None]
        return MicroBatch(
            **twice,
            pixel_values_NC=None,
            image_grid_thw=torch.cat(grids) if grids else None,
            prompt_lengths=mb.prompt_lengths * 2,
            response_lengths=mb.response_lengths * 2,
            extras_BS={},
            pixel_parts=mb.pixel_parts + [p for p, _ in perturbed if p is not None],
            cu_seqlens=cu_seqlens,
        )

    def padding_share(self) -> float:
        """The share of the micro-batches' token positions that are padding (compute spent on no rollout): what
        trainer.pack_sequences removes, down to each pack's last few positions."""
        tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in self.samples)
        return 1.0 - tokens / max(1, sum(view.input_ids_BS.numel() for view in self.views))

    def pixel_bytes(self) -> int:
        """Bytes of the image patches this step batch stores (each distinct tensor once)."""
        parts = {id(p): p for mb in self.views for p in mb.pixel_parts}
        return sum(p.nbytes for p in parts.values())


def micro_batch_rows(
    lengths: list[int],
    mini_batches: list[slice],
    size: int,
    max_tokens: int = 0,
    multiple: int = 1,
    packed: bool = False,
) -> list[slice]:
    """The one micro-batching rule: consecutive rows inside each mini-batch, `size` rows each, or (max_tokens > 0)
    as many rows as fit max_tokens (one row at least: a longer sequence runs alone) counted as rows x padded
    length, or packed as the padded sum of their lengths."""
    out = []
    for mini in mini_batches:
        start = mini.start
        while start < mini.stop:
            stop, longest, total = start + 1, lengths[start], lengths[start]
            while stop < mini.stop:
                longest_next, total_next = max(longest, lengths[stop]), total + lengths[stop]
                if max_tokens and packed:
                    fits = padded_length(total_next, multiple) <= max_tokens
                elif max_tokens:
                    fits = (stop + 1 - start) * padded_length(longest_next, multiple) <= max_tokens
                else:
                    fits = stop - start < size
                if not fits:
                    break
                stop, longest, total = stop + 1, longest_next, total_next
            out.append(slice(start, stop))
            start = stop
    return out


def encode_images(image_processor, images: list[np.ndarray]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """pixel_values [N, C * temporal_patch * patch^2] and image_grid_thw [num_images, 3] (HF processor layout)."""
    if not images:
        return None, None
    out = image_processor(images=images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def unresized(image_processor, images: list[np.ndarray], grid_thw: torch.Tensor) -> bool:
    """Whether the processor encoded these images at their own size (each one patch_size x patch_size pixel cell
    per patch, one frame): then an image operation that works per cell can work on the encoded patches."""
    patch = image_processor.patch_size
    return all(
        t == 1 and image.shape[0] == h * patch and image.shape[1] == w * patch
        for image, (t, h, w) in zip(images, grid_thw.tolist(), strict=True)
    )


def blacken_patches(
    pixel_values_NC: torch.Tensor, grid_thw: torch.Tensor, keeps: list[torch.Tensor], merge: int, black_C: torch.Tensor
) -> torch.Tensor:
    """Patch blackening on the processor's output: the patches of cells not kept (keeps: one [Hc, Wc] mask per
    image, one cell per patch) become `black_C`, the encoding of a black patch. The processor's rows run over
    (frame, row block, column block, row in block, column in block), blocks being merge x merge patches; its
    rescale and normalisation act pixel by pixel, so this equals encoding the blackened image, bit for bit."""
    keep_N = torch.cat(
        [
            keep.view(h // merge, merge, w // merge, merge).permute(0, 2, 1, 3).reshape(-1).repeat(t)
            for keep, (t, h, w) in zip(keeps, grid_thw.tolist(), strict=True)
        ]
    )
    return torch.where(keep_N[:, None], pixel_values_NC, black_C)


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
    packed: bool = False,
) -> MicroBatch:
    """Pads a list of rollouts into one micro-batch (packed: into one row, `MicroBatch.cu_seqlens`); pixel values
    are given per rollout (original or perturbed) and kept as given (`pixel_parts`: a prompt's tensor shared by
    its rollouts stays one tensor until `materialize`)."""
    sequences = [torch.tensor(s.prompt_ids + s.response_ids, dtype=torch.long) for s in samples]
    lengths = [len(s) for s in sequences]
    if packed:
        starts = np.cumsum([0] + lengths).tolist()
        rows, seq_len = [0] * len(samples), padded_length(starts[-1], length_multiple)
        cu_seqlens = torch.tensor(starts + ([seq_len] if seq_len > starts[-1] else []), dtype=torch.int32)
    else:
        starts, rows, cu_seqlens = [0] * len(samples), list(range(len(samples))), None
        seq_len = padded_length(max(lengths), length_multiple)
    height = 1 if packed else len(samples)
    input_ids = torch.full((height, seq_len), pad_id, dtype=torch.long)
    positions = torch.zeros((3, height, seq_len), dtype=torch.long)
    labels = torch.full((height, seq_len), pad_id, dtype=torch.long)
    response_mask = torch.zeros((height, seq_len), dtype=torch.float32)
    image_mask = torch.zeros((height, seq_len), dtype=torch.bool)
    for sample, seq, grid, b, start in zip(samples, sequences, image_grid_thw, rows, starts):
        length, prompt_len = len(seq), len(sample.prompt_ids)
        span = slice(start, start + length)
        input_ids[b, span] = seq
        positions[:, b, span] = mrope_positions(hf_config, seq, grid, prompt_len)
        image_mask[b, span] = image_token_mask(hf_config, seq, prompt_len)
        labels[b, start : start + length - 1] = seq[1:]
        response_mask[b, start + prompt_len - 1 : start + length - 1] = 1.0
    for b in range(height):  # padding continues the text positions so every position id stays in range
        end = starts[-1] if packed else lengths[b]
        positions[:, b, end:] = positions[:, b, end - 1 : end].amax() + 1
    present_grids = [g for g in image_grid_thw if g is not None]
    return MicroBatch(
        input_ids_BS=input_ids,
        position_ids_3BS=positions,
        labels_BS=labels,
        response_mask_BS=response_mask,
        image_mask_BS=image_mask,
        pixel_values_NC=None,
        image_grid_thw=torch.cat(present_grids) if present_grids else None,
        prompt_lengths=[len(s.prompt_ids) for s in samples],
        response_lengths=[len(s.response_ids) for s in samples],
        extras_BS={},
        pixel_parts=[p for p in pixel_values if p is not None],
        cu_seqlens=cu_seqlens,
    )
