"""One exception family for everything a user can fix.

Errors are raised where the knowledge is (spec errors in :mod:`kdgraph.spec`, missing nodes in
:mod:`kdgraph.capture`, shape mismatches in :mod:`kdgraph.compiler`). The CLI turns any
:class:`KDGraphError` into exit code 2 and one paragraph on stderr, never a traceback.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class KDGraphError(Exception):
    """Base class: a problem the user can act on. ``str(err)`` is the whole message."""


class SpecError(KDGraphError):
    """The YAML spec is invalid (schema, grammar, unknown names)."""


class ModelError(KDGraphError):
    """A model reference cannot be resolved or built, or weights cannot be loaded."""


class TraceError(KDGraphError):
    """torch.fx cannot trace a model."""


class TapError(KDGraphError):
    """A tap names something that does not exist in the traced graph."""


class ShapeError(KDGraphError):
    """Two tensors that a loss or adapter compares have incompatible shapes."""


class DataError(KDGraphError):
    """A data folder or dataset is missing or malformed."""


class CheckpointError(KDGraphError):
    """A checkpoint cannot be read or does not fit the spec."""


class TrainingError(KDGraphError):
    """Training stopped (for example a non-finite loss)."""


class TeacherCacheError(KDGraphError):
    """A teacher output cache is missing, incomplete, or was made from another spec, teacher or data set."""


def did_you_mean(name: str, candidates: Iterable[str], n: int = 5) -> str:
    """Return ``" Did you mean: a, b?"`` with the closest candidates, or ``""``."""
    candidates = list(dict.fromkeys(candidates))
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if not close:
        # prefix / substring matches help for deep paths ("layer4" -> "layer4.1.relu")
        tail = name.split(".")[-1].split("/")[-1]
        close = [c for c in candidates if tail and tail in c][:n]
    return f" Did you mean: {', '.join(close)}?" if close else ""
