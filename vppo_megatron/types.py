"""Data contracts between the stages of one training step (train.py; docs/algorithm.md). Shapes in comments."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class PromptSample:
    """One prompt ready for rollout: the data stage's output, the rollout stage's input."""

    uid: str
    """Stable id of the dataset row (seeds the image perturbation; groups the n rollouts of this prompt)."""
    prompt_text: str
    """Chat-templated prompt; each image appears as <|vision_start|><|image_pad|><|vision_end|>."""
    images: list[np.ndarray]
    """Decoded, smart-resized RGB images, each uint8 [H, W, 3] with H, W multiples of patch * merge size."""
    answer: str
    """Ground-truth answer for the reward function."""
    problem: str = ""
    """The original problem text (with its <image> placeholders), for logs and evaluation."""
    extra: dict[str, str] = field(default_factory=dict)
    """Other scalar string columns of the row (task, split, ...), carried into metrics."""


@dataclass
class ActorSample:
    """One rollout as the Megatron actor sees it (the rollout stage's output, tokenised)."""

    uid: str
    """Rollout id (prompt uid + sample index): seeds this rollout's image perturbation."""
    prompt_ids: list[int]
    """Prompt token ids with each image's <|image_pad|> expanded to its merged-patch count (processor/vLLM)."""
    response_ids: list[int]
    """Sampled response token ids (T_i of them)."""
    images: list[np.ndarray]
    """The prompt's decoded images, uint8 [H, W, 3], as the data stage produced them."""
    answer_span: tuple[int, int] | None = None
    """Response positions [a, b) of the answer (the last \\boxed{...}'s content), for the perception
    diagnostics; None when there is none or it was not looked for."""


@dataclass
class RolloutResult:
    """One sampled response (the rollout stage's output)."""

    prompt_index: int
    """Index of the prompt in the request list."""
    sample_index: int
    """Which of the n samples of that prompt."""
    prompt_ids: list[int]
    """The engine's prompt token ids (image pads expanded), identical to the HF processor's."""
    response_ids: list[int]
    response_logprobs: list[float]
    """The engine's log-prob of each sampled token (rollout policy; the actor recomputes its own)."""
    text: str
    finish_reason: str
    policy_version: int
    """Weight version of the engine that produced it."""
    answer_span: tuple[int, int] | None = None
    """Response positions [a, b) of the answer (algo/diagnostics.answer_span), set by the trainer's rollout stage
    when it computes perception diagnostics."""
