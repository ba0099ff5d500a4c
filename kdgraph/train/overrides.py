"""``--set key=value`` on the command line: the CLI's use of :mod:`kdgraph.spec.overrides` (grammar, errors)."""
from __future__ import annotations

from typing import Any, Iterable

from ..spec.overrides import apply_overrides
from ..spec import Spec, load_spec


def load_with_overrides(path: Any, assignments: Iterable[str] = (), data_root: str | None = None) -> Spec:
    """The spec at ``path`` with ``--set`` assignments applied and ``--data`` as ``data.root``."""
    spec = apply_overrides(load_spec(path), assignments, label="--set")
    if data_root is not None:
        spec = spec.model_copy(deep=True)
        spec.data.root = data_root
    return spec


__all__ = ["apply_overrides", "load_with_overrides"]
