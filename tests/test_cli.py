import os
import subprocess
import sys
from pathlib import Path

import pytest

VPPO = [str(Path(sys.executable).parent / "vppo")]


def _run(*args, check=True):
    """The installed `vppo` console script in its own process (the entry point as users run it)."""
    proc = subprocess.run(VPPO + list(args), capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _main(capsys, *args, check=True):
    """`vppo ARGS` through the CLI's main in this process (the process boundary is test_help's subject): the
    same parsing, commands and error handling, without importing the stack again for each command."""
    from vppo_megatron.cli import main

    capsys.readouterr()
    proc = subprocess.CompletedProcess(["vppo", *args], main(list(args)), *capsys.readouterr())
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_help_lists_the_subcommands():
    out = _run("--help").stdout
    for command in ("tiny-model", "make-data", "config", "preview-data", "sft", "train", "eval", "convert", "demo"):
        assert command in out
    proc = _run("config", "algorithm.token_fraction=2", check=False)  # an error's exit status, through the process
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_tiny_model_make_data_and_preview_offline(tmp_path, capsys):
    _main(capsys, "tiny-model", "--out", str(tmp_path / "m"))
    _main(
        capsys,
        "make-data",
        "--out",
        str(tmp_path / "d"),
        "--num-train",
        "12",
        "--num-val",
        "4",
        "--task",
        "count_color",
    )
    assert (tmp_path / "d" / "train.parquet").exists() and (tmp_path / "d" / "validation.parquet").exists()
    out = _main(
        capsys,
        "preview-data",
        "--config",
        "examples/configs/tiny_cpu.yaml",
        "--batch-size",
        "4",
        f"model.path={tmp_path / 'm'}",
        f"data.train_files=[{tmp_path / 'd' / 'train.parquet'}]",
    ).stdout
    assert "12 usable rows" in out and "batch of 4" in out and "no rows skipped" in out


def test_errors_are_one_clear_line_not_a_traceback(tmp_path, capsys):
    proc = _main(capsys, "config", "algorithm.token_fraction=2", check=False)
    assert proc.returncode == 2
    assert "algorithm.token_fraction=2.0: must be in (0, 1]" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x").write_text("keep me")
    proc = _main(capsys, "tiny-model", "--out", str(tmp_path / "m"), check=False)
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert (tmp_path / "m" / "x").read_text() == "keep me"


def test_config_reference_table(capsys):
    out = _main(capsys, "config").stdout
    assert "algorithm.token_fraction = 0.4" in out and "parallel.tp = 1" in out


def test_every_example_config_passes_dry_run_at_its_target_world_size(capsys):
    for config in sorted(Path("examples/configs").glob("*.yaml")):
        proc = _main(capsys, "train", "--config", str(config), "--dry-run")
        assert "config OK for" in proc.stdout, config


def test_dry_run_refuses_an_impossible_layout(capsys):
    proc = _main(
        capsys, "train", "--config", "examples/configs/qwen2_5_vl_7b.yaml", "--dry-run", "parallel.tp=3", check=False
    )
    assert proc.returncode == 2 and "not divisible by tp*pp*cp = 3" in proc.stderr


@pytest.mark.parametrize(
    "script, launcher, model",
    [
        ("run_qwen2_5_vl_7b.sh", "torchrun", "Qwen2.5-VL-7B-Instruct"),
        ("run_qwen2_5_vl_32b.sh", "sbatch", "Qwen2.5-VL-32B-Instruct"),
        ("run_qwen3_vl_8b.sh", "torchrun", "Qwen3-VL-8B-Instruct"),
        ("run_qwen3_vl_32b.sh", "sbatch", "Qwen3-VL-32B-Instruct"),
    ],
)
def test_example_run_scripts_validate_then_launch_their_config(script, launcher, model, tmp_path):
    """The scripts' glue: the dry-run passes first, then the launcher (recorded, not run: no GPUs here) receives the
    config and the model/data paths; a failing dry-run stops the script before any launch."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("torchrun", "sbatch"):
        (bin_dir / tool).write_text(f'#!/usr/bin/env bash\necho "{tool} $*" > {tmp_path}/launched\n')
        (bin_dir / tool).chmod(0o755)
    env = dict(
        os.environ, PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", MODEL=f"/m/{model}", DATA="/d"
    )
    proc = subprocess.run(["bash", f"examples/{script}"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "config OK for" in proc.stdout and f"from built-in table ({model})" in proc.stdout
    launched = (tmp_path / "launched").read_text()
    assert (
        launched.startswith(launcher)
        and f"model.path=/m/{model}" in launched
        and "data.train_files=[/d/train.parquet]" in launched
    )
    (tmp_path / "launched").unlink()
    proc = subprocess.run(["bash", f"examples/{script}", "parallel.tp=3"], capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and not (tmp_path / "launched").exists()
