"""Weight files on disk, safely: atomic writes, a content hash in every file, verified ``weights_only`` loads.

Writing goes to a temporary file beside the target, is fsynced, then ``os.replace``-d over it (atomic on
POSIX), so a crash or a SIGKILL during a save leaves the previous file intact. A failed write (disk full,
no permission, a file where a folder should be) is a :class:`~kdgraph.errors.CheckpointError` naming the
path and the OS's reason, and leaves nothing half-written. Loading never unpickles code.

Integrity: ``torch.load`` does not check the zip CRCs, so rotted bytes would load. Every file kdgraph
writes carries a sha256 over the sorted key paths, dtypes, shapes and bytes of every tensor and the value
of every other entry (:func:`content_hash`, nothing skipped): a kdgraph checkpoint (a dict marked with
``CHECKPOINT_MARK``) holds it under ``HASH_KEY``; a plain state_dict (an export, a cached pretrained
network) cannot hold a foreign key without breaking ``load_state_dict(strict=True)``, so its hash is in a
sidecar file ``<file>.sha256``; a ``.safetensors`` file holds it in its metadata header. :func:`load_file`
verifies it and refuses a mismatch naming the file. Files written before this check (no hash, no sidecar)
and plain state_dicts from elsewhere still load, unverified.

This is the core's: ``Distiller.load_weights`` reads weight files with it; the trainer's checkpoints
(:mod:`kdgraph.train.checkpoint`) are written and read through it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Union

import torch

from ..errors import CheckpointError

__all__ = ["HASH_KEY", "SIDECAR", "CHECKPOINT_MARK", "file_sha256", "content_hash", "write_atomic", "atomic_save",
           "save_safetensors", "verify", "load_file", "brief"]

CHECKPOINT_MARK = "kdgraph_checkpoint"  # the key that makes a saved dict a kdgraph checkpoint (its format number)

HASH_KEY = "kdgraph_sha256"
SIDECAR = ".sha256"


def _leaves(obj: Any, path: tuple[str, ...], out: list[tuple[tuple[str, ...], Any]]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _leaves(v, path + (f"{type(k).__name__}:{k}",), out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _leaves(v, path + (f"[{i}]",), out)
    else:
        out.append((path, obj))


def file_sha256(path: Union[str, Path]) -> str:
    """sha256 (hex) of the whole file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 << 20), b""):
            h.update(block)
    return h.hexdigest()


def content_hash(obj: Any) -> str:
    """sha256 (hex) over every entry of ``obj`` in sorted key-path order: for a tensor its dtype, shape and
    bytes, for anything else its type and ``repr``. The top-level ``HASH_KEY`` entry is left out."""
    leaves: list[tuple[tuple[str, ...], Any]] = []
    if isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if k != HASH_KEY}
    _leaves(obj, (), leaves)
    h = hashlib.sha256()
    for path, v in sorted(leaves, key=lambda item: item[0]):
        h.update(repr(path).encode())
        if isinstance(v, torch.Tensor):
            t = v.detach().to("cpu").contiguous()
            h.update(f"|{t.dtype}|{tuple(t.shape)}|".encode())
            if t.numel():
                h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        else:
            h.update(f"|{type(v).__name__}|{v!r}|".encode())
    return h.hexdigest()


def _is_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and CHECKPOINT_MARK in obj


def _os_reason(e: BaseException) -> str:
    if isinstance(e, OSError):
        return f"{e.strerror or type(e).__name__}" + (f" (errno {e.errno})" if e.errno else "")
    return brief(e, 200)


def _write_error(path: Path, e: BaseException) -> CheckpointError:
    return CheckpointError(f"cannot write {str(path)!r}: {_os_reason(e)}. Nothing was written there (a previous "
                           f"file, if any, is intact); check that the folder is writable, is not a file, and that "
                           f"the disk has space.")


def write_atomic(path: Path, write: Callable[[Any], Any]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync, ``os.replace``; OS errors ->
    :class:`CheckpointError` with the temporary file removed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # RuntimeError: torch's C++ writer ("file write failed")
        raise _write_error(path, e) from None
    finally:
        try:
            if tmp.exists():
                tmp.unlink()
        except OSError:
            pass


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync it, then ``os.replace`` it over ``path``:
    readers see the old file or the new one, never a partial one. A kdgraph checkpoint gets its content
    hash inside; any other object (a plain state_dict) in the sidecar ``<path>.sha256``."""
    path = Path(path)
    digest = content_hash(obj)
    if _is_checkpoint(obj):
        obj = dict(obj, **{HASH_KEY: digest})
    write_atomic(path, lambda f: torch.save(obj, f))
    sidecar = path.with_name(path.name + SIDECAR)
    if _is_checkpoint(obj):
        if sidecar.exists():
            sidecar.unlink()
    else:
        write_atomic(sidecar, lambda f: f.write(f"{digest}  {path.name}\n".encode()))


def save_safetensors(sd: dict[str, torch.Tensor], path: str | Path) -> None:
    """A state_dict as ``.safetensors`` (no code, a checked format), its content hash in the metadata."""
    from safetensors.torch import save

    path = Path(path)
    data = save(sd, metadata={HASH_KEY: content_hash(sd)})
    write_atomic(path, lambda f: f.write(data))


def _mismatch(p: Path, what: str, where: str) -> CheckpointError:
    return CheckpointError(f"{what} {str(p)!r} is corrupt: its content does not match the sha256 stored {where} "
                           f"(bytes changed since kdgraph wrote it). It was not used; restore it from a copy or "
                           f"use another checkpoint.")


def verify(obj: Any, p: Path, what: str = "checkpoint") -> Any:
    """Check ``obj`` (loaded from ``p``) against its stored hash, if it has one; returns it without the hash."""
    if isinstance(obj, dict) and HASH_KEY in obj:
        if obj[HASH_KEY] != content_hash(obj):
            raise _mismatch(p, what, "inside it")
        return {k: v for k, v in obj.items() if k != HASH_KEY}
    sidecar = p.with_name(p.name + SIDECAR)
    if sidecar.is_file():
        try:
            stored = sidecar.read_text().split()[0]
        except (OSError, UnicodeDecodeError, IndexError):
            stored = ""
        if stored != content_hash(obj):
            raise _mismatch(p, what, f"in {sidecar.name}")
    return obj


def load_file(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` (or safetensors) on CPU, verified against its content hash,
    with a :class:`CheckpointError` for any problem."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{what} {str(p)!r} does not exist")
    if p.suffix == ".safetensors":
        return _load_safetensors(p, what)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, not a torch file, or holds code
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{what} {str(p)!r} cannot be read ({first}). It may be truncated or not a "
                              f"torch file; kdgraph reads checkpoints with weights_only=True, so files that "
                              f"hold pickled code are refused.") from None
    return verify(obj, p, what)


def _load_safetensors(p: Path, what: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    from safetensors.torch import load_file as st_load

    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        sd = st_load(str(p), device="cpu")
    except Exception as e:  # noqa: BLE001 - a damaged header or data
        raise CheckpointError(f"{what} {str(p)!r} cannot be read as safetensors ({brief(e, 200)})") from None
    if HASH_KEY in meta and meta[HASH_KEY] != content_hash(sd):
        raise _mismatch(p, what, "in its metadata")
    return sd


def brief(err: BaseException, limit: int = 400) -> str:
    """The gist of a (long) load_state_dict error: its lines joined, cut at ``limit`` characters."""
    text = " ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())
    return text if len(text) <= limit else text[:limit] + " ..."
