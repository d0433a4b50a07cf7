"""Prompt datasets: parquet/jsonl rows with the ViRL39K schema -> PromptSample batches.

Rows are checked in two places. Structural problems (missing or empty problem/answer, placeholder count not
matching the images, no image at all) are found when the files are opened, from the text columns only. Image
problems (unreadable or corrupt bytes, missing file, extreme aspect ratio) and over-long prompts are found when a
batch is built. Either way the row is skipped and counted in a `SkipReport`, which logs the first row of each
reason once; the run never crashes on a bad row. A dataset with no usable row is a `ValueError`.

Image bytes stay in the (memory-mapped) Arrow table until a batch needs them.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vppo_megatron.config import DataConfig
from vppo_megatron.data.images import ImageDecoder, ImageError, make_decoder, processor_pixels, read_source
from vppo_megatron.data.prompts import IMAGE_PLACEHOLDER, render_prompt
from vppo_megatron.types import PromptSample

logger = logging.getLogger(__name__)


@dataclass
class SkipReport:
    """Counts skipped rows by reason; logs the first occurrence of each reason only."""

    counts: Counter = field(default_factory=Counter)

    def skip(self, reason: str, origin: str, detail: str = "") -> None:
        if reason not in self.counts:
            detail = f" ({detail})" if detail else ""
            logger.warning(
                "skipping %s: %s%s; later rows with this problem are counted, not logged", origin, reason, detail
            )
        self.counts[reason] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "no rows skipped"
        return f"{self.total} rows skipped: " + "; ".join(f"{n} x {r}" for r, n in self.counts.most_common())


@dataclass
class _Source:
    """One file's rows: text columns as Python lists, images fetched per row on demand."""

    path: Path
    problems: list[Any]
    answers: list[Any]
    image_counts: list[int]
    extras: dict[str, list[Any]]
    images_of: Any  # (row index) -> list of image sources

    def __len__(self) -> int:
        return len(self.problems)


def _open_parquet(path: Path, cfg: DataConfig) -> _Source:
    table = pq.read_table(pa.memory_map(str(path)))
    num_rows = table.num_rows

    def column(name: str) -> list[Any]:
        return table.column(name).to_pylist() if name in table.column_names else [None] * num_rows

    if cfg.image_key in table.column_names:
        images = table.column(cfg.image_key)
        counts = pc.fill_null(pc.list_value_length(images), 0).to_pylist()
        images_of = lambda i: images[i].as_py() or []  # noqa: E731
    else:
        counts, images_of = [0] * num_rows, lambda i: []  # noqa: E731
    known = (cfg.prompt_key, cfg.answer_key, cfg.image_key)
    extras = {
        name: column(name)
        for name in table.column_names
        if name not in known and pa.types.is_string(table.schema.field(name).type)
    }
    return _Source(path, column(cfg.prompt_key), column(cfg.answer_key), counts, extras, images_of)


def _open_jsonl(path: Path, cfg: DataConfig) -> _Source:
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({exc.msg}); each line must be one object") from exc

    def images_of(i: int) -> list[Any]:
        # Relative image paths in a jsonl file are relative to that file.
        return [str(path.parent / s) if isinstance(s, str) else s for s in rows[i].get(cfg.image_key) or []]

    extras = {
        key: [r.get(key) for r in rows]
        for key in {k for r in rows for k, v in r.items() if isinstance(v, str)}
        if key not in (cfg.prompt_key, cfg.answer_key, cfg.image_key)
    }
    return _Source(
        path,
        [r.get(cfg.prompt_key) for r in rows],
        [r.get(cfg.answer_key) for r in rows],
        [len(r.get(cfg.image_key) or []) for r in rows],
        extras,
        images_of,
    )


DATA_SUFFIXES = (".parquet", ".jsonl", ".json")
GLOB_CHARS = "*?["


def expand_files(entries: list[str]) -> list[Path]:
    """`data.*_files` entries as files: a file as is; a directory, its data files (sorted, not recursive: Hugging
    Face's `data/` holds every split's shards); a glob (`data/train-*.parquet`), its matches, sorted."""
    import glob

    out = []
    for entry in entries:
        path = Path(entry)
        if any(c in entry for c in GLOB_CHARS):
            matches = sorted(Path(m) for m in glob.glob(entry) if Path(m).is_file())
            if not matches:
                raise FileNotFoundError(f"data files {entry!r}: the pattern matches no file")
            out += matches
        elif path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES)
            if not matches:
                raise FileNotFoundError(f"data directory {path} holds no {', '.join(DATA_SUFFIXES)} file")
            out += matches
        else:
            out.append(path)
    return out


def answer_text(answer: Any) -> str | None:
    """The ground truth a reward function grades: a string (stripped); a number as written (3, 2.5); a list of
    exactly one of these, that one. None for anything else (several answers, a bool, a dict): the row is skipped."""
    if isinstance(answer, list | tuple) and len(answer) == 1:
        answer = answer[0]
    if isinstance(answer, bool) or not isinstance(answer, str | int | float):
        return None
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)
    text = str(answer).strip()
    return text or None


def open_source(path: str | Path, cfg: DataConfig) -> _Source:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist (build one with `vppo make-data --out DIR`)")
    if path.suffix == ".parquet":
        return _open_parquet(path, cfg)
    if path.suffix in (".jsonl", ".json"):
        return _open_jsonl(path, cfg)
    raise ValueError(f"{path}: unsupported data file type {path.suffix!r}; use .parquet or .jsonl")


def _structural_problem(problem: Any, answer: Any, num_images: int, cfg: DataConfig) -> str | None:
    if not isinstance(problem, str) or not problem.strip():
        return f"missing or empty '{cfg.prompt_key}'"
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        return f"missing or empty '{cfg.answer_key}'"
    if answer_text(answer) is None:
        kind = f"a list of {len(answer)} values" if isinstance(answer, list | tuple) else type(answer).__name__
        return f"'{cfg.answer_key}' is {kind}: one answer (a string, a number, or a list of one) per row"
    if num_images == 0:
        return f"no image in '{cfg.image_key}'"
    placeholders = problem.count(IMAGE_PLACEHOLDER)
    if placeholders and placeholders != num_images:
        return f"{placeholders} {IMAGE_PLACEHOLDER} placeholders but {num_images} images"
    return None


class PromptDataset:
    """The usable rows of some files; `samples(indices)` decodes images and renders prompts for a batch."""

    def __init__(
        self,
        files: list[str],
        cfg: DataConfig,
        tokenizer,
        patch_size: int,
        merge_size: int,
        report: SkipReport | None = None,
        decoder: ImageDecoder | None = None,
        processor_limits: tuple[float, float] = (0, math.inf),
    ):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.patch_size, self.merge_size = patch_size, merge_size
        self.report = report or SkipReport()
        self.decoder = decoder or make_decoder(
            cfg.image_decoder,
            patch_size * merge_size,
            cfg.min_pixels,
            cfg.max_pixels,
            cfg.image_resize,
            processor_limits,
        )
        self.sources = [open_source(f, cfg) for f in expand_files(files)]
        self.index: list[tuple[int, int]] = []  # (source, row) of every structurally valid row
        for s, source in enumerate(self.sources):
            for r in range(len(source)):
                why = _structural_problem(source.problems[r], source.answers[r], source.image_counts[r], cfg)
                if why:
                    self.report.skip(why, f"{source.path}:row {r}")
                else:
                    self.index.append((s, r))
        if not self.index:
            raise ValueError(
                f"no usable rows in {', '.join(map(str, files))} ({self.report.summary()}); "
                f"expected columns {cfg.prompt_key!r}, {cfg.answer_key!r}, {cfg.image_key!r}"
            )

    @classmethod
    def for_processor(cls, files: list[str], cfg: DataConfig, processor) -> PromptDataset:
        """The rows of `files` as the model's processor will see them: its tokenizer, patch grid and pixel limits
        (images it would resize again are sized as it would; a narrower range than the data's is logged once)."""
        ip = processor.image_processor
        limits = processor_pixels(ip)
        if limits[0] > cfg.min_pixels or limits[1] < cfg.max_pixels:
            logger.warning(
                "the model's image processor keeps images within %s..%s pixels, narrower than data.min_pixels.."
                "data.max_pixels (%d..%d): images are sized within both, as the processor would (widen "
                "preprocessor_config.json's limits to use the data's range)",
                limits[0],
                limits[1],
                cfg.min_pixels,
                cfg.max_pixels,
            )
        return cls(files, cfg, processor.tokenizer, ip.patch_size, ip.merge_size, processor_limits=limits)

    def __len__(self) -> int:
        return len(self.index)

    def head(self, count: int) -> list[PromptSample]:
        """The first `count` samples (all of them when count is 0): the validation set of a run or an eval."""
        return self.samples(list(range(min(count or len(self), len(self)))))

    def samples(self, indices: list[int]) -> list[PromptSample]:
        """Samples for dataset positions `indices`, in order; rows with unusable images are skipped and counted."""
        rows = [self.index[i] for i in indices]
        encoded, owner, unreadable = [], [], set()
        for k, (s, r) in enumerate(rows):
            for source in self.sources[s].images_of(r):
                try:
                    encoded.append(read_source(source))
                    owner.append(k)
                except Exception as exc:  # missing file, struct without bytes
                    self.report.skip("image could not be read", f"{self.sources[s].path}:row {r}", str(exc))
                    unreadable.add(k)
        per_row: list[list[np.ndarray | ImageError]] = [[] for _ in rows]
        for k, image in zip(owner, self.decoder.decode(encoded)):
            per_row[k].append(image)
        out = []
        for k, ((s, r), images) in enumerate(zip(rows, per_row)):
            if k in unreadable:
                continue
            origin = f"{self.sources[s].path}:row {r}"
            error = next((im for im in images if isinstance(im, ImageError)), None)
            if error is not None:
                self.report.skip(error.reason, origin, error.detail)
                continue
            sample = self._sample(s, r, images)
            if self._prompt_length(sample) > self.cfg.max_prompt_length:
                self.report.skip(f"prompt longer than data.max_prompt_length={self.cfg.max_prompt_length}", origin)
                continue
            out.append(sample)
        return out

    def _sample(self, s: int, r: int, images: list[np.ndarray]) -> PromptSample:
        source = self.sources[s]
        problem = source.problems[r]
        extra = {k: v[r] for k, v in source.extras.items() if isinstance(v[r], str)}
        return PromptSample(
            uid=extra.get("uid") or f"{source.path.stem}-{r}",
            prompt_text=render_prompt(self.tokenizer, problem, len(images), self.cfg.format_prompt),
            images=images,
            answer=answer_text(source.answers[r]),
            problem=problem,
            extra=extra,
        )

    def _prompt_length(self, sample: PromptSample) -> int:
        """Tokens after the processor expands each <|image_pad|> into one token per merged patch."""
        text_tokens = len(self.tokenizer(sample.prompt_text)["input_ids"])
        per_image = [
            (im.shape[0] // self.patch_size) * (im.shape[1] // self.patch_size) // self.merge_size**2
            for im in sample.images
        ]
        return text_tokens + sum(n - 1 for n in per_image)


class PromptLoader:
    """Endless, seeded, resumable batches of exactly `batch_size` usable samples."""

    def __init__(self, dataset: PromptDataset, batch_size: int, seed: int, shuffle: bool = True):
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.epoch, self.cursor = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.dataset))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.dataset))

    def next_batch(self) -> list[PromptSample]:
        batch: list[PromptSample] = []
        since_last_usable = 0
        while len(batch) < self.batch_size:
            if self.cursor == len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._epoch_order()
            take = self._order[self.cursor : self.cursor + self.batch_size - len(batch)].tolist()
            self.cursor += len(take)
            got = self.dataset.samples(take)
            batch += got
            since_last_usable = 0 if got else since_last_usable + len(take)
            if since_last_usable >= len(self.dataset):
                raise ValueError(
                    f"a full pass over the data produced no usable sample ({self.dataset.report.summary()})"
                )
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch, self.cursor = state["seed"], state["epoch"], state["cursor"]
        self._order = self._epoch_order()
