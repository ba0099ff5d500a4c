"""A run folder (``--out``): locked while a run uses it, what it holds decides whether and where to resume,
and every file of the run is written into it (rank 0 only)::

    OUT/spec.json       the spec as run               OUT/last.pt, best.pt   checkpoints (:class:`Checkpoint`)
                                                      (fsdp: OUT/last.sharded/, best.sharded/: sharded ones)
    OUT/results.json    what :func:`kdgraph.train.train` returns   OUT/metrics.jsonl, curves.png, tb/ (monitor)
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from ..errors import CheckpointError, TrainingError
from ..spec import Spec
from .checkpoint import Checkpoint
from .distributed import DistEnv, barrier
from .runlock import RunLock, make_folder

__all__ = ["RunFolder"]

_RUN_FILES = ("last.pt", "best.pt", "results.json", "metrics.jsonl", "curves.png")
_RUN_FOLDERS = ("tb", "last.sharded", "best.sharded")
TRAINER_FILE = "trainer.pt"  # in a sharded checkpoint folder: the run's position, schedule, RNG states, history


class RunFolder:
    """The files of one run (see the module docstring)."""

    def __init__(self, out: Path, env: DistEnv, sharded: bool = False):
        self.out, self.env = Path(out), env
        self.sharded = sharded
        # runtime.distributed: fsdp: sharded checkpoint folders (sharded_checkpoint), the rest in their trainer.pt
        self.last_path = self.out / ("last.sharded" if sharded else "last.pt")
        self.best_path = self.out / ("best.sharded" if sharded else "best.pt")

    @contextlib.contextmanager
    def locked(self) -> Iterator["RunFolder"]:
        """An exclusive lock on the folder while the run uses it (rank 0 holds it; see :mod:`.runlock`)."""
        lock = RunLock(self.out).acquire() if self.env.is_main else None
        try:
            yield self
        finally:
            if lock is not None:
                lock.release()

    def prepare(self, spec: Spec, resume: bool, overwrite: bool, say: Callable[[str], None]) -> Optional[Checkpoint]:
        """The checkpoint to resume from, or None for a fresh start (after clearing an ``overwrite``-n run).

        A folder holding a run needs ``resume`` or ``overwrite``; a checkpoint of another spec is refused. A
        mid-epoch checkpoint saved with another number of processes restarts its epoch from the first image."""
        if self.env.is_main and self.out.is_dir():
            for stale in self.out.glob(".*.pt.*.tmp"):  # left by a process killed while saving
                stale.unlink(missing_ok=True)
        exists = self.last_path.exists()
        if exists and not resume and not overwrite:
            raise TrainingError(f"{self.out} already holds a run (last.pt). Pass --resume to continue it, --overwrite "
                                f"to start over there, or --out for another folder.")
        if not resume:
            if overwrite and self.env.is_main:
                self._clear()
            barrier(self.env)
            return None
        if not exists:
            say(f"[yellow]--resume: no checkpoint in {self.out}; starting from scratch[/]")
            return None
        if self.sharded:  # verified (every shard's size and sha256) before anything is read
            from .sharded_checkpoint import verify

            verify(self.last_path)
            ck = Checkpoint.load(self.last_path / TRAINER_FILE)
        else:
            ck = Checkpoint.load(self.last_path)
        names = [s.name for s in spec.stages]
        if ck.spec_name != spec.name or ck.stage_names != names:
            raise CheckpointError(f"{self.last_path} belongs to spec {ck.spec_name!r} with stages {ck.stage_names}, "
                                  f"not {spec.name!r} with stages {names}; use another --out")
        if ck.world_size != self.env.world_size and not ck.epoch_done:
            say(f"[yellow]resuming mid-epoch with {self.env.world_size} processes, saved with {ck.world_size}: the "
                f"rest of the epoch restarts from its first image[/]")
            ck = dataclasses.replace(ck, step=0)
        say(f"resuming from {self.last_path}: {ck.describe()}")
        return ck

    def _clear(self) -> None:
        for name in _RUN_FILES:
            (self.out / name).unlink(missing_ok=True)
        for name in _RUN_FOLDERS:
            if (self.out / name).is_dir():
                shutil.rmtree(self.out / name)

    def begin(self, spec: Spec) -> None:
        """Create the folder and write ``spec.json`` (rank 0)."""
        if not self.env.is_main:
            return
        make_folder(self.out)
        try:
            (self.out / "spec.json").write_text(json.dumps(spec.model_dump(mode="json"), indent=2))
        except OSError as e:
            raise TrainingError(f"cannot write {self.out / 'spec.json'}: {e.strerror or type(e).__name__}; "
                                f"check that --out {self.out} is writable and the disk has space") from None

    def save_sharded(self, ck: Checkpoint, model: Any, optimizer: Any, best: bool = False) -> None:
        """``last.sharded/`` (and ``best.sharded/``): every process writes its shards of ``model`` and ``optimizer``
        (:func:`~.sharded_checkpoint.save`), rank 0 adds ``ck`` (what is not a shard) as ``trainer.pt``."""
        from .sharded_checkpoint import save

        for folder in [self.last_path] + ([self.best_path] if best else []):
            save(folder, model, optimizer, extra={"describe": ck.describe(), "spec_name": ck.spec_name},
                 write_files=lambda tmp: ck.save(tmp / TRAINER_FILE))

    def save(self, ck: Checkpoint, best: bool = False) -> None:
        """``last.pt`` (and ``best.pt``), each written atomically (rank 0)."""
        if not self.env.is_main:
            return
        ck.save(self.last_path)
        if best:
            ck.save(self.best_path)

    def write_results(self, results: dict[str, Any]) -> None:
        """``results.json``, written atomically (rank 0)."""
        if not self.env.is_main:
            return
        tmp = self.out / ".results.json.tmp"
        tmp.write_text(json.dumps(results, indent=2, default=str))
        tmp.replace(self.out / "results.json")
