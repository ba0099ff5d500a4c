"""How a spec's field paths are written in error messages: ``stages[0].losses[1].inputs``."""
from __future__ import annotations


__all__ = ["fmt_loc"]


def fmt_loc(loc: tuple) -> str:
    """``("stages", 0, "losses")`` -> ``stages[0].losses``; ``()`` -> ``(top level)``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"
