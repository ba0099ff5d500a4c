"""Sharded checkpoints of a (FSDP2-sharded or plain) Distiller and its optimizer with ``torch.distributed.checkpoint``.

    sharded_checkpoint.save("runs/x/step-200", d, opt, extra={"step": 200})   # every rank, collectively
    extra = sharded_checkpoint.load("runs/x/step-200", d, opt)                 # any number of processes

Each rank writes its own shards (DCP's ``__R_0.distcp`` files plus ``.metadata``) into a temporary folder beside the
target; rank 0 then records every file's size and sha256 in ``manifest.json`` and renames the folder into place, so
a run folder is either complete or absent. Loading verifies the manifest first (a missing, truncated or changed
shard is refused naming the file) and then lets DCP re-shard the tensors for the current processes: a checkpoint
written by 2 processes loads into 1 (a plain, unsharded distiller) or into 2 (sharded). Keys are the distiller's
fully qualified names (``student.layer1.0.conv1.weight``), the optimizer's state keyed by them too.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch.distributed as dist
from torch import nn

from ..errors import CheckpointError
from ..models.weightio import file_sha256

__all__ = ["save", "load", "verify", "read_student", "is_sharded_checkpoint", "MANIFEST"]

MANIFEST = "manifest.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _state(model: nn.Module, optimizer: Optional[Any]) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def save(folder: str | Path, model: nn.Module, optimizer: Optional[Any] = None,
         extra: Optional[dict[str, Any]] = None, write_files: Optional[Callable[[Path], None]] = None) -> Path:
    """Write ``model`` (and ``optimizer``) into ``folder``; all processes call it. Returns the folder.

    ``write_files(tmp)``: rank 0 writes more files into the folder before the manifest (so they are verified like
    the shards; ``kdgraph train`` puts its ``trainer.pt`` there)."""
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    tmp = folder.parent / f".{folder.name}.tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
    _barrier()
    dcp.save(_state(model, optimizer), checkpoint_id=str(tmp))
    _barrier()
    if _rank() == 0:
        if write_files is not None:
            write_files(tmp)
        files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(tmp.iterdir())}
        manifest = {"format": "kdgraph-sharded-checkpoint", "version": 1,
                    "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                    "optimizer": optimizer is not None, "files": files, "extra": extra or {}}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        old = folder.parent / f".{folder.name}.old"
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return folder


def verify(folder: str | Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint folder; :class:`CheckpointError` naming what is missing or changed."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a complete sharded checkpoint: {MANIFEST} is missing (a save that "
                              f"did not finish leaves no folder; this one was made or changed by something else)")
    manifest = json.loads(path.read_text())
    for name, want in manifest["files"].items():
        f = folder / name
        if not f.is_file():
            raise CheckpointError(f"sharded checkpoint {folder}: shard file {name} is missing (written by "
                                  f"{manifest['world_size']} process(es); every file of {MANIFEST} is needed)")
        if f.stat().st_size != want["bytes"] or file_sha256(f) != want["sha256"]:
            raise CheckpointError(f"sharded checkpoint {folder}: shard file {name} differs from what was written "
                                  f"({f.stat().st_size} bytes, {want['bytes']} recorded; or another sha256): "
                                  f"truncated or changed")
    return manifest


def load(folder: str | Path, model: nn.Module, optimizer: Optional[Any] = None) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save` (by any number of processes) into ``model`` / ``optimizer``,
    re-sharded for the current ones; returns its ``extra``. All processes call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    manifest = verify(folder)
    if optimizer is not None and not manifest["optimizer"]:
        raise CheckpointError(f"sharded checkpoint {folder} holds no optimizer state; load it without an optimizer")
    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=state["model"],
                   optim_state_dict=state.get("optim", {}))
    return manifest["extra"]


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by :func:`save` (it holds ``manifest.json``)."""
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def read_student(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """One process, no model needed: the student's full tensors (``student.`` prefix removed) gathered from every
    shard of a verified checkpoint, and the checkpoint's ``extra`` (``kdgraph export`` writes them as one file)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    manifest = verify(folder)
    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=FileSystemReader(str(folder)),
                     planner=_EmptyStateDictLoadPlanner(keys={"model"}), no_dist=True)
    model = state["model"]
    student = {k[len("student."):]: v for k, v in model.items() if k.startswith("student.")}
    if not student:
        raise CheckpointError(f"sharded checkpoint {folder} holds no student tensors (keys 'student.*')")
    return student, manifest["extra"]
