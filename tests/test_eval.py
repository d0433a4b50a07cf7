"""`vppo eval`: a model directory's validation accuracy on its own vLLM fleet, and clear errors before any start."""

import json
import subprocess
import sys

import pytest

VPPO = [sys.executable, "-m", "vppo_megatron.cli", "eval", "--config", "examples/configs/tiny_cpu.yaml"]


def test_eval_refuses_a_directory_that_is_not_a_model(tmp_path, capsys):
    """Refused before any engine or Ray starts: the command's main in this process (the process boundary is the
    next test's)."""
    from vppo_megatron.cli import main

    assert main([*VPPO[3:], "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "has no config.json: pass an HF model directory or a checkpoint" in err and "Traceback" not in err


def test_a_megatron_checkpoint_is_exported_once_beside_it(tmp_path, capsys):
    """A checkpoint of this project (or its checkpoints directory: the newest) is evaluated through its HF export
    `<step>-hf`, made on first use and reused; a failed export is one line."""
    from vppo_megatron.actor.checkpoint import METADATA, TRAINER_STATE
    from vppo_megatron.cli import main
    from vppo_megatron.evaluate import resolve_model

    root = tmp_path / "checkpoints"
    for step in (2, 4):
        (root / f"step_{step}").mkdir(parents=True)
        (root / f"step_{step}" / METADATA).write_text("{}")
        (root / f"step_{step}" / TRAINER_STATE).write_text("{}")
    (root / "step_4-hf").mkdir()
    (root / "step_4-hf" / "config.json").write_text("{}")
    assert resolve_model(str(root)) == str(root / "step_4-hf")  # the newest, its export already there
    assert resolve_model(str(root / "step_4")) == str(root / "step_4-hf")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert resolve_model(str(hf)) == str(hf)
    # step_2 has no export: the conversion runs, and refuses this empty checkpoint in one line
    assert main([*VPPO[3:], "--model", str(root / "step_2")]) == 2
    err = capsys.readouterr().err
    assert f"could not export {root / 'step_2'}" in err and not (root / "step_2-hf").exists()


@pytest.mark.slow
def test_eval_scores_the_validation_prompts_with_the_trainer_settings(tiny_model_dir, tmp_path):
    from vppo_megatron.data.synthetic import write_dataset

    write_dataset(tmp_path / "data", ["largest_color"], num_train=1, num_val=3, seed=0)
    overrides = [
        f"data.val_files=[{tmp_path / 'data' / 'validation.parquet'}]",
        "trainer.val_prompts=0",
        "rollout.val_num_samples=2",
        "rollout.max_response_length=8",
    ]
    out = tmp_path / "eval.json"
    proc = subprocess.run(
        [*VPPO, "--model", str(tiny_model_dir), "--out", str(out), *overrides],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == result
    assert result["val/prompts"] == 3 and result["val/samples_per_prompt"] == 2
    # a random tiny model writes no \boxed{} answer in 8 tokens: every one of the 6 samples is graded wrong
    assert result["val/accuracy"] == 0.0 and result["model"] == str(tiny_model_dir)


@pytest.mark.slow
def test_eval_runs_the_papers_protocol_on_fixture_files_of_all_eight_benchmarks(tiny_model_dir, tmp_path):
    """One fixture row per benchmark in its card's schema (one benchmark in the PAPO-Eval layout instead, one left
    out): the table has every benchmark found with its accuracy, std over the samples and items, the average,
    and names the missing one."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from fixtures.benchmark_rows import ROWS

    from vppo_megatron.data.benchmarks import BENCHMARKS

    for name, (row, _) in ROWS.items():
        if name not in ("MathVision", "LogicVista"):
            pq.write_table(pa.Table.from_pylist([row] * 2), tmp_path / f"{BENCHMARKS[name].stems[0]}.parquet")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.png").write_bytes(ROWS["Geo3K"][0]["images"][0]["bytes"])
    user = "<image>How many?\n\nYou first think through the reasoning process as an internal monologue."
    papo = {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "3"}],
        "images": ["images/1.png"],
    }
    (tmp_path / "MathLLMs_MathVision.json").write_text(json.dumps([papo]))
    markdown = tmp_path / "table.md"
    overrides = ["data.max_prompt_length=960", "rollout.max_response_length=64"]
    proc = subprocess.run(
        [
            *VPPO,
            "--model",
            str(tiny_model_dir),
            "--benchmarks",
            str(tmp_path),
            "--papo-root",
            str(tmp_path),
            "--samples",
            "2",
            "--max-tokens",
            "8",
            "--markdown",
            str(markdown),
            "--out",
            str(tmp_path / "r.json"),
            *overrides,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["missing"] == ["LogicVista"]
    assert list(result["benchmarks"]) == [n for n in BENCHMARKS if n != "LogicVista"]
    items = {n: t["items"] for n, t in result["benchmarks"].items()}
    assert items == {n: 1 if n == "MathVision" else 2 for n in items}
    # a random tiny model boxes no answer in 8 tokens: 0 for every benchmark, std 0 over the 2 samples
    assert all(t["accuracy"] == 0.0 and t["std"] == 0.0 for t in result["benchmarks"].values())
    assert result["average"] == 0.0 and result["protocol"]["samples"] == 2 and result["protocol"]["top_p"] == 1.0
    table = markdown.read_text()
    assert "| Geo3K | 0.0 | 0.0 | 2 |" in table and "| **average** | **0.0** | | |" in table
    assert "missing (no file found): LogicVista" in table
