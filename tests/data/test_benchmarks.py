"""The eight benchmarks' loaders on fixture files each test writes in the benchmark's own schema (field names and
types as docs/evaluation.md cites from the dataset cards), and in the PAPO-Eval / VPPO-Eval layout."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures.benchmark_rows import IMG, ROWS, png

from vppo_megatron.data import benchmarks
from vppo_megatron.reward.math import compute_score


@pytest.mark.parametrize("name", list(ROWS))
def test_each_schema_becomes_a_prompt_row_with_its_images_and_answer(tmp_path, name):
    row, (problem, answer, images) = ROWS[name]
    stem = benchmarks.BENCHMARKS[name].stems[0]
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / f"{stem}.parquet")
    found, missing = benchmarks.find(tmp_path, [name])
    assert missing == [] and found[name].name == f"{stem}.parquet"
    (item,), left_out = benchmarks.load(name, found[name])
    assert (item["problem"], item["answer"], len(item["images"]), left_out) == (problem, answer, images, 0)
    assert item["problem"].count("<image>") == len(item["images"])


def test_free_form_mathverse_items_are_left_out_and_counted(tmp_path):
    row = dict(ROWS["MathVerse"][0], question_type="free-form", answer="30")
    pq.write_table(pa.Table.from_pylist([ROWS["MathVerse"][0], row]), tmp_path / "mathverse.parquet")
    rows, left_out = benchmarks.load("MathVerse", tmp_path / "mathverse.parquet")
    assert len(rows) == 1 and left_out == 1


def test_the_mmmu_pro_vision_config_asks_about_the_screenshot(tmp_path):
    row = {"id": "v1", "image": IMG, "options": ["x", "y"], "answer": "B", "subject": "Art"}
    (tmp_path / "mmmu_pro.jsonl").write_text(json.dumps(dict(row, image="shot.png")) + "\n")
    (item,), _ = benchmarks.load("MMMU-Pro", tmp_path / "mmmu_pro.jsonl")
    assert item["problem"] == "<image>Answer the multiple-choice question in the image." and item["answer"] == "B"


def test_the_papo_eval_layout_loads_with_its_instruction_removed_and_its_image_paths_resolved(tmp_path):
    """PAPO-Eval's files (and VPPO-Eval's data/vppo/*.json): ShareGPT messages, image paths from the checkout."""
    (tmp_path / "data" / "images" / "geo").mkdir(parents=True)
    (tmp_path / "data" / "images" / "geo" / "1.png").write_bytes(png(1))
    user = (
        "<image>Find $AC$.\n\nYou first think through the reasoning process as an internal monologue, enclosed "
        "within <think> </think> tags. Then, provide your final answer enclosed within \\boxed{}."
    )
    rows = [
        {
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "4"}],
            "images": ["./data/images/geo/1.png"],
        }
    ]
    (tmp_path / "data" / "papo").mkdir()
    (tmp_path / "data" / "papo" / "hiyouga_geometry3k.json").write_text(json.dumps(rows))
    found, missing = benchmarks.find(tmp_path / "data", list(benchmarks.BENCHMARKS))
    assert list(found) == ["Geo3K"] and missing == [n for n in benchmarks.BENCHMARKS if n != "Geo3K"]
    (item,), _ = benchmarks.load("Geo3K", found["Geo3K"], root=tmp_path)
    assert item == {"problem": "<image>Find $AC$.", "answer": "4", "images": [str(tmp_path / "data/images/geo/1.png")]}


def test_an_unknown_benchmark_names_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark.*Geo3K, We-Math"):
        benchmarks.find(tmp_path, ["Geo3k"])


# the boxed answer graded as the protocol grades it (mathruler's grade_answer on the last box), per answer format
GRADED = [
    ("MMK12", r"\boxed{B}", "B", 1.0),  # a letter
    ("MMK12", r"\boxed{(B)}", "B", 1.0),
    ("MMK12", r"\boxed{A}", "B", 0.0),
    ("MMK12", r"\boxed{B. 2}", "B", 0.0),  # mathruler: a letter with its option text is not the letter
    ("LogicVista", r"\boxed{A,C}", "A, C", 1.0),  # a set of letters
    ("LogicVista", r"\boxed{A}", "A, C", 0.0),
    ("Geo3K", r"\boxed{48.0}", "48", 1.0),  # a number
    ("Geo3K", r"\boxed{47}", "48", 0.0),
    ("DynaMath", r"\boxed{\frac{1}{2}}", "0.5", 1.0),  # an expression
    ("MathVision", r"\boxed{2\sqrt3}", r"2\sqrt{3}", 1.0),
    ("MathVision", r"\boxed{3\sqrt2}", r"2\sqrt{3}", 0.0),
    ("We-Math", "B", "B", 0.0),  # no box: no answer
]


@pytest.mark.parametrize("name, response, answer, expected", GRADED)
def test_grading_per_answer_format(name, response, answer, expected):
    assert compute_score(f"<think>...</think> {response}", answer)["accuracy"] == expected, name
