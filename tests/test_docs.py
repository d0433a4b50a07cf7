"""The repository's documentation stands alone and stays in step with the code.

- No file cites the private design notes the project was written from (users and contributors do not have them).
- Every relative link in README.md and docs/*.md reaches a file of the repository (and a heading, for `#anchor`).
- docs/algorithm.md's ablation table lists every entry of vppo_megatron/algo/ablations.py with its overrides and the
  paper's number.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vppo_megatron.algo.ablations import ABLATIONS

REPO = Path(__file__).resolve().parents[1]
SCANNED_DIRS = ("vppo_megatron", "tests", "examples", "tools", "docs", "benchmarks", "checkpoints_convert", ".ci")
SCANNED_FILES = ("README.md", "CONTRIBUTING.md", "CHANGELOG.md", "Makefile", "pyproject.toml", "setup.py")
SKIPPED_PARTS = {"__pycache__", ".pytest_cache", ".ruff_cache"}
# Joined at run time so this file does not match itself (a formatter merges adjacent literals).
NOTE_NAMES = tuple(
    "".join(parts)
    for parts in [
        ("VPPO", "_SPEC"),
        ("GPU", "_PATH"),
        ("WEIGHT", "_SYNC"),
        ("DESIGN", ".md"),
        ("STYLE", ".md"),
        ("../", "shared"),
    ]
)
MARKDOWN = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def _text_files() -> list[Path]:
    paths = [REPO / name for name in SCANNED_FILES if (REPO / name).is_file()]
    for directory in SCANNED_DIRS:
        paths += [p for p in (REPO / directory).rglob("*") if p.is_file() and not SKIPPED_PARTS & set(p.parts)]
    out = []
    for path in sorted(paths):
        try:
            out.append((path, path.read_text(encoding="utf-8")))
        except UnicodeDecodeError:  # images and other binaries cannot cite anything
            continue
    return out


def test_no_file_cites_the_private_design_notes():
    files = _text_files()
    assert any(path.name == "algorithm.md" for path, _ in files), "the scan must reach docs/"
    hits = [
        f"{path.relative_to(REPO)}:{number}: {name}"
        for path, text in files
        for number, line in enumerate(text.splitlines(), 1)
        for name in NOTE_NAMES
        if name in line
    ]
    assert not hits, "cite the repository's own docs (README.md, docs/) instead:\n" + "\n".join(hits)


def github_anchor(heading: str) -> str:
    """The #fragment GitHub gives a heading: lower case, punctuation dropped (but - and _), spaces -> -."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def _links(path: Path) -> list[str]:
    text = INLINE_CODE.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))
    return [m.group(1) for m in LINK.finditer(text)]


def test_github_anchor_rule():
    assert github_anchor("What `tools/gpu_acceptance.sh` proves") == "what-toolsgpu_acceptancesh-proves"
    assert github_anchor("Vocab-parallel log-probs, entropy and KL") == "vocab-parallel-log-probs-entropy-and-kl"


@pytest.mark.parametrize("doc", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_reach_files_and_headings(doc):
    broken = []
    for target in _links(doc):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:: outside the repository
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (doc.parent / file_part).resolve() if file_part else doc
        if REPO not in resolved.parents and resolved != REPO:
            broken.append(f"{target}: outside the repository")
        elif not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.relative_to(REPO)}")
    assert not broken, f"{doc.relative_to(REPO)}: broken links:\n" + "\n".join(broken)


def test_link_check_sees_the_readme_links():
    assert {"docs/algorithm.md", "docs/gpu_path.md", "docs/memory.md", "docs/scaling.md"} <= set(_links(MARKDOWN[0]))


def _ablation_rows() -> dict[str, tuple[list[str], float | None]]:
    rows = {}
    for line in (REPO / "docs" / "algorithm.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not re.fullmatch(r"`\w+/[\w.]+`", cells[0]):
            continue
        overrides = [] if cells[1].startswith("(none") else cells[1].strip("`").split()
        rows[cells[0].strip("`")] = (overrides, None if cells[2] == "-" else float(cells[2]))
    return rows


def test_the_ablation_table_matches_ablations_py():
    rows = _ablation_rows()
    assert rows["table12/prob_drop"] == (["algorithm.estimator=prob_drop"], 50.3)  # the parser reads the table
    missing = sorted(set(ABLATIONS) - set(rows))
    extra = sorted(set(rows) - set(ABLATIONS))
    differ = [
        f"{name}: docs {rows[name]} != code {ABLATIONS[name]}"
        for name in ABLATIONS
        if rows.get(name, ABLATIONS[name]) != ABLATIONS[name]
    ]
    assert not (missing or extra or differ), (
        "update the ablation table in docs/algorithm.md to vppo_megatron/algo/ablations.py: "
        f"missing {missing}, not in the code {extra}, different {differ}"
    )


RECIPE_TABLE_RECIPES = ("qwen2_5_vl_7b", "qwen3_vl_8b")


def _recipe_rows():
    """(our key, our value per recipe) of docs/recipes.md's table, for rows that name a setting of ours."""
    rows = []
    for line in (REPO / "docs" / "recipes.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) != 6 or not cells[3].startswith("`") or cells[3] == "`ours: key`":
            continue
        values = [v.strip() for v in cells[4].split(" / ")]
        rows.append((cells[3].strip("`"), values if len(values) == 2 else values * 2))
    return rows


def test_the_recipe_provenance_table_states_the_recipes_values():
    from vppo_megatron.config import load

    rows = _recipe_rows()
    assert len(rows) >= 25
    recipes = [load(REPO / "examples" / "configs" / f"{name}.yaml") for name in RECIPE_TABLE_RECIPES]
    for key, values in rows:
        for cfg, stated in zip(recipes, values):
            actual = cfg
            for part in key.split("."):
                actual = getattr(actual, part)
            try:
                assert float(stated) == float(actual), (key, stated, actual)
            except (TypeError, ValueError):
                assert str(actual).lower() == stated.lower(), (key, stated, actual)
