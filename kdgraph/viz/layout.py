"""The HTML page's layout: boxes in left-to-right columns, the teacher's band on top and the student's at the
bottom, edges as curves; computed here in Python so the page's script only draws (and tests can check it)."""
from __future__ import annotations

import json
from typing import Any

from .model import DEdge, Kind, StageView, VNode
from .style import edge_colour

__all__ = ["layout"]

_CHAR_W = {"title": 7.4, "line": 6.2}
_LINE_H = 14
_BANDS = {Kind.TEACHER: 0, Kind.STUDENT: 2}


def _size(n: VNode) -> tuple[float, float]:
    if n.kind == Kind.TAP:
        return max(len(n.title) * 6.0, len(n.lines[0]) * 5.2) + 12, 30.0
    w = max([len(n.title) * _CHAR_W["title"]] + [len(ln) * _CHAR_W["line"] for ln in n.lines]) + 20
    h = (1 + len(n.lines)) * _LINE_H + 12
    return max(w, 60.0), float(h)


def _layers(nodes: dict[str, VNode], edges: list[DEdge]) -> dict[str, int]:
    """Longest-path layering; an edge against the fused graph's order (a cycle after collapsing) is ignored."""
    order = {k: n.order for k, n in nodes.items()}
    preds: dict[str, list[str]] = {k: [] for k in nodes}
    for e in edges:
        if order[e.src] < order[e.dst]:
            preds[e.dst].append(e.src)
    layer: dict[str, int] = {}
    for k in sorted(nodes, key=order.get):
        layer[k] = 1 + max((layer[p] for p in preds[k] if p in layer), default=-1)
    return layer


def layout(v: StageView, gap_x: float = 46.0, gap_y: float = 14.0, band_gap: float = 56.0) -> dict[str, Any]:
    """Positions for the HTML drawing: boxes in columns (longest-path layers), the teacher's boxes in a
    band on top, the student's at the bottom, inputs, taps, adapters and losses in between; each
    column's boxes ordered by the barycentre of their neighbours. Boxes never overlap.

    Returns ``{"nodes": [...], "edges": [...], "clusters": [...], "width", "height"}`` in pixels.
    """
    nodes, edges = v.drawing()
    layer = _layers(nodes, edges)
    band = {k: _BANDS.get(n.kind, 1) for k, n in nodes.items()}
    size = {k: _size(n) for k, n in nodes.items()}
    n_layers = max(layer.values(), default=-1) + 1
    cells: dict[tuple[int, int], list[str]] = {}
    for k in sorted(nodes, key=lambda k: nodes[k].order):
        cells.setdefault((layer[k], band[k]), []).append(k)
    preds: dict[str, list[str]] = {k: [] for k in nodes}
    succs: dict[str, list[str]] = {k: [] for k in nodes}
    for e in edges:
        preds[e.dst].append(e.src)
        succs[e.src].append(e.dst)
    # barycentre ordering inside each cell (a few sweeps both ways)
    pos = {k: float(i) for cell in cells.values() for i, k in enumerate(cell)}
    for sweep in range(4):
        neigh = preds if sweep % 2 == 0 else succs
        for li in (range(n_layers) if sweep % 2 == 0 else range(n_layers - 1, -1, -1)):
            for b in range(3):
                cell = cells.get((li, b))
                if not cell or len(cell) < 2:
                    continue

                def bary(k: str) -> float:
                    ns = [pos[n] + 1000 * band[n] for n in neigh[k]]
                    return sum(ns) / len(ns) if ns else pos[k] + 1000 * band[k]

                cell.sort(key=bary)
                for i, k in enumerate(cell):
                    pos[k] = float(i)
    # x: columns
    col_w = [0.0] * n_layers
    for (li, _), cell in cells.items():
        col_w[li] = max([col_w[li]] + [size[k][0] for k in cell])
    col_x, x = [], 30.0
    for w in col_w:
        col_x.append(x + w / 2)
        x += w + gap_x
    # y: bands of fixed height (so the teacher and student clusters never overlap anything else)
    band_h = [0.0, 0.0, 0.0]
    for (li, b), cell in cells.items():
        band_h[b] = max(band_h[b], sum(size[k][1] for k in cell) + gap_y * (len(cell) - 1))
    band_top, y = [], 64.0
    for b in range(3):
        band_top.append(y)
        y += band_h[b] + (band_gap if band_h[b] else 0)
    xy: dict[str, tuple[float, float]] = {}
    for (li, b), cell in cells.items():
        total = sum(size[k][1] for k in cell) + gap_y * (len(cell) - 1)
        cy = band_top[b] + (band_h[b] - total) / 2
        for k in cell:
            xy[k] = (col_x[li], cy + size[k][1] / 2)
            cy += size[k][1] + gap_y
    nodes_out = []
    for k, n in nodes.items():
        (cx, cy), (w, h) = xy[k], size[k]
        nodes_out.append({"id": k, "kind": str(n.kind), "title": n.title, "lines": n.lines, "x": cx - w / 2,
                          "y": cy - h / 2, "w": w, "h": h, "trainable": n.trainable, "pruned": n.pruned,
                          "details": _jsonable(n.details)})
    edges_out = []
    for e in edges:  # cubic curves from the right side of one box to the left side of the next
        (x1, y1), (x2, y2) = xy[e.src], xy[e.dst]
        x1 += size[e.src][0] / 2
        x2 -= size[e.dst][0] / 2
        if x2 > x1:
            dx = max((x2 - x1) / 2, 20)
            path = f"M{x1:.1f},{y1:.1f} C{x1 + dx:.1f},{y1:.1f} {x2 - dx:.1f},{y2:.1f} {x2:.1f},{y2:.1f}"
        else:  # against the flow: loop below
            low = max(y1, y2) + 40
            path = f"M{x1:.1f},{y1:.1f} C{x1 + 60:.1f},{low:.1f} {x2 - 60:.1f},{low:.1f} {x2:.1f},{y2:.1f}"
        edges_out.append({"src": e.src, "dst": e.dst, "path": path, "kind": e.kind, "colour": edge_colour(e),
                          "pruned": e.pruned})
    clusters = []
    for role in (Kind.TEACHER, Kind.STUDENT):
        ks = [k for k, n in nodes.items() if n.kind == role]
        if not ks:
            continue
        x0 = min(xy[k][0] - size[k][0] / 2 for k in ks) - 14
        x1_ = max(xy[k][0] + size[k][0] / 2 for k in ks) + 14
        y0 = band_top[_BANDS[role]] - 24
        y1_ = band_top[_BANDS[role]] + band_h[_BANDS[role]] + 10
        clusters.append({"role": str(role), "x": x0, "y": y0, "w": x1_ - x0, "h": y1_ - y0, "frozen": v.frozen[role],
                         "label": f"{role}: {v.networks[role]}  ({'frozen' if v.frozen[role] else 'trains'})"})
    return {"stage": v.stage, "title": v.title, "nodes": nodes_out, "edges": edges_out, "clusters": clusters,
            "width": x, "height": y}


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))
