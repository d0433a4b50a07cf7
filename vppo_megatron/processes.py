"""Fresh Python processes for work that must not share this one's torch.distributed or CUDA state (test ranks,
the rehearsal's stage builds).

On a host without CUDA they fork from one forkserver that imported the heavy libraries once (a spawned process
re-imports torch, Megatron and transformers: about 12 s of CPU each on 2 cores). On a CUDA host they are spawned:
those imports call torch.cuda.is_available(), which initialises the CUDA driver (cuInit) in the server, and a
process forked from one that did fails at its first CUDA call with "Cannot re-initialize CUDA in forked
subprocess". `cuda_hidden()` makes processes started inside it see no GPU at all (CUDA_VISIBLE_DEVICES=""), for
work meant to run on the host (the rehearsal) or ranks that would otherwise share one GPU over gloo.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Iterator, Sequence

import torch

# torch.distributed's backend for ranks with a GPU each: CUDA tensors over NCCL, host tensors over gloo (the
# trainer's advantage statistics and some metrics are reduced on the host; an NCCL-only group refuses them)
HOST_AND_DEVICE_BACKEND = "cpu:gloo,cuda:nccl"


def fresh_process_context(preload: Sequence[str]) -> multiprocessing.context.BaseContext:
    """A context for fresh processes: spawn on a CUDA host, else a forkserver that imports `preload` first."""
    if torch.cuda.is_available():  # this process may initialise CUDA: it never forks
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))  # takes effect when the server starts (the first call)
    return ctx


@contextlib.contextmanager
def cuda_hidden(hide: bool = True) -> Iterator[None]:
    """Processes started (spawned) inside see no CUDA device; this process's own CUDA state is untouched (the
    driver reads the variable once, at its initialisation). `hide=False`: no change."""
    if not hide:
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before
