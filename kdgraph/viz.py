"""Drawing the fused graph: Graphviz SVG / PNG, DOT text, and a self-contained interactive HTML page.

    d = kdgraph.compile("specs/kr_resnet18.yaml")
    kdgraph.viz.render(d, "kr.svg")                    # every stage; .png, .dot, .html alike
    kdgraph.viz.render(d, "kr_main.html", stage="main", depth=2)

or ``kdgraph viz specs/kr_resnet18.yaml -o kr.svg [--stage NAME|all] [--depth N]``.

What is drawn (per stage, from :func:`kdgraph.graphview.to_networkx`):

* the teacher and the student as two clusters, their nodes collapsed to module level: ``depth=1``
  shows ``conv1 .. layer1 .. layer4, avgpool, fc``, ``depth=2`` the blocks (``layer1.0``), ``depth=3``
  every layer; ``depth=0`` one box per network. A box lists its module type, output shape
  (``B`` = the batch) and parameter count;
* the taps on the edges that read them, with their shapes;
* adapters (orange) and loss terms (red) with their weights, the total loss;
* what the stage trains (solid, bold borders) versus what is frozen (dashed borders, "frozen");
* the teacher nodes dead-code elimination removed, faded (grey, dashed).

SVG and PNG are laid out by Graphviz's ``dot`` program (Debian/Ubuntu: ``apt-get install graphviz``;
macOS: ``brew install graphviz``). ``.dot`` and ``.html`` need no Graphviz: the HTML page carries its
own layered layout and a small inline script (no network access): hover a box for its details,
click one to highlight everything upstream and downstream of it, drag to pan, wheel to zoom.
"""
from __future__ import annotations

import html
import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import networkx as nx
from torch import nn

from .errors import KDGraphError
from .graphview import collapse, to_networkx

__all__ = ["StageView", "stage_view", "views", "to_dot", "to_html", "to_svg", "render", "fmt_shape",
           "FORMATS", "GraphvizMissing"]

FORMATS = ("svg", "png", "dot", "html")


class GraphvizMissing(KDGraphError):
    """Graphviz's ``dot`` program is needed (SVG, PNG) but not installed."""


# ------------------------------------------------------------------------------------------------
# Formatting
# ------------------------------------------------------------------------------------------------

#: role -> (fill, border, font colour)
COLOURS = {
    "teacher": ("#dbe8f6", "#3f6f9f", "#1d3550"),
    "student": ("#dcefd8", "#3f7f3a", "#1f3d1c"),
    "adapter": ("#fde2bf", "#c06c10", "#5a3208"),
    "loss": ("#f8d3d3", "#b03a3a", "#561a1a"),
    "total": ("#b03a3a", "#7a1f1f", "#ffffff"),
    "input": ("#ececec", "#6f6f6f", "#2b2b2b"),
    "transform": ("#e5dbf3", "#6f4a9e", "#35204f"),
}
PRUNED = ("#f5f5f5", "#c4c4c4", "#a8a8a8")
TAP = ("#fffbe0", "#8a7a2a", "#3a3310")  # a tapped value, on the edge to its readers
CLUSTER_FILL = {"teacher": "#f3f7fc", "student": "#f3faf2"}


def fmt_shape(shape: Any, batch: int = 2, factor: float = 1.0) -> str:
    """``(2, 512, 7, 7)`` -> ``B×512×7×7`` (``batch`` = the traced batch; ``(8, ...)`` -> ``4B×...``).

    ``factor`` scales the batch dimension (values traced without an input transform that multiplies it).
    """
    if shape is None:
        return "?"
    if _is_tuple_shape(shape):
        return ", ".join(f".{i} {fmt_shape(s, batch, factor)}" for i, s in enumerate(shape))
    dims = [int(d) for d in shape]
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


def _is_tuple_shape(shape: Any) -> bool:
    return isinstance(shape, (tuple, list)) and bool(shape) and isinstance(shape[0], (tuple, list, type(None)))


def fmt_count(n: int) -> str:
    """Parameter counts: ``21.8M``, ``221.9k``, ``512``."""
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    if n >= 1_000:
        return f"{n / 1e3:.1f}k"
    return str(n)


# ------------------------------------------------------------------------------------------------
# The view: the fused graph collapsed to module level, with everything a drawing needs
# ------------------------------------------------------------------------------------------------


@dataclass
class VNode:
    id: str
    kind: str  # teacher | student | adapter | loss | total | input | transform
    title: str
    lines: list[str]
    members: list[str]
    trainable: bool
    pruned: bool
    order: float  # position of its first member in the fused graph (stable layouts)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def cluster(self) -> Optional[str]:
        return self.kind if self.kind in ("teacher", "student") else None


@dataclass
class VEdge:
    src: str
    dst: str
    taps: list[tuple[str, str]]  # (tap, formatted shape)
    pruned: bool
    kind: str  # tap | flow
    dst_kind: str = ""


@dataclass
class StageView:
    """One stage, collapsed to ``depth``: nodes (module-level boxes) and edges (taps labelled)."""

    spec: str
    stage: str
    index: int
    n_stages: int
    depth: int
    train: list[str]
    nodes: dict[str, VNode]
    edges: list[VEdge]
    networks: dict[str, str]  # teacher/student -> model reference
    frozen: dict[str, bool]  # teacher/student -> frozen in this stage
    graph: nx.DiGraph  # the full (uncollapsed) networkx view

    @property
    def title(self) -> str:
        return (f"stage {self.index + 1}/{self.n_stages}: {self.stage}  —  trains "
                f"{', '.join(self.train) or 'nothing'}")

    def drawing(self) -> tuple[dict[str, VNode], list[DEdge]]:
        """What is drawn: the boxes plus one small *tap* node per tapped value, sitting on the edges
        from the value to the adapters / losses that read it (so tap names never collide with lines)."""
        nodes: dict[str, VNode] = dict(self.nodes)
        edges: list[DEdge] = []
        tap_ids: dict[tuple[str, str], str] = {}
        for e in self.edges:
            if not e.taps:
                edges.append(DEdge(e.src, e.dst, "flow", e.pruned, e.dst_kind))
                continue
            for tap, shape in e.taps:
                key = (e.src, tap)
                if key not in tap_ids:
                    tid = tap_ids[key] = f"tap{len(tap_ids)}"
                    nodes[tid] = VNode(tid, "tap", tap, [shape], [], False, False, self.nodes[e.src].order + 0.5,
                                       {"tap": tap, "shape": shape, "reads": e.src, "read_by": []})
                    edges.append(DEdge(e.src, tid, "tap_in", False, e.dst_kind))
                tid = tap_ids[key]
                nodes[tid].details["read_by"].append(e.dst)
                edges.append(DEdge(tid, e.dst, "tap_out", False, e.dst_kind))
        return nodes, edges


@dataclass
class DEdge:
    """A drawn edge: ``flow`` (data between boxes), ``tap_in`` (value -> tap), ``tap_out`` (tap -> reader)."""

    src: str
    dst: str
    kind: str
    pruned: bool
    dst_kind: str


def _network_key(n: str, a: dict[str, Any], depth: int) -> str:
    role = a["role"]
    if depth <= 0:
        return role
    path = a.get("module_path") or ""
    parts = path.split(".") if path else []
    if a["op"] != "call_module":  # a functional op lives inside its scope module
        parts = parts + [str(a.get("name") or n).rsplit("/", 1)[-1]]
    if len(parts) > depth:
        return f"{role}:{'.'.join(parts[:depth])}"
    return f"{role}:{a.get('name') or n}"


def _group_key(depth: int):
    def key(n: str, a: dict[str, Any]) -> Optional[str]:
        role = a["role"]
        if role in ("teacher", "student"):
            return _network_key(n, a, depth)
        if role == "adapter":
            return f"adapter:{a['owner']}"
        if role == "loss":
            return "loss:total" if a["owner"] == "total" else f"loss:{a['owner']}"
        if role == "input":
            return f"input:{a['owner']}"
        if role == "transform":
            return "transform"
        return None  # the output node: the total loss box says what leaves the graph

    return key


def _describe_module(root: Optional[nn.Module], path: str) -> Optional[str]:
    if root is None or not path:
        return type(root).__name__ if root is not None and not path else None
    try:
        mod = root.get_submodule(path)
    except AttributeError:
        return None
    children = list(mod.children())
    if isinstance(mod, nn.Sequential) and children and len({type(c) for c in children}) == 1:
        return f"{len(children)}× {type(children[0]).__name__}"
    return type(mod).__name__


def _unique_params(G: nx.DiGraph, members: list[str]) -> int:
    seen: dict[str, int] = {}
    for m in members:
        a = G.nodes[m]
        if a["op"] in ("call_module", "get_attr"):
            seen[a["target"].removeprefix("inplace_safe.")] = a["params"]
    return sum(seen.values())


def _output_member(G: nx.DiGraph, members: list[str]) -> str:
    """The member whose value leaves the group (the last one read from outside), else the last."""
    ms = set(members)
    leaving = [m for m in members if any(s not in ms for s in G.successors(m))]
    alive = [m for m in leaving if not G.nodes[m]["pruned"]]
    return (alive or leaving or members)[-1]


def stage_view(distiller, stage: int | str | None = None, depth: int = 1) -> StageView:
    """Collapse one stage's networkx view to ``depth`` and describe each box (see module docstring)."""
    G = to_networkx(distiller, stage)
    spec = distiller.spec
    si = G.graph["stage_index"]
    stage_spec = spec.stages[si]
    batch = G.graph["batch_size"]
    train = list(stage_spec.train)
    H = collapse(G, _group_key(depth))
    factor = float(G.graph.get("batch_factor", 1.0))
    transform = next((n for n, a in G.nodes(data=True) if a["role"] == "transform"), None)
    scaled = nx.descendants(G, transform) if transform is not None and factor != 1.0 else set()

    def shape_of(node: str, shape: Any = None) -> str:
        return fmt_shape(G.nodes[node]["shape"] if shape is None else shape, batch,
                         factor if node in scaled else 1.0)

    order = {n: i for i, n in enumerate(G.nodes)}
    losses = {ls.name: ls for ls in stage_spec.losses}
    adapters = {a.name: a for a in distiller.build_stage(si)[1].adapters}
    nodes: dict[str, VNode] = {}
    for gid, ga in H.nodes(data=True):
        members = ga["members"]
        first = G.nodes[members[0]]
        role = first["role"]
        pruned = all(G.nodes[m]["pruned"] for m in members)
        trainable = any(G.nodes[m]["trainable"] for m in members)
        out_name = _output_member(G, members)
        out = G.nodes[out_name]
        shape = shape_of(out_name)
        taps = [t for m in members for t in G.nodes[m]["taps"]]
        details: dict[str, Any] = {"members": len(members), "taps": taps}
        if role in ("teacher", "student"):
            root = getattr(distiller, role, None)
            name = gid.split(":", 1)[1] if ":" in gid else role
            params = _unique_params(G, members)
            if len(members) == 1 and gid == f"{role}:{first['name'] or members[0]}":
                what = first["module_type"] or first["target"].split(" ")[-1].strip("<>")
                if first["op"] != "call_module":
                    what = f"{first['op'].removeprefix('call_')} {first['name'].rsplit('/', 1)[-1]}"
            else:
                what = _describe_module(root, "" if ":" not in gid else name) or "module"
                if ":" not in gid:
                    name = spec.teacher.model if role == "teacher" else spec.student.model
            lines = [what, shape] + ([f"{fmt_count(params)} params"] if params else [])
            if pruned:
                lines.append("pruned (unused)")
            kind, title = role, name
            details.update(module_path=name, params=params, shape=shape, dtype=out["dtype"], frozen=not trainable)
        elif role == "adapter":
            owner = first["owner"]
            rep = adapters.get(owner)
            call = next((G.nodes[m] for m in members if G.nodes[m]["op"] == "call_module"), first)
            params = rep.parameters if rep is not None else call["params"]
            shapes = rep.output_shape if rep is not None else call["shape"]
            f = factor if members[0] in scaled else 1.0
            shape_lines = ([fmt_shape(shapes, batch, f)] if not _is_tuple_shape(shapes)
                           else [f".{i} {fmt_shape(x, batch, f)}" for i, x in enumerate(shapes)])
            lines = [f"{rep.type} ({call['module_type']})" if rep else str(call["module_type"]), *shape_lines,
                     f"{fmt_count(params)} params", "trainable" if trainable else "frozen"]
            kind, title = "adapter", owner
            details.update(type=rep.type if rep else None, args=rep.args if rep else {},
                           inputs=rep.inputs if rep else {}, params=params, shape=" ".join(shape_lines),
                           frozen=not trainable)
        elif role == "loss" and first["owner"] == "total":
            kind, title = "total", "total loss"
            lines = [" + ".join(f"{losses[n].weight:g}·{n}" if losses[n].weight != 1 else n for n in losses)
                     if len(losses) <= 3 else f"sum of {len(losses)} weighted terms", "= out.loss"]
            details.update(terms=list(losses))
        elif role == "loss":
            owner = first["owner"]
            ls = losses.get(owner)
            kind, title = "loss", owner
            lines = [ls.type if ls else str(first["module_type"])]
            if ls is not None:
                lines.append(f"weight {ls.weight:g}")
                if ls.args:
                    lines.append(", ".join(f"{k}={v}" for k, v in ls.args.items()))
            if trainable:
                lines.append("trainable")
            details.update(type=ls.type if ls else None, weight=ls.weight if ls else None,
                           args=ls.args if ls else {})
            if G.graph.get("loss_node") in members:  # the stage's only term is the total itself
                lines.append("= out.loss")
        elif role == "input":
            kind, title = "input", first["name"]
            lines = [shape]
        else:
            kind, title = "transform", str(first["name"])
            lines = ["input transform", shape]
        nodes[gid] = VNode(gid, kind, title, [ln for ln in lines if ln], members, trainable, pruned,
                           float(min(order[m] for m in members)), details)
    edges: list[VEdge] = []
    for u, v, ea in H.edges(data=True):
        taps = [(t, shape_of(G.graph["taps"][t], s) if t in G.graph["taps"] else fmt_shape(s, batch))
                for t, s in zip(ea["taps"], ea["shapes"])]
        edges.append(VEdge(u, v, taps, bool(ea["pruned"]), "tap" if taps else "flow", nodes[v].kind))
    # drop inputs nothing reads (e.g. targets in a stage without a cross-entropy term)
    used = {e.src for e in edges} | {e.dst for e in edges}
    for gid in [g for g, n in nodes.items() if n.kind == "input" and g not in used]:
        del nodes[gid]
    edges.sort(key=lambda e: (nodes[e.src].order, nodes[e.dst].order))
    frozen = {"teacher": True, "student": "student" not in train}
    return StageView(spec.name, stage_spec.name, si, len(spec.stages), depth, train,
                     dict(sorted(nodes.items(), key=lambda kv: kv[1].order)), edges,
                     {"teacher": spec.teacher.model, "student": spec.student.model}, frozen, G)


def views(distiller, stage: int | str | None = "all", depth: int = 1) -> list[StageView]:
    """Views of ``stage`` (a name or index), of every stage (``"all"``), or of the current one (``None``)."""
    if depth < 0:
        raise KDGraphError(f"depth must be >= 0 (0: one box per network, 1: top-level modules), got {depth}")
    if stage == "all":
        return [stage_view(distiller, i, depth) for i in range(len(distiller.stages))]
    if isinstance(stage, str) and stage.lstrip("-").isdigit():
        stage = int(stage)
    if isinstance(stage, str):
        distiller.spec.stage(stage)  # a clear error for an unknown name
    return [stage_view(distiller, stage, depth)]


# ------------------------------------------------------------------------------------------------
# DOT
# ------------------------------------------------------------------------------------------------


def _q(s: str) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _h(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _node_colours(n: VNode) -> tuple[str, str, str]:
    if n.pruned:
        return PRUNED
    return COLOURS.get(n.kind, COLOURS["input"])


def _dot_node(prefix: str, n: VNode) -> str:
    if n.kind == "tap":
        fill, border, font = TAP
        label = f'<<FONT POINT-SIZE="10">{_h(n.title)}</FONT><BR/><FONT POINT-SIZE="8">{_h(n.lines[0])}</FONT>>'
        return (f"{_q(prefix + n.id)} [label={label}, shape=box, style=\"rounded,filled\", fillcolor={_q(fill)}, "
                f"color={_q(border)}, fontcolor={_q(font)}, penwidth=0.8, margin=\"0.05,0.02\", height=0.3, "
                f"tooltip={_q('tap ' + n.title + ' ' + n.lines[0])}];")
    fill, border, font = _node_colours(n)
    frozen = n.kind in ("teacher", "student", "adapter") and not n.trainable
    style = "rounded,filled" + (",dashed" if frozen or n.pruned else "")
    pen = "2.2" if n.trainable else "1.0"
    sub = "".join(f'<BR/><FONT POINT-SIZE="9">{_h(ln)}</FONT>' for ln in n.lines)
    label = f"<<B>{_h(n.title)}</B>{sub}>"
    shape = "cds" if n.kind == "input" else "box"
    tip = f"{n.kind} {n.title}: " + "; ".join(n.lines)
    return (f"{_q(prefix + n.id)} [label={label}, shape={shape}, style={_q(style)}, fillcolor={_q(fill)}, "
            f"color={_q(border)}, fontcolor={_q(font)}, penwidth={pen}, tooltip={_q(tip)}];")


def _edge_colour(e: DEdge) -> str:
    if e.pruned:
        return PRUNED[1]
    if e.kind == "flow":
        return "#8c8c8c"
    return COLOURS.get(e.dst_kind, COLOURS["loss"])[1]


def _dot_edge(prefix: str, e: DEdge) -> str:
    attrs = {"color": _edge_colour(e)}
    if e.pruned:
        attrs.update(style="dashed", arrowhead="onormal")
    elif e.kind == "tap_in":
        attrs.update(arrowhead="none", penwidth="1.5")
    elif e.kind == "tap_out":
        attrs.update(penwidth="1.5")
    body = ", ".join(f"{k}={_q(v)}" for k, v in attrs.items())
    return f"{_q(prefix + e.src)} -> {_q(prefix + e.dst)} [{body}];"


def _legend_cells() -> str:
    def cell(kind: str, text: str, dashed: bool = False, fade: bool = False, bold: bool = False) -> str:
        fill, border, font = PRUNED if fade else COLOURS[kind]
        style = ' STYLE="dashed"' if dashed else ""
        return (f'<TD BGCOLOR="{fill}" COLOR="{border}" BORDER="{2 if bold else 1}"{style}><FONT COLOR="{font}" '
                f'POINT-SIZE="9">{_h(text)}</FONT></TD>')

    tap = (f'<TD BGCOLOR="{TAP[0]}" COLOR="{TAP[1]}" BORDER="1"><FONT COLOR="{TAP[2]}" POINT-SIZE="9">tap '
           f'(tapped value, shape)</FONT></TD>')
    return "".join([cell("teacher", "teacher"), cell("student", "student"), cell("adapter", "adapter"),
                    cell("loss", "loss term"), cell("total", "total loss"), cell("input", "batch input"),
                    cell("transform", "input transform"), tap, cell("adapter", "frozen: dashed", dashed=True),
                    cell("student", "trains: bold", bold=True), cell("teacher", "pruned by DCE", fade=True)])


def _graph_label(title: str, legend: bool) -> str:
    rows = f'<TR><TD ALIGN="LEFT"><FONT POINT-SIZE="15"><B>{_h(title)}</B></FONT></TD></TR>'
    if legend:
        rows += (f'<TR><TD ALIGN="LEFT"><TABLE BORDER="0" CELLSPACING="3" CELLPADDING="3"><TR>{_legend_cells()}'
                 f'</TR></TABLE></TD></TR>'
                 f'<TR><TD ALIGN="LEFT"><FONT POINT-SIZE="9">Boxes: module, output shape (B = batch), parameters. '
                 f'Yellow tags: the taps adapters and losses read, on the edges they read.</FONT></TD></TR>')
    return f'<<TABLE BORDER="0" CELLSPACING="0" CELLPADDING="2">{rows}</TABLE>>'


def to_dot(stage_views: list[StageView], legend: bool = True) -> str:
    """DOT text for one or more stage views (one cluster per stage when there are several)."""
    if not stage_views:
        raise KDGraphError("nothing to draw: no stage")
    spec = stage_views[0].spec
    multi = len(stage_views) > 1
    title = spec if multi else f"{spec}  ·  {stage_views[0].title}"
    out = ["digraph kdgraph {",
           f"  graph [rankdir=LR, newrank=true, fontname=\"Helvetica\", fontsize=14, labelloc=t, labeljust=l, "
           f"nodesep=0.22, ranksep=0.42, pad=0.25, label={_graph_label(title, legend)}, tooltip={_q(spec)}];",
           "  node [fontname=\"Helvetica\", fontsize=11, margin=\"0.10,0.05\"];",
           "  edge [fontname=\"Helvetica\", fontsize=9, arrowsize=0.6];"]
    # dot tends to stack what is emitted later above what came first: emit the last stage first
    # (stages read top to bottom), and the student before the teacher (teacher on top)
    for v in reversed(stage_views):
        p = f"s{v.index}_"
        ind = "  "
        if multi:
            out.append(f"  subgraph {_q('cluster_' + p + 'stage')} {{")
            out.append(f"    label={_q(v.title)}; style=\"rounded\"; color=\"#9a9a9a\"; fontsize=13;")
            ind = "    "
        for role in ("student", "teacher"):
            members = [n for n in v.nodes.values() if n.kind == role]
            if not members:
                continue
            state = "frozen" if v.frozen[role] else "trains"
            fill, border, _ = COLOURS[role]
            style = "rounded,filled" + (",dashed" if v.frozen[role] else "")
            out.append(f"{ind}subgraph {_q('cluster_' + p + role)} {{")
            out.append(f"{ind}  label={_q(f'{role}: {v.networks[role]}  ({state})')}; style={_q(style)}; "
                       f"fillcolor={_q(CLUSTER_FILL[role])}; color={_q(border)}; fontcolor={_q(border)}; "
                       f"penwidth={'1.0' if v.frozen[role] else '2.0'}; fontsize=12;")
            out.extend(f"{ind}  {_dot_node(p, n)}" for n in members)
            out.append(f"{ind}}}")
        nodes, edges = v.drawing()
        out.extend(f"{ind}{_dot_node(p, n)}" for n in nodes.values() if n.cluster is None)
        out.extend(f"{ind}{_dot_edge(p, e)}" for e in edges)
        if multi:
            out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"


def _dot_binary() -> str:
    exe = shutil.which("dot")
    if exe is None:
        raise GraphvizMissing(
            "drawing SVG or PNG needs Graphviz's `dot` program, which is not installed. Install it "
            "(Debian/Ubuntu: `sudo apt-get install graphviz`, macOS: `brew install graphviz`, conda: "
            "`conda install graphviz`), or write a .dot file or a self-contained .html page, which need no Graphviz.")
    return exe


def run_dot(dot_text: str, fmt: str = "svg", dpi: int = 96) -> bytes:
    """Lay out ``dot_text`` with Graphviz and return the ``fmt`` (svg, png) bytes."""
    args = [_dot_binary(), f"-T{fmt}"]
    if fmt == "png":
        args.append(f"-Gdpi={dpi}")
    proc = subprocess.run(args, input=dot_text.encode(), capture_output=True, timeout=300)
    if proc.returncode != 0:
        raise KDGraphError(f"Graphviz `dot -T{fmt}` failed ({proc.returncode}): "
                           f"{proc.stderr.decode(errors='replace').strip()[:800]}")
    return proc.stdout


def to_svg(stage_views: list[StageView]) -> str:
    return run_dot(to_dot(stage_views), "svg").decode()


# ------------------------------------------------------------------------------------------------
# HTML: a layered left-to-right layout computed here, drawn by a small inline script
# ------------------------------------------------------------------------------------------------

_CHAR_W = {"title": 7.4, "line": 6.2}
_LINE_H = 14
_BANDS = {"teacher": 0, "student": 2}


def _size(n: VNode) -> tuple[float, float]:
    if n.kind == "tap":
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
        nodes_out.append({"id": k, "kind": n.kind, "title": n.title, "lines": n.lines, "x": cx - w / 2,
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
        edges_out.append({"src": e.src, "dst": e.dst, "path": path, "kind": e.kind, "colour": _edge_colour(e),
                          "pruned": e.pruned})
    clusters = []
    for role in ("teacher", "student"):
        ks = [k for k, n in nodes.items() if n.kind == role]
        if not ks:
            continue
        x0 = min(xy[k][0] - size[k][0] / 2 for k in ks) - 14
        x1_ = max(xy[k][0] + size[k][0] / 2 for k in ks) + 14
        y0 = band_top[_BANDS[role]] - 24
        y1_ = band_top[_BANDS[role]] + band_h[_BANDS[role]] + 10
        clusters.append({"role": role, "x": x0, "y": y0, "w": x1_ - x0, "h": y1_ - y0, "frozen": v.frozen[role],
                         "label": f"{role}: {v.networks[role]}  ({'frozen' if v.frozen[role] else 'trains'})"})
    return {"stage": v.stage, "title": v.title, "nodes": nodes_out, "edges": edges_out, "clusters": clusters,
            "width": x, "height": y}


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>__TITLE__</title>
<style>
body{margin:0;font:13px Helvetica,Arial,sans-serif;color:#222;background:#fff}
header{padding:8px 14px;border-bottom:1px solid #ddd;display:flex;gap:14px;align-items:center;flex-wrap:wrap}
header h1{font-size:16px;margin:0}
.tabs button{border:1px solid #bbb;background:#f4f4f4;padding:3px 10px;border-radius:4px;cursor:pointer;margin-right:4px}
.tabs button.on{background:#333;color:#fff;border-color:#333}
#legend span{display:inline-block;padding:1px 7px;margin-right:4px;border-radius:3px;border:1px solid;font-size:11px}
.stage{display:none;width:100vw;height:calc(100vh - 52px);overflow:hidden;cursor:grab}
.stage.on{display:block}
svg text{pointer-events:none}
.edge path{fill:none}
.dim{opacity:.15}
.hl path{stroke-width:3px !important}
#tip{position:fixed;display:none;background:#fffff4;border:1px solid #999;padding:6px 8px;font:12px monospace;
 white-space:pre;max-width:60vw;pointer-events:none;box-shadow:2px 2px 6px rgba(0,0,0,.2)}
#kd-status{font-size:11px;color:#777}
</style></head>
<body>
<header><h1>__TITLE__</h1><div class="tabs" id="tabs"></div><div id="legend"></div><div id="kd-status">loading</div></header>
<div id="stages"></div><div id="tip"></div>
<script id="kd-data" type="application/json">__DATA__</script>
<script>
(function(){
"use strict";
var DATA = JSON.parse(document.getElementById("kd-data").textContent);
var C = DATA.colours, P = DATA.pruned, NS = "http://www.w3.org/2000/svg";
function el(tag, attrs, parent){ var e = document.createElementNS(NS, tag);
  for (var k in attrs) e.setAttribute(k, attrs[k]); if (parent) parent.appendChild(e); return e; }
function colours(n){ return n.pruned ? P : (C[n.kind] || C.input); }
C.tap = DATA.tap;
var tip = document.getElementById("tip");
var legend = document.getElementById("legend");
[["teacher","teacher"],["student","student"],["adapter","adapter"],["loss","loss term"],["total","total loss"],
 ["input","input"],["tap","tap"]].forEach(function(p){ var s = document.createElement("span"); var c = C[p[0]];
  s.style.background = c[0]; s.style.borderColor = c[1]; s.style.color = c[2]; s.textContent = p[1]; legend.appendChild(s); });
var extra = document.createElement("span"); extra.textContent = "dashed = frozen, bold = trains, grey = pruned";
extra.style.border = "none"; legend.appendChild(extra);
var total = 0, taps = 0, tabs = document.getElementById("tabs"), host = document.getElementById("stages"), views = [];
DATA.stages.forEach(function(st, si){
  var div = document.createElement("div"); div.className = "stage"; div.dataset.stage = st.stage; host.appendChild(div);
  var b = document.createElement("button"); b.textContent = st.stage; b.title = st.title;
  b.onclick = function(){ show(si); }; tabs.appendChild(b);
  var svg = el("svg", {width: "100%", height: "100%", viewBox: "0 0 " + st.width + " " + st.height}, div);
  var defs = el("defs", {}, svg);
  var mk = el("marker", {id: "arr" + si, viewBox: "0 0 10 10", refX: "10", refY: "5", markerWidth: "7",
                         markerHeight: "7", orient: "auto-start-reverse"}, defs);
  el("path", {d: "M0,0 L10,5 L0,10 z", fill: "#777"}, mk);
  var root = el("g", {}, svg);
  var t = el("text", {x: 12, y: 22, "font-size": 15, "font-weight": "bold"}, root); t.textContent = st.title;
  st.clusters.forEach(function(c){
    var g = el("g", {"class": "cluster"}, root);
    el("rect", {x: c.x, y: c.y, width: c.w, height: c.h, rx: 10, fill: DATA.cluster_fill[c.role],
                stroke: C[c.role][1], "stroke-width": c.frozen ? 1 : 2, "stroke-dasharray": c.frozen ? "6 4" : ""}, g);
    var lt = el("text", {x: c.x + 10, y: c.y + 16, "font-size": 12, fill: C[c.role][1]}, g); lt.textContent = c.label;
  });
  var edgeLayer = el("g", {}, root), nodeLayer = el("g", {}, root);
  var byId = {}, eds = [];
  st.edges.forEach(function(e){
    var g = el("g", {"class": "edge", "data-src": e.src, "data-dst": e.dst, "data-kind": e.kind}, edgeLayer);
    var a = {d: e.path, stroke: e.colour, "stroke-width": e.kind === "flow" ? 1 : 1.6,
             "stroke-dasharray": e.pruned ? "5 4" : ""};
    if (e.kind !== "tap_in") a["marker-end"] = "url(#arr" + si + ")";
    el("path", a, g);
    eds.push({e: e, g: g});
  });
  st.nodes.forEach(function(n){
    var isTap = n.kind === "tap", c = isTap ? DATA.tap : colours(n);
    var frozen = (n.kind === "teacher" || n.kind === "student" || n.kind === "adapter") && !n.trainable;
    var g = el("g", {"class": isTap ? "tap" : "node", "data-id": n.id, "data-kind": n.kind}, nodeLayer);
    el("rect", {x: n.x, y: n.y, width: n.w, height: n.h, fill: c[0], stroke: c[1], rx: isTap ? 3 : 6,
                "stroke-width": n.trainable ? 2.2 : 1, "stroke-dasharray": (frozen || n.pruned) ? "5 3" : ""}, g);
    var tt = el("text", {x: n.x + n.w / 2, y: n.y + (isTap ? 13 : 17), "text-anchor": "middle",
                         "font-weight": isTap ? "normal" : "bold", "font-size": isTap ? 10 : 12, fill: c[2]}, g);
    tt.textContent = n.title;
    n.lines.forEach(function(ln, i){
      var s = el("text", {x: n.x + n.w / 2, y: n.y + (isTap ? 25 : 31 + 14 * i), "text-anchor": "middle",
                          "font-size": isTap ? 9 : 10, fill: c[2]}, g); s.textContent = ln; });
    g.addEventListener("mousemove", function(ev){
      tip.style.display = "block"; tip.style.left = (ev.clientX + 14) + "px"; tip.style.top = (ev.clientY + 10) + "px";
      tip.textContent = n.kind + " " + n.title + "\\n" + n.lines.join("\\n") + "\\n" + JSON.stringify(n.details, null, 1);
    });
    g.addEventListener("mouseleave", function(){ tip.style.display = "none"; });
    g.addEventListener("click", function(ev){ ev.stopPropagation(); highlight(n.id); });
    byId[n.id] = g;
    if (isTap) taps += 1; else total += 1;
  });
  function reach(start, fwd){
    var seen = {}; seen[start] = 1; var todo = [start];
    while (todo.length){ var k = todo.pop();
      eds.forEach(function(x){ var a = fwd ? x.e.src : x.e.dst, b = fwd ? x.e.dst : x.e.src;
        if (a === k && !seen[b]){ seen[b] = 1; todo.push(b); } }); }
    return seen;
  }
  function highlight(id){
    var up = reach(id, false), down = reach(id, true);
    Object.keys(byId).forEach(function(k){ byId[k].classList.toggle("dim", !(up[k] || down[k])); });
    eds.forEach(function(x){ var on = (up[x.e.src] && up[x.e.dst]) || (down[x.e.src] && down[x.e.dst]);
      x.g.classList.toggle("dim", !on); x.g.classList.toggle("hl", !!on); });
  }
  svg.addEventListener("click", function(){ Object.keys(byId).forEach(function(k){ byId[k].classList.remove("dim"); });
    eds.forEach(function(x){ x.g.classList.remove("dim", "hl"); }); });
  // pan and zoom on the viewBox
  var vb = [0, 0, st.width, st.height], drag = null;
  function setVB(){ svg.setAttribute("viewBox", vb.join(" ")); }
  svg.addEventListener("wheel", function(ev){ ev.preventDefault(); var r = svg.getBoundingClientRect();
    var f = ev.deltaY > 0 ? 1.15 : 1 / 1.15, mx = vb[0] + (ev.clientX - r.left) / r.width * vb[2],
        my = vb[1] + (ev.clientY - r.top) / r.height * vb[3];
    vb = [mx - (mx - vb[0]) * f, my - (my - vb[1]) * f, vb[2] * f, vb[3] * f]; setVB(); }, {passive: false});
  svg.addEventListener("mousedown", function(ev){ drag = [ev.clientX, ev.clientY, vb[0], vb[1]]; });
  window.addEventListener("mouseup", function(){ drag = null; });
  svg.addEventListener("mousemove", function(ev){ if (!drag) return; var r = svg.getBoundingClientRect();
    vb[0] = drag[2] - (ev.clientX - drag[0]) * vb[2] / r.width; vb[1] = drag[3] - (ev.clientY - drag[1]) * vb[3] / r.height;
    setVB(); });
  views.push({div: div, button: b});
});
function show(i){ views.forEach(function(v, j){ v.div.classList.toggle("on", i === j); v.button.classList.toggle("on", i === j); }); }
show(0);
document.documentElement.setAttribute("data-rendered-nodes", String(total));
document.documentElement.setAttribute("data-rendered-taps", String(taps));
document.getElementById("kd-status").textContent = "rendered " + total + " nodes and " + taps + " taps in " +
  DATA.stages.length + " stage(s)";
})();
</script>
</body></html>
"""


def to_html(stage_views: list[StageView]) -> str:
    """A self-contained HTML page (inline CSS and script, no network) drawing the stage views."""
    if not stage_views:
        raise KDGraphError("nothing to draw: no stage")
    data = {"spec": stage_views[0].spec, "colours": COLOURS, "pruned": PRUNED, "tap": TAP, "cluster_fill": CLUSTER_FILL,
            "stages": [layout(v) for v in stage_views]}
    text = json.dumps(data, separators=(",", ":"))
    # keep the JSON inert inside <script>: no "</script>" or "<!--" can end or open anything
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    title = _h(f"kdgraph · {stage_views[0].spec}")
    return _HTML.replace("__TITLE__", title).replace("__DATA__", text)


# ------------------------------------------------------------------------------------------------
# One entry point
# ------------------------------------------------------------------------------------------------


def render(distiller, path: str | Path, stage: int | str | None = "all", depth: int = 1,
           fmt: Optional[str] = None, dpi: int = 96) -> list[StageView]:
    """Draw ``stage`` (``"all"``: every stage, ``None``: the current one) to ``path``.

    The format follows the file's suffix (``.svg``, ``.png``, ``.dot``, ``.html``) unless ``fmt``
    names one. Returns the views drawn (their ``nodes`` / ``edges`` are what the picture shows).
    """
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt == "gv":
        fmt = "dot"
    if fmt not in FORMATS:
        raise KDGraphError(f"cannot draw to {str(path)!r}: unknown format {fmt!r}; use a file ending in "
                           f"{', '.join('.' + f for f in FORMATS)} (or pass the format)")
    vs = views(distiller, stage, depth)
    if fmt == "dot":
        data: bytes = to_dot(vs).encode()
    elif fmt == "html":
        data = to_html(vs).encode()
    else:
        data = run_dot(to_dot(vs), fmt, dpi)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return vs
