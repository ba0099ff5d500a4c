"""Checkpoints: written atomically, read with ``weights_only=True``, holding everything to resume exactly.

A checkpoint is a dict::

    {"kdgraph_checkpoint": 1, "spec": <the spec as plain data>, "spec_name": str,
     "distiller": distiller.state_dict(),        # student, teacher, adapters, loss state (e.g. CRD memories)
     "student": student.state_dict(),            # what `kdgraph export` writes
     "optimizer": ..., "scheduler": ..., "scaler": ...,   # of the stage in progress (None when absent)
     "rng": {"python": ..., "numpy": ..., "torch": ..., "cuda": [...]},
     "stage": name, "stage_index": i, "epoch": e, "step": steps done in epoch e, "epoch_done": bool,
     "global_step": n, "world_size": W, "samples_done": images of epoch e consumed (all ranks),
     "best_top1": float | None, "history": [eval records]}

Writing goes to ``<path>.tmp`` then ``os.replace`` (atomic on POSIX), so a crash or a SIGKILL during
a save leaves the previous file intact. Loading never unpickles code. A failed write (disk full, no
permission, a file where a folder should be) is a :class:`CheckpointError` naming the path and the OS's
reason, and leaves nothing half-written.

Integrity: ``torch.load`` does not check the zip CRCs, so rotted bytes would load. Every file kdgraph
writes carries a sha256 over the sorted key paths, dtypes, shapes and bytes of every tensor and the
value of every other entry (:func:`content_hash`, nothing skipped): a checkpoint holds it under
``"kdgraph_sha256"``; a plain state_dict (an export, a cached pretrained network) cannot hold a foreign
key without breaking ``load_state_dict(strict=True)``, so its hash is in a sidecar file ``<file>.sha256``;
a ``.safetensors`` export holds it in its metadata header. :func:`load_file` (resume, eval, export,
init_from, a model's ``weights``) verifies it and refuses a mismatch naming the file.

Note: files written before this check (no hash, no sidecar) and plain state_dicts from elsewhere still
load, unverified, as before.
"""
from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..errors import CheckpointError

FORMAT = 1


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
    return isinstance(obj, dict) and "kdgraph_checkpoint" in obj


def _os_reason(e: BaseException) -> str:
    if isinstance(e, OSError):
        return f"{e.strerror or type(e).__name__}" + (f" (errno {e.errno})" if e.errno else "")
    return brief(e, 200)


def _write_error(path: Path, e: BaseException) -> CheckpointError:
    return CheckpointError(f"cannot write {str(path)!r}: {_os_reason(e)}. Nothing was written there (a previous "
                           f"file, if any, is intact); check that the folder is writable, is not a file, and that "
                           f"the disk has space.")


def _write_atomic(path: Path, write: Any) -> None:
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
    _write_atomic(path, lambda f: torch.save(obj, f))
    sidecar = path.with_name(path.name + SIDECAR)
    if _is_checkpoint(obj):
        if sidecar.exists():
            sidecar.unlink()
    else:
        _write_atomic(sidecar, lambda f: f.write(f"{digest}  {path.name}\n".encode()))


def save_safetensors(sd: dict[str, torch.Tensor], path: str | Path) -> None:
    """A state_dict as ``.safetensors`` (no code, a checked format), its content hash in the metadata."""
    from safetensors.torch import save

    path = Path(path)
    data = save(sd, metadata={HASH_KEY: content_hash(sd)})
    _write_atomic(path, lambda f: f.write(data))


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


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A kdgraph checkpoint (see the module docstring)."""
    obj = load_file(path)
    if not isinstance(obj, dict) or "kdgraph_checkpoint" not in obj:
        raise CheckpointError(f"{str(path)!r} is not a kdgraph checkpoint (no 'kdgraph_checkpoint' key); a plain "
                              f"state_dict can be used as a spec's init_from or a model's weights instead")
    if obj["kdgraph_checkpoint"] > FORMAT:
        raise CheckpointError(f"{str(path)!r} was written by a newer kdgraph (format {obj['kdgraph_checkpoint']})")
    return obj


def brief(err: BaseException, limit: int = 400) -> str:
    """The gist of a (long) load_state_dict error: its lines joined, cut at ``limit`` characters."""
    text = " ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())
    return text if len(text) <= limit else text[:limit] + " ..."


def student_state_dict(obj: Any, path: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The student's weights from a kdgraph checkpoint, or the dict itself when it is a plain state_dict
    (also ``{"state_dict": ...}`` / ``{"model": ...}``)."""
    if isinstance(obj, dict) and "kdgraph_checkpoint" in obj:
        sd = obj.get("student")
        if isinstance(sd, dict):
            return sd
        dist = obj.get("distiller") or {}
        sd = {k[len("student."):]: v for k, v in dist.items() if k.startswith("student.")}
        if sd:
            return sd
        raise CheckpointError(f"{path}: kdgraph checkpoint without student weights")
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "student"):
            if isinstance(obj.get(key), dict):
                return obj[key]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise CheckpointError(f"{path} holds no state_dict (expected a kdgraph checkpoint or a dict of tensors)")


def clean_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain contiguous CPU tensors; ``module.`` / ``_orig_mod.`` prefixes (DDP, torch.compile) removed."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v.detach().to("cpu").contiguous() if isinstance(v, torch.Tensor) else v
    return out


# --------------------------------------------------------------------------------------------
# RNG states
# --------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """python, numpy, torch (and CUDA) generator states, as types ``weights_only`` loading accepts."""
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    out: dict[str, Any] = {
        "python": [version, list(state), gauss],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: Optional[dict[str, Any]]) -> None:
    if not state:
        return
    version, st, gauss = state["python"]
    random.setstate((version, tuple(st), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
