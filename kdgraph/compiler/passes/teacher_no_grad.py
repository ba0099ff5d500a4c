"""Pass: run the teacher's nodes with autograd off (``torch.no_grad`` semantics, inside the graph).

The teacher's parameters are frozen already, so no graph would be recorded; switching grad mode off also skips
autograd's per-op bookkeeping, as a hand-written ``with torch.no_grad()`` does. A :func:`teacher_grad_off` node
goes right before the teacher's first node, :func:`teacher_grad_restore` right after its last.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..nodeinfo import NodeInfo, Role, role_of, set_info
from ..report import PassResult
from .context import PassContext

__all__ = ["NAME", "run", "teacher_grad_off", "teacher_grad_restore"]

NAME = "teacher_no_grad"


def teacher_grad_off() -> bool:
    """Switch autograd off for the teacher's nodes; return the mode to restore."""
    prev = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)
    return prev


def teacher_grad_restore(prev: bool) -> None:
    """Restore the grad mode saved by :func:`teacher_grad_off`."""
    torch._C._set_grad_enabled(prev)


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    graph = gm.graph
    nodes = [n for n in graph.nodes if role_of(n) is Role.TEACHER]
    if not nodes:
        return PassResult(NAME, False, "no teacher nodes", {"teacher_nodes": 0})
    with graph.inserting_before(nodes[0]):
        prev = set_info(graph.call_function(teacher_grad_off, ()), NodeInfo(Role.GRAD_MODE, "teacher_grad_off"))
    with graph.inserting_after(nodes[-1]):
        set_info(graph.call_function(teacher_grad_restore, (prev,)), NodeInfo(Role.GRAD_MODE, "teacher_grad_restore"))
    return PassResult(NAME, True, f"autograd off around the teacher's {len(nodes)} node(s)",
                      {"teacher_nodes": len(nodes), "first": nodes[0].name, "last": nodes[-1].name})
