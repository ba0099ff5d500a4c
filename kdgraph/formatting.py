"""How kdgraph writes numbers for people: shapes, parameter counts, dtypes, durations, loss values.

One place, used by the CLI, the drawing, the training monitor and checkpoints' descriptions, so a tap's shape
reads the same everywhere (``B×512×7×7``).
"""
from __future__ import annotations

import math
from typing import Any, Optional

__all__ = ["shape", "count", "count_exact", "dtype", "seconds", "number", "is_tuple_shape"]


def is_tuple_shape(value: Any) -> bool:
    """A tuple of shapes (an adapter or a network returning several tensors)."""
    return isinstance(value, (tuple, list)) and bool(value) and isinstance(value[0], (tuple, list, type(None)))


def shape(value: Any, batch: Optional[int] = 2, factor: float = 1.0) -> str:
    """``(2, 512, 7, 7)`` -> ``B×512×7×7``.

    ``batch`` is the batch size the shape was traced at (2 by default); a leading dimension that is a multiple
    of it prints as ``4B`` (SSKD's four rotations). ``factor`` scales the leading dimension first (values traced
    without an input transform that multiplies the batch). ``()`` is ``scalar``; ``None`` is ``?``; a tuple of
    shapes prints its items as ``.0 B×64, .1 B×128``.
    """
    if value is None:
        return "?"
    if is_tuple_shape(value):
        return ", ".join(f".{i} {shape(s, batch, factor)}" for i, s in enumerate(value))
    dims = [int(d) for d in value]
    if not dims:
        return "scalar"
    first = int(round(dims[0] * factor))
    if batch and first == batch:
        lead = "B"
    elif batch and first % batch == 0:
        lead = f"{first // batch}B"
    else:
        lead = str(first)
    return "×".join([lead, *map(str, dims[1:])])


def count(n: int) -> str:
    """Short parameter counts: ``21.8M``, ``221.9k``, ``512``."""
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    if n >= 1_000:
        return f"{n / 1e3:.1f}k"
    return str(n)


def count_exact(n: int) -> str:
    """Exact counts with thousands separators: ``21,797,672``."""
    return f"{n:,}"


def dtype(value: Any) -> Optional[str]:
    """``torch.float32`` -> ``float32``; ``None`` stays ``None``."""
    return None if value is None else str(value).replace("torch.", "")


def seconds(s: float) -> str:
    """Durations: ``0.41 s``, ``12.3 s``, ``4 min 05 s``, ``1 h 02 min``."""
    if s != s or math.isinf(s):
        return "?"
    if s < 10:
        return f"{s:.2f} s"
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def number(v: float) -> str:
    """A loss or metric value with about four significant digits: ``0.4123``, ``12.3``, ``1.2e-05``."""
    if v != v or math.isinf(v):
        return str(v)
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 0.01:
        return f"{v:.4f}"
    return f"{v:.2e}"
