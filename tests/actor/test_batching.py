"""Packed micro-batches (trainer.pack_sequences): one row holding what the padded rows hold, and the per-token
values' way in and out of it."""

import torch
from parity_worker import make_samples
from transformers import AutoConfig, AutoProcessor

from vppo_megatron.actor import batching


def test_a_packed_token_budget_counts_the_rollouts_own_lengths():
    lengths, whole = [10, 60, 10, 10], [slice(0, 4)]
    assert batching.micro_batch_rows(lengths, whole, 4, max_tokens=100) == [slice(0, 1), slice(1, 2), slice(2, 4)]
    assert batching.micro_batch_rows(lengths, whole, 4, max_tokens=100, packed=True) == [slice(0, 4)]
    # the pack is padded once, to the length multiple: 90 -> 96 fits 100; 70 -> 128 does not
    assert batching.micro_batch_rows(lengths, whole, 4, 100, multiple=16, packed=True) == [slice(0, 4)]
    assert batching.micro_batch_rows(lengths, whole, 4, 100, multiple=64, packed=True) == [
        slice(0, 1),
        slice(1, 2),
        slice(2, 4),
    ]
    # never across a mini-batch; without a budget, micro_batch_size rollouts per pack
    assert batching.micro_batch_rows(lengths, [slice(0, 2), slice(2, 4)], 4, 100, packed=True) == [
        slice(0, 2),
        slice(2, 4),
    ]
    assert batching.micro_batch_rows(lengths, whole, 3, packed=True) == [slice(0, 3), slice(3, 4)]


def test_a_packed_micro_batch_is_the_padded_rows_back_to_back(tiny_model_dir):
    hf_config = AutoConfig.from_pretrained(tiny_model_dir)
    samples = make_samples(tiny_model_dir)
    image_processor = AutoProcessor.from_pretrained(tiny_model_dir).image_processor
    grids = [batching.encode_images(image_processor, s.images)[1] for s in samples]
    padded = batching.collate(hf_config, samples, [None] * 4, grids, 0, length_multiple=8)
    packed = batching.collate(hf_config, samples, [None] * 4, grids, 0, length_multiple=8, packed=True)
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    total = sum(lengths)
    assert packed.input_ids_BS.shape == (1, -(-total // 8) * 8) and padded.input_ids_BS.shape[0] == 4
    ends = torch.tensor(lengths).cumsum(0).tolist()
    assert packed.cu_seqlens.tolist() == [0, *ends] + ([packed.input_ids_BS.shape[1]] if ends[-1] % 8 else [])
    assert packed.cu_seqlens.dtype == torch.int32 and padded.cu_seqlens is None
    assert packed.longest_segment() >= int(packed.cu_seqlens.diff().max()) == max(lengths)  # TE's max_seqlen bound
    for b, (start, length) in enumerate(zip([0, *ends], lengths)):
        for name in ("input_ids_BS", "labels_BS", "response_mask_BS", "image_mask_BS"):
            assert torch.equal(getattr(packed, name)[0, start : start + length], getattr(padded, name)[b, :length])
        # each rollout keeps its own M-RoPE positions (they restart at 0)
        assert torch.equal(
            packed.position_ids_3BS[:, 0, start : start + length], padded.position_ids_3BS[:, b, :length]
        )
    assert packed.response_mask_BS.sum() == sum(len(s.response_ids) for s in samples)

    # per-token values in and out: label positions of the pack, back to one row per rollout
    width = max(len(s.response_ids) for s in samples)
    values = torch.randn(4, width)
    inside = torch.arange(width)[None, :] < torch.tensor([len(s.response_ids) for s in samples])[:, None]
    for mb in (packed, padded):
        at_labels = mb.label_positions(values)
        assert at_labels.shape == mb.input_ids_BS.shape
        assert torch.equal(at_labels != 0, (mb.response_mask_BS != 0) & (at_labels != 0))  # only response tokens
        assert torch.equal(mb.response_aligned(at_labels, width), values * inside)

    share = [batching.StepBatch(samples, [slice(0, 4)], [mb], perturb=None).padding_share() for mb in (padded, packed)]
    assert share[0] == 1 - total / padded.input_ids_BS.numel() > 0.1  # the lengths differ: the rows pad
    assert share[1] == 1 - total / packed.input_ids_BS.numel() < 8 / total  # only the pack's tail

    # the dual pass: both views in one row twice as long, the second view's bounds shifted by the row
    batch = batching.StepBatch(samples, [slice(0, 4)], [packed], perturb=lambda rows: [(None, None)] * len(rows))
    twice = batch.paired(0, with_pixels=False)
    row = packed.input_ids_BS.shape[1]
    assert twice.input_ids_BS.shape == (1, 2 * row) and twice.position_ids_3BS.shape == (3, 1, 2 * row)
    assert torch.equal(twice.input_ids_BS[0, row:], packed.input_ids_BS[0])
    bounds = packed.cu_seqlens.tolist()
    assert twice.cu_seqlens.tolist() == bounds + [b + row for b in bounds[1:]]
