"""Data contracts between the stages of one training step (DESIGN.md data flow). Shapes in comments."""

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
