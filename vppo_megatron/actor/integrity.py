"""A checkpoint's files, checked: a manifest of every file's size and CRC32 written with the checkpoint and
verified before it loads, torch.distributed.checkpoint's shard sizes for checkpoints without one, and the hidden
temporary directories of killed writers removed. A damaged file is named in one line, never loaded.

The CRC of a file is computed by one rank (files dealt round-robin over the ranks) right after the save, while
the bytes are still in the page cache: the cost is one read of the checkpoint spread over the job.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import zlib
from pathlib import Path

MANIFEST = "vppo_files.json"
CHUNK = 16 * 2**20


class DamagedCheckpoint(ValueError):
    """A checkpoint file is missing, truncated or altered since the save."""


def crc32(path: Path) -> int:
    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            value = zlib.crc32(chunk, value)
    return value


def _files(ckpt_dir: Path) -> list[str]:
    """The checkpoint's files but the manifest."""
    return sorted(str(p.relative_to(ckpt_dir)) for p in ckpt_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def _dealt(names: list[str]) -> list[str]:
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return names[rank::world]


def _gather(part):
    import torch.distributed as dist

    if not dist.is_initialized():
        return [part]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, part)
    return everyone


def write_manifest(ckpt_dir: str | Path) -> None:
    """Records every file's size and CRC32 in MANIFEST (collective; rank 0 writes it)."""
    import torch.distributed as dist

    ckpt_dir = Path(ckpt_dir)
    if dist.is_initialized():
        dist.barrier()  # every rank lists the same files: all of them written
    names = _files(ckpt_dir)
    mine = {n: [(ckpt_dir / n).stat().st_size, crc32(ckpt_dir / n)] for n in _dealt(names)}
    merged = {k: v for part in _gather(mine) for k, v in part.items()}
    if not dist.is_initialized() or dist.get_rank() == 0:
        (ckpt_dir / MANIFEST).write_text(json.dumps({"files": merged}, indent=1, sort_keys=True) + "\n")


def verify(ckpt_dir: str | Path) -> None:
    """Every file of the manifest is there with its size and CRC32 (collective: each rank checks its share, every
    rank raises the same DamagedCheckpoint naming the first damaged file). A checkpoint written before manifests
    existed gets the shard-size check."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / MANIFEST
    if not path.exists():
        check_distcp(ckpt_dir, dcp_metadata(ckpt_dir))
        return
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError) as exc:
        raise DamagedCheckpoint(f"{path} is unreadable ({type(exc).__name__}): the copy is damaged") from None
    problems = [p for p in (_problem(ckpt_dir / n, *files[n]) for n in _dealt(sorted(files))) if p]
    found = sorted(p for part in _gather(problems) for p in part)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise DamagedCheckpoint(found[0] + more)


def _problem(path: Path, size: int, checksum: int) -> str | None:
    if not path.exists():
        return f"{path} is missing from the checkpoint"
    actual = path.stat().st_size
    if actual != size:
        return f"{path}: {actual} bytes, the checkpoint wrote {size}: truncated or replaced"
    if crc32(path) != checksum:
        return f"{path}: its CRC32 differs from the one written with the checkpoint: the file is corrupted"
    return None


def dcp_metadata(ckpt_dir: str | Path):
    """torch.distributed.checkpoint's metadata of a Megatron checkpoint (the `.metadata` file megatron-core's
    torch_dist format writes), or a clear error."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(str(ckpt_dir)).read_metadata()
    except FileNotFoundError:
        raise DamagedCheckpoint(f"{ckpt_dir}/.metadata is missing: the checkpoint's save was interrupted") from None
    except Exception as exc:
        raise DamagedCheckpoint(
            f"{ckpt_dir}/.metadata is unreadable ({type(exc).__name__}); the copy is damaged"
        ) from None


def check_distcp(ckpt_dir: str | Path, metadata) -> None:
    """Every shard file the checkpoint's metadata points into exists and holds the bytes it is read from."""
    ckpt_dir = Path(ckpt_dir)
    need: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, nbytes in sorted(need.items()):
        path = ckpt_dir / name
        if not path.exists():
            raise DamagedCheckpoint(f"{path} is missing: the checkpoint's metadata reads {nbytes} bytes from it")
        size = path.stat().st_size
        if size < nbytes:
            raise DamagedCheckpoint(
                f"{path}: truncated checkpoint shard ({size} bytes, the checkpoint's metadata reads {nbytes}); "
                "the copy or the save was interrupted"
            )


TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-(?:p(?P<pid>\d+)-)?[0-9a-f]{8}$")


def remove_stale_temporaries(out_dir: str | Path, any_name: bool = False) -> None:
    """Removes the hidden temporary directories that killed writers left next to `out_dir` (their writer process
    is gone; `any_name`: those of every sibling, not only of `out_dir`), with a one-line note; a live writer's is
    kept."""
    out_dir = Path(out_dir)
    removed, nbytes = 0, 0
    if not out_dir.parent.is_dir():
        return
    for path in out_dir.parent.glob(".*.tmp-*" if any_name else f".{out_dir.name}.tmp-*"):
        match = TEMPORARY.match(path.name)
        if not match or not (any_name or match["name"] == out_dir.name) or not path.is_dir():
            continue
        if match["pid"] and _alive(int(match["pid"])):
            continue
        nbytes += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    if removed:
        where = f"in {out_dir.parent}" if any_name else f"next to {out_dir}"
        print(
            f"note: removed {removed} temporary director{'y' if removed == 1 else 'ies'} of killed runs {where} "
            f"({nbytes / 2**20:.1f} MiB)",
            file=sys.stderr,
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
