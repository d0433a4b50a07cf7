"""The weight sync's shared-memory staging, shared by the trainer side (sync/weight_sync.py) and the engines
(rollout/extension.py): flat bucket layouts, files mapped once and rewritten in place, and the removal of files that
dead writers left behind.

Layout on a node: one directory per run and node, `/dev/shm/vppo-sync-<run id>-node<k>/`, holding files named
`p<writer pid>-s<slot>-...`; a file whose writer pid is gone is stale.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")


STAGING_PREFIX = "vppo-sync-"  # + run id + "-node<k>": one directory per node; files p<writer pid>-s<slot>-...
_WRITER_PID = re.compile(r"^(?:vppo-sync-[0-9a-f]+-)?p(\d+)-")


def stale_staging(directory: Path = SHM_DIR) -> list[Path]:
    """The sync staging files under `directory` whose writer process is gone from this host (a killed or crashed
    run leaves its last version in shared memory: the whole model, held in RAM until the host reboots). A file
    whose writer pid is alive (this run, another live run, or a pid reused since) is not stale."""
    out = []
    for path in directory.glob(f"{STAGING_PREFIX}*"):
        for item in path.iterdir() if path.is_dir() else [path]:
            match = _WRITER_PID.match(item.name)
            if match is not None and not _alive(int(match.group(1))):
                out.append(item)
    return out


def remove_stale_staging(directory: Path = SHM_DIR) -> tuple[int, int]:
    """Removes `stale_staging` files (and staging directories left empty); returns (files, bytes) removed."""
    files = nbytes = 0
    for path in stale_staging(directory):
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:  # another rank of this host removed it first
            continue
        files, nbytes = files + 1, nbytes + size
        if path.parent != directory:
            with contextlib.suppress(OSError):  # not empty: live files of its run
                path.parent.rmdir()
    return files, nbytes


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@dataclass
class SharedBucket:
    path: str
    manifest: list = field(default_factory=list)
    """(name, dtype, shape, offset, nbytes) per tensor."""


def layout_of(tensors: list[tuple[str, torch.Tensor]]) -> tuple[list, int]:
    """The packed layout of a bucket: (name, dtype, shape, offset, nbytes) per tensor, and the total bytes."""
    manifest, offset = [], 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        manifest.append((name, str(t.dtype).removeprefix("torch."), list(t.shape), offset, nbytes))
        offset += nbytes
    return manifest, offset


def pack(tensors: list[tuple[str, torch.Tensor]], manifest: list, raw: torch.Tensor) -> None:
    """Copies each tensor's bytes into its place in the flat uint8 buffer `raw` (host, mapped or device)."""
    for (_, t), (_, _, _, start, nbytes) in zip(tensors, manifest):
        if nbytes:
            raw[start : start + nbytes].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))


def map_file(path: Path, nbytes: int, mapped: dict | None = None) -> torch.Tensor:
    """A uint8 tensor over the shared-memory file at `path`, sized to `nbytes` (created or resized in place, so
    its inode, and the engines' mappings of it, stay). `mapped` caches this process's mappings by path: a file
    rewritten every other sync is mapped, and its pages faulted in, once."""
    key = str(path)
    if nbytes == 0:
        Path(path).write_bytes(b"")
        return torch.empty(0, dtype=torch.uint8)
    if mapped is not None and key in mapped and mapped[key].numel() == nbytes:
        return mapped[key]
    with open(path, "ab") as f:  # created if missing, never truncated to zero first
        f.truncate(nbytes)
    raw = torch.from_file(key, shared=True, size=nbytes, dtype=torch.uint8)
    if mapped is not None:
        mapped[key] = raw
    return raw


def write_shared_bucket(path: Path, tensors: list[tuple[str, torch.Tensor]], mapped: dict | None = None):
    """Packs `tensors` straight into a shared-memory file at `path`: the file is sized and mapped, and each
    tensor's bytes are copied into their place once (from host or device memory). Nothing is exported to numpy, so
    the actor's storages stay resizable (a replicated weight arrives here as a view of the actor's own buffer,
    which the lifecycle must be able to release while the engines generate)."""
    manifest, total = layout_of(tensors)
    pack(tensors, manifest, map_file(path, total, mapped))
    return SharedBucket(str(path), manifest)
