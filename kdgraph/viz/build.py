"""From the networkx view of a stage (:func:`kdgraph.distiller.graphview.to_networkx`) to a :class:`StageView`:
the fused graph's nodes grouped to module level (``depth``), each box described (module type, shape,
parameters, weights, frozen or trained), the taps on the edges that read them.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import networkx as nx
from torch import nn

from .. import formatting
from ..errors import KDGraphError
from ..distiller.graphview import collapse, to_networkx
from ..compiler.nodeinfo import Role
from .model import Kind, StageView, VEdge, VNode
from .shapes import ShapeText

__all__ = ["stage_view", "views"]


def _network_key(n: str, a: dict[str, Any], depth: int) -> str:
    role = str(a["role"])
    if depth <= 0:
        return role
    path = a.get("module_path") or ""
    parts = path.split(".") if path else []
    if a["op"] != "call_module":  # a functional op lives inside its scope module
        parts = parts + [str(a.get("name") or n).rsplit("/", 1)[-1]]
    if len(parts) > depth:
        return f"{role}:{'.'.join(parts[:depth])}"
    return f"{role}:{a.get('name') or n}"


def _group_key(depth: int) -> Callable[[str, dict[str, Any]], Optional[str]]:
    """The box a fused-graph node is drawn in (``None``: not drawn)."""

    def key(n: str, a: dict[str, Any]) -> Optional[str]:
        role = a["role"]
        if role in (Role.TEACHER, Role.STUDENT):
            return _network_key(n, a, depth)
        if role == Role.ADAPTER:
            return f"adapter:{a['owner']}"
        if role == Role.LOSS:
            return "loss:total" if a["owner"] == "total" else f"loss:{a['owner']}"
        if role == Role.INPUT:
            return f"input:{a['owner']}"
        if role == Role.TRANSFORM:
            return "transform"
        return None  # the output node: the total loss box says what leaves the graph

    return key


def _called(G, members: list[str]) -> str:
    """The function a box's members call (``chunked_token_losses``: a call several loss terms share)."""
    for m in members:
        if G.nodes[m]["op"] == "call_function":
            target = str(G.nodes[m]["target"])
            return target.split(" ")[1] if target.startswith("<function ") else target
    return "loss"


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


class _Describer:
    """Describes each group of one stage: (kind, title, lines, details)."""

    def __init__(self, distiller, G: nx.DiGraph, shapes: ShapeText):
        self.distiller, self.G, self.shapes = distiller, G, shapes
        self.spec = distiller.spec
        stage_spec = self.spec.stages[G.graph["stage_index"]]
        self.losses = {ls.name: ls for ls in stage_spec.losses}
        self.adapters = {a.name: a for a in distiller.build_stage(G.graph["stage_index"])[1].adapters}

    def __call__(self, gid: str, members: list[str], trainable: bool, pruned: bool):
        G = self.G
        first = G.nodes[members[0]]
        role = first["role"]
        out_name = _output_member(G, members)
        shape = self.shapes.of_node(out_name)
        taps = [t for m in members for t in G.nodes[m]["taps"]]
        details: dict[str, Any] = {"members": len(members), "taps": taps}
        if role in (Role.TEACHER, Role.STUDENT):
            return self._network(gid, members, first, Kind(role), shape, G.nodes[out_name]["dtype"], trainable,
                                 pruned, details)
        if role == Role.ADAPTER:
            return self._adapter(members, first, trainable, details)
        if role == Role.LOSS and first["owner"] == "total":
            losses = self.losses
            lines = [" + ".join(f"{losses[n].weight:g}·{n}" if losses[n].weight != 1 else n for n in losses)
                     if len(losses) <= 3 else f"sum of {len(losses)} weighted terms", "= out.loss"]
            return Kind.TOTAL, "total loss", lines, {**details, "terms": list(losses)}
        if role == Role.LOSS:
            return self._loss(members, first, trainable, details)
        if role == Role.INPUT:
            return Kind.INPUT, first["name"], [shape], details
        return Kind.TRANSFORM, str(first["name"]), ["input transform", shape], details

    def _network(self, gid, members, first, kind: Kind, shape, dtype, trainable, pruned, details):
        root = getattr(self.distiller, kind.value, None)
        name = gid.split(":", 1)[1] if ":" in gid else kind.value
        params = _unique_params(self.G, members)
        if len(members) == 1 and gid == f"{kind}:{first['name'] or members[0]}":
            what = first["module_type"] or first["target"].split(" ")[-1].strip("<>")
            if first["op"] != "call_module":
                what = f"{first['op'].removeprefix('call_')} {(first['name'] or members[0]).rsplit('/', 1)[-1]}"
        else:
            what = _describe_module(root, "" if ":" not in gid else name) or "module"
            if ":" not in gid:
                name = self.spec.teacher.model if kind == Kind.TEACHER else self.spec.student.model
        lines = [what, shape] + ([f"{formatting.count(params)} params"] if params else [])
        if pruned:
            lines.append("pruned (unused)")
        details.update(module_path=name, params=params, shape=shape, dtype=dtype, frozen=not trainable)
        return kind, name, lines, details

    def _adapter(self, members, first, trainable, details):
        G = self.G
        owner = first["owner"]
        rep = self.adapters.get(owner)
        call = next((G.nodes[m] for m in members if G.nodes[m]["op"] == "call_module"), first)
        params = rep.parameters if rep is not None else call["params"]
        shape_lines = self.shapes.lines(rep.output_shape if rep is not None else call["shape"], members[0])
        lines = [f"{rep.type} ({call['module_type']})" if rep else str(call["module_type"]), *shape_lines,
                 f"{formatting.count(params)} params", "trainable" if trainable else "frozen"]
        details.update(type=rep.type if rep else None, args=rep.args if rep else {},
                       inputs=rep.inputs if rep else {}, params=params, shape=" ".join(shape_lines),
                       frozen=not trainable)
        return Kind.ADAPTER, owner, lines, details

    def _loss(self, members, first, trainable, details):
        owner = first["owner"]
        ls = self.losses.get(owner)
        lines = [ls.type if ls else first["module_type"] or _called(self.G, members)]
        if ls is not None:
            lines.append(f"weight {ls.weight:g}")
            if ls.args:
                lines.append(", ".join(f"{k}={v}" for k, v in ls.args.items()))
        if trainable:
            lines.append("trainable")
        details.update(type=ls.type if ls else None, weight=ls.weight if ls else None, args=ls.args if ls else {})
        if self.G.graph.get("loss_node") in members:  # the stage's only term is the total itself
            lines.append("= out.loss")
        return Kind.LOSS, owner, lines, details


def stage_view(distiller, stage: int | str | None = None, depth: int = 1) -> StageView:
    """Collapse one stage's networkx view to ``depth`` and describe each box (see :mod:`kdgraph.viz`)."""
    G = to_networkx(distiller, stage)
    spec = distiller.spec
    si = G.graph["stage_index"]
    stage_spec = spec.stages[si]
    train = list(stage_spec.train)
    H = collapse(G, _group_key(depth))
    shapes = ShapeText(G)
    describe = _Describer(distiller, G, shapes)
    order = {n: i for i, n in enumerate(G.nodes)}
    nodes: dict[str, VNode] = {}
    for gid, ga in H.nodes(data=True):
        members = ga["members"]
        pruned = all(G.nodes[m]["pruned"] for m in members)
        trainable = any(G.nodes[m]["trainable"] for m in members)
        kind, title, lines, details = describe(gid, members, trainable, pruned)
        nodes[gid] = VNode(gid, kind, title, [ln for ln in lines if ln], members, trainable, pruned,
                           float(min(order[m] for m in members)), details)
    edges: list[VEdge] = []
    for u, v, ea in H.edges(data=True):
        taps = [(t, shapes.of_tap(t, s)) for t, s in zip(ea["taps"], ea["shapes"])]
        edges.append(VEdge(u, v, taps, bool(ea["pruned"]), "tap" if taps else "flow", nodes[v].kind))
    # drop inputs nothing reads (e.g. targets in a stage without a cross-entropy term)
    used = {e.src for e in edges} | {e.dst for e in edges}
    for gid in [g for g, n in nodes.items() if n.kind == Kind.INPUT and g not in used]:
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
