"""Tiny checkpoints of every registered family built locally: the embedded default model for CPU runs, tests and
CI (Qwen2.5-VL by default; `family="qwen3_vl"` for Qwen3-VL with DeepStack, QK-norm and interleaved M-RoPE).

`build_tiny_model(out_dir)` writes a complete Hugging Face model directory, offline and deterministically:
- a byte-level BPE tokenizer trained on a small built-in corpus (the task vocabulary, the VPPO prompt, digits),
  with Qwen's special tokens (`<|im_start|>`, `<|vision_start|>`, `<|image_pad|>`, ...) and a Qwen-style chat
  template that places `<|vision_start|><|image_pad|><|vision_end|>` for each image;
- a seeded random-init model of the family's transformers class (vppo_megatron/families: Qwen2.5-VL with M-RoPE,
  GQA, QKV bias, a 2-block windowed vision tower; Qwen3-VL with 4 LLM layers, a 3-block vision tower, DeepStack
  from 2 of them), saved as safetensors;
- image-processor files with small min/max pixels, so `AutoProcessor` and vLLM load the directory as is.

Sizes respect the CPU constraints found earlier: head_dim >= 32 (CPU attention kernels), mrope_section summing to
head_dim / 2, heads and KV heads divisible by 2 so TP=2 splits them, vocab padded to a multiple of 128.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_pad|>",
]
# Qwen2-VL's template, reduced to text and image parts; the default system turn is Qwen's.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_MARKER = "vppo_tiny_model.json"


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny model. The defaults run a VPPO step on 2 CPU cores in seconds."""

    num_layers: int = 2
    hidden_size: int = 128
    intermediate_size: int = 256
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_depth: int = 2
    vision_hidden_size: int = 64
    vision_heads: int = 2
    tokenizer_vocab: int = 1024
    min_pixels: int = 28 * 28 * 4
    max_pixels: int = 28 * 28 * 64
    seed: int = 0
    family: str = "qwen2_5_vl"
    tie_word_embeddings: bool = False
    """The output layer reuses the embedding (as Qwen3-VL 2B / 4B do)."""
    head_dim: int = 0
    """0: hidden_size / num_heads. Qwen3-VL only may differ (Qwen3-VL-32B: 64 heads x 128 != 5120)."""
    mrope_section: tuple[int, ...] = ()
    """(temporal, height, width) rotary frequencies, summing to head_dim / 2; () the family's tiny default."""
    vocab_multiple: int = 128
    """The vocabulary is the tokenizer's, padded to a multiple of this (128 divides every TP size up to 128)."""

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


def tiny_spec(family: str = "qwen2_5_vl", **overrides) -> TinySpec:
    """The family's tiny shape (its registry record's `tiny_shape` over the defaults), then `overrides`."""
    from vppo_megatron import families

    return TinySpec(family=family, **{**families.get(family).tiny_shape, **overrides})


def _corpus() -> list[str]:
    """Deterministic text the tokenizer is trained on: what the tiny model reads and writes."""
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "grey"]
    shapes = ["circle", "square", "triangle", "shape", "shapes", "circles", "squares", "triangles"]
    words = (
        "How many are there in the image ? What colour is the largest smallest sum of digits shown count "
        "You first think through the reasoning process as an internal monologue , enclosed within "
        "<think> </think> tags . Then , provide your final answer enclosed within \\boxed{} . "
        "I see so the answer is there are and of with a an the is image picture left right top bottom "
        "system user assistant You are a helpful assistant ."
    )
    lines = [words] * 50
    for c in colours:
        for s in shapes:
            lines += [f"How many {c} {s} are in the image?", f"I see a {c} {s}.", f"The {s} is {c}."]
    for n in range(0, 101):
        lines += [f"<think> I count {n} shapes. </think> \\boxed{{{n}}}", f"The answer is {n}."]
    return lines


def build_tokenizer(spec: TinySpec):
    """Trains the byte-level BPE tokenizer and wraps it as a PreTrainedTokenizerFast with Qwen tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=spec.tokenizer_vocab,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
    )


def build_tiny_model(out_dir: str | Path, spec: TinySpec | None = None, overwrite: bool = False) -> Path:
    """Writes a tiny HF directory of `spec.family` to `out_dir` atomically (temporary directory, then rename)."""
    import torch

    from vppo_megatron import families

    spec = spec or TinySpec()
    family = families.get(spec.family)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass overwrite=True (--overwrite) to replace it")
        if not (out / TINY_MARKER).exists():
            raise FileExistsError(f"{out} holds something other than a tiny model; refusing to delete it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tokenizer = build_tokenizer(spec)
        token_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        vocab_size = -(-len(tokenizer) // spec.vocab_multiple) * spec.vocab_multiple
        config = family.tiny_config(spec, token_ids, vocab_size)
        torch.manual_seed(spec.seed)
        model = family.model_class()(config).to(torch.float32)
        model.generation_config.eos_token_id = token_ids["<|im_end|>"]
        model.generation_config.pad_token_id = token_ids["<|endoftext|>"]
        model.save_pretrained(tmp)
        family.tiny_processor(spec, tokenizer, CHAT_TEMPLATE).save_pretrained(tmp)
        (tmp / TINY_MARKER).write_text(json.dumps(asdict(spec), indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
