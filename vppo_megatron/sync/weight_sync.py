"""Stage 7: the actor's weights -> every rollout engine, after every optimizer step.

Megatron TP/PP shards -> full HF-named tensors (convert/'s mapping, gathered over TP one tensor at a time) ->
whole-layer buckets of at most rollout.sync_bucket_mb -> the engines -> caches reset -> policy version bumped.
`push()` is collective over all trainer ranks; trainer rank 0 drives the fleet (Ray calls carry only paths,
manifests and handles: the bytes move node-locally). Who feeds which engine: vppo_megatron/topology.py.

Transports (rollout.sync_transport; auto = shm on CPU, cuda_ipc colocated, nccl disaggregated):
- shm: every node that hosts engines has a staging directory in its shared memory; one rank of the node packs
  each bucket straight into a mapped file there (a rank of the bucket's pipeline stage on that node, else the
  node's first rank, which receives the packed bucket from the stage's writer); the node's engines map the files
  and load views of them, and read no other directory. Versions alternate between two slots of files that are
  rewritten in place (no new pages, mappings kept), so the last good version stays as the node's snapshot: an
  engine that restarts is re-synced from it, and a failed sync rolls every engine back to it, so engines never
  serve half-updated weights.
- cuda_ipc / nccl (GPU): every rank that feeds an engine holds each bucket packed in a flat device buffer (its
  own when it belongs to the stage, else broadcast by the stage's writer); two buffers alternate, so the engines
  load bucket k while bucket k+1 is packed. cuda_ipc: each rank hands an IPC handle of its buffer to the engine
  worker on its own GPU (matched by GPU UUID); nccl: each engine's feeder rank broadcasts to the engine's workers
  over a NCCL group of their own. One engine per node also copies every bucket to the node's shared memory: the
  node's snapshot for rollbacks and restarts.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
import uuid
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from vppo_megatron import faults
from vppo_megatron import topology as sync_topology
from vppo_megatron.rollout.staging import (
    SHM_DIR,
    STAGING_PREFIX,
    SharedBucket,
    layout_of,
    map_file,
    pack,
    remove_stale_staging,
)
from vppo_megatron.sync.buckets import buckets
from vppo_megatron.types import ActorSample

logger = logging.getLogger(__name__)
PROBE_RESPONSE = "<think> I look at the image carefully. </think> \\boxed{1}"  # any fixed text scores the weights


SYNC_ATTEMPTS = 2  # a sync that engines failed runs once more after they were restarted


class SyncError(RuntimeError):
    """A weight sync failed; the message says which version the engines are on."""


def _gloo_group(ranks: list[int], timeout_s: float):
    return dist.new_group(ranks, backend="gloo", timeout=timedelta(seconds=timeout_s))


class WeightSync:
    def __init__(self, cfg, actor, fleet=None):
        """`fleet` on trainer rank 0 only; `actor` on every rank. Collective: creates the sync's process groups."""
        self.cfg, self.actor, self.fleet = cfg, actor, fleet
        self.groups = actor.groups
        self.rank = dist.get_rank()
        self.transport = self._transport(cfg.rollout.sync_transport)
        self.topology = sync_topology.plan(cfg, self.groups.layout, self.transport)
        self.node = self.topology.node_of(self.rank)
        local = os.environ.get("LOCAL_WORLD_SIZE")
        if torch.cuda.is_available() and local and int(local) != self.topology.ranks_per_node:
            from vppo_megatron.config import ConfigError

            raise ConfigError(
                f"parallel.gpus_per_node={self.cfg.parallel.gpus_per_node} but torchrun started {local} ranks on "
                f"this node: set parallel.gpus_per_node={local} (the weight sync feeds engines node by node)"
            )
        files, nbytes = remove_stale_staging()
        if files:
            mib = nbytes / 2**20
            logger.warning("removed %d weight-sync files (%.1f MiB) that killed runs left in %s", files, mib, SHM_DIR)
        self.version = 0
        self.snapshot: dict[object, list[SharedBucket]] = {}
        """Rank 0: per node (shm: the topology's node; GPU: the Ray node id) the last good version's buckets."""
        self.run_id = self._shared_run_id()
        self._mapped: dict[str, torch.Tensor] = {}  # this process's staging files, mapped
        timeout_s = self.cfg.parallel.timeout_s
        self._stage_groups = {}
        for pp in range(self.topology.pp):  # every rank creates every group, in the same order
            receivers = self.topology.receivers(pp)
            if not receivers:
                continue
            ranks = sorted({self.topology.writer(pp), *receivers})
            if self.transport == "shm":
                group = _gloo_group(ranks, timeout_s)
            else:
                group = dist.new_group(ranks, timeout=timedelta(seconds=timeout_s))
            if self.rank in ranks:
                self._stage_groups[pp] = group
        self._feeders = sorted({r for ranks in self.topology.feeders for r in ranks} | {0})
        self._feed_group = _gloo_group(self._feeders, timeout_s) if self.transport != "shm" else None
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._nccl: dict[int, object] | None = None
        self._nccl_stale = False  # rank 0: an engine restarted; its NCCL group is made again at the next push
        self.probe_set: tuple[list, list[str]] | None = None
        """(ActorSamples, chat prompt texts) scored every rollout.verify_sync_every syncs (set_probe)."""
        self.claim_engines()

    def claim_engines(self) -> None:
        """Points every engine at this sync's staging directory on its node (the only place it reads weights
        from), and the fleet's engine restarts at this sync. At start-up; and when two trainers share one fleet
        (`Trainer.build(alongside=...)`, benchmarks), each claims the engines before its turn."""
        if self.fleet is not None:
            self.fleet.resync = self._resync_engine
            for i in range(len(self.fleet.engines)):
                self.fleet.call_one(i, "set_staging", str(self._node_dir(self._engine_node(i))))

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

    def _node_dir(self, node) -> Path:
        """A node's staging directory (in its own shared memory; simulated nodes of one host get one each)."""
        return SHM_DIR / f"{STAGING_PREFIX}{self.run_id}-node{str(node)[:16]}"

    def _engine_node(self, i: int):
        """The node engine i reads its snapshot from: the topology's node (shm), the engine's Ray node (GPU)."""
        if self.transport == "shm":
            return self.topology.engine_nodes[i]
        return self.fleet.info[i]["node_id"]

    def _engines_on(self, node) -> list[int]:
        return [i for i in range(len(self.fleet.engines)) if self._engine_node(i) == node]

    # -------------------------------------------------------------------------------------- push

    def push(self) -> dict[str, float]:
        """Sends the actor's current weights to every engine (collective); returns sync/ metrics on rank 0.

        A failed sync puts every engine back on the last good version. When engines failed it (dead, or silent
        past rollout.request_timeout_s), they are restarted and the sync runs once more; any other failure (or
        a second one) raises SyncError on every rank. Not covered on the nccl transport: a feeding rank blocked
        in a broadcast to a dead engine (PyNccl has no timeout) waits until parallel.timeout_s stops the run."""
        start = time.perf_counter()
        version, replaced = self.version + 1, []
        for attempt in range(SYNC_ATTEMPTS):
            snapshot, error = self._push_once(version)
            restarted = []
            if self.fleet is not None and error is not None:
                if attempt + 1 < SYNC_ATTEMPTS:
                    restarted = self._restart_failed_engines()  # they come back on the last good version
                self._rollback(skip=restarted)
            outcome = [error, restarted]
            dist.broadcast_object_list(outcome, src=0)
            error, restarted = outcome
            if self.transport != "shm":
                self._release_gpu_buffers()
            if error is None:
                break
            if not restarted:
                raise SyncError(
                    f"weight sync to version {version} failed ({error}); engines were restored to version "
                    f"{self.version}"
                )
            replaced += restarted
            if self.fleet is not None:
                logger.warning(
                    "weight sync to version %d failed (%s); engine(s) %s restarted, syncing again",
                    version,
                    error,
                    restarted,
                )
        self.snapshot, self.version = snapshot, version
        if self.fleet is None:
            return {}
        one_copy = next(iter(snapshot.values()), [])
        nbytes = sum(entry[4] for b in one_copy for entry in b.manifest)
        elapsed = time.perf_counter() - start
        return {
            "sync/version": float(self.version),
            "sync/engines_restarted": float(len(replaced)),
            "sync/megabytes": nbytes / 2**20,
            "time/sync_s": elapsed,
            "sync/buckets": float(len(one_copy)),
            "sync/megabytes_per_s": nbytes / 2**20 / max(elapsed, 1e-9),
        }

    def _push_once(self, version: int) -> tuple[dict, str | None]:
        """One attempt at serving `version`: (rank 0: the new snapshot per node, the error or None)."""
        if self.transport == "shm":
            snapshot, error = self._push_shm(version)
        else:
            snapshot, error = self._push_gpu(version)
        if self.fleet is not None and error is None:
            try:
                versions = self.fleet.call_all("finish_sync", version)
                if set(versions) != {version}:
                    raise SyncError(f"engines report versions {versions} after syncing {version}")
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
        return snapshot, error

    def _restart_failed_engines(self) -> list[int]:
        """Rank 0: restarts the engines that are dead or do not answer (the fleet re-syncs each to the last good
        version); the others are left for the rollback. A restart that fails restarts nothing: the sync fails on
        every rank (never on rank 0 alone)."""
        try:
            failed = self.fleet.unresponsive()
            for i in failed:
                self.fleet.restart(i)
        except Exception:
            logger.exception("restarting the engines that failed the sync failed")
            return []
        return failed

    def _wait(self, futures: list, error: str | None) -> str | None:
        try:
            self.fleet.wait(futures)
        except Exception as exc:  # any engine failure: the sync fails, every engine goes back to the snapshot
            error = error or f"{type(exc).__name__}: {exc}"
        return error

    # ------------------------------------------------------------------------------------ shm

    def _push_shm(self, version: int) -> tuple[dict, str | None]:
        """Every node's writer packs each bucket into its node's staging slot (version % 2), receiving it from the
        stage's writer when it is not of the stage; rank 0 starts the engines loading each bucket it wrote at once
        and the others' once every rank is done. Returns (rank 0: the new snapshot per node, error)."""
        topo, rank, slot = self.topology, self.rank, version % 2
        written, futures = [], []
        writes_here = self.node in topo.staging_nodes()

        def stored(pp: int, k: int, path: Path, manifest: list) -> None:
            bucket = SharedBucket(str(path), manifest)
            written.append((self.node, pp, k, bucket))
            if self.fleet is not None:
                futures.extend(self._submit_shared(self.node, bucket))
                faults.at("sync_load", self.fleet)

        for pp in range(topo.pp):
            mine = writes_here and topo.node_writer(pp, self.node) == rank  # a receiver is its node's writer

            def mapped(k: int, nbytes: int, pp: int = pp) -> torch.Tensor:
                return self._map(self._staged(slot, pp, k), nbytes)

            for k, manifest, _ in self._stage_buckets(pp, mine, mapped, device=None):
                stored(pp, k, self._staged(slot, pp, k), manifest)  # packed or received into the node's file
        everything = [None] * dist.get_world_size()
        dist.all_gather_object(everything, [] if rank == 0 else written)
        if self.fleet is None:
            return {}, None
        snapshot: dict[int, list] = {}
        for node, _, _, bucket in sorted(
            (item for part in [written, *everything[1:]] for item in part), key=lambda item: item[:3]
        ):
            snapshot.setdefault(node, []).append(bucket)
        for part in everything[1:]:
            for node, _, _, bucket in part:
                futures.extend(self._submit_shared(node, bucket))
        return snapshot, self._wait(futures, None)

    def _stage_buckets(self, pp: int, wanted: bool, buffer, device):
        """Yields (k, manifest, flat) for each of stage pp's buckets when this rank needs them (`wanted`): packed
        from its own gathered tensors if it belongs to the stage, else received from the stage's writer, which
        broadcasts every bucket to the stage's receivers. `buffer(k, nbytes)` gives the flat uint8 tensor to pack
        or receive bucket k into (a mapped staging file, a device buffer). Every rank of the stage walks the TP
        gather to its end, wanted or not (collective)."""
        topo, rank = self.topology, self.rank
        group, writer = self._stage_groups.get(pp), topo.writer(pp)
        if topo.stage_of(rank) == pp:
            sends = rank == writer and group is not None
            max_bytes = self.cfg.rollout.sync_bucket_mb * 2**20
            for k, bucket in enumerate(buckets(self.actor.hf_tensors(), max_bytes)):
                if not (wanted or sends):
                    continue  # the TP gather still needs this rank
                manifest, total = layout_of(bucket)
                flat = buffer(k, total) if wanted else torch.empty(total, dtype=torch.uint8, device=device)
                pack(bucket, manifest, flat)
                del bucket
                if sends:
                    dist.broadcast_object_list([manifest], src=writer, group=group)
                    dist.broadcast(flat, src=writer, group=group)
                if wanted:
                    yield k, manifest, flat
            if sends:
                dist.broadcast_object_list([None], src=writer, group=group)
        elif group is not None and rank in topo.receivers(pp):
            for k in itertools.count():
                box = [None]
                dist.broadcast_object_list(box, src=writer, group=group)
                if box[0] is None:
                    return
                flat = buffer(k, sum(entry[4] for entry in box[0]))
                dist.broadcast(flat, src=writer, group=group)
                yield k, box[0], flat

    def _staged(self, slot: int, pp: int, k: int) -> Path:
        """This rank's staging file of stage pp's bucket k in version slot `slot`, in its node's directory."""
        return self._node_dir(self.node) / f"p{os.getpid()}-s{slot}-pp{pp}-b{k:04d}"

    def _map(self, path: Path, nbytes: int) -> torch.Tensor:
        path.parent.mkdir(exist_ok=True)
        return map_file(path, nbytes, self._mapped)

    def _submit_shared(self, node, bucket: SharedBucket) -> list:
        return [self.fleet.submit(i, "load_shared", bucket.path, bucket.manifest) for i in self._engines_on(node)]

    # ------------------------------------------------------------------------------------ GPU

    def _push_gpu(self, version: int) -> tuple[dict, str | None]:
        """Every feeding rank holds each bucket in one of two flat device buffers (packed from its stage's
        gathered tensors, or broadcast by the stage's writer) and hands it to its engines; rank 0 makes sure the
        engines finished bucket k-1 before anyone packs bucket k+1 into k-1's buffer."""
        topo, rank, slot = self.topology, self.rank, version % 2
        device = torch.device("cuda", torch.cuda.current_device())
        feeds = rank in self._feeders
        if self.transport == "nccl" and feeds:
            box = [self._nccl is None or self._nccl_stale]  # rank 0: first sync, or an engine restarted since
            dist.broadcast_object_list(box, src=0, group=self._feed_group)
            if box[0]:
                self._init_nccl()
        state = {"index": 0, "pending": [], "error": None, "snapshot": {}, "slot": slot}

        def buffer(k: int, nbytes: int) -> torch.Tensor:
            return self._buffer(state["index"], nbytes, device)

        for pp in range(topo.pp):
            for _, manifest, flat in self._stage_buckets(pp, feeds, buffer, device):
                self._feed(state, manifest, flat)
                state["index"] += 1
        if self.fleet is not None:
            state["error"] = self._wait(state["pending"], state["error"])
            if state["error"] is None:  # (a failed sync's rollback reads the old files)
                for i in self._snapshot_writers():
                    self.fleet.submit(i, "remove_stale_staging")  # a restarted snapshot writer's old files
        self._buffers = [None, None]
        flat = None  # noqa: F841 - the last bucket's view: its buffer goes back with the others
        return state["snapshot"], state["error"]

    def _release_gpu_buffers(self) -> None:
        """The sync's device buffers back to the device before the KV cache wakes. Only once every rank knows the
        outcome, i.e. rank 0 heard the engines load the last bucket: before that an engine may still hold a
        buffer through CUDA IPC, which ipc_collect would keep (until the next sync) instead of freeing."""
        if self.transport == "cuda_ipc":
            torch.cuda.ipc_collect()  # buffers the engines held past their last reference
        torch.cuda.empty_cache()

    def _buffer(self, index: int, nbytes: int, device) -> torch.Tensor:
        held = self._buffers[index % 2]
        if held is None or held.numel() < nbytes:
            held = self._buffers[index % 2] = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return held[:nbytes]

    def _snapshot_writers(self) -> list[int]:
        """Rank 0: the first engine of every node; it copies each bucket it receives to its node's staging."""
        first = {}
        for i in range(len(self.fleet.engines)):
            first.setdefault(self._engine_node(i), i)
        return sorted(first.values())

    def _feed(self, state: dict, manifest: list, flat: torch.Tensor) -> None:
        """Hands one bucket (held by every feeding rank) to the engines (collective over the feeding ranks)."""
        from vppo_megatron.rollout.extension import device_uuid

        if self.rank == 0 and state["pending"]:  # bucket k-1 loaded before bucket k+1 reuses its buffer
            state["error"] = self._wait(state["pending"], state["error"])
            state["pending"] = []
        torch.cuda.current_stream().synchronize()  # the packed bytes are there before another process reads them
        box = [state["error"] is None]  # rank 0 found no failure so far: the engines take this bucket
        dist.broadcast_object_list(box, src=0, group=self._feed_group)
        go, mine = box[0], None
        if self.transport == "cuda_ipc" and go:  # no handle is made that no engine would open and release
            from torch.multiprocessing.reductions import reduce_tensor

            mine = (device_uuid(flat.device), reduce_tensor(flat))
        everyone = [None] * len(self._feeders)
        dist.all_gather_object(everyone, mine, group=self._feed_group)
        if self.fleet is not None and go:
            nbytes = sum(entry[4] for entry in manifest)
            writers = self._snapshot_writers()
            for i in range(len(self.fleet.engines)):
                path = None
                if i in writers:
                    node = self._engine_node(i)
                    name = f"p{self.fleet.info[i]['pid']}-s{state['slot']}-b{state['index']:04d}"
                    path = str(self._node_dir(node) / name)
                    state["snapshot"].setdefault(node, []).append(SharedBucket(path, manifest))
                if self.transport == "cuda_ipc":
                    handles = dict(entry for entry in everyone if entry is not None)
                    state["pending"].append(self.fleet.submit(i, "load_ipc", handles, manifest, path))
                else:
                    state["pending"].append(self.fleet.submit(i, "load_nccl", manifest, nbytes, path))
        if self.fleet is not None and go:
            faults.at("sync_load", self.fleet)
        if self.transport == "nccl" and go:
            for communicator in self._nccl.values():  # the engines this rank feeds
                communicator.broadcast(flat, src=0, stream=torch.cuda.current_stream())
            torch.cuda.current_stream().synchronize()

    def _init_nccl(self) -> None:
        """One NCCL group per disaggregated engine: its feeder rank (rank 0 of the group) and the engine's workers
        (ranks 1..tensor_parallel_size). Collective over the feeding ranks."""
        from vppo_megatron.rollout.nccl import rendezvous_address, trainer_communicator

        world = 1 + self.cfg.rollout.tensor_parallel_size
        mine = [i for i, ranks in enumerate(self.topology.feeders) if ranks[0] == self.rank]
        addresses = {i: rendezvous_address() for i in mine}
        everyone = [None] * len(self._feeders)
        dist.all_gather_object(
            everyone, {i: (host, port) for i, (host, port, _) in addresses.items()}, group=self._feed_group
        )
        futures = []
        if self.fleet is not None:
            merged = {i: address for part in everyone for i, address in part.items()}
            futures = [self.fleet.submit(i, "init_nccl", *merged[i], 1, world) for i in sorted(merged)]
        for communicator in (self._nccl or {}).values():  # an engine restarted: its old group is gone
            communicator.destroy()
        # blocks until the engine's workers joined
        self._nccl = {i: trainer_communicator(host, port, world, sock) for i, (host, port, sock) in addresses.items()}
        self._nccl_stale = False
        if futures:
            self.fleet.wait(futures)

    # ------------------------------------------------------------------------------- recovery

    def _rollback(self, skip: list[int] = ()) -> None:
        for i in range(len(self.fleet.engines)):
            if i in skip:
                continue
            try:
                self._resync_engine(i)
            except Exception:  # a dead engine is restarted (and re-synced) by the fleet on next use
                logger.exception("rollback of engine %d failed", i)

    def _resync_engine(self, i: int) -> None:
        """Loads the last good version into engine i (after a restart or a failed sync) from its own node's
        snapshot; version 0 is the checkpoint the engines were started from."""
        node = self._engine_node(i)
        self._nccl_stale = self.transport == "nccl"  # a new engine process has no NCCL group yet
        self.fleet.call_one(i, "set_staging", str(self._node_dir(node)))
        self.fleet.call_one(i, "abort_sync")  # a failed sync's half-open reload session, if any
        if self.version == 0:
            self.fleet.call_one(i, "reload_from_disk")
        elif not self.snapshot.get(node):
            raise SyncError(f"no snapshot of version {self.version} on engine {i}'s node {node}")
        for bucket in self.snapshot.get(node, []):
            self.fleet.call_one(i, "load_shared", bucket.path, bucket.manifest)
        self.fleet.call_one(i, "finish_sync", self.version)

    def close(self) -> None:
        """Removes this run's staging files (collective)."""
        dist.barrier()
        if self.fleet is not None and self.transport != "shm":
            for i in self._snapshot_writers():  # both slots of the node's snapshot, on the node
                try:
                    self.fleet.call_one(i, "clear_staging")
                except Exception:  # a dead engine: its node's files go with the next run's stale cleanup
                    logger.exception("engine %d could not clear its node's staging", i)
        for path in list(self._mapped):
            del self._mapped[path]
            Path(path).unlink(missing_ok=True)
        dist.barrier()
        if self.transport == "shm" and self.node in self.topology.staging_nodes():
            with contextlib.suppress(OSError):  # another rank of the node removes it, or it was never made
                self._node_dir(self.node).rmdir()
        self.snapshot = {}

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
