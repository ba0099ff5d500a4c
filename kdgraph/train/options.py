"""How to run a training (:class:`TrainOptions`); what to train is the spec."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

__all__ = ["TrainOptions"]


@dataclass
class TrainOptions:
    """How to run (what to train is the spec)."""

    out: Optional[Path] = None  # run folder; default runs/<spec name>
    data: Optional[str] = None  # overrides data.root
    resume: bool = False  # continue from OUT/last.pt when it exists
    overwrite: bool = False  # start over in a folder that holds a run
    only_stages: Sequence[str] = ()  # run only these stages (names)
    device: Optional[str] = None  # cpu | cuda | cuda:N; default cuda when available
    ckpt_every: int = 0  # also checkpoint every N steps within an epoch (0: epoch ends only)
    ckpt_minutes: float = 30.0  # ... and at least this often
    log_every: int = 0  # steps per logged record (0: every step on CPU, 20 on GPU)
    progress: Optional[bool] = None  # rich progress bar (default: when stdout is a terminal)
    tensorboard: bool = True
    plot: bool = True
    started: Optional[float] = None  # time.perf_counter() at command start (for time-to-first-step)
    allow_imports: Sequence[str] = ()  # module prefixes the spec may import (consent, see kdgraph.models.trust)
    trust_code: bool = False  # the spec may import any module
    skip_bad_images: bool = False  # ImageFolder: skip (and count) unreadable images instead of stopping
    # called with each evaluation of a training stage (a copy of the ``eval`` record: top1, stage, epoch, ...),
    # after it is logged and before the epoch's checkpoint; an exception it raises stops the run (kdgraph tune
    # reports every epoch's score to Optuna here and stops a pruned trial)
    on_eval: Optional[Callable[[dict[str, Any]], None]] = None
