"""`vppo compare`: the statistics of its table, its settings guard, and a comparison end to end (2 arms x 2 seeds x
2 steps from one warm start) that is killed in its first run and continued by the same command."""

import json
import os
import subprocess
import sys

import pytest

from vppo_megatron import compare


def _run(curve: dict[int, float], step_s=(1.0, 3.0, 2.0)) -> dict:
    return {"curve": curve, "step_s": list(step_s), "wall_s": 10.0, "attempts": 1}


def test_the_table_is_mean_and_sample_std_over_seeds_with_paired_differences():
    results = {
        "vppo": {0: _run({0: 0.5, 2: 0.7, 4: 0.8}), 1: _run({0: 0.5, 2: 0.6, 4: 0.6})},
        "dapo": {0: _run({0: 0.5, 2: 0.6, 4: 0.7}), 1: _run({0: 0.5, 2: 0.5, 4: 0.4})},
    }
    summary = compare.summarise(results, "+0.15")
    assert summary["threshold"] == pytest.approx(0.65) and summary["reference"] == "vppo"
    vppo, dapo = summary["rows"]
    assert vppo["final"] == pytest.approx((0.7, 0.1414213562))  # sample std of 0.8, 0.6
    assert dapo["finals"] == [0.7, 0.4] and dapo["vs_reference"] == pytest.approx((-0.15, 0.0707106781))
    assert vppo["vs_reference"] is None
    # trapezoids over steps 0..4 divided by the span: (0.6 + 0.75) / 2 for seed 0
    assert compare.area({0: 0.5, 2: 0.7, 4: 0.8}) == pytest.approx(0.675)
    assert compare.area({0: 0.5, 1: 0.7, 4: 0.7}) == pytest.approx((0.6 + 3 * 0.7) / 4)  # uneven intervals weigh
    assert vppo["steps_to_threshold"] == 2.0 and vppo["reached"] == "1/2"  # seed 0 at step 2, seed 1 never
    assert dapo["steps_to_threshold"] == 4.0 and dapo["reached"] == "1/2"
    assert vppo["step_s"] == 2.0  # the median step of each seed, averaged
    table = compare.markdown(summary)
    assert "| vppo | 2 | 0.700 ± 0.141 | - |" in table and "| dapo | 2 | 0.550 ± 0.212 | -0.150 ± 0.071 |" in table
    assert compare.resolve_threshold("0.7", 0.5) == 0.7
    with pytest.raises(ValueError, match="expected an accuracy"):
        compare.resolve_threshold("high", 0.5)


def test_arms_are_the_algorithms_and_the_papers_ablations_by_name():
    chosen = compare.arms(["vppo", "dapo", "grpo"], ["table4/random"])
    assert [a.name for a in chosen] == ["vppo", "dapo", "grpo", "table4/random"]
    assert chosen[0].overrides == () and "algorithm.base=grpo" in chosen[2].overrides
    assert chosen[3].slug == "table4-random" and "algorithm.token_filter=random" in chosen[3].overrides
    with pytest.raises(ValueError, match="unknown algorithm 'ppo'"):
        compare.arms(["ppo"], [])
    with pytest.raises(ValueError, match="unknown ablation"):
        compare.arms([], ["table9/none"])
    with pytest.raises(ValueError, match="listed twice"):
        compare.arms(["dapo"], ["table2/dapo", "table2/dapo"])


@pytest.mark.slow
def test_a_comparison_runs_every_arm_and_seed_from_one_warm_start_and_continues_after_a_kill(tiny_model_dir, tmp_path):
    from vppo_megatron.data.synthetic import write_dataset

    data = tmp_path / "data"
    write_dataset(data, ["largest_color"], num_train=8, num_val=2, seed=0)
    out = tmp_path / "cmp"
    command = [
        sys.executable,
        "-m",
        "vppo_megatron.cli",
        "compare",
        "--config",
        "examples/configs/tiny_cpu.yaml",
        "--algorithms",
        "vppo,dapo",
        "--seeds",
        "0,1",
        "--out",
        str(out),
        "--sft-override",
        "sft.steps=2",
        "--threshold",
        "0.0",
        f"model.path={tiny_model_dir}",
        f"data.train_files=[{data / 'train.parquet'}]",
        f"data.val_files=[{data / 'validation.parquet'}]",
        "parallel.tp=1",
        "parallel.world_size=1",
        "sft.batch_size=4",
        "sft.warmup_steps=0",
        "trainer.total_steps=2",
        "trainer.prompts_per_step=2",
        "trainer.prompts_per_update=2",
        "trainer.micro_batch_size=8",
        "rollout.num_samples_per_prompt=4",
        "algorithm.tas_segment=4",
        "rollout.max_response_length=8",
        "trainer.val_every=1",
        "rollout.val_num_samples=2",
        "algorithm.dynamic_sampling=false",  # a barely trained model solves nothing: keep every group
        "algorithm.entropy_coef=0.06",
        "checkpoint.save_every=1",
    ]
    env = dict(os.environ, VPPO_FAULT="kill@update:1")  # the first run dies in step 1, after step 0's checkpoint
    killed = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert killed.returncode == 1, killed.stdout[-2000:] + killed.stderr[-3000:]
    assert "vppo seed 0 stopped" in killed.stderr and "rerun the same command to continue" in killed.stderr
    first = out / "runs" / "vppo" / "seed0"
    assert (first / "checkpoints").is_dir() and not (out / "runs" / "dapo").exists()

    other = [*command[:7], "vppo,grpo", *command[8:]]  # another comparison in the same directory is refused
    refused = subprocess.run(other, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "holds a comparison with other settings (arms differ)" in refused.stderr

    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "4 runs to go" in done.stdout  # the killed run had not finished: it is continued, not skipped
    assert json.loads((first / "compare_run.json").read_text())["attempts"] == 2
    assert "resumed from" in (first / "run.log").read_text()  # from its step-0 checkpoint

    rows = {}
    for arm in ("vppo", "dapo"):
        for seed in (0, 1):
            lines = (out / "runs" / arm / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()
            rows[arm, seed] = {r["step"]: r for r in map(json.loads, lines)}
    for seed in (0, 1):  # one warm start, one data order per seed: step 0 is the same run in both arms
        vppo, dapo = rows["vppo", seed][0], rows["dapo", seed][0]
        for key in ("val/accuracy", "reward/accuracy", "rollout/response_tokens", "rollout/truncated_fraction"):
            assert vppo[key] == dapo[key], (seed, key)
        assert vppo["vppo/selected_fraction"] < 1.0 == dapo["vppo/selected_fraction"]  # TGF in one arm only
    assert sorted(rows["vppo", 0]) == [0, 1, 2]  # step 2: the final validation

    results = json.loads((out / "results.json").read_text())
    assert [r["arm"] for r in results["rows"]] == ["vppo", "dapo"] and results["threshold"] == 0.0
    assert all(r["seeds"] == [0, 1] and r["steps_to_threshold"] == 0.0 for r in results["rows"])
    assert "| vppo | 2 |" in (out / "results.md").read_text() and "| dapo | 2 |" in done.stdout
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "warm_start" / "config.json").exists()

    # the perception diagnostics of a VPPO run: scalars, TensorBoard histograms, the end-of-run PNG (none for DAPO)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    vppo_run, dapo_run = out / "runs" / "vppo" / "seed1", out / "runs" / "dapo" / "seed1"
    assert 0 < rows["vppo", 1][1]["vppo/dependency_top10_share"] <= 1 and "vppo/tas_alpha_mean" in rows["vppo", 1][1]
    assert (vppo_run / "perception.png").read_bytes()[:4] == b"\x89PNG" and not (dapo_run / "perception.png").exists()
    events = EventAccumulator(str(vppo_run / "tensorboard"), size_guidance={"histograms": 0})
    events.Reload()
    assert [h.step for h in events.Histograms("vppo/token_dependency")] == [0, 1]
    assert "vppo/tas_alpha" in events.Tags()["histograms"]

    again = subprocess.run([*command, "--report"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "| dapo | 2 |" in again.stdout and "runs to go" not in again.stdout
