"""Pass: dead-code elimination; the teacher nodes no loss needs disappear (``avgpool``/``fc`` behind a feature tap).

An in-place op whose mutated input is read later stays even if its own result is unused. The details list
every removed teacher node (name, tap name, op, target, shape) for the report and the graph view.
"""
from __future__ import annotations

import torch.fx as fx

from ..nodeinfo import Role, info_of, role_of
from ..report import PassResult
from .context import PassContext
from .inplace_ops import is_inplace

__all__ = ["NAME", "run"]

NAME = "prune_teacher"


def _shape(n: fx.Node):
    meta = n.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    graph = gm.graph
    before = list(graph.nodes)
    order = {n: i for i, n in enumerate(before)}

    def impure(n: fx.Node) -> bool:
        if n.op in ("placeholder", "output"):
            return True
        if is_inplace(n, gm) and n.args and isinstance(n.args[0], fx.Node):
            return any(order[u] > order[n] for u in n.args[0].users if u is not n)
        return n.is_impure()

    graph.eliminate_dead_code(is_impure_node=impure)
    alive = set(graph.nodes)
    removed = [n for n in before if n not in alive]
    teacher = [{"name": n.name, "tap": info_of(n).name, "op": n.op, "target": str(n.target), "shape": _shape(n)}
               for n in removed if role_of(n) is Role.TEACHER]
    other = [n.name for n in removed if role_of(n) is not Role.TEACHER]
    if removed:
        names = ", ".join(p["tap"] or p["name"] for p in teacher[:8]) + (", ..." if len(teacher) > 8 else "")
        summary = f"removed {len(teacher)} teacher node(s)" + (f" ({names})" if teacher else "") \
            + (f" and {len(other)} other node(s)" if other else "")
    else:
        summary = "every node is needed"
    return PassResult(NAME, bool(removed), summary, {"teacher_pruned": teacher, "other_removed": other})
