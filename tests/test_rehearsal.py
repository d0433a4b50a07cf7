"""`vppo plan`'s rehearsal: the target layouts built with the actor's own model code on the meta device (fake
process groups of the target world size, one fresh process per pipeline-stage role) hold exactly the parameters
memory.py counts, and one layer's measured activations agree with memory.layer_activation_bytes."""

import subprocess
import sys

import pytest

from vppo_megatron import memory
from vppo_megatron.actor import rehearsal
from vppo_megatron.config import load

CONFIG_32B = "examples/configs/qwen2_5_vl_32b.yaml"

# Qwen2.5-VL-32B on one TP8 rank (h=5120, 40/8 heads of 128, ffn 27648, vocab 152064):
#   layer = (h*(5120 + 2*1024) + (5120 + 2048) + 5120*h + 3*h*27648) / 8 + 2*h (two RMSNorms, replicated)
#         = 487,595,008 / 8 + 10,240 = 60,959,616
#   vision tower (whole on every TP rank) 688,841,984; embedding 152064/8 * 5120 = 97,320,960;
#   output layer 97,320,960 + final norm 5,120
LAYER_TP8 = 60_959_616
VISION = 688_841_984
EMBEDDING_TP8 = 97_320_960


def test_32b_tp8_dp4_rank_holds_what_memory_counts():
    cfg = load(CONFIG_32B)
    (row,) = rehearsal.rehearse(cfg)  # PP=1: the first stage is the last
    assert row["role"] == "only" and row["layers"] == 64 and row["matches"], row
    assert row["params"]["total"] == 64 * LAYER_TP8 + VISION + 2 * EMBEDDING_TP8 + 5120 == 4_784_904_448
    assert row["params"]["replicated"] == VISION + 64 * 2 * 5120 + 5120  # ViT + norms: not split by TP
    parts = memory.estimate(cfg, memory.KNOWN["Qwen2.5-VL-32B-Instruct"])
    assert parts["weights"] * memory.GIB == row["weight_bytes"] == 2 * row["params"]["total"]
    assert parts["optimizer"] * memory.GIB == row["optimizer_bytes"]  # 12 B / DP4
    assert row["padded_numel"] >= row["params"]["total"]  # megatron's buffers only ever pad


def test_32b_tp8_pp2_dp2_first_and_last_stages_hold_what_memory_counts():
    cfg = load(CONFIG_32B, ["parallel.pp=2"])
    first, last = rehearsal.rehearse(cfg, workers=2)
    assert (first["role"], first["pp_rank"], last["role"], last["pp_rank"]) == ("first", 0, "last", 1)
    assert first["matches"] and last["matches"], (first, last)
    assert first["layer_numbers"] == [(1, 32)] and last["layer_numbers"] == [(33, 64)]
    assert first["params"]["total"] == 32 * LAYER_TP8 + VISION + EMBEDDING_TP8 == 2_736_870_656
    assert last["params"]["total"] == 32 * LAYER_TP8 + EMBEDDING_TP8 + 5120 == 2_048_033_792
    per_stage = memory.estimate_stages(cfg, memory.KNOWN["Qwen2.5-VL-32B-Instruct"])
    assert per_stage["first"]["gradients"] * memory.GIB == first["grad_bytes"]
    assert per_stage["last"]["gradients"] * memory.GIB == last["grad_bytes"]


def test_one_layer_activations_agree_with_the_estimator():
    """32B widths on a TP8 rank (5 query heads, 1 KV group, ffn 3456), a shorter sequence than the target
    (activations are linear in s once the s x s scores are out); forward + backward in fp32, against the estimate
    for fp32: CPUs without AVX-512 BF16 run bf16 GEMMs through a slow fallback (measured on such a 2-core host:
    one 1024 x 5120 x 3456 product, 230 s in bf16, 0.8 s in fp32). `vppo plan --measure` runs the model's dtype."""
    cfg = load(CONFIG_32B, ["model.dtype=float32"])
    cases = [("none", False), ("none", True), ("selective", True), ("full", True)]
    results = rehearsal.measure_activations(cfg, seq=512, micro_batch=2, cases=cases)
    for r in results:
        label = (r["recompute"], r["sequence_parallel"])
        assert r["saved_bytes"] == pytest.approx(r["estimate_bytes"], rel=0.15), label
        assert r["scores_bytes"] == pytest.approx(r["estimate_scores_bytes"], rel=0.15), label
    by_case = {(r["recompute"], r["sequence_parallel"]): r for r in results}
    # only the local attention without recompute materialises the [b, heads, s, s] softmax
    assert by_case[("none", False)]["scores_bytes"] >= 2 * 5 * 512 * 512 * 4  # fp32: softmax and probs are one
    assert by_case[("selective", True)]["scores_bytes"] == 0
    # SP splits the norm-region tensors over TP; full recompute keeps only the layer input [s/8, b, h] bf16
    assert by_case[("none", True)]["saved_bytes"] < by_case[("none", False)]["saved_bytes"]
    assert by_case[("full", True)]["saved_bytes"] >= 512 // 8 * 2 * 5120 * 2
    # what the dry run assumes on GPU (fused norms, flash attention, unrepeated K/V) is smaller than what ran;
    # a fully recomputed layer keeps the same checkpoint on either
    assert all(r["transformer_engine_bytes"] < r["saved_bytes"] for r in results if r["recompute"] != "full")
    assert by_case[("full", True)]["transformer_engine_bytes"] == by_case[("full", True)]["saved_bytes"]


def _plan_output(command, capsys):
    """stdout of `vppo plan` (the CLI's main in this process: test_cli covers its process boundary) or of the
    trainer module's own `--dry-run --rehearse` entry point (a real process), on the 7B config."""
    config = ["--config", "examples/configs/qwen2_5_vl_7b.yaml"]
    if command == "vppo plan":
        from vppo_megatron.cli import main

        assert main(["plan", *config]) == 0
        return capsys.readouterr().out
    proc = subprocess.run(
        [sys.executable, "-m", "vppo_megatron.train", "--dry-run", "--rehearse", *config],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.parametrize("command", ["vppo plan", "python -m vppo_megatron.train --dry-run --rehearse"])
def test_vppo_plan_prints_the_estimate_and_the_rehearsed_7b_rank(command, capsys):
    stdout = _plan_output(command, capsys)
    assert "heaviest: only stage, experience phase, 50.2 GiB" in stdout
    # 4.48B on each TP2 rank: 28 split layers + the whole vision tower + half of the embedding and output layer
    (row,) = [line for line in stdout.splitlines() if line.startswith("  only")]
    assert "4,484,460,544" in row and row.endswith("equal")


def _visible_devices():
    import os

    return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_rehearsal_workers_never_see_a_gpu(monkeypatch):
    """On a CUDA host the stage builds still run on the meta device and the host (megatron-core would otherwise
    allocate every weight of a full-size stage on the GPU): the workers are spawned with no GPU visible."""
    import os

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with rehearsal._pool(1) as pool:
        assert pool.submit(_visible_devices).result(timeout=120) == ""
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
