"""`vppo compare`: VPPO against its baselines (and the paper's ablations) under identical conditions, over seeds.

    vppo compare --config X --algorithms vppo,dapo,grpo --seeds 0,1,2 [--ablations table4/random,...] --out DIR

One warm start (`vppo sft`, once) is shared by every arm; then each (arm, seed) is a `vppo train` run with
`trainer.seed=seed`, so for a given seed all arms see the same prompts in the same order, start from the same
weights and train for the same steps. Runs go seed by seed (every arm of seed 0 first), so a comparison stopped
part-way is balanced. The directory is the state: `compare.json` holds the resolved settings, a run whose final
validation is logged is done, and running the same command again continues where it stopped (an interrupted
run resumes from its last checkpoint, `checkpoint.resume=auto`). The runs share one Ray cluster and one vLLM
fleet, started once by this command (each run attaches to the engines and pushes its own weights first): the
engines' sampling is seeded per request, so a run's rollouts do not depend on which run the engines served before.

Results, in DIR (also `--report` alone, on whatever runs are finished): `results.md` and `results.json` (final
validation accuracy mean +- std over seeds, the area under the validation curve, steps to reach a threshold, wall
time per step, and each arm's paired difference to the first arm, seed by seed), and `curves.png` (each arm's
mean validation curve and its +- std band).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vppo_megatron.algo.ablations import ABLATIONS

# The three algorithms by name: VPPO (TAS + TGF on the DAPO base), plain DAPO and plain GRPO (algo/ablations.py).
ALGORITHMS = {"vppo": "table2/vppo", "dapo": "table2/dapo", "grpo": "main/grpo"}
SETTINGS = "compare.json"
DEFAULT_THRESHOLD = "+0.05"  # 5 points above the shared warm start's validation accuracy


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: tuple[str, ...]

    @property
    def slug(self) -> str:
        return self.name.replace("/", "-")


def arms(algorithms: list[str], ablations: list[str]) -> list[Arm]:
    """The arms in the order given: algorithms by name, then the paper's ablations by their algo/ablations.py
    name (`python -m vppo_megatron.algo.ablations` lists them)."""
    chosen = []
    for name in algorithms:
        if name not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(ALGORITHMS)} (ablations: --ablations)")
        chosen.append(Arm(name, tuple(ABLATIONS[ALGORITHMS[name]][0])))
    for name in ablations:
        if name not in ABLATIONS:
            raise ValueError(
                f"unknown ablation {name!r}; `python -m vppo_megatron.algo.ablations` lists them (e.g. table4/random)"
            )
        chosen.append(Arm(name, tuple(ABLATIONS[name][0])))
    if not chosen:
        raise ValueError("no arms: give --algorithms and/or --ablations")
    names = [a.name for a in chosen]
    if len(set(names)) != len(names):
        raise ValueError(f"an arm is listed twice: {', '.join(names)}")
    return chosen


def run_dir(out: Path, arm: Arm, seed: int) -> Path:
    return out / "runs" / arm.slug / f"seed{seed}"


# ---------------------------------------------------------------------------------------------------- reading runs


def read_run(directory: Path) -> dict:
    """A run's validation curve {step: accuracy} and its step times, from metrics.jsonl; a step logged twice (a
    resumed run repeats the steps after its checkpoint) counts once, the later row."""
    path = directory / "metrics.jsonl"
    rows: dict[int, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["step"]] = row
    curve = {s: r["val/accuracy"] for s, r in sorted(rows.items()) if "val/accuracy" in r}
    step_times = [r["time/step_s"] for _, r in sorted(rows.items()) if "time/step_s" in r]
    wall = json.loads((directory / "compare_run.json").read_text()) if (directory / "compare_run.json").exists() else {}
    return {"curve": curve, "step_s": step_times, "wall_s": wall.get("wall_s"), "attempts": wall.get("attempts", 0)}


def finished(directory: Path, total_steps: int) -> bool:
    """Whether the run logged its final validation (the trainer's last act, at step total_steps)."""
    return total_steps in read_run(directory)["curve"]


# ---------------------------------------------------------------------------------------------------- statistics


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def area(curve: dict[int, float]) -> float:
    """The area under the validation curve over its steps, divided by their span: the run's mean accuracy
    (trapezoids, so uneven validation intervals weigh by the steps they cover)."""
    steps = sorted(curve)
    if len(steps) < 2:
        return curve[steps[0]]
    total = sum((b - a) * (curve[a] + curve[b]) / 2 for a, b in zip(steps, steps[1:]))
    return total / (steps[-1] - steps[0])


def steps_to(curve: dict[int, float], threshold: float) -> int | None:
    return next((s for s in sorted(curve) if curve[s] >= threshold), None)


def resolve_threshold(threshold: str, start_accuracy: float) -> float:
    """`0.7` is an accuracy; `+0.05` is that much above the warm start's (the runs' step-0 validation)."""
    try:
        value = float(threshold)
    except ValueError:
        raise ValueError(
            f"--threshold {threshold!r}: expected an accuracy (0.7) or a gain over the start (+0.05)"
        ) from None
    return start_accuracy + value if threshold.strip().startswith("+") else value


def summarise(results: dict[str, dict[int, dict]], threshold: str = DEFAULT_THRESHOLD) -> dict:
    """results[arm][seed] = read_run(...) of finished runs -> the comparison's table (one row per arm, in order)
    and its threshold. The first arm is the reference of the paired differences: the same seed means the same
    prompts and the same start, so the per-seed difference cancels what the seeds share."""
    starts = [run["curve"][min(run["curve"])] for runs in results.values() for run in runs.values() if run["curve"]]
    target = resolve_threshold(threshold, statistics.fmean(starts) if starts else 0.0)
    reference = next(iter(results), None)
    rows = []
    for arm, runs in results.items():
        seeds = sorted(s for s, r in runs.items() if r["curve"])
        if not seeds:
            continue
        finals = [runs[s]["curve"][max(runs[s]["curve"])] for s in seeds]
        reached = [steps_to(runs[s]["curve"], target) for s in seeds]
        hit = [r for r in reached if r is not None]
        step_s = [statistics.median(runs[s]["step_s"]) for s in seeds if runs[s]["step_s"]]
        row = {
            "arm": arm,
            "seeds": seeds,
            "final": _mean_std(finals),
            "finals": finals,
            "auc": _mean_std([area(runs[s]["curve"]) for s in seeds]),
            "steps_to_threshold": statistics.fmean(hit) if hit else None,
            "reached": f"{len(hit)}/{len(seeds)}",
            "step_s": statistics.fmean(step_s) if step_s else None,
        }
        paired = [
            runs[s]["curve"][max(runs[s]["curve"])]
            - results[reference][s]["curve"][max(results[reference][s]["curve"])]
            for s in seeds
            if arm != reference and s in results[reference] and results[reference][s]["curve"]
        ]
        row["vs_reference"] = _mean_std(paired) if paired else None
        rows.append(row)
    return {"threshold": target, "reference": reference, "rows": rows}


def markdown(summary: dict) -> str:
    ref = summary["reference"]
    lines = [
        f"| arm | seeds | final val accuracy | paired diff. vs {ref} | area under curve | "
        f"steps to {summary['threshold']:.3f} (reached) | s/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        diff = "-" if r["vs_reference"] is None else f"{r['vs_reference'][0]:+.3f} ± {r['vs_reference'][1]:.3f}"
        to = "-" if r["steps_to_threshold"] is None else f"{r['steps_to_threshold']:.1f}"
        step_s = "-" if r["step_s"] is None else f"{r['step_s']:.1f}"
        lines.append(
            f"| {r['arm']} | {len(r['seeds'])} | {r['final'][0]:.3f} ± {r['final'][1]:.3f} | {diff} | "
            f"{r['auc'][0]:.3f} ± {r['auc'][1]:.3f} | {to} ({r['reached']}) | {step_s} |"
        )
    lines.append(
        "\nmean ± std over seeds (sample std); the paired difference is taken seed by seed (same prompts, same "
        "start); area under curve = the run's mean validation accuracy over its steps."
    )
    return "\n".join(lines) + "\n"


COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75)]


def plot(results: dict[str, dict[int, dict]], path: Path, title: str) -> Path:
    """Each arm's mean validation curve over its seeds with a +- std band (Pillow only)."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 760, 440, 56, 200, 34, 40
    series = {}
    for arm, runs in results.items():
        curves = [r["curve"] for r in runs.values() if r["curve"]]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if steps:
            series[arm] = [(s, *_mean_std([c[s] for c in curves])) for s in steps]
    points = [(m - d, m + d) for rows in series.values() for _, m, d in rows]
    low = min((p[0] for p in points), default=0.0)
    high = max((p[1] for p in points), default=1.0)
    pad = max(0.02, (high - low) * 0.1)
    low, high = max(0.0, low - pad), min(1.0, high + pad)
    last = max((rows[-1][0] for rows in series.values()), default=1) or 1

    def xy(step: float, value: float) -> tuple[float, float]:
        x = left + (width - left - right) * step / last
        return x, height - bottom - (height - top - bottom) * (value - low) / max(high - low, 1e-9)

    image = Image.new("RGBA", (width, height), "white")
    grid = ImageDraw.Draw(image)
    for i in range(6):
        value = low + (high - low) * i / 5
        y = xy(0, value)[1]
        grid.line([(left, y), (width - right, y)], fill=(225, 225, 225))
        grid.text((6, y - 6), f"{value:.3f}", fill="black")
    for step in sorted({s for rows in series.values() for s, _, _ in rows}):
        grid.text((xy(step, low)[0] - 4, height - bottom + 6), str(step), fill="black")
    grid.rectangle([left, top, width - right, height - bottom], outline="black")
    for index, (arm, rows) in enumerate(series.items()):
        colour = COLOURS[index % len(COLOURS)]
        band = Image.new("RGBA", image.size, (0, 0, 0, 0))
        outline = [xy(s, m + d) for s, m, d in rows] + [xy(s, m - d) for s, m, d in reversed(rows)]
        if len(rows) > 1:
            ImageDraw.Draw(band).polygon(outline, fill=(*colour, 48))
        image = Image.alpha_composite(image, band)
        draw = ImageDraw.Draw(image)
        line = [xy(s, m) for s, m, _ in rows]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for x, y in line:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        seeds = sum(1 for r in results[arm].values() if r["curve"])
        label = f"{arm}: {rows[-1][1]:.3f} ± {rows[-1][2]:.3f} ({seeds} seeds)"
        draw.text((width - right + 10, top + 6 + 16 * index), label, fill=colour)
    ImageDraw.Draw(image).text((left, 10), title, fill="black")
    image.convert("RGB").save(path)
    return path


# ---------------------------------------------------------------------------------------------------- running


def torchrun_command(module: str, config: str | None, overrides: list[str]) -> list[str]:
    """`module` under torchrun on the config's parallel.world_size local ranks (1 when unset), with the config file
    (if any) and dotted overrides."""
    from vppo_megatron import config as config_lib

    world = config_lib.load(config, overrides).parallel.world_size or 1
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={world}",
        "-m",
        module,
        *(["--config", config] if config else []),
        *overrides,
    ]


def _launch(command: list[str], log: Path) -> int:
    """Runs `command` with its output appended to `log`; a failure prints the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(command)}\n")
        f.flush()
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT).returncode
    if code:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        print("\n".join(f"    {line}" for line in tail), file=sys.stderr)
    return code


def _settings(args, chosen: list[Arm], warm_start: str, cfg) -> dict:
    return {
        "config": str(Path(args.config).resolve()),
        "overrides": list(args.overrides),
        "arms": {a.name: list(a.overrides) for a in chosen},
        "warm_start": warm_start,
        "resolved": cfg.to_dict(),
    }


def _check_settings(out: Path, settings: dict, seeds: list[int]) -> None:
    """A directory holds one comparison: the same arms, settings and warm start (seeds may be added)."""
    path = out / SETTINGS
    if path.exists():
        held = json.loads(path.read_text())
        held_seeds = held.pop("seeds", [])
        if held != settings:
            changed = sorted(k for k in settings if settings[k] != held.get(k))
            raise ValueError(
                f"{out} holds a comparison with other settings ({', '.join(changed)} differ); rerun it with the "
                "same arguments to continue it, or give a new --out"
            )
        seeds = sorted(set(held_seeds) | set(seeds))
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**settings, "seeds": seeds}, indent=1) + "\n")


def warm_start(args, out: Path, cfg) -> str:
    """The model every arm starts from: --warm-start, the config's model (--no-warm-start), or one `vppo sft` of
    the config into DIR/warm_start, run once."""
    if args.warm_start:
        model = Path(args.warm_start)
        if not (model / "config.json").exists():
            raise FileNotFoundError(f"--warm-start {model}: no config.json there (an HF model directory)")
        return str(model.resolve())
    if args.no_warm_start:
        return cfg.model.path
    target = out / "warm_start"
    if not (target / "config.json").exists():
        print(f"== warm start: vppo sft -> {target} ==", flush=True)
        overrides = [*args.overrides, *args.sft_overrides, f"sft.output_dir={target}", "logging.progress_bars=false"]
        if _launch(torchrun_command("vppo_megatron.sft", args.config, overrides), out / "warm_start.log"):
            raise RunFailed(f"the warm start failed (log: {out / 'warm_start.log'}); rerun the same command")
    return str(target.resolve())


class RunFailed(RuntimeError):
    pass


def run_arm(args, out: Path, arm: Arm, seed: int, model: str) -> None:
    directory = run_dir(out, arm, seed)
    overrides = [
        *args.overrides,
        *arm.overrides,
        f"trainer.seed={seed}",
        f"model.path={model}",
        f"trainer.output_dir={directory}",
        "checkpoint.resume=auto",
        "logging.progress_bars=false",
    ]
    record = directory / "compare_run.json"
    state = json.loads(record.read_text()) if record.exists() else {"wall_s": 0.0, "attempts": 0}
    start = time.perf_counter()
    code = _launch(torchrun_command("vppo_megatron.train", args.config, overrides), directory / "run.log")
    state = {"wall_s": state["wall_s"] + time.perf_counter() - start, "attempts": state["attempts"] + 1}
    record.write_text(json.dumps(state) + "\n")
    if code:
        raise RunFailed(
            f"{arm.name} seed {seed} stopped (exit {code}; log: {directory / 'run.log'}); rerun the same command to "
            "continue it from its last checkpoint"
        )


@contextlib.contextmanager
def shared_fleet(cfg, model: str):
    """One Ray cluster (RAY_ADDRESS's, or a local one of this process) and one vLLM fleet for every run: the runs
    attach to the engines by name (`RolloutFleet.create_or_attach`) instead of starting Ray and vLLM each."""
    from vppo_megatron.rollout.fleet import RolloutFleet, cluster_address, connect, disconnect

    connected = connect()
    fleet = RolloutFleet(cfg, model)
    previous = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = cluster_address()  # the runs' trainers join this cluster
    try:
        yield fleet
    finally:
        if previous is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = previous
        fleet.shutdown()
        if connected:
            disconnect()


def collect(out: Path, chosen: list[Arm], seeds: list[int], total_steps: int) -> dict[str, dict[int, dict]]:
    """read_run of every finished run, by arm and seed."""
    results: dict[str, dict[int, dict]] = {}
    for arm in chosen:
        results[arm.name] = {}
        for seed in seeds:
            directory = run_dir(out, arm, seed)
            if finished(directory, total_steps):
                results[arm.name][seed] = read_run(directory)
    return results


def report(out: Path, chosen: list[Arm], seeds: list[int], total_steps: int, threshold: str) -> dict:
    results = collect(out, chosen, seeds, total_steps)
    summary = summarise(results, threshold)
    table = markdown(summary)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps({**summary, "runs": results}, indent=1) + "\n")
    plot(results, out / "curves.png", f"validation accuracy by step, mean ± std over seeds ({out.name})")
    print(table + f"\nresults: {out / 'results.md'}, {out / 'results.json'}\ncurves: {out / 'curves.png'}")
    return summary


def run(args) -> int:
    from vppo_megatron import config as config_lib

    chosen = arms(_names(args.algorithms), _names(args.ablations))
    seeds = [int(s) for s in _names(args.seeds)]
    if not seeds:
        raise ValueError("--seeds: give at least one, e.g. 0,1,2")
    out = Path(args.out)
    cfg = config_lib.load(args.config, args.overrides)
    # every arm's settings are valid before anything runs
    checked = [config_lib.load(args.config, [*args.overrides, *a.overrides]).validate(check_host=False) for a in chosen]
    total = cfg.trainer.total_steps
    if args.report:
        report(out, chosen, seeds, total, args.threshold)
        return 0
    start = (
        str(Path(args.warm_start).resolve())
        if args.warm_start
        else ("model.path" if args.no_warm_start else f"vppo sft {' '.join(args.sft_overrides)}".strip())
    )
    _check_settings(out, _settings(args, chosen, start, cfg), seeds)
    started = time.perf_counter()
    try:
        model = warm_start(args, out, cfg)
        todo = [(arm, seed) for seed in seeds for arm in chosen if not finished(run_dir(out, arm, seed), total)]
        print(f"== {len(todo)} of {len(chosen) * len(seeds)} runs to go ({total} steps each) ==", flush=True)
        if todo:
            with shared_fleet(checked[0], model):
                for index, (arm, seed) in enumerate(todo, 1):
                    began = time.perf_counter()
                    print(f"[{index}/{len(todo)}] {arm.name} seed {seed} ...", flush=True)
                    run_arm(args, out, arm, seed, model)
                    curve = read_run(run_dir(out, arm, seed))["curve"]
                    trace = ", ".join(f"{s}: {a:.3f}" for s, a in curve.items())
                    took = time.perf_counter() - began
                    print(f"[{index}/{len(todo)}] {arm.name} seed {seed}: {took:.0f}s; val {trace}", flush=True)
    except RunFailed as exc:
        print(f"vppo compare: error: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"== comparison finished in {time.perf_counter() - started:.0f}s ==")
    report(out, chosen, seeds, total, args.threshold)
    return 0


def _names(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the training config every arm shares")
    p.add_argument("--algorithms", default="vppo,dapo,grpo", help="comma-separated: vppo, dapo, grpo")
    p.add_argument("--ablations", default="", help="comma-separated ablation names (algo/ablations.py)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated trainer.seed values (default 0,1,2)")
    p.add_argument("--out", default="runs/compare", help="the comparison's directory (its state: rerun to continue)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--warm-start", help="an HF model directory every arm starts from (default: vppo sft once)")
    start.add_argument("--no-warm-start", action="store_true", help="start every arm from the config's model.path")
    p.add_argument(
        "--sft-override",
        dest="sft_overrides",
        action="append",
        default=[],
        help="an override for the warm start only (repeatable), e.g. --sft-override parallel.tp=1",
    )
    p.add_argument(
        "--threshold",
        default=DEFAULT_THRESHOLD,
        help="validation accuracy for 'steps to threshold': 0.7, or +0.05 above the warm start (default)",
    )
    p.add_argument("--report", action="store_true", help="only write the table and plot of the finished runs")
    p.add_argument("overrides", nargs="*", help="config overrides for every arm, e.g. trainer.total_steps=40")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="vppo compare", description=__doc__)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
