"""Deterministic synthetic visual-reasoning data whose answers need the image.

Every row is one small RGB PNG (white background, 1..5 flat, non-overlapping circles, squares and triangles in a
five-colour palette, drawn without anti-aliasing so pixel colours are exact) and a question about it:

* ``count_color``    "How many red shapes are in the image?" -> "1".."4". The colour asked for is in the text, but
  the count is uniform over 1..4 whatever the colour, so the text alone is at chance (1/4).
* ``count_shapes``   "How many shapes are in the image?" -> "1".."5", uniform: the text is identical for every row.
* ``largest_color``  "What colour is the largest shape?" -> a colour, uniform over the palette. The largest shape
  covers >= 1.3x the pixels of any other and every other shape has a different colour, so the image must be read
  for both sizes and colours.
* ``color_of_shape`` "What colour is the triangle?" -> a colour, uniform; the image holds exactly one shape of the
  kind asked for and the others have other colours.
* ``largest_value``  "Colour values: red=3, green=1, ... What is the value of the largest shape's colour plus 2?"
  -> "5". A several-step answer of which one step needs the image: read the largest shape's colour (as in
  ``largest_color``), look its value up in the text (``VALUES``, the same table in every row: with a fresh
  permutation per row a 2-layer model's warm start wrote the right colour 86% of the time but its value only at
  chance), add the number in the text (1..4). The row's ``solution`` spells the steps out
  (`sft.target_field=solution` warm-starts on it), so of its ~25 response tokens only the colour's depends on the
  image. Text alone guesses the colour: 1/5.

Rows follow the ViRL39K layout (``problem`` starting with ``<image>``, ``answer``, ``images`` as Hugging Face
``Image`` structs) plus ``task``, ``uid`` and ``template`` (the question template, for text-only baselines).
``solve_from_pixels`` reads every answer back from the PNG alone; ``text_only_baseline`` is the best a model
that ignores the image can do. Together they show the answers are determined by, and only by, the image.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

TASKS = ("count_color", "count_shapes", "largest_color", "color_of_shape", "largest_value")
SPLITS = ("train", "validation")
IMAGE_TOKEN = "<image>"  # ViRL39K's placeholder; the prompt builder swaps it for the processor's vision tokens

# Pure, pairwise far-apart RGB values: nearest-colour lookup can never confuse two of them.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 0, 0),
    "green": (0, 170, 0),
    "blue": (0, 0, 230),
    "yellow": (250, 210, 0),
    "purple": (150, 0, 200),
}
# largest_value's colour values, printed in every row's question (not in colour order: the value is looked up)
VALUES: dict[str, int] = {"red": 3, "green": 1, "blue": 4, "yellow": 5, "purple": 2}
BACKGROUND = (255, 255, 255)
SHAPE_KINDS = ("circle", "square", "triangle")

DEFAULT_IMAGE_SIZE = 112  # 4 x 28: Qwen2.5-VL's smart resize (multiples of 28) leaves it untouched
IMAGE_SIZE_MULTIPLE = 28  # patch 14 x spatial merge 2
MIN_IMAGE_SIZE = 84  # smallest canvas that still packs 5 shapes of MAX_SHAPE_FRACTION comfortably
MIN_SHAPE_PX = 16  # > one 14-px ViT patch, so every shape fills at least one patch
MAX_SHAPE_FRACTION = 0.27  # shape side <= 27% of the canvas side: 5 shapes plus gaps always fit
SHAPE_GAP_PX = 3  # empty pixels between bounding boxes: 4-connected components never touch
BORDER_PX = 2  # empty margin at the canvas edge
MAX_SHAPES = 5
LARGEST_AREA_RATIO = 1.3  # largest_color: largest area >= 1.3 x the runner-up, unambiguous to the eye
MAX_LAYOUT_TRIES = 1000  # rejection sampling budget; deterministic because it draws from the row's own rng

_ONE_NUMBER = " Answer with a single number."
_ONE_WORD = " Answer with a single word."
TEMPLATES: dict[str, tuple[str, ...]] = {
    "count_color": (
        "How many {color} shapes are in the image?" + _ONE_NUMBER,
        "Count the {color} shapes in the picture." + _ONE_NUMBER,
    ),
    "count_shapes": (
        "How many shapes are in the image?" + _ONE_NUMBER,
        "How many objects are drawn on the white background?" + _ONE_NUMBER,
    ),
    "largest_color": (
        "What colour is the largest shape?" + _ONE_WORD,
        "Which colour does the biggest shape in the image have?" + _ONE_WORD,
    ),
    "color_of_shape": (
        "What colour is the {shape}?" + _ONE_WORD,
        "In which colour is the {shape} drawn?" + _ONE_WORD,
    ),
    "largest_value": (
        "Colour values: {table}. What is the value of the largest shape's colour plus {add}?" + _ONE_NUMBER,
        "Each colour has a value: {table}. Add {add} to the value of the biggest shape's colour." + _ONE_NUMBER,
    ),
}
# largest_value's worked solution: the colour is read from the image, everything after it from the text
SOLUTIONS = {
    "largest_value": "<think> The largest shape is {color}. {color} is {value}. {value} + {add} = {answer}. </think> "
    "\\boxed{{{answer}}}",
}

IMAGES_TYPE = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))  # datasets.Image encoding
SCHEMA = pa.schema(
    [
        ("problem", pa.string()),
        ("answer", pa.string()),
        ("images", IMAGES_TYPE),
        ("task", pa.string()),
        ("uid", pa.string()),
        ("template", pa.string()),
        ("solution", pa.string()),  # a worked target response (largest_value), else null
    ]
)

Shape = tuple[str, int, str]  # (kind, side in px, colour name)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed tasks: {', '.join(TASKS)}")


def _check_image_size(image_size: int) -> None:
    if image_size < MIN_IMAGE_SIZE or image_size % IMAGE_SIZE_MULTIPLE:
        raise ValueError(
            f"image_size must be a multiple of {IMAGE_SIZE_MULTIPLE} and >= {MIN_IMAGE_SIZE}, got {image_size}"
        )


def _row_rng(seed: int, task: str, split: str, index: int) -> np.random.Generator:
    # crc32, not hash(): Python salts str hashes per process, which would break cross-run determinism.
    entropy = [seed, zlib.crc32(task.encode()), zlib.crc32(split.encode()), index]
    return np.random.default_rng(np.random.SeedSequence(entropy))


@cache
def _shape_mask(kind: str, size: int) -> np.ndarray:
    """Boolean size x size mask; drawn in mode "1" so there is no anti-aliasing."""
    img = Image.new("1", (size, size), 0)
    draw = ImageDraw.Draw(img)
    last = size - 1
    if kind == "circle":
        draw.ellipse((0, 0, last, last), fill=1)
    elif kind == "square":
        draw.rectangle((0, 0, last, last), fill=1)
    else:
        draw.polygon([(0, last), (last, last), (size // 2, 0)], fill=1)
    mask = np.array(img, dtype=bool)
    mask.flags.writeable = False
    return mask


def _area(shape: Shape) -> int:
    return int(_shape_mask(shape[0], shape[1]).sum())


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _sizes(rng: np.random.Generator, n: int, image_size: int) -> list[int]:
    return [int(s) for s in rng.integers(MIN_SHAPE_PX, int(image_size * MAX_SHAPE_FRACTION) + 1, size=n)]


def _sample_scene(task: str, rng: np.random.Generator, image_size: int) -> tuple[list[Shape], dict[str, str], str]:
    """Shapes to draw, template fields and answer; answers are uniform so the question text carries no signal."""
    colors = list(PALETTE)
    if task == "count_color":
        target = _pick(rng, colors)
        count = int(rng.integers(1, 5))
        n = count + int(rng.integers(0, MAX_SHAPES - count + 1))
        others = [c for c in colors if c != target]
        cols = [target] * count + [_pick(rng, others) for _ in range(n - count)]
        shapes = [(_pick(rng, SHAPE_KINDS), s, c) for s, c in zip(_sizes(rng, n, image_size), cols, strict=True)]
        return shapes, {"color": target}, str(count)
    if task == "count_shapes":
        n = int(rng.integers(1, MAX_SHAPES + 1))
        sizes = _sizes(rng, n, image_size)
        return [(_pick(rng, SHAPE_KINDS), s, _pick(rng, colors)) for s in sizes], {}, str(n)
    if task == "largest_color":
        target = _pick(rng, colors)
        others = [c for c in colors if c != target]
        n = int(rng.integers(2, MAX_SHAPES + 1))
        for _ in range(MAX_LAYOUT_TRIES):
            geo = sorted(((_pick(rng, SHAPE_KINDS), s) for s in _sizes(rng, n, image_size)), key=lambda g: -_area(g))
            if _area(geo[0]) >= LARGEST_AREA_RATIO * _area(geo[1]):
                shapes = [(*geo[0], target)] + [(k, s, _pick(rng, others)) for k, s in geo[1:]]
                return shapes, {}, target
        raise RuntimeError("could not sample a scene with an unambiguous largest shape")
    if task == "largest_value":
        shapes, _, color = _sample_scene("largest_color", rng, image_size)
        add = int(rng.integers(1, 5))
        table = ", ".join(f"{c}={v}" for c, v in VALUES.items())
        fields = {"table": table, "add": str(add), "color": color, "value": str(VALUES[color])}
        return shapes, fields, str(VALUES[color] + add)
    # color_of_shape
    target = _pick(rng, colors)
    kind = _pick(rng, SHAPE_KINDS)
    n = int(rng.integers(2, MAX_SHAPES + 1))
    other_kinds = [k for k in SHAPE_KINDS if k != kind]
    others = [c for c in colors if c != target]
    sizes = _sizes(rng, n, image_size)
    shapes = [(kind, sizes[0], target)] + [(_pick(rng, other_kinds), s, _pick(rng, others)) for s in sizes[1:]]
    return shapes, {"shape": kind}, target


def _place(rng: np.random.Generator, sizes: list[int], image_size: int) -> list[tuple[int, int]]:
    """Top-left corners such that bounding boxes stay SHAPE_GAP_PX apart and BORDER_PX from the edge."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])  # big shapes first: they are the hard ones to fit
    for _ in range(MAX_LAYOUT_TRIES):
        corners: dict[int, tuple[int, int]] = {}
        for i in order:
            size = sizes[i]
            hi = image_size - BORDER_PX - size + 1
            for _ in range(100):
                x, y = (int(v) for v in rng.integers(BORDER_PX, hi, size=2))
                if not any(
                    x < bx + sizes[j] + SHAPE_GAP_PX
                    and bx < x + size + SHAPE_GAP_PX
                    and y < by + sizes[j] + SHAPE_GAP_PX
                    and by < y + size + SHAPE_GAP_PX
                    for j, (bx, by) in corners.items()
                ):
                    corners[i] = (x, y)
                    break
            else:
                break
        if len(corners) == len(sizes):
            return [corners[i] for i in range(len(sizes))]
    raise RuntimeError(f"could not place {len(sizes)} shapes on a {image_size}px canvas")


def _render_png(shapes: list[Shape], corners: list[tuple[int, int]], image_size: int) -> bytes:
    canvas = np.full((image_size, image_size, 3), BACKGROUND, dtype=np.uint8)
    for (kind, size, color), (x, y) in zip(shapes, corners, strict=True):
        canvas[y : y + size, x : x + size][_shape_mask(kind, size)] = PALETTE[color]
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()


def generate_rows(
    task: str, num_rows: int, seed: int, image_size: int = DEFAULT_IMAGE_SIZE, split: str = "train"
) -> list[dict[str, Any]]:
    """`num_rows` rows of `task`; row i depends only on (seed, task, split, i), so splits never share a draw."""
    _check_task(task)
    _check_image_size(image_size)
    if num_rows < 1:
        raise ValueError(f"num_rows must be >= 1, got {num_rows}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    rows = []
    for index in range(num_rows):
        rng = _row_rng(seed, task, split, index)
        shapes, fields, answer = _sample_scene(task, rng, image_size)
        png = _render_png(shapes, _place(rng, [s for _, s, _ in shapes], image_size), image_size)
        template = int(rng.integers(len(TEMPLATES[task])))
        solution = SOLUTIONS[task].format(answer=answer, **fields) if task in SOLUTIONS else None
        rows.append(
            {
                "problem": IMAGE_TOKEN + TEMPLATES[task][template].format(**fields),
                "answer": answer,
                "images": [{"bytes": png, "path": None}],
                "task": task,
                "uid": f"{task}-{split}-{index}",
                "template": f"{task}/{template}",
                "solution": solution,
            }
        )
    return rows


def _components(foreground: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask (iterative flood fill); each as an array of flat pixel indices."""
    h, w = foreground.shape
    fg = foreground.ravel().tolist()
    seen = [False] * len(fg)
    comps = []
    for start in np.flatnonzero(foreground).tolist():
        if seen[start]:
            continue
        seen[start] = True
        stack, members = [start], []
        while stack:
            p = stack.pop()
            members.append(p)
            r, c = divmod(p, w)
            for q, inside in ((p - w, r > 0), (p + w, r < h - 1), (p - 1, c > 0), (p + 1, c < w - 1)):
                if inside and fg[q] and not seen[q]:
                    seen[q] = True
                    stack.append(q)
        comps.append(np.array(members))
    return comps


def _nearest_color(rgb: np.ndarray) -> str:
    names = list(PALETTE)
    dist = [int(((rgb.astype(int) - PALETTE[n]) ** 2).sum()) for n in names]
    return names[int(np.argmin(dist))]


def _classify(pixels: np.ndarray, width: int) -> str:
    """Shape kind from the fill ratio of the bounding box: square ~1.0, circle ~pi/4, triangle ~1/2."""
    rows, cols = np.divmod(pixels, width)
    fill = len(pixels) / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
    return "square" if fill > 0.9 else "circle" if fill > 0.66 else "triangle"


def _asked(question: str, options: Sequence[str]) -> str:
    found = [o for o in options if re.search(rf"\b{o}\b", question)]
    if len(found) != 1:
        raise ValueError(f"expected exactly one of {options} in question {question!r}, found {found}")
    return found[0]


def solve_from_pixels(task: str, question: str, png_bytes: bytes) -> str:
    """Answers `question` from the image alone: colour masks + connected components, no generator state."""
    _check_task(task)
    img = np.asarray(Image.open(io.BytesIO(png_bytes)).convert("RGB"))
    comps = _components((img != BACKGROUND).any(axis=-1))
    flat = img.reshape(-1, 3)
    objects = [(len(c), _nearest_color(flat[c[0]]), _classify(c, img.shape[1])) for c in comps]
    if task == "count_shapes":
        return str(len(objects))
    if task == "count_color":
        color = _asked(question, tuple(PALETTE))
        return str(sum(c == color for _, c, _ in objects))
    if task == "largest_color":
        return max(objects)[1]
    if task == "largest_value":
        values = dict(re.findall(r"\b([a-z]+)=(\d+)", question))
        add = re.search(r"(?:plus|Add) (\d+)", question)
        if set(values) != set(PALETTE) or add is None:
            raise ValueError(f"expected a value per colour and a number to add in {question!r}")
        return str(int(values[max(objects)[1]]) + int(add.group(1)))
    kind = _asked(question, SHAPE_KINDS)
    matches = [c for _, c, k in objects if k == kind]
    if len(matches) != 1:
        raise ValueError(f"expected one {kind} in the image, found {len(matches)}")
    return matches[0]


def text_only_baseline(train_rows: Sequence[dict[str, Any]], val_rows: Sequence[dict[str, Any]]) -> float:
    """Validation accuracy of answering each problem text with its most common train answer (image ignored);
    largest_value's text holds the answer for each colour, so its best guess is right for 1 colour in 5."""
    by_text: dict[str, Counter[str]] = {}
    by_task: dict[str, Counter[str]] = {}
    for row in train_rows:
        by_text.setdefault(row["problem"], Counter())[row["answer"]] += 1
        by_task.setdefault(row["task"], Counter())[row["answer"]] += 1
    correct = 0.0
    for row in val_rows:
        if row["task"] == "largest_value":
            correct += 1 / len(PALETTE)
            continue
        votes = by_text.get(row["problem"]) or by_task.get(row["task"]) or Counter()
        correct += bool(votes) and votes.most_common(1)[0][0] == row["answer"]
    return correct / len(val_rows)


def _mixed_rows(tasks: Sequence[str], num_rows: int, seed: int, image_size: int, split: str) -> list[dict[str, Any]]:
    """`num_rows` rows shared round-robin over `tasks` and interleaved, so any prefix mixes the tasks."""
    counts = [num_rows // len(tasks) + (i < num_rows % len(tasks)) for i in range(len(tasks))]
    per_task = [generate_rows(t, n, seed, image_size, split) for t, n in zip(tasks, counts, strict=True) if n]
    return [rows[k] for k in range(len(per_task[0])) for rows in per_task if k < len(rows)]


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the dataset is meant to be read by other users and jobs
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_dataset(
    out_dir: str | os.PathLike[str],
    tasks: Sequence[str],
    num_train: int,
    num_val: int,
    seed: int,
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> dict[str, Path]:
    """Writes train.parquet, validation.parquet and dataset_info.json (atomically); returns their paths."""
    if not tasks:
        raise ValueError(f"tasks must not be empty; allowed tasks: {', '.join(TASKS)}")
    for task in tasks:
        _check_task(task)
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must not repeat, got {list(tasks)}")
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train} and {num_val}")
    _check_image_size(image_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = {
        "train": _mixed_rows(tasks, num_train, seed, image_size, "train"),
        "validation": _mixed_rows(tasks, num_val, seed, image_size, "validation"),
    }
    paths: dict[str, Path] = {}
    for split, rows in splits.items():
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        paths[split] = out / f"{split}.parquet"
        _atomic_write(paths[split], lambda tmp, table=table: pq.write_table(table, tmp))
    info = {
        "tasks": list(tasks),
        "seed": seed,
        "image_size": image_size,
        "num_rows": {split: len(rows) for split, rows in splits.items()},
        "answer_distribution": {
            split: {t: dict(sorted(Counter(r["answer"] for r in rows if r["task"] == t).items())) for t in tasks}
            for split, rows in splits.items()
        },
        "text_only_baseline_accuracy": text_only_baseline(splits["train"], splits["validation"]),
    }
    paths["info"] = out / "dataset_info.json"
    _atomic_write(paths["info"], lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2) + "\n"))
    return paths
