"""The HTML renderer: one self-contained page (inline CSS and script, no network access) drawing the stage
views with :func:`kdgraph.viz.layout.layout`'s positions.

The page's HTML, CSS and JavaScript are package data under ``kdgraph/viz/page/`` (``page.html`` with
``__TITLE__``, ``__STYLE__``, ``__DATA__`` and ``__SCRIPT__`` slots, ``page.css``, ``page.js``), read with
:mod:`importlib.resources` so an installed wheel carries them. In the page: hover a box for its details,
click one to highlight everything upstream and downstream of it, drag to pan, wheel to zoom.
"""
from __future__ import annotations

import html
import json
import re
from functools import lru_cache
from importlib import resources

from ..errors import KDGraphError
from .layout import layout
from .model import StageView
from .style import CLUSTER_FILL, COLOURS, PRUNED, TAP

__all__ = ["to_html", "page_asset"]

_SLOT = re.compile(r"__(TITLE|STYLE|DATA|SCRIPT)__")


@lru_cache(maxsize=None)
def page_asset(name: str) -> str:
    """The text of ``kdgraph/viz/page/<name>`` (``page.html``, ``page.css``, ``page.js``)."""
    return resources.files(__package__).joinpath("page", name).read_text(encoding="utf-8")


def _inert_json(data: object) -> str:
    """JSON that stays inert inside ``<script>``: no ``</script>`` or ``<!--`` can end or open anything."""
    text = json.dumps(data, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def to_html(stage_views: list[StageView]) -> str:
    """A self-contained HTML page (inline CSS and script, no network) drawing the stage views."""
    if not stage_views:
        raise KDGraphError("nothing to draw: no stage")
    data = {"spec": stage_views[0].spec, "colours": COLOURS, "pruned": PRUNED, "tap": TAP, "cluster_fill": CLUSTER_FILL,
            "stages": [layout(v) for v in stage_views]}
    slots = {"TITLE": html.escape(f"kdgraph · {stage_views[0].spec}", quote=True), "STYLE": page_asset("page.css"),
             "DATA": _inert_json(data), "SCRIPT": page_asset("page.js")}
    # one pass: text put into a slot is never searched for slots again
    return _SLOT.sub(lambda m: slots[m.group(1)], page_asset("page.html"))
