"""The DOT renderer (Graphviz's language) and running Graphviz's ``dot`` for SVG / PNG."""
from __future__ import annotations

import html
import shutil
import subprocess

from ..errors import KDGraphError
from .model import DEdge, Kind, StageView, VNode
from .style import CLUSTER_FILL, COLOURS, PRUNED, TAP, edge_colour, node_colours

__all__ = ["to_dot", "run_dot", "dot_binary", "GraphvizMissing"]


class GraphvizMissing(KDGraphError):
    """Graphviz's ``dot`` program is needed (SVG, PNG) but not installed."""


def _q(s: object) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _h(s: object) -> str:
    return html.escape(str(s), quote=True)


def _dot_node(prefix: str, n: VNode) -> str:
    fill, border, font = node_colours(n)
    if n.kind == Kind.TAP:
        label = f'<<FONT POINT-SIZE="10">{_h(n.title)}</FONT><BR/><FONT POINT-SIZE="8">{_h(n.lines[0])}</FONT>>'
        return (f"{_q(prefix + n.id)} [label={label}, shape=box, style=\"rounded,filled\", fillcolor={_q(fill)}, "
                f"color={_q(border)}, fontcolor={_q(font)}, penwidth=0.8, margin=\"0.05,0.02\", height=0.3, "
                f"tooltip={_q('tap ' + n.title + ' ' + n.lines[0])}];")
    frozen = n.kind in (Kind.TEACHER, Kind.STUDENT, Kind.ADAPTER) and not n.trainable
    style = "rounded,filled" + (",dashed" if frozen or n.pruned else "")
    pen = "2.2" if n.trainable else "1.0"
    sub = "".join(f'<BR/><FONT POINT-SIZE="9">{_h(ln)}</FONT>' for ln in n.lines)
    label = f"<<B>{_h(n.title)}</B>{sub}>"
    shape = "cds" if n.kind == Kind.INPUT else "box"
    tip = f"{n.kind} {n.title}: " + "; ".join(n.lines)
    return (f"{_q(prefix + n.id)} [label={label}, shape={shape}, style={_q(style)}, fillcolor={_q(fill)}, "
            f"color={_q(border)}, fontcolor={_q(font)}, penwidth={pen}, tooltip={_q(tip)}];")


def _dot_edge(prefix: str, e: DEdge) -> str:
    attrs = {"color": edge_colour(e)}
    if e.pruned:
        attrs.update(style="dashed", arrowhead="onormal")
    elif e.kind == "tap_in":
        attrs.update(arrowhead="none", penwidth="1.5")
    elif e.kind == "tap_out":
        attrs.update(penwidth="1.5")
    body = ", ".join(f"{k}={_q(v)}" for k, v in attrs.items())
    return f"{_q(prefix + e.src)} -> {_q(prefix + e.dst)} [{body}];"


def _legend_cells() -> str:
    def cell(kind: Kind, text: str, dashed: bool = False, fade: bool = False, bold: bool = False) -> str:
        fill, border, font = PRUNED if fade else COLOURS[kind]
        style = ' STYLE="dashed"' if dashed else ""
        return (f'<TD BGCOLOR="{fill}" COLOR="{border}" BORDER="{2 if bold else 1}"{style}><FONT COLOR="{font}" '
                f'POINT-SIZE="9">{_h(text)}</FONT></TD>')

    tap = (f'<TD BGCOLOR="{TAP[0]}" COLOR="{TAP[1]}" BORDER="1"><FONT COLOR="{TAP[2]}" POINT-SIZE="9">tap '
           f'(tapped value, shape)</FONT></TD>')
    return "".join([cell(Kind.TEACHER, "teacher"), cell(Kind.STUDENT, "student"), cell(Kind.ADAPTER, "adapter"),
                    cell(Kind.LOSS, "loss term"), cell(Kind.TOTAL, "total loss"), cell(Kind.INPUT, "batch input"),
                    cell(Kind.TRANSFORM, "input transform"), tap, cell(Kind.ADAPTER, "frozen: dashed", dashed=True),
                    cell(Kind.STUDENT, "trains: bold", bold=True), cell(Kind.TEACHER, "pruned by DCE", fade=True)])


def _graph_label(title: str, legend: bool) -> str:
    rows = f'<TR><TD ALIGN="LEFT"><FONT POINT-SIZE="15"><B>{_h(title)}</B></FONT></TD></TR>'
    if legend:
        rows += (f'<TR><TD ALIGN="LEFT"><TABLE BORDER="0" CELLSPACING="3" CELLPADDING="3"><TR>{_legend_cells()}'
                 f'</TR></TABLE></TD></TR>'
                 f'<TR><TD ALIGN="LEFT"><FONT POINT-SIZE="9">Boxes: module, output shape (B = batch), parameters. '
                 f'Yellow tags: the taps adapters and losses read, on the edges they read.</FONT></TD></TR>')
    return f'<<TABLE BORDER="0" CELLSPACING="0" CELLPADDING="2">{rows}</TABLE>>'


def _stage_lines(v: StageView, multi: bool) -> list[str]:
    p = f"s{v.index}_"
    ind = "    " if multi else "  "
    out = []
    if multi:
        out.append(f"  subgraph {_q('cluster_' + p + 'stage')} {{")
        out.append(f"    label={_q(v.title)}; style=\"rounded\"; color=\"#9a9a9a\"; fontsize=13;")
    for role in (Kind.STUDENT, Kind.TEACHER):
        members = [n for n in v.nodes.values() if n.kind == role]
        if not members:
            continue
        state = "frozen" if v.frozen[role] else "trains"
        border = COLOURS[role][1]
        style = "rounded,filled" + (",dashed" if v.frozen[role] else "")
        out.append(f"{ind}subgraph {_q(f'cluster_{p}{role}')} {{")
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
    return out


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
        out.extend(_stage_lines(v, multi))
    out.append("}")
    return "\n".join(out) + "\n"


def dot_binary() -> str:
    """The path of Graphviz's ``dot``; :class:`GraphvizMissing` (saying how to install it) if there is none."""
    exe = shutil.which("dot")
    if exe is None:
        raise GraphvizMissing(
            "drawing SVG or PNG needs Graphviz's `dot` program, which is not installed. Install it "
            "(Debian/Ubuntu: `sudo apt-get install graphviz`, macOS: `brew install graphviz`, conda: "
            "`conda install graphviz`), or write a .dot file or a self-contained .html page, which need no Graphviz.")
    return exe


def run_dot(dot_text: str, fmt: str = "svg", dpi: int = 96) -> bytes:
    """Lay out ``dot_text`` with Graphviz and return the ``fmt`` (svg, png) bytes."""
    args = [dot_binary(), f"-T{fmt}"]
    if fmt == "png":
        args.append(f"-Gdpi={dpi}")
    proc = subprocess.run(args, input=dot_text.encode(), capture_output=True, timeout=300)
    if proc.returncode != 0:
        raise KDGraphError(f"Graphviz `dot -T{fmt}` failed ({proc.returncode}): "
                           f"{proc.stderr.decode(errors='replace').strip()[:800]}")
    return proc.stdout
