"""HF -> Megatron (TP2 PP2) -> HF round trip, loads at other layouts, and every bad input's error."""

import contextlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from vllm_greedy import vllm_greedy

from vppo_megatron.actor.weights import SafetensorsReader
from vppo_megatron.testing import run_distributed


def _cli(module, *args, check=True):
    """The real command: a process that re-launches itself under torchrun (the entry point as users run it)."""
    proc = subprocess.run(
        [sys.executable, "-m", f"checkpoints_convert.{module}", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _convert_rank(rank, world_size, module, args):
    """One rank of a conversion: the command's own main on an already launched rank (so no torchrun re-launch),
    with what it printed."""
    import contextlib
    import io

    main = importlib.import_module(f"checkpoints_convert.{module}").main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def _convert(module, world_size, *args):
    """The command's main on `world_size` forked ranks: the ranks torchrun would start, without re-importing the
    stack in each (the process boundary is tested by `_cli` above). (exit code, rank 0's stdout, its stderr)."""
    results = run_distributed(_convert_rank, world_size, module, [str(a) for a in args], timeout_s=600)
    assert len({code for code, _, _ in results}) == 1, results  # every rank reaches the same verdict
    return results[0]


def _precheck_error(module, args, capsys, monkeypatch):
    """Exit code and stderr of an input error, from the command's main in this process: each is caught before
    any rank starts, so reaching the torchrun re-launch is itself a failure."""
    from checkpoints_convert import common

    def relaunch(world_size, _module):
        raise AssertionError(f"{module} {args}: passed the input checks and would start {world_size} rank(s)")

    monkeypatch.setattr(common, "relaunch_under_torchrun", relaunch)
    code = importlib.import_module(f"checkpoints_convert.{module}").main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def tp2pp2_checkpoint(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "tp2pp2"
    code, stdout, stderr = _convert(
        "hf_to_megatron", 4, "--hf", tiny_model_dir, "--out", out, "--tp", 2, "--pp", 2, "--verify"
    )
    assert code == 0, stderr[-4000:]
    assert "worst difference 0.000e+00" in stdout and ": OK" in stdout
    return out


def test_checkpoint_is_complete_and_layout_independent(tp2pp2_checkpoint):
    meta = json.loads((tp2pp2_checkpoint / "vppo_checkpoint.json").read_text())
    assert meta["written_at"] == {
        "tp": 2,
        "pp": 2,
        "cp": 1,
        "dp": 1,
        "vpp": 1,
        "first_stage_layers": 0,
        "last_stage_layers": 0,
    }
    assert meta["optimizer"] is False
    assert (tp2pp2_checkpoint / "hf" / "config.json").exists()
    assert not list(tp2pp2_checkpoint.parent.glob(".*tmp-*"))  # the temporary directory was renamed


def _round_trip_serves(model_dir, checkpoint, tmp_path):
    """Megatron (TP2 PP2) -> HF: bit-exact tensors, equal logits in transformers, vLLM greedy = transformers'."""
    from transformers import AutoProcessor

    from vppo_megatron import families

    out = tmp_path / "hf"
    proc = _cli("megatron_to_hf", "--megatron", checkpoint, "--out", out, "--tp", 2, "--pp", 2, "--verify")
    assert ": OK" in proc.stdout
    original, exported = SafetensorsReader(model_dir), SafetensorsReader(out)
    assert original.keys() == exported.keys()
    for name in sorted(original.keys()):
        a, b = original.get(name), exported.get(name)
        assert a.dtype == b.dtype and torch.equal(a, b), name  # bit-exact

    processor = AutoProcessor.from_pretrained(model_dir)
    model_class = families.get(json.loads((model_dir / "config.json").read_text())["model_type"]).model_class()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many shapes?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8))
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    logits = []
    for directory in (model_dir, out):
        model = model_class.from_pretrained(directory).eval()
        with torch.no_grad():
            logits.append(model(**inputs).logits)
            greedy = model.generate(**inputs, do_sample=False, max_new_tokens=8, min_new_tokens=8)
    assert torch.equal(logits[0], logits[1])
    served = vllm_greedy(out, text, tmp_path)
    assert served["ids"] == greedy[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.slow
def test_round_trip_is_bit_exact_and_serves_in_transformers_and_vllm(tiny_model_dir, tp2pp2_checkpoint, tmp_path):
    _round_trip_serves(tiny_model_dir, tp2pp2_checkpoint, tmp_path)


@pytest.mark.slow
def test_qwen3_vl_round_trip_is_bit_exact_and_serves_in_transformers_and_vllm(tiny_qwen3_vl_dir, tmp_path):
    """HF -> Megatron (TP2 PP2, --verify) -> HF for the tiny Qwen3-VL (QK-norms, DeepStack mergers, no QKV bias)."""
    checkpoint = tmp_path / "tp2pp2"
    code, stdout, stderr = _convert(
        "hf_to_megatron", 4, "--hf", tiny_qwen3_vl_dir, "--out", checkpoint, "--tp", 2, "--pp", 2, "--verify"
    )
    assert code == 0, stderr[-4000:]
    assert "worst difference 0.000e+00" in stdout and ": OK" in stdout
    assert json.loads((checkpoint / "vppo_checkpoint.json").read_text())["family"] == "qwen3_vl"
    _round_trip_serves(tiny_qwen3_vl_dir, checkpoint, tmp_path)


# (model fixture, split written at, split exported at): neither needs to match the other, nor an even split
SPLITS = {
    "pp2_uneven": (
        "tiny_model_3l_dir",
        ["--first-stage-layers", 1, "--last-stage-layers", 2],
        ["--last-stage-layers", 1],
    ),
    "pp2_vpp2": ("tiny_model_4l_dir", ["--vpp", 2], []),
    # tied embeddings: the last stage's output layer is a copy of the embedding, loaded from it, never exported
    "qwen3_vl_tied_pp2": ("tiny_qwen3_vl_tied_dir", [], []),
    # the held-out shapes (conftest.HELD_OUT_SPECS), written and exported at different uneven splits
    "held_out_qwen2_5_vl": ("held_out_qwen2_5_vl_dir", ["--first-stage-layers", 2], ["--first-stage-layers", 3]),
    "held_out_qwen3_vl": ("held_out_qwen3_vl_dir", ["--first-stage-layers", 2], ["--last-stage-layers", 1]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SPLITS))
def test_uneven_and_virtual_pipeline_round_trips_are_bit_exact(name, tmp_path, request):
    model_fixture, written_at, exported_at = SPLITS[name]
    model_dir = request.getfixturevalue(model_fixture)
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    # --verify reloads the checkpoint at the split it was written at: every tensor bit-exact, probe log-probs
    code, stdout, stderr = _convert(
        "hf_to_megatron", 2, "--hf", model_dir, "--out", ckpt, "--pp", 2, *written_at, "--verify"
    )
    assert code == 0, stderr[-4000:]
    assert "worst difference 0.000e+00" in stdout and ": OK" in stdout
    code, stdout, stderr = _convert(
        "megatron_to_hf", 2, "--megatron", ckpt, "--out", out, "--pp", 2, *exported_at, "--verify"
    )
    assert code == 0 and ": OK" in stdout, stderr[-4000:]
    original, exported = SafetensorsReader(model_dir), SafetensorsReader(out)
    assert original.keys() == exported.keys()
    for key in sorted(original.keys()):
        a, b = original.get(key), exported.get(key)
        assert a.dtype == b.dtype and torch.equal(a, b), key


def _probe_at_layout(rank, world_size, ckpt, layout):
    from checkpoints_convert.common import probe_sample
    from vppo_megatron.actor import checkpoint
    from vppo_megatron.actor.engine import MegatronActor
    from vppo_megatron.config import load
    from vppo_megatron.parallel.layout import ParallelLayout, destroy, initialize

    cfg = load(None, ["model.dtype=float32"])
    actor = MegatronActor(
        cfg, initialize(ParallelLayout(**layout), seed=0), f"{ckpt}/hf", training=False, load_weights=False
    )
    checkpoint.load(actor.chunks, ckpt)
    log_probs = actor.experience([probe_sample(f"{ckpt}/hf")], step=0, with_perception=False).old_logp_BT
    destroy()
    return log_probs


@pytest.mark.slow
def test_tp2pp2_checkpoint_loads_at_tp1pp1_and_tp1pp2(tp2pp2_checkpoint):
    (serial,) = run_distributed(_probe_at_layout, 1, str(tp2pp2_checkpoint), {})
    pipelined = run_distributed(_probe_at_layout, 2, str(tp2pp2_checkpoint), {"pp": 2})
    assert torch.equal(pipelined[0], serial) and torch.equal(pipelined[1], serial)  # the same ops, split by layer
    assert (serial < 0).all()


def _broken_copy(tiny_model_dir, tmp_path, mutate):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    tensors = load_file(broken / "model.safetensors")
    mutate(tensors)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    return broken


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "checkpoint lacks model.layers.1.mlp.up_proj.weight"),
        (
            lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}),
            "no rule maps checkpoint tensor model.layers.0.extra.weight",
        ),
    ],
)
def test_missing_and_unmapped_tensors_are_listed(tiny_model_dir, tmp_path, mutate, message):
    broken = _broken_copy(tiny_model_dir, tmp_path, mutate)
    code, _, stderr = _convert("hf_to_megatron", 1, "--hf", broken, "--out", tmp_path / "out")
    assert code == 2 and message in stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_bad_inputs_get_clear_errors(tiny_model_dir, tp2pp2_checkpoint, tmp_path, capsys, monkeypatch):
    other_model = tmp_path / "wider"  # the same family, another size: its config would mislabel the export
    shutil.copytree(tiny_model_dir, other_model)
    wider = json.loads((other_model / "config.json").read_text())
    wider["text_config"] = dict(wider["text_config"], hidden_size=2 * wider["text_config"]["hidden_size"])
    (other_model / "config.json").write_text(json.dumps(wider))
    llama = tmp_path / "llama"
    shutil.copytree(tiny_model_dir, llama)
    config = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
    cases = [
        (("hf_to_megatron", "--hf", llama, "--out", tmp_path / "a"), "model_type 'llama' is not a supported family"),
        (
            ("hf_to_megatron", "--hf", tiny_model_dir, "--out", tmp_path / "b", "--tp", 3),
            "--tp = 3 does not divide the model's num_attention_heads = 4",
        ),
        (
            ("hf_to_megatron", "--hf", tiny_model_dir, "--out", tmp_path / "c", "--pp", 3),
            "does not divide the model's num_hidden_layers = 2",
        ),
        (
            ("hf_to_megatron", "--hf", tiny_model_dir, "--out", tmp_path / "c2", "--pp", 2, "--first-stage-layers", 3),
            "--first-stage-layers=3 leaves -1 of the model's num_hidden_layers = 2",
        ),
        (
            ("megatron_to_hf", "--megatron", tp2pp2_checkpoint, "--out", tmp_path / "c3", "--vpp", 2),
            "--vpp=2: virtual stages need --pp > 1",
        ),
        (("hf_to_megatron", "--hf", tmp_path / "nothing", "--out", tmp_path / "d"), "has no config.json"),
        (("hf_to_megatron", "--hf", tiny_model_dir, "--out", tp2pp2_checkpoint), "is not empty"),
        (
            ("megatron_to_hf", "--megatron", tiny_model_dir, "--out", tmp_path / "e"),
            "is not a complete vppo-megatron checkpoint",
        ),
    ]
    truncated = tmp_path / "truncated-hf"  # a download or copy cut short
    shutil.copytree(tiny_model_dir, truncated)
    weights = truncated / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    shard_cut = tmp_path / "truncated-ckpt"
    shutil.copytree(tp2pp2_checkpoint, shard_cut)
    shard = sorted(shard_cut.glob("*.distcp"))[-1]
    os.truncate(shard, shard.stat().st_size - 100)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    cases += [
        (("hf_to_megatron", "--hf", truncated, "--out", tmp_path / "g"), f"{weights}: truncated safetensors file"),
        (("megatron_to_hf", "--megatron", shard_cut, "--out", tmp_path / "h"), f"{shard}: truncated checkpoint shard"),
        (
            ("megatron_to_hf", "--megatron", tp2pp2_checkpoint, "--out", tmp_path / "i", "--hf-config", other_model),
            "--hf-config is another model's",
        ),
        (("hf_to_megatron", "--hf", tiny_model_dir, "--out", a_file), f"output path {a_file} is a file"),
    ]
    for (module, *args), message in cases:
        code, stderr = _precheck_error(module, args, capsys, monkeypatch)
        assert code == 2 and message in stderr, (args, stderr[-2000:])
        assert len(stderr.strip().splitlines()) == 1, stderr  # one line, no traceback
    incomplete = tmp_path / "incomplete"
    shutil.copytree(tp2pp2_checkpoint, incomplete)
    (incomplete / "metadata.json").unlink()  # megatron's own metadata: an interrupted or truncated copy
    args = ["--megatron", incomplete, "--out", tmp_path / "f"]
    code, stderr = _precheck_error("megatron_to_hf", args, capsys, monkeypatch)
    assert code == 2 and "is incomplete" in stderr


def test_a_killed_tp2_conversion_leaves_no_worker_and_no_output_and_the_next_run_cleans_up(tiny_model_dir, tmp_path):
    """SIGKILL of the launcher (the command the user started) of a TP2 conversion: its workers die with it (none
    goes on to publish), nothing appears at --out; the next run to the same --out removes the killed run's hidden
    temporary directory with a one-line note and converts."""
    import psutil

    out = tmp_path / "out"
    command = [sys.executable, "-m", "checkpoints_convert.hf_to_megatron", "--hf", str(tiny_model_dir)]
    hang = dict(os.environ, VPPO_FAULT="hang@checkpoint_write:*:all")  # caught mid-write: shards, no metadata
    launcher = subprocess.Popen(
        [*command, "--out", str(out), "--tp", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=hang
    )
    workers = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list(tmp_path.glob(".out.tmp-*")):  # the workers are writing
            workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if p.is_running()]
            assert launcher.poll() is None, "the conversion ended before it could be killed"
            time.sleep(0.2)
        assert len(workers) >= 2 and list(tmp_path.glob(".out.tmp-*")), "no worker started writing within 120 s"
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=30)
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, f"workers outlived their launcher: {alive}"
        time.sleep(2)  # a worker that survived would publish now
        assert not out.exists()
    finally:
        for process in [launcher, *workers]:
            with contextlib.suppress(Exception):
                process.kill()
    again = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "note: removed 1 temporary directory of killed runs next to" in again.stderr
    assert not list(tmp_path.glob(".out.tmp-*")) and (out / "vppo_checkpoint.json").exists()
