"""Pass: an in-place op that would overwrite a tapped value is made out-of-place.

A tap reads a value by reference; torchvision's ``ReLU(inplace=True)`` after ``layer1.0/add`` would overwrite
it before the loss reads it. Every later user of a network tap's node (other than the adapters and losses that
read it) that writes into it in place is rewritten as its out-of-place twin (see :mod:`.inplace_ops`).
"""
from __future__ import annotations

import torch.fx as fx

from ..nodeinfo import Role, role_of
from ...spec import parse_tap
from ..report import PassResult
from .context import PassContext
from .inplace_ops import make_out_of_place, writes_into

__all__ = ["NAME", "run"]

NAME = "inplace_safety"


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    consumers = {n for n in gm.graph.nodes if role_of(n) in (Role.ADAPTER, Role.LOSS)}
    fixed: list[str] = []
    nodes: list[str] = []
    for text, node in ctx.taps.items():
        if parse_tap(text).source not in ("teacher", "student"):
            continue
        for user in list(node.users):
            # nodes this pass inserted (clones) have no order and write nothing
            if user in consumers or order.get(user, -1) <= order[node] or not writes_into(user, node, gm):
                continue
            nodes.append(user.name)
            fixed.append(f"{text}: {make_out_of_place(user, gm)}")
    summary = f"{len(fixed)} in-place op(s) made out-of-place" if fixed else "no tapped value is overwritten in place"
    return PassResult(NAME, bool(fixed), summary, {"fixed": fixed, "nodes": nodes})
