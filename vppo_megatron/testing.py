"""Run a function on N gloo ranks in their own processes and collect each rank's return value (tests, benchmarks).

`run_distributed(fn, world_size, *args)` starts `world_size` processes, initialises a gloo process group on a
free loopback port (CUDA tensors over NCCL where each rank has a GPU of its own), calls `fn(rank, world_size,
*args)` and returns the list of return values by rank. A failing rank's traceback is re-raised in the caller; a
hung run is killed after `timeout_s`.

Ranks are fresh processes (vppo_megatron/processes.py): forked from one forkserver that imported torch, Megatron
and transformers once, or spawned on a CUDA host. The server's environment is the one of the moment it started, so
each rank takes the caller's environment of the moment of the call (a Ray cluster started later, with its auth
token, is reachable from the ranks). On a CUDA host with a GPU per rank, CUDA tensors go over NCCL as in the
trainer; with fewer GPUs than ranks the ranks see none and run on the host (gloo cannot carry device tensors
between ranks that share one GPU). A rank that dies without reporting (a crash, a kill) fails the run at once
with its exit code.
"""

from __future__ import annotations

import faulthandler
import io
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from vppo_megatron.processes import HOST_AND_DEVICE_BACKEND, cuda_hidden, fresh_process_context

# imported once by the forkserver; a rank that needs more imports it itself
PRELOAD = ("torch", "torch.distributed", "megatron.core", "transformers", "vppo_megatron.actor.engine")
DEAD_RANK_GRACE_S = 5.0  # a rank's result can still be in the pipe when its process has exited


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results, environ: dict) -> None:
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)  # N ranks share 2 cores: oversubscribed intra-op threads only slow gloo down
    faulthandler.enable()  # a rank killed by a signal (SIGSEGV, SIGABRT) prints its Python stack first
    try:
        backend = "gloo"
        if torch.cuda.is_available():  # one GPU per rank (as torchrun's LOCAL_RANK); else CUDA is hidden
            torch.cuda.set_device(rank)
            backend = HOST_AND_DEVICE_BACKEND
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        # bytes, not tensors: torch's queue would share tensor storage with a process that is about to exit
        buffer = io.BytesIO()
        torch.save(fn(rank, world_size, *args), buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout_s: float = 300.0) -> list[Any]:
    ctx = fresh_process_context(PRELOAD)
    results = ctx.Queue()
    share_a_gpu = torch.cuda.is_available() and world_size > torch.cuda.device_count()
    port = free_port()
    environ = dict(os.environ)  # the caller's, now: the forkserver's may be older
    if share_a_gpu:  # in the environment a rank starts with, and in the one it takes on
        environ["CUDA_VISIBLE_DEVICES"] = ""
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results, environ)) for r in range(world_size)
    ]
    with cuda_hidden(share_a_gpu):
        for p in procs:
            p.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    dead_since: dict[int, float] = {}
    try:
        while len(out) < world_size:
            try:
                rank, status, value = results.get(timeout=1.0)
            except queue.Empty:
                now = time.monotonic()
                if now > deadline:
                    raise TimeoutError(f"distributed run did not finish in {timeout_s}s") from None
                for r, p in enumerate(procs):
                    dead = r not in out and p.exitcode is not None
                    if dead and now - dead_since.setdefault(r, now) > DEAD_RANK_GRACE_S:
                        raise RuntimeError(f"rank {r} exited with code {p.exitcode} before reporting") from None
                continue
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            out[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(world_size)]
