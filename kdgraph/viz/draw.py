"""The one entry point: :func:`render` draws a distiller's stages to a file, the format from its suffix."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import KDGraphError
from .build import views
from .dot import run_dot, to_dot
from .model import StageView
from .webpage import to_html

__all__ = ["render", "FORMATS", "format_of"]

FORMATS = ("svg", "png", "dot", "html")


def format_of(path: str | Path, fmt: Optional[str] = None) -> Optional[str]:
    """The format to write ``path`` in: ``fmt`` if given, else its suffix (``.gv`` is DOT); ``None`` if unknown."""
    kind = (fmt or Path(path).suffix.lstrip(".")).lower()
    kind = "dot" if kind == "gv" else kind
    return kind if kind in FORMATS else None


def render(distiller, path: str | Path, stage: int | str | None = "all", depth: int = 1,
           fmt: Optional[str] = None, dpi: int = 96) -> list[StageView]:
    """Draw ``stage`` (``"all"``: every stage, ``None``: the current one) to ``path``.

    The format follows the file's suffix (``.svg``, ``.png``, ``.dot``, ``.html``) unless ``fmt``
    names one. Returns the views drawn (their ``nodes`` / ``edges`` are what the picture shows).
    """
    path = Path(path)
    kind = format_of(path, fmt)
    if kind is None:
        asked = (fmt or path.suffix.lstrip(".")).lower()
        raise KDGraphError(f"cannot draw to {str(path)!r}: unknown format {asked!r}; use a file ending in "
                           f"{', '.join('.' + f for f in FORMATS)} (or pass the format)")
    vs = views(distiller, stage, depth)
    if kind == "dot":
        data: bytes = to_dot(vs).encode()
    elif kind == "html":
        data = to_html(vs).encode()
    else:
        data = run_dot(to_dot(vs), kind, dpi)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return vs
