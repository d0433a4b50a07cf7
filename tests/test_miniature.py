"""`vppo miniature`: every shipped recipe's miniatures keep its settings and cover its parallel axes (the plan,
for every recipe), and recipes run end to end in miniature with every stage checked (the runs)."""

import dataclasses
import os
from pathlib import Path

import pytest

from vppo_megatron import config as config_lib
from vppo_megatron import miniature

RECIPES = sorted(Path("examples/configs").glob("*.yaml"))
# settings a miniature may change (miniature.plan's rules) and the run's own paths and cadence
SHRUNK = {
    "model.path", "model.dtype", "model.transformer_impl", "model.fp8",
    "parallel.world_size", "parallel.tp", "parallel.pp", "parallel.cp", "parallel.dp", "parallel.vpp",
    "parallel.first_stage_layers", "parallel.last_stage_layers", "parallel.sequence_parallel",
    "rollout.num_engines", "rollout.tensor_parallel_size", "rollout.max_response_length",
    "rollout.val_num_samples", "data.max_prompt_length", "data.min_pixels", "data.max_pixels",
    "data.train_files", "data.val_files", "trainer.prompts_per_update", "trainer.prompts_per_step",
    "trainer.total_steps", "trainer.val_every", "trainer.val_prompts", "trainer.output_dir",
    "checkpoint.save_every", "checkpoint.resume", "logging.wandb_project", "logging.progress_bars",
    "algorithm.tas_range_rollouts",
}  # fmt: skip


def _leaves(cfg) -> dict:
    return dict(_walk(dataclasses.asdict(cfg)))


def _walk(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _walk(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_split_world_keeps_every_axis_at_2_on_at_most_4_ranks():
    assert miniature.split_world({"tp": 2, "pp": 1, "cp": 1, "dp": 4}) == [{"tp": 2, "dp": 2}]
    assert miniature.split_world({"tp": 2, "pp": 1, "cp": 2, "dp": 2}) == [{"tp": 2, "cp": 2}, {"tp": 2, "dp": 2}]
    assert miniature.split_world({"tp": 8, "pp": 4, "cp": 1, "dp": 2}) == [{"tp": 2, "pp": 2}, {"tp": 2, "dp": 2}]
    assert miniature.split_world({"tp": 1, "pp": 2, "cp": 2, "dp": 2}) == [{"pp": 2, "cp": 2}, {"dp": 2}]
    assert miniature.split_world({"tp": 1, "pp": 1, "cp": 1, "dp": 1}) == [{}]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_miniatures_keep_every_recipe_setting_and_cover_its_axes(recipe):
    cfg = config_lib.load(recipe)
    minis = miniature.plan(cfg)
    covered = {axis for m in minis for axis, size in m.layout.items() if size == 2}
    wanted = {axis for axis, size in miniature._axes(cfg).items() if size > 1}
    assert covered == wanted
    recipe_leaves = _leaves(cfg)
    for m in minis:
        assert m.world_size <= miniature.MAX_RANKS
        mini = config_lib.load(recipe, m.overrides).validate(m.world_size)  # runs on this host as it is
        changed = {k for k, v in _leaves(mini).items() if v != recipe_leaves[k]}
        assert changed <= SHRUNK, f"{m.name} changes {changed - SHRUNK}, which no shrinking rule names"
        assert {row[0].split(" ")[0] for row in m.rows} >= {"model.dtype", "parallel.tp", "trainer.prompts_per_step"}
        if cfg.parallel.sequence_parallel and m.layout.get("tp"):
            assert mini.parallel.sequence_parallel  # never dropped where it can run


# Full runs: every recipe's miniature passes with `vppo miniature` (or `make miniatures`, which runs this test for
# all of them), but one 4-rank miniature takes 2-3 minutes on 2 cores and, beside the suite's other multi-process
# tests, slows them past their own timeouts; the suite runs them when VPPO_MINIATURES=1 (the plans above always).
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("VPPO_MINIATURES"), reason="full miniature runs: VPPO_MINIATURES=1")
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_passes_its_miniature(recipe, tmp_path_factory, capsys):
    out = Path(os.environ.get("VPPO_MINIATURE_OUT", tmp_path_factory.getbasetemp() / "miniature"))
    code = miniature.run(str(recipe), [], out)
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "[FAIL]" not in printed and printed.count("[PASS]") >= 5
