"""The synthetic dataset is deterministic, ViRL39K-shaped, and answerable from the image but not from the text."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vppo_megatron.data import synthetic as S

SEED = 1234


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return S.write_dataset(tmp_path_factory.mktemp("synthetic"), list(S.TASKS), 40, 20, SEED)


def _png(row: dict) -> bytes:
    return row["images"][0]["bytes"]


def test_rows_are_deterministic_per_seed_and_split() -> None:
    for task in S.TASKS:
        first = S.generate_rows(task, 8, SEED)
        assert first == S.generate_rows(task, 8, SEED)
        # Row i depends only on (seed, task, split, i): a longer run starts with the same rows.
        assert S.generate_rows(task, 12, SEED)[:8] == first
        assert [_png(r) for r in S.generate_rows(task, 8, SEED + 1)] != [_png(r) for r in first]
        assert [_png(r) for r in S.generate_rows(task, 8, SEED, split="validation")] != [_png(r) for r in first]


def test_rows_do_not_depend_on_the_process_hash_seed() -> None:
    # Python salts str hashes per process; seeding from hash(task) would pass the in-process test above but change
    # the data between runs. A child with a different PYTHONHASHSEED must produce the same PNG.
    code = (
        "import hashlib; from vppo_megatron.data import synthetic as S; "
        f"print(hashlib.sha256(S.generate_rows('largest_color', 1, {SEED})[0]['images'][0]['bytes']).hexdigest())"
    )
    child = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONHASHSEED": "987"},
        capture_output=True,
        text=True,
        check=True,
    )
    expected = hashlib.sha256(_png(S.generate_rows("largest_color", 1, SEED)[0])).hexdigest()
    assert child.stdout.strip() == expected


def test_write_dataset_is_byte_identical(tmp_path: Path, dataset: dict[str, Path]) -> None:
    again = S.write_dataset(tmp_path / "again", list(S.TASKS), 40, 20, SEED)
    for name in ("train", "validation", "info"):
        assert again[name].read_bytes() == dataset[name].read_bytes(), name
    other = S.write_dataset(tmp_path / "other", list(S.TASKS), 40, 20, SEED + 1)
    assert other["train"].read_bytes() != dataset["train"].read_bytes()
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == [
        "dataset_info.json",
        "train.parquet",
        "validation.parquet",
    ]  # no temporary files left behind


def test_schema_and_images(dataset: dict[str, Path]) -> None:
    for split, num_rows in (("train", 40), ("validation", 20)):
        table = pq.read_table(dataset[split])
        assert table.schema.equals(S.SCHEMA), table.schema
        rows = table.to_pylist()
        assert len(rows) == num_rows
        # 40 rows over 4 tasks round-robin: 10 each, interleaved so any prefix mixes the tasks.
        assert Counter(r["task"] for r in rows) == {t: num_rows // len(S.TASKS) for t in S.TASKS}
        assert [r["task"] for r in rows[: len(S.TASKS)]] == list(S.TASKS)
        assert len({r["uid"] for r in rows}) == num_rows
        for row in rows:
            assert row["problem"].startswith(S.IMAGE_TOKEN)
            assert row["problem"].count(S.IMAGE_TOKEN) == len(row["images"]) == 1
            assert row["images"][0]["path"] is None
            assert row["uid"].startswith(f"{row['task']}-{split}-")
            task, template = row["template"].split("/")
            assert task == row["task"] and 0 <= int(template) < len(S.TEMPLATES[task])
            image = Image.open(io.BytesIO(_png(row)))
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (112, 112)


def test_dataset_info(dataset: dict[str, Path]) -> None:
    info = json.loads(dataset["info"].read_text())
    assert info["tasks"] == list(S.TASKS) and info["seed"] == SEED and info["image_size"] == 112
    assert info["num_rows"] == {"train": 40, "validation": 20}
    train = pq.read_table(dataset["train"]).to_pylist()
    assert info["answer_distribution"]["train"]["count_shapes"] == dict(
        sorted(Counter(r["answer"] for r in train if r["task"] == "count_shapes").items())
    )
    assert 0.0 <= info["text_only_baseline_accuracy"] <= 1.0


def test_train_and_validation_never_share_an_image(dataset: dict[str, Path]) -> None:
    train = {_png(r) for r in pq.read_table(dataset["train"]).to_pylist()}
    val = {_png(r) for r in pq.read_table(dataset["validation"]).to_pylist()}
    assert not train & val


def test_pixels_are_exact_palette_colours() -> None:
    # No anti-aliasing: every pixel is the background or one palette colour, and every shape covers a ViT patch.
    allowed = {S.BACKGROUND, *S.PALETTE.values()}
    for task in S.TASKS:
        for row in S.generate_rows(task, 10, SEED):
            pixels = np.asarray(Image.open(io.BytesIO(_png(row)))).reshape(-1, 3)
            assert {tuple(int(v) for v in p) for p in np.unique(pixels, axis=0)} <= allowed


@pytest.mark.parametrize("task", S.TASKS)
def test_pixel_solver_recovers_every_answer(task: str) -> None:
    rows = S.generate_rows(task, 60, SEED, split="validation")
    solved = [S.solve_from_pixels(task, r["problem"], _png(r)) for r in rows]
    assert solved == [r["answer"] for r in rows]


def test_largest_shape_is_unambiguous() -> None:
    for row in S.generate_rows("largest_color", 30, SEED):
        image = np.asarray(Image.open(io.BytesIO(_png(row))))
        areas = sorted((len(c) for c in S._components((image != S.BACKGROUND).any(axis=-1))), reverse=True)
        assert 2 <= len(areas) <= S.MAX_SHAPES
        assert areas[0] >= S.LARGEST_AREA_RATIO * areas[1]
        assert areas[-1] >= S._area(("triangle", S.MIN_SHAPE_PX, "red"))  # smallest possible shape


def test_answers_are_uniform_over_their_range() -> None:
    # Uniform answers are what keeps the text-only baseline at chance; check the ranges and that each is hit.
    expected = {
        "count_color": {"1", "2", "3", "4"},
        "count_shapes": {"1", "2", "3", "4", "5"},
        "largest_color": set(S.PALETTE),
        "color_of_shape": set(S.PALETTE),
    }
    for task, answers in expected.items():
        counts = Counter(r["answer"] for r in S.generate_rows(task, 200, SEED))
        assert set(counts) == answers
        assert min(counts.values()) >= 200 / len(answers) / 2  # no answer far below its 1/k share


def test_text_only_baseline_is_far_below_the_pixel_solver() -> None:
    train = S._mixed_rows(S.TASKS, 600, SEED, 112, "train")
    val = S._mixed_rows(S.TASKS, 200, SEED, 112, "validation")
    baseline = S.text_only_baseline(train, val)
    solver = np.mean([S.solve_from_pixels(r["task"], r["problem"], _png(r)) == r["answer"] for r in val])
    # Given the question text the answer is uniform: 1/4 for count_color, 1/5 for the other four tasks (for
    # largest_value: guess the colour), so the best text-only accuracy on an even task mix is (1/4 + 4/5) / 5 =
    # 0.21; 40 validation rows per task make it noisy, sd = sqrt(0.21 * 0.79 / 200) = 0.029 overall. 0.35 is ~5 sd
    # above chance. It only depends on the rng-drawn questions and answers, not on PNG encoder bytes.
    assert baseline < 0.35, baseline
    assert solver == 1.0


def test_largest_value_solutions_read_one_fact_from_the_image_and_the_rest_from_the_text() -> None:
    rows = S.generate_rows("largest_value", 200, SEED)
    answers = Counter(r["answer"] for r in rows)
    assert set(answers) == {str(n) for n in range(2, 10)}  # value 1..5 plus 1..4
    for r in rows:
        color = S.solve_from_pixels("largest_color", r["problem"], _png(r))  # the one step that needs the image
        table = dict(re.findall(r"([a-z]+)=(\d)", r["problem"]))
        add = re.search(r"(?:plus|Add) (\d)", r["problem"]).group(1)
        assert table == {c: str(v) for c, v in S.VALUES.items()} and set(table) == set(S.PALETTE)
        value = table[color]
        assert r["answer"] == str(int(value) + int(add))
        assert r["solution"] == (
            f"<think> The largest shape is {color}. {color} is {value}. {value} + {add} = {r['answer']}. </think> "
            f"\\boxed{{{r['answer']}}}"
        )
    assert all(r["solution"] is None for r in S.generate_rows("largest_color", 5, SEED))
    # text alone: any colour's value plus the number, right for 1 colour in 5
    assert S.text_only_baseline(rows, rows) == pytest.approx(0.2)


def test_text_only_baseline_uses_the_question_text() -> None:
    def row(task: str, problem: str, answer: str) -> dict:
        return {"task": task, "problem": problem, "answer": answer}

    train = [row("a", "q1", "x"), row("a", "q1", "x"), row("a", "q2", "y"), row("a", "q2", "y"), row("a", "q2", "y")]
    val = [row("a", "q1", "x"), row("a", "q2", "y"), row("a", "q3", "y"), row("b", "q4", "z")]
    # q1 -> x, q2 -> y by text; unseen q3 falls back to task a's majority y; task b was never seen: wrong.
    assert S.text_only_baseline(train, val) == 0.75


def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = S.write_dataset(tmp_path, ["count_shapes"], 2, 1, SEED)
    before = paths["train"].read_bytes()

    def broken_write(table: object, where: str) -> None:
        Path(where).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(S.pq, "write_table", broken_write)
    with pytest.raises(OSError, match="disk full"):
        S.write_dataset(tmp_path, ["count_shapes"], 3, 1, SEED + 1)
    assert paths["train"].read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset_info.json", "train.parquet", "validation.parquet"]


def test_bad_inputs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="count_color, count_shapes, largest_color, color_of_shape"):
        S.generate_rows("count_dogs", 1, SEED)
    with pytest.raises(ValueError, match="allowed tasks"):
        S.write_dataset(tmp_path, ["count_color", "count_dogs"], 4, 4, SEED)
    with pytest.raises(ValueError, match="allowed tasks"):
        S.solve_from_pixels("count_dogs", "?", b"")
    with pytest.raises(ValueError, match="num_train and num_val must be >= 1"):
        S.write_dataset(tmp_path, ["count_color"], 0, 4, SEED)
    with pytest.raises(ValueError, match="num_rows must be >= 1"):
        S.generate_rows("count_color", 0, SEED)
    with pytest.raises(ValueError, match="multiple of 28"):
        S.generate_rows("count_color", 1, SEED, image_size=100)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        S.generate_rows("count_color", 1, -1)
    assert not list(tmp_path.iterdir())  # validation happens before anything is written
