"""A training checkpoint: the :class:`Checkpoint` dataclass, the one place that knows a checkpoint file's keys.

On disk a checkpoint is the dict ``torch.save`` writes (unchanged since format 1, so files written before
still load)::

    {"kdgraph_checkpoint": 1, "spec_name": str, "spec": <the spec as plain data>, "stage_names": [...],
     "distiller": distiller.state_dict(),        # student, teacher, adapters, loss state (e.g. CRD memories)
     "student": student.state_dict(),            # what `kdgraph export` writes
     "optimizer": ..., "scheduler": ..., "scaler": ...,   # of the stage in progress (None when absent)
     "ema": {"model": AveragedModel state, "steps": n} | None,  # stages[i].ema; "student" is then the EMA's
                                                                 # weights when ema.report is true
     "rng": [per process: {"python": ..., "numpy": ..., "torch": ..., "cuda": [...]}],
     "stage": name, "stage_index": i, "epoch": e, "step": steps done in epoch e, "epoch_done": bool,
     "stage_done": bool, "global_step": n, "world_size": W, "samples_done": images of epoch e consumed,
     "best_top1": float | None, "last_eval": {...} | None, "history": [eval records],
     "teacher_eval": {...} | None, "stage_results": {stage name: result}, "kdgraph_sha256": hex}

:meth:`Checkpoint.save` writes it atomically with its content hash inside, :meth:`Checkpoint.load` reads it
with ``weights_only=True`` and refuses a file whose bytes no longer match that hash (see
:mod:`kdgraph.models.weightio`); everything else reads the typed fields.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import CheckpointError
from ..models.weightio import (CHECKPOINT_MARK, HASH_KEY, atomic_save, brief, content_hash, load_file,  # noqa: F401
                        save_safetensors)
from ..models.weights import state_dict_of

__all__ = ["Checkpoint", "FORMAT", "load_checkpoint", "atomic_save", "load_file", "save_safetensors",
           "content_hash", "HASH_KEY", "brief"]

FORMAT = 1
_REQUIRED = ("spec_name", "stage_names", "distiller", "stage_index", "epoch", "step")

StateDict = dict[str, torch.Tensor]


@dataclass
class Checkpoint:
    """Everything needed to resume a run exactly where it was saved."""

    spec_name: str
    spec: dict[str, Any]  # the spec as plain data (model_dump(mode="json"))
    stage_names: list[str]
    distiller: StateDict  # Distiller.state_dict(): student, teacher, adapters, loss state
    student: StateDict  # the student alone, clean (what an export writes)
    stage: str  # where it was saved: the stage in progress ...
    stage_index: int
    epoch: int  # ... its epoch (0-based)
    step: int  # ... and the steps done in that epoch (0 at an epoch's end)
    epoch_done: bool = False
    stage_done: bool = False
    optimizer: Optional[dict[str, Any]] = None  # of the stage in progress
    scheduler: Optional[dict[str, Any]] = None
    scaler: Optional[dict[str, Any]] = None
    ema: Optional[dict[str, Any]] = None  # the student's EMA (StudentEMA.state_dict()), when the stage keeps one
    rng: list[dict[str, Any]] = field(default_factory=list)  # every process's generator states, by rank
    global_step: int = 0
    world_size: int = 1
    samples_done: int = 0  # images of the epoch in progress consumed, all processes together
    best_top1: Optional[float] = None  # of the stage in progress
    last_eval: Optional[dict[str, Any]] = None
    history: list[dict[str, Any]] = field(default_factory=list)  # every evaluation of the run
    teacher_eval: Optional[dict[str, Any]] = None
    stage_results: dict[str, dict[str, Any]] = field(default_factory=dict)  # finished stages, by name

    # ------------------------------------------------------------------ file
    def to_dict(self) -> dict[str, Any]:
        """The on-disk form (without its hash, which :meth:`save` adds)."""
        return {CHECKPOINT_MARK: FORMAT, **_fields_of(self)}

    @classmethod
    def from_dict(cls, obj: Any, path: str | Path = "checkpoint") -> "Checkpoint":
        """A checkpoint from its on-disk form (as :func:`kdgraph.models.weightio.load_file` returns it)."""
        if not isinstance(obj, dict) or CHECKPOINT_MARK not in obj:
            raise CheckpointError(f"{str(path)!r} is not a kdgraph checkpoint (no {CHECKPOINT_MARK!r} key); a "
                                  f"plain state_dict can be used as a spec's init_from or a model's weights instead")
        if not isinstance(obj[CHECKPOINT_MARK], int) or obj[CHECKPOINT_MARK] > FORMAT:
            raise CheckpointError(f"{str(path)!r} was written by a newer kdgraph (format {obj[CHECKPOINT_MARK]})")
        missing = [k for k in _REQUIRED if k not in obj]
        if missing:
            raise CheckpointError(f"{str(path)!r} is an incomplete kdgraph checkpoint (missing {', '.join(missing)})"
                                  f"; it cannot be resumed from, use another checkpoint")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in obj.items() if k in known}
        for k in ("rng", "history", "stage_results", "global_step", "world_size", "samples_done"):
            if values.get(k) is None:  # absent, or None from an older writer: the default
                values.pop(k, None)
        values["spec"] = values.get("spec") or {}
        values["stage"] = values.get("stage") or _name(obj["stage_names"], obj["stage_index"])
        if not isinstance(values.get("student"), dict):
            values["student"] = state_dict_of(obj, "student", str(path))
        return cls(**values)

    def save(self, path: str | Path) -> None:
        """Write atomically (the previous file stays intact until the new one is complete), hash inside."""
        atomic_save(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> "Checkpoint":
        """Read ``path`` (``weights_only=True``, verified against its content hash)."""
        return cls.from_dict(load_file(path), path)

    # ------------------------------------------------------------------ reading
    def describe(self) -> str:
        """Where it was saved, for people: ``stage main, end of epoch 3``."""
        stage = _name(self.stage_names, self.stage_index)
        if self.stage_done:
            return f"end of stage {stage}"
        if self.epoch_done:
            return f"stage {stage}, end of epoch {self.epoch + 1}"
        return f"stage {stage}, epoch {self.epoch + 1}, step {self.step}"

    def resume_point(self) -> tuple[int, int]:
        """(first epoch, first step in it) of the stage in progress to run next."""
        if self.epoch_done:
            return self.epoch + 1, 0
        return self.epoch, self.step

    def is_done(self, stage_index: int) -> bool:
        """Whether the run had finished stage ``stage_index`` when this was saved."""
        return self.stage_index > stage_index or (self.stage_index == stage_index and self.stage_done)

    def weights(self, role: str = "student") -> StateDict:
        """One network's weights: ``student``, ``teacher`` or ``adapters.NAME`` (see :func:`state_dict_of`)."""
        return state_dict_of(self.to_dict(), role, f"checkpoint of {self.spec_name!r}")

    def rng_of(self, rank: int, world_size: int) -> Optional[dict[str, Any]]:
        """Process ``rank``'s generator states, when saved with the same number of processes."""
        return self.rng[rank] if isinstance(self.rng, list) and len(self.rng) == world_size else None


def _fields_of(ck: Checkpoint) -> dict[str, Any]:
    """The fields by name, values as they are (``dataclasses.asdict`` would deep-copy every tensor)."""
    return {f.name: getattr(ck, f.name) for f in fields(ck)}


def _name(names: list[str], index: int) -> str:
    return names[index] if 0 <= index < len(names) else "?"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A kdgraph checkpoint's on-disk dict, verified and checked (:meth:`Checkpoint.load` gives the typed form)."""
    return Checkpoint.load(path).to_dict()

