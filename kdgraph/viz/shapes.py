"""Shapes of one stage's networkx view written for people, with the batch an input transform makes.

Shapes downstream of an input transform that multiplies the batch (SSKD's four rotations) are traced
without it; :class:`ShapeText` scales their batch dimension back (``4B×512``), so the picture and the
``kdgraph compile`` summary print the same text for the same tap. The text itself is
:func:`kdgraph.formatting.shape`'s.
"""
from __future__ import annotations

from typing import Any, Optional

import networkx as nx

from .. import formatting
from ..compiler.nodeinfo import Role

__all__ = ["ShapeText"]


class ShapeText:
    """``shapes = ShapeText(to_networkx(d, stage))``; ``shapes.of_node(n)``, ``shapes.of_tap("teacher:layer4")``."""

    def __init__(self, G: nx.DiGraph):
        self.graph = G
        self.batch: int = G.graph["batch_size"]
        self.factor = float(G.graph.get("batch_factor", 1.0))
        transform = next((n for n, a in G.nodes(data=True) if a["role"] == Role.TRANSFORM), None)
        self.scaled: set[str] = (nx.descendants(G, transform) if transform is not None and self.factor != 1.0
                                 else set())

    def factor_of(self, node: Optional[str]) -> float:
        """How much larger ``node``'s real batch dimension is than the traced one."""
        return self.factor if node in self.scaled else 1.0

    def of_node(self, node: str, shape: Any = None) -> str:
        """``node``'s shape (or ``shape``, a value read at ``node``) as text."""
        value = self.graph.nodes[node]["shape"] if shape is None else shape
        return formatting.shape(value, self.batch, self.factor_of(node))

    def of_tap(self, tap: str, shape: Any = None) -> str:
        """The shape a tap reads (``shape`` overrides the graph's, e.g. a tuple item's)."""
        node = self.graph.graph["taps"].get(tap)
        if node is None:
            return formatting.shape(shape, self.batch)
        return self.of_node(node, shape)

    def adapter_node(self, name: str) -> Optional[str]:
        """The node calling adapter ``name`` (``None`` if the stage does not run it)."""
        return next((n for n, a in self.graph.nodes(data=True) if a["role"] == Role.ADAPTER
                     and a["op"] == "call_module" and a["owner"] == name), None)

    def lines(self, shape: Any, node: Optional[str]) -> list[str]:
        """One line per shape: ``["B×512"]``, or ``[".0 B×64", ".1 B×128"]`` for a tuple of shapes."""
        f = self.factor_of(node)
        if formatting.is_tuple_shape(shape):
            return [f".{i} {formatting.shape(s, self.batch, f)}" for i, s in enumerate(shape)]
        return [formatting.shape(shape, self.batch, f)]

    def of_adapter(self, name: str, shape: Any) -> str:
        """An adapter's output shape (a tuple's items joined by ``, ``)."""
        return ", ".join(self.lines(shape, self.adapter_node(name)))
