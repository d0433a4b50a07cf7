"""Stage 7: the actor's weights -> every rollout engine, after every optimizer step.

Megatron TP/PP shards -> full HF-named tensors (convert/'s mapping, gathered over TP one tensor at a time) ->
whole-layer buckets of at most rollout.sync_bucket_mb -> every engine -> caches reset -> policy version bumped.
`push()` is collective over all trainer ranks; trainer rank 0 drives the fleet.

Transports (rollout.sync_transport; auto = shm on CPU, cuda_ipc colocated, nccl disaggregated):
- shm: each pipeline stage's writer rank (TP = CP = DP rank 0) writes its buckets as files under /dev/shm;
  engines read them by path. The files of the last good version stay as the recovery snapshot: an engine that
  restarts is re-synced from them, and a failed sync rolls every engine back to them, so engines never serve
  half-updated weights. Costs one model copy of host shared memory.
- cuda_ipc / nccl (GPU): tensors are gathered to trainer rank 0 (PP broadcast) and passed as CUDA IPC handles
  (same node) or broadcast over a NCCL group that the engine workers joined (engine workers get ranks 1..).
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from vppo_megatron.sync.buckets import buckets
from vppo_megatron.types import ActorSample

logger = logging.getLogger(__name__)
SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")
PROBE_RESPONSE = "<think> I look at the image carefully. </think> \\boxed{1}"  # any fixed text scores the weights


STAGING_PREFIX = "vppo-sync-"  # + run id, -p<writer pid>, version, pipeline stage, bucket
_WRITER_PID = re.compile(r"^vppo-sync-[0-9a-f]+-p(\d+)-")


def remove_stale_staging(directory: Path = SHM_DIR) -> tuple[int, int]:
    """Removes the sync staging files of runs whose writer process is gone from this host (a killed or crashed
    run leaves its last version in shared memory: the whole model, held in RAM until the host reboots). A file
    whose writer pid is alive (this run, another live run, or a pid reused since) is kept. Returns (files, bytes)
    removed."""
    files = nbytes = 0
    for path in directory.glob(f"{STAGING_PREFIX}*"):
        match = _WRITER_PID.match(path.name)
        if match is None or _alive(int(match.group(1))):
            continue
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:  # another rank of this host removed it first
            continue
        files, nbytes = files + 1, nbytes + size
    return files, nbytes


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class SyncError(RuntimeError):
    """A weight sync failed; the message says which version the engines are on."""


@dataclass
class SharedBucket:
    path: str
    manifest: list = field(default_factory=list)
    """(name, dtype, shape, offset, nbytes) per tensor."""


def write_shared_bucket(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> SharedBucket:
    """Packs `tensors` straight into a shared-memory file at `path`: the file is sized first and mapped, and each
    tensor's bytes are copied into their place once (from host or device memory). Nothing is exported to numpy, so
    the actor's storages stay resizable (a replicated weight arrives here as a view of the actor's own buffer,
    which the lifecycle must be able to release while the engines generate)."""
    flat = [(name, t.detach().contiguous()) for name, t in tensors]
    manifest, offset = [], 0
    for name, t in flat:
        nbytes = t.numel() * t.element_size()
        manifest.append((name, str(t.dtype).removeprefix("torch."), list(t.shape), offset, nbytes))
        offset += nbytes
    with open(path, "wb") as f:
        f.truncate(offset)
    if offset:
        raw = torch.from_file(str(path), shared=True, size=offset, dtype=torch.uint8)
        for (_, t), (_, _, _, start, nbytes) in zip(flat, manifest):
            if nbytes:
                raw[start : start + nbytes].copy_(t.reshape(-1).view(torch.uint8))
        del raw  # unmapped: the bytes are in the file
    return SharedBucket(str(path), manifest)


class WeightSync:
    def __init__(self, cfg, actor, fleet=None):
        """`fleet` on trainer rank 0 only; `actor` on every rank."""
        self.cfg, self.actor, self.fleet = cfg, actor, fleet
        self.groups = actor.groups
        self.transport = self._transport(cfg.rollout.sync_transport)
        files, nbytes = remove_stale_staging()
        if files:
            mib = nbytes / 2**20
            logger.warning("removed %d weight-sync files (%.1f MiB) that killed runs left in %s", files, mib, SHM_DIR)
        self.version = 0
        self.snapshot: list[SharedBucket] = []
        self.run_id = self._shared_run_id()
        self.probe_set: tuple[list, list[str]] | None = None
        """(ActorSamples, chat prompt texts) scored every rollout.verify_sync_every syncs (set_probe)."""
        if fleet is not None:
            fleet.resync = self._resync_engine

    def _transport(self, name: str) -> str:
        if name == "auto":
            if not torch.cuda.is_available():
                return "shm"
            return "cuda_ipc" if self.cfg.rollout.placement == "colocated" else "nccl"
        if name in ("cuda_ipc", "nccl") and not torch.cuda.is_available():
            from vppo_megatron.config import ConfigError

            raise ConfigError(f"rollout.sync_transport={name} needs CUDA; use shm (or auto) on this host")
        return name

    @staticmethod
    def _shared_run_id() -> str:
        box = [uuid.uuid4().hex[:8]]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # -------------------------------------------------------------------------------------- push

    def push(self) -> dict[str, float]:
        """Sends the actor's current weights to every engine (collective); returns sync/ metrics on rank 0."""
        start = time.perf_counter()
        new_version = self.version + 1
        if self.transport != "shm":
            return self._push_gpu(new_version, start)
        written = self._write_stage_buckets(new_version)
        all_buckets = [None] * dist.get_world_size()
        dist.all_gather_object(all_buckets, written)
        bucket_list = [b for part in all_buckets for b in part]
        error = None
        if self.fleet is not None:
            try:
                self._send(bucket_list, new_version)
            except Exception as exc:  # any engine failure: roll every engine back to the snapshot
                error = f"{type(exc).__name__}: {exc}"
                self._rollback()
        failed = [error]
        dist.broadcast_object_list(failed, src=0)
        if failed[0] is not None:
            self._delete(bucket_list)
            raise SyncError(
                f"weight sync to version {new_version} failed ({failed[0]}); engines were restored "
                f"to version {self.version}"
            )
        old, self.snapshot, self.version = self.snapshot, bucket_list, new_version
        dist.barrier()
        self._delete(old)
        nbytes = sum(entry[4] for b in bucket_list for entry in b.manifest)
        elapsed = time.perf_counter() - start
        return {
            "sync/version": float(self.version),
            "sync/megabytes": nbytes / 2**20,
            "time/sync_s": elapsed,
            "sync/buckets": float(len(bucket_list)),
            "sync/megabytes_per_s": nbytes / 2**20 / max(elapsed, 1e-9),
        }

    def _write_stage_buckets(self, version: int) -> list[SharedBucket]:
        g = self.groups
        writer = g.tp_rank == 0 and g.cp_rank == 0 and g.dp_rank == 0
        tensors = self.actor.hf_tensors()  # TP collective: every rank of the stage walks it
        if not writer:
            for _ in tensors:
                pass
            return []
        out = []
        max_bytes = self.cfg.rollout.sync_bucket_mb * 2**20
        for k, bucket in enumerate(buckets(tensors, max_bytes)):
            path = SHM_DIR / f"{STAGING_PREFIX}{self.run_id}-p{os.getpid()}-v{version}-pp{g.pp_rank}-{k:04d}"
            out.append(write_shared_bucket(path, bucket))
        return out

    def _send(self, bucket_list: list[SharedBucket], version: int) -> None:
        for bucket in bucket_list:  # engines' weights are awake (lifecycle.py)
            self.fleet.call_all("load_shared", bucket.path, bucket.manifest)
        versions = self.fleet.call_all("finish_sync", version)
        if set(versions) != {version}:
            raise SyncError(f"engines report versions {versions} after syncing {version}")

    def _rollback(self) -> None:
        for i in range(len(self.fleet.engines)):
            try:
                self._resync_engine(i)
            except Exception:  # a dead engine is restarted (and re-synced) by the fleet on next use
                logger.exception("rollback of engine %d failed", i)

    def _resync_engine(self, i: int) -> None:
        """Loads the last good version (the snapshot) into engine i (after a restart or a failed sync)."""
        self.fleet.call_one(i, "abort_sync")  # a failed sync's half-open reload session, if any
        if not self.snapshot:  # version 0 is the checkpoint the engines were started from
            self.fleet.call_one(i, "reload_from_disk")
        for bucket in self.snapshot:
            self.fleet.call_one(i, "load_shared", bucket.path, bucket.manifest)
        self.fleet.call_one(i, "finish_sync", self.version)

    def _delete(self, bucket_list: list[SharedBucket]) -> None:
        for bucket in bucket_list:
            if os.path.exists(bucket.path) and bucket.path.startswith(str(SHM_DIR)):
                mine = (
                    f"-pp{self.groups.pp_rank}-" in bucket.path
                    and self.groups.tp_rank == 0
                    and self.groups.cp_rank == 0
                    and self.groups.dp_rank == 0
                )
                if mine:
                    os.unlink(bucket.path)

    def close(self) -> None:
        dist.barrier()
        self._delete(self.snapshot)
        self.snapshot = []

    # ------------------------------------------------------------------------------------- verify

    def verify_due(self) -> bool:
        """rollout.verify_sync_every: this version is one the probe checks (the same answer on every rank)."""
        every = self.cfg.rollout.verify_sync_every
        return bool(every) and self.probe_set is not None and self.version % every == 0

    def score_probe_with_actor(self) -> None:
        """The actor's side of the check, while its weights are resident (collective)."""
        samples, _ = self.probe_set
        self._actor_probe = self.actor.experience(
            samples, step=0, with_perception=False, with_entropy=False
        ).old_logp_BT

    def verify(self) -> dict[str, float]:
        """The engines' side, once they are awake: raises SyncError on every rank when the largest per-token
        log-prob difference exceeds rollout.verify_sync_tolerance (collective)."""
        samples, texts = self.probe_set
        gap = [None]
        if self.fleet is not None:
            engine = self.fleet.sequence_log_probs(
                [{"prompt": t, "images": s.images, "response_ids": s.response_ids} for s, t in zip(samples, texts)]
            )
            gap[0] = max(
                (self._actor_probe[b, : len(v)] - torch.tensor(v)).abs().max().item() for b, v in enumerate(engine)
            )
        dist.broadcast_object_list(gap, src=0)
        tolerance = self.cfg.rollout.verify_sync_tolerance
        if gap[0] > tolerance:
            raise SyncError(
                f"after syncing version {self.version} the engines' log-probs differ from the actor's by "
                f"{gap[0]:.3g} on the probe set (rollout.verify_sync_tolerance={tolerance}): the engines do not "
                "serve the trained weights; check the weight mapping / transport, or raise the tolerance for "
                "a lower-precision engine"
            )
        return {"sync/probe_max_abs_diff": gap[0]}

    def set_probe(self, prompts, processor, response_text: str = PROBE_RESPONSE) -> None:
        """The fixed probe set from trainer rank 0's `prompts` (PromptSamples), each answered with
        `response_text`, on every rank (collective; other ranks pass prompts=None)."""
        box = [None]
        if prompts is not None:
            response_ids = processor.tokenizer(response_text, add_special_tokens=False)["input_ids"]
            samples = []
            for k, prompt in enumerate(prompts):
                images = prompt.images or None
                prompt_ids = processor(text=[prompt.prompt_text], images=images, return_tensors="pt")["input_ids"]
                samples.append(ActorSample(f"probe/{k}", prompt_ids[0].tolist(), response_ids, prompt.images))
            box[0] = (samples, [p.prompt_text for p in prompts])
        dist.broadcast_object_list(box, src=0)
        self.probe_set = box[0]

    def probe(self, samples, prompt_texts: list[str]) -> dict[str, float]:
        """Engine vs actor log-probs on fixed sequences (collective); `sync/probe_max_abs_diff` on rank 0.

        `samples` are ActorSamples (expanded prompt ids), `prompt_texts` the same prompts as chat text."""
        experience = self.actor.experience(samples, step=0, with_perception=False, with_entropy=False)
        if self.fleet is None:
            return {}
        sequences = [
            {"prompt": text, "images": s.images, "response_ids": s.response_ids}
            for s, text in zip(samples, prompt_texts)
        ]
        engine = self.fleet.sequence_log_probs(sequences)
        gap = 0.0
        for b, values in enumerate(engine):
            ours = experience.old_logp_BT[b, : len(values)]
            gap = max(gap, (ours - torch.tensor(values)).abs().max().item())
        return {"sync/probe_max_abs_diff": gap}

    # --------------------------------------------------------------------------------- GPU paths

    def gather_to_rank0(self):
        """(HF name, full tensor) of every stage on trainer rank 0 (a generator there; collective elsewhere).

        Stage 0's tensors come from rank 0's own TP gather; every later stage's writer (TP = CP = DP rank 0)
        sends its tensors point to point, header (name, shape, dtype) first, then the data."""
        g, rank = self.groups, dist.get_rank()
        writer = g.tp_rank == 0 and g.cp_rank == 0 and g.dp_rank == 0
        roles = [None] * dist.get_world_size()
        dist.all_gather_object(roles, (g.pp_rank, writer))
        writers = {pp: r for r, (pp, w) in enumerate(roles) if w}
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        if g.pp_rank == 0:
            for name, tensor in self.actor.hf_tensors():
                if rank == 0:
                    yield name, tensor
        elif rank == writers[g.pp_rank]:
            for name, tensor in self.actor.hf_tensors():
                dist.send_object_list([(name, list(tensor.shape), tensor.dtype)], dst=0)
                dist.send(tensor.contiguous(), dst=0)
            dist.send_object_list([None], dst=0)
        else:
            for _ in self.actor.hf_tensors():
                pass
        if rank == 0:
            for pp in range(1, g.layout.pp):
                while True:
                    header = [None]
                    dist.recv_object_list(header, src=writers[pp])
                    if header[0] is None:
                        break
                    name, shape, dtype = header[0]
                    tensor = torch.empty(shape, dtype=dtype, device=device)
                    dist.recv(tensor, src=writers[pp])
                    yield name, tensor

    def _push_gpu(self, version: int, start: float) -> dict[str, float]:
        max_bytes = self.cfg.rollout.sync_bucket_mb * 2**20
        nbytes, count, snapshot, error = 0, 0, [], None
        if self.fleet is not None and self.transport == "nccl" and not hasattr(self, "_nccl"):
            self._init_nccl()
        for bucket in buckets(self.gather_to_rank0(), max_bytes):
            if error is not None:
                continue  # drain the collective; the sync already failed
            try:
                self._send_gpu_bucket(bucket)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            snapshot.append([(n, t.detach().to("cpu")) for n, t in bucket])  # recovery copy on host
            nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
            count += 1
        if self.fleet is not None and error is None:
            self.fleet.call_all("finish_sync", version)
        if self.fleet is not None and error is not None:
            self._rollback()
        failed = [error]
        dist.broadcast_object_list(failed, src=0)
        if failed[0] is not None:
            raise SyncError(
                f"weight sync to version {version} failed ({failed[0]}); engines were restored "
                f"to version {self.version}"
            )
        if dist.get_rank() == 0:
            self._delete(self.snapshot)
            self.snapshot = [
                write_shared_bucket(SHM_DIR / f"{STAGING_PREFIX}{self.run_id}-p{os.getpid()}-v{version}-pp0-{k:04d}", b)
                for k, b in enumerate(snapshot)
            ]
        self.version = version
        elapsed = time.perf_counter() - start
        return {
            "sync/version": float(version),
            "sync/megabytes": nbytes / 2**20,
            "time/sync_s": elapsed,
            "sync/buckets": float(count),
            "sync/megabytes_per_s": nbytes / 2**20 / max(elapsed, 1e-9),
        }

    def _send_gpu_bucket(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        if self.fleet is None:
            return
        if self.transport == "cuda_ipc":
            from torch.multiprocessing.reductions import reduce_tensor

            handles = [(name, *reduce_tensor(tensor.contiguous())) for name, tensor in bucket]
            self.fleet.call_all("load_ipc", handles)
            torch.cuda.ipc_collect()
            return
        manifest = [(name, str(t.dtype).removeprefix("torch."), list(t.shape)) for name, t in bucket]
        futures = self.fleet.submit_each("load_nccl", [(manifest,)] * len(self.fleet.engines))
        for _, tensor in bucket:
            self._nccl.broadcast(tensor.contiguous(), src=0, stream=torch.cuda.current_stream())
        self.fleet.wait(futures)

    def _init_nccl(self) -> None:
        """Trainer rank 0 is NCCL rank 0; engine i's workers take ranks 1 + i * tp ... (distinct per engine)."""
        from vppo_megatron.rollout.nccl import rendezvous_address, trainer_communicator

        tp = self.cfg.rollout.tensor_parallel_size
        world = 1 + len(self.fleet.engines) * tp
        address, port = rendezvous_address()
        futures = self.fleet.submit_each(
            "init_nccl", [(address, port, 1 + i * tp, world) for i in range(len(self.fleet.engines))]
        )
        self._nccl = trainer_communicator(address, port, world)  # blocks until every worker joined
        self.fleet.wait(futures)
