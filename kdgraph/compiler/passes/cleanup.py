"""Pass, always last: check the graph (``lint``), drop the submodules no node calls any more, regenerate code."""
from __future__ import annotations

import torch.fx as fx

from ..report import PassResult
from .context import PassContext

__all__ = ["NAME", "run"]

NAME = "cleanup"


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    gm.graph.lint()
    before = [name for name, _ in gm.named_modules() if name]
    gm.delete_all_unused_submodules()
    kept = {name for name, _ in gm.named_modules() if name}
    removed = [name for name in before if name not in kept]
    gm.recompile()
    summary = f"dropped {len(removed)} unused submodule(s)" if removed else "graph checked, code regenerated"
    return PassResult(NAME, bool(removed), summary, {"removed_submodules": removed})
