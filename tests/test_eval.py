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
    assert "has no config.json: pass an HF model directory with --model" in err and "Traceback" not in err


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
