"""The view model of a drawing: boxes (:class:`VNode`), edges between them (:class:`VEdge`) and one stage's
collapsed view (:class:`StageView`), which also lays the taps out as small nodes of their own (:meth:`drawing`).

Built from the networkx view by :mod:`kdgraph.viz.build`; drawn by :mod:`kdgraph.viz.dot` and
:mod:`kdgraph.viz.webpage`. Nothing here knows about Graphviz or HTML.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

import networkx as nx

from ..compiler.nodeinfo import Role

__all__ = ["Kind", "VNode", "VEdge", "DEdge", "StageView"]


class Kind(str, Enum):
    """What a box of the drawing shows. The network, adapter, loss, input and transform kinds equal the
    :class:`~kdgraph.compiler.nodeinfo.Role` of the nodes they collapse (``Kind.LOSS == Role.LOSS == "loss"``)."""

    TEACHER = Role.TEACHER.value
    STUDENT = Role.STUDENT.value
    ADAPTER = Role.ADAPTER.value
    LOSS = Role.LOSS.value  # one loss term
    TOTAL = "total"  # the weighted sum, out.loss
    INPUT = Role.INPUT.value
    TRANSFORM = Role.TRANSFORM.value
    TAP = "tap"  # a tapped value, on the edges to the adapters / losses reading it

    def __str__(self) -> str:
        return self.value

    @property
    def is_network(self) -> bool:
        return self in (Kind.TEACHER, Kind.STUDENT)


@dataclass
class VNode:
    """One box: a group of fused-graph nodes (``members``) collapsed to module level, with its text."""

    id: str
    kind: Kind
    title: str
    lines: list[str]
    members: list[str]
    trainable: bool
    pruned: bool
    order: float  # position of its first member in the fused graph (stable layouts)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def cluster(self) -> Optional[Kind]:
        """The network cluster the box is drawn in (teacher / student), else ``None``."""
        return self.kind if self.kind.is_network else None


@dataclass
class VEdge:
    """Data flowing between two boxes; ``taps`` lists the taps read along it with their shapes."""

    src: str
    dst: str
    taps: list[tuple[str, str]]  # (tap, formatted shape)
    pruned: bool
    kind: str  # tap | flow
    dst_kind: Kind


@dataclass
class DEdge:
    """A drawn edge: ``flow`` (data between boxes), ``tap_in`` (value -> tap), ``tap_out`` (tap -> reader)."""

    src: str
    dst: str
    kind: str
    pruned: bool
    dst_kind: Kind


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
                    nodes[tid] = VNode(tid, Kind.TAP, tap, [shape], [], False, False, self.nodes[e.src].order + 0.5,
                                       {"tap": tap, "shape": shape, "reads": e.src, "read_by": []})
                    edges.append(DEdge(e.src, tid, "tap_in", False, e.dst_kind))
                tid = tap_ids[key]
                nodes[tid].details["read_by"].append(e.dst)
                edges.append(DEdge(tid, e.dst, "tap_out", False, e.dst_kind))
        return nodes, edges
