"""Who feeds which rollout engine during a weight sync, and what each trainer rank holds while it does.

Node-local sync: every engine receives its weights from trainer ranks on its own node, one bucket at a time.
Per pipeline stage, every rank of the stage holds the stage's full tensors one at a time (the TP all-gather of
`stage_hf_tensors`), so a rank that needs a bucket packs it itself when it belongs to the stage, and otherwise
receives the packed bucket from the stage's writer (TP = CP = DP rank 0), which broadcasts it to exactly those
ranks. No rank ever holds more than the bucket it packs or receives plus the one the engines are still loading.

Who needs the buckets, per transport:
- shm (CPU, one host or simulated nodes): each node that hosts an engine has its own staging directory; one rank
  of the node writes every bucket there (a rank of the stage on that node, else the node's first rank, which
  receives it), and the node's engines read only that directory. The files of the last good version are the
  node's rollback snapshot and the restart source of its engines.
- cuda_ipc (colocated GPU): every rank whose GPU carries an engine worker (all of them when engines fill the
  trainer's GPUs); each hands a CUDA IPC handle of its bucket to the worker on its own GPU (matched by GPU UUID
  at run time; the plan below assumes engines packed on consecutive GPUs, as Ray's placement fills a node).
- nccl (disaggregated GPU): one feeder rank per engine, spread over the trainer's nodes; it broadcasts each
  bucket to its engine's workers over a NCCL group of its own.
Nodes are consecutive blocks of `ranks_per_node` ranks (torchrun's numbering).
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class SyncTopology:
    transport: str
    tp: int
    cp: int
    dp: int
    pp: int
    ranks_per_node: int
    engine_tp: int
    engine_nodes: tuple[int | None, ...]
    """The trainer node engine i sits on (None: on rollout nodes of its own, disaggregated)."""
    feeders: tuple[tuple[int, ...], ...]
    """Per engine, the trainer ranks that hand it the buckets (per engine worker for cuda_ipc)."""

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    @property
    def nodes(self) -> int:
        return self.world // self.ranks_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def stage_of(self, rank: int) -> int:
        return rank // (self.tp * self.cp * self.dp)

    def stage_ranks(self, pp: int) -> range:
        size = self.tp * self.cp * self.dp
        return range(pp * size, (pp + 1) * size)

    def writer(self, pp: int) -> int:
        """The stage's TP = CP = DP rank 0 (megatron-core's tp-cp-ep-dp-pp rank order)."""
        return pp * self.tp * self.cp * self.dp

    def node_ranks(self, node: int) -> range:
        return range(node * self.ranks_per_node, (node + 1) * self.ranks_per_node)

    def staging_nodes(self) -> list[int]:
        """shm: the nodes whose staging directory engines read."""
        return sorted({n for n in self.engine_nodes if n is not None})

    def node_writer(self, pp: int, node: int) -> int:
        """shm: the rank that writes stage pp's buckets into `node`'s staging directory: a rank of the stage on
        that node (it holds the tensors already), else the node's first rank (it receives them)."""
        local = [r for r in self.stage_ranks(pp) if self.node_of(r) == node]
        return local[0] if local else self.node_ranks(node)[0]

    def needs(self, pp: int) -> list[int]:
        """The ranks that must hold each of stage pp's buckets in full."""
        if self.transport == "shm":
            return sorted({self.node_writer(pp, n) for n in self.staging_nodes()})
        return sorted({r for ranks in self.feeders for r in ranks})

    def receivers(self, pp: int) -> list[int]:
        """The ranks that get stage pp's buckets from the stage's writer (they do not belong to the stage)."""
        stage = self.stage_ranks(pp)
        return [r for r in self.needs(pp) if r not in stage]

    def rank_peak_buckets(self, rank: int) -> int:
        """How many buckets' worth of full tensors a rank holds at most during a sync: the one it assembles or
        receives and, on GPU, the one the engines are still loading (double buffer); a rank of a stage also
        holds the bucket's gathered tensors while it packs them."""
        needs = any(rank in self.needs(pp) for pp in range(self.pp))
        writes = any(rank == self.writer(pp) and self.receivers(pp) for pp in range(self.pp))
        if not (needs or writes):
            return 0
        packs = rank in self.needs(self.stage_of(rank)) or writes
        return (2 if self.transport != "shm" else 1) + (1 if packs else 0)

    def describe(self, bucket_bytes: float, model_bytes: float) -> list[str]:
        """Lines for the dry run: which ranks feed which engines on which node, what crosses nodes, and the most
        any rank holds (never the full model unless one bucket is the full model)."""
        lines = [
            f"weight sync ({self.transport}): {len(self.engine_nodes)} engines, {self.nodes} trainer nodes of "
            f"{self.ranks_per_node} ranks, buckets of up to {bucket_bytes / GIB:.2f} GiB "
            "(rollout.sync_bucket_mb, or the largest whole unit: a layer, the embedding)"
        ]
        by_node: dict[int | None, list[int]] = {}
        for i, node in enumerate(self.engine_nodes):
            by_node.setdefault(node, []).append(i)
        for node, engines in sorted(by_node.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
            where = "rollout nodes" if node is None else f"node {node}"
            feeds = "; ".join(f"engine {i} <- ranks {_ranges(self.feeders[i])}" for i in engines[:4])
            more = f"; ... ({len(engines)} engines)" if len(engines) > 4 else ""
            lines.append(f"  {where}: {feeds}{more}")
        for pp in range(self.pp):
            recv = self.receivers(pp)
            across = sorted({self.node_of(r) for r in recv} - {self.node_of(self.writer(pp))})
            passed = f"passed by rank {self.writer(pp)} to ranks {_ranges(recv)}" if recv else "not passed on"
            lines.append(
                f"  stage {pp} (ranks {_ranges(self.stage_ranks(pp))}): buckets {passed}"
                + (f" (crossing to nodes {_ranges(across)})" if across else "")
            )
        peak = max(self.rank_peak_buckets(r) for r in range(self.world)) * bucket_bytes
        lines.append(
            f"  most any rank holds during a sync: {peak / GIB:.2f} GiB ({peak / max(model_bytes, 1):.1%} of the "
            f"{model_bytes / GIB:.1f} GiB model)"
        )
        return lines


def _ranges(values) -> str:
    values = sorted(values)
    if not values:
        return "none"
    out, start, prev = [], values[0], values[0]
    for v in values[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ",".join(out)


def plan(cfg, layout, transport: str, ranks_per_node: int | None = None) -> SyncTopology:
    """The sync topology of a run: `layout` the actor's ParallelLayout, `transport` resolved (shm, cuda_ipc or
    nccl). Engines are placed as the fleet places them: colocated engines fill the trainer's GPUs in order
    (cuda_ipc) or spread one block per node (shm); disaggregated engines sit on rollout nodes."""
    from vppo_megatron.config import ConfigError

    r = cfg.rollout
    world = layout.world_size
    per_node = ranks_per_node or min(cfg.parallel.gpus_per_node, world)
    if world % per_node:
        raise ConfigError(
            f"parallel.gpus_per_node={per_node} does not divide the {world} trainer ranks: set it to the ranks "
            "torchrun starts per node"
        )
    nodes, engines, etp = world // per_node, r.num_engines, r.tensor_parallel_size
    if transport == "cuda_ipc":
        if engines * etp > world or per_node % etp:
            raise ConfigError(
                f"colocated engines need their GPUs among the trainer's: rollout.num_engines * "
                f"rollout.tensor_parallel_size = {engines * etp} on {world} trainer GPUs of {per_node} per node"
            )
        feeders = tuple(tuple(range(i * etp, (i + 1) * etp)) for i in range(engines))
        engine_nodes = tuple(f[0] // per_node for f in feeders)
    elif transport == "nccl":
        feeders = tuple((i * world // engines,) for i in range(engines))
        engine_nodes = (None,) * engines
    else:
        engine_nodes = tuple(i * nodes // engines for i in range(engines))
        feeders = tuple((n * per_node,) for n in engine_nodes)
    return SyncTopology(transport, layout.tp, layout.cp, layout.dp, layout.pp, per_node, etp, engine_nodes, feeders)
