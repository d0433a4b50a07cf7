"""The eight benchmarks of VPPO's evaluation, read from local files: each in the schema its Hugging Face dataset
publishes (docs/evaluation.md cites every card), or in the PAPO-Eval / VPPO-Eval layout the paper's numbers come
from (ShareGPT `messages` + image paths). Every row becomes one prompt row of this project's schema: `problem`
(with one `<image>` placeholder per image, lettered options appended where the schema keeps them apart), `answer`
(what the boxed answer is graded against) and `images` (encoded bytes, paths or {bytes, path} structs).

A benchmark listed but absent on disk is reported as missing (`find`), never skipped in silence.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

IMAGE = "<image>"
LETTERS = "ABCDEFGHIJ"
# the instruction PAPO-Eval / VPPO-Eval bake into each user turn; data.format_prompt adds the run's own
BAKED_INSTRUCTION = re.compile(r"\s*You first think through the reasoning process as an internal monologue.*$", re.S)
SUFFIXES = (".parquet", ".jsonl", ".json")


@dataclass(frozen=True)
class Benchmark:
    name: str
    """As the table prints it."""
    hf_id: str
    """The Hugging Face dataset whose schema `normalize` reads."""
    stems: tuple[str, ...]
    """File names (without suffix) that hold it: the HF id with '/' -> '_', PAPO-Eval's split name, short names."""
    normalize: Callable[[dict], dict | None]
    """An upstream row -> {problem, answer, images}; None for a row the paper's protocol leaves out."""


def _one(image) -> list:
    return [] if image is None else [image]


def _lettered(options) -> str:
    """Options as the lines 'A. ...' (a list, or a list written as a string as MMMU-Pro's standard configs do)."""
    if isinstance(options, str):
        options = ast.literal_eval(options) if options.strip().startswith("[") else [options]
    return "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options or []))


def _with_images(text: str, count: int) -> str:
    """`text` with one <image> placeholder per image: the row's own, else that many put in front."""
    return text if text.count(IMAGE) == count else IMAGE * count + text.replace(IMAGE, "")


def _row(problem: str, answer, images: list) -> dict:
    return {"problem": _with_images(problem.strip(), len(images)), "answer": str(answer).strip(), "images": images}


def _geo3k(r: dict) -> dict:
    return _row(r["problem"], r["answer"], list(r["images"]))  # answer: the text of the correct choice


def _we_math(r: dict) -> dict:
    options = "\n".join(o.strip() for o in r["option"].split(";")) if r.get("option") else ""
    return _row(f"{r['question']}\n{options}", r["answer"], _one(r["image_path"]))


def _plain(question: str, answer: str, image: str) -> Callable[[dict], dict]:
    return lambda r: _row(r[question], r[answer], _one(r[image]))


def _mathverse(r: dict) -> dict | None:
    if r.get("question_type") != "multi-choice":  # the protocol keeps the verifiable multiple-choice items
        return None
    return _row(r["question"], r["answer"], _one(r["image"]))


def _mathvision(r: dict) -> dict:
    options = _lettered(r.get("options"))
    image = r.get("decoded_image") or r.get("image")
    return _row(f"{r['question']}\n{options}" if options else r["question"], r["answer"], _one(image))


def _dynamath(r: dict) -> dict:
    return _row(r["question"], r["ground_truth"], _one(r.get("decoded_image") or r.get("image")))


def _mmmu_pro(r: dict) -> dict:
    if "question" not in r:  # the vision config: question and options are rendered in the screenshot
        return _row("Answer the multiple-choice question in the image.", r["answer"], _one(r["image"]))
    images = [r[f"image_{k}"] for k in range(1, 8) if r.get(f"image_{k}") is not None]
    question = re.sub(r"<image \d+>", IMAGE, r["question"])
    return _row(f"{question}\n{_lettered(r['options'])}", r["answer"], images)


BENCHMARKS = {
    b.name: b
    for b in [
        Benchmark("Geo3K", "hiyouga/geometry3k", ("hiyouga_geometry3k", "geo3k", "geometry3k"), _geo3k),
        Benchmark("We-Math", "We-Math/We-Math", ("We-Math_We-Math", "We_Math", "we_math", "wemath"), _we_math),
        Benchmark(
            "MMK12", "FanqingM/MMK12", ("FanqingM_MMK12", "PAPO_MMK12", "mmk12"), _plain("question", "answer", "image")
        ),
        Benchmark("MathVerse", "AI4Math/MathVerse", ("AI4Math_MathVerse", "mathverse"), _mathverse),
        Benchmark("MathVision", "MathLLMs/MathVision", ("MathLLMs_MathVision", "mathvision"), _mathvision),
        Benchmark("DynaMath", "DynaMath/DynaMath_Sample", ("DynaMath_DynaMath_Sample", "dynamath"), _dynamath),
        Benchmark(
            "LogicVista",
            "lscpku/LogicVista",
            ("lscpku_LogicVista", "logicvista"),
            _plain("question", "answer", "image"),
        ),
        Benchmark("MMMU-Pro", "MMMU/MMMU_Pro", ("MMMU_MMMU_Pro", "mmmu_pro"), _mmmu_pro),
    ]
}


def sharegpt(row: dict, root: Path) -> dict:
    """A PAPO-Eval / VPPO-Eval row: the user turn (its baked-in instruction removed: the run's data.format_prompt
    adds its own), the assistant turn as the answer, image paths relative to `root` (the PAPO-Eval checkout)."""
    turns = {m["role"]: m["content"] for m in row["messages"]}
    images = [str((root / p).resolve()) if not Path(p).is_absolute() else p for p in row.get("images") or []]
    return _row(BAKED_INSTRUCTION.sub("", turns["user"]), turns["assistant"], images)


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text()
    if path.suffix == ".json":
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def find(directory: Path, names: list[str]) -> tuple[dict[str, Path], list[str]]:
    """(benchmark -> its file in `directory`, searched recursively by the benchmark's stems; the names found on
    no file). An unknown name is a ValueError naming the known ones."""
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    found, missing = {}, []
    files = sorted(p for p in Path(directory).rglob("*") if p.suffix in SUFFIXES)
    for name in names:
        stems = {s.lower() for s in BENCHMARKS[name].stems}
        match = [p for p in files if p.stem.lower() in stems or p.stem.lower().split("-0000")[0] in stems]
        if match:
            found[name] = match[0]
        else:
            missing.append(name)
    return found, missing


def load(name: str, path: Path, root: Path | None = None) -> tuple[list[dict], int]:
    """The prompt rows of benchmark `name` from `path` (either schema), and how many rows the protocol left out."""
    rows = read_rows(path)
    normalize = BENCHMARKS[name].normalize
    out, left_out = [], 0
    for row in rows:
        item = sharegpt(row, root or path.parent) if "messages" in row else normalize(row)
        if item is None:
            left_out += 1
        else:
            out.append(item)
    return out, left_out


def image_struct(image, base: Path) -> dict:
    """One image as the {bytes, path} struct the prompt loader reads (a relative path resolved against `base`)."""
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, bytes | bytearray):
        return {"bytes": bytes(image), "path": None}
    path = Path(image)
    return {"bytes": None, "path": str(path if path.is_absolute() else base / path)}


def write_prompt_file(rows: list[dict], base: Path, out: Path) -> Path:
    """Prompt rows as a parquet file of this project's schema (problem, answer, images), images as structs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("problem", pa.string()), ("answer", pa.string()), ("images", pa.list_(image))])
    table = [dict(r, images=[image_struct(i, base) for i in r["images"]]) for r in rows]
    pq.write_table(pa.Table.from_pylist(table, schema=schema), out)
    return out
