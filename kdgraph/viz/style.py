"""The drawing's colours: one palette for the DOT and the HTML renderers, by box kind."""
from __future__ import annotations

from .model import DEdge, VNode, Kind

__all__ = ["COLOURS", "PRUNED", "TAP", "CLUSTER_FILL", "FLOW_EDGE", "node_colours", "edge_colour"]

Colours = tuple[str, str, str]  # (fill, border, font colour)

#: box kind -> (fill, border, font colour)
COLOURS: dict[str, Colours] = {
    Kind.TEACHER: ("#dbe8f6", "#3f6f9f", "#1d3550"),
    Kind.STUDENT: ("#dcefd8", "#3f7f3a", "#1f3d1c"),
    Kind.ADAPTER: ("#fde2bf", "#c06c10", "#5a3208"),
    Kind.LOSS: ("#f8d3d3", "#b03a3a", "#561a1a"),
    Kind.TOTAL: ("#b03a3a", "#7a1f1f", "#ffffff"),
    Kind.INPUT: ("#ececec", "#6f6f6f", "#2b2b2b"),
    Kind.TRANSFORM: ("#e5dbf3", "#6f4a9e", "#35204f"),
}
PRUNED: Colours = ("#f5f5f5", "#c4c4c4", "#a8a8a8")
TAP: Colours = ("#fffbe0", "#8a7a2a", "#3a3310")  # a tapped value, on the edge to its readers
CLUSTER_FILL = {Kind.TEACHER: "#f3f7fc", Kind.STUDENT: "#f3faf2"}
FLOW_EDGE = "#8c8c8c"


def node_colours(n: VNode) -> Colours:
    """A box's colours: faded when dead-code elimination removed it, else by its kind."""
    if n.pruned:
        return PRUNED
    if n.kind == Kind.TAP:
        return TAP
    return COLOURS.get(n.kind, COLOURS[Kind.INPUT])


def edge_colour(e: DEdge) -> str:
    """Grey for data flow, faded when pruned, else the border colour of the box that reads the tap."""
    if e.pruned:
        return PRUNED[1]
    if e.kind == "flow":
        return FLOW_EDGE
    return COLOURS.get(e.dst_kind, COLOURS[Kind.LOSS])[1]
