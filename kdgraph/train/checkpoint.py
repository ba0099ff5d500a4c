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
a save leaves the previous file intact. Loading never unpickles code.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..errors import CheckpointError

FORMAT = 1


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync it, then ``os.replace`` it over ``path``:
    readers see the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_file(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on CPU with a :class:`CheckpointError` for any problem."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{what} {str(p)!r} does not exist")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, not a torch file, or holds code
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{what} {str(p)!r} cannot be read ({first}). It may be truncated or not a "
                              f"torch file; kdgraph reads checkpoints with weights_only=True, so files that "
                              f"hold pickled code are refused.") from None


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
