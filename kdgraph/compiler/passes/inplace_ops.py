"""What counts as an in-place op in an fx graph, and how to rewrite one as its out-of-place twin.

Shared by the in-place safety pass (which rewrites them) and the pruning pass (which keeps an in-place op whose
mutated input is read later, even when its own result is unused).
"""
from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
from torch import nn

from ..nodeinfo import derive

__all__ = ["is_inplace", "writes_into", "make_out_of_place", "SAFE_MODULES"]

#: where out-of-place copies of in-place modules go in the GraphModule (``inplace_safe.<path with __>``)
SAFE_MODULES = "inplace_safe"

_INPLACE_OPERATORS = {operator.iadd: operator.add, operator.imul: operator.mul, operator.isub: operator.sub,
                      operator.itruediv: operator.truediv}


def is_inplace(node: fx.Node, root: nn.Module) -> bool:
    """The node writes into its first input: a module with ``inplace=True``, ``inplace=True`` kwarg, ``relu_``,
    ``x += y``, ``x.add_(y)``."""
    if node.op == "call_module":
        try:
            mod = root.get_submodule(node.target)
        except AttributeError:
            return False
        return bool(getattr(mod, "inplace", False))
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return bool(node.kwargs.get("inplace", False)) or (name.endswith("_") and not name.endswith("__")) \
            or node.target in _INPLACE_OPERATORS
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    return False


def writes_into(node: fx.Node, value: fx.Node, root: nn.Module) -> bool:
    """``node`` is an in-place op that overwrites ``value`` (its first argument; with none, assume it may)."""
    return is_inplace(node, root) and (not node.args or node.args[0] is value)


def make_out_of_place(node: fx.Node, gm: fx.GraphModule) -> str:
    """Rewrite an in-place op as its out-of-place twin (a module copy shares parameters; only its flag differs);
    with no twin, clone its input first. Returns a description of the change."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        key = node.target.replace(".", "__")
        target = f"{SAFE_MODULES}.{key}"
        try:
            gm.get_submodule(target)
        except AttributeError:
            twin = copy.copy(mod)  # shares parameters; only the flag differs
            twin.inplace = False
            gm.add_submodule(target, twin)
        old = node.target
        node.target = target
        return f"{old} (inplace=True) -> out-of-place copy"
    if node.op == "call_function":
        if node.kwargs.get("inplace"):
            node.kwargs = {**node.kwargs, "inplace": False}
            return f"{node.name}: inplace=False"
        if node.target in _INPLACE_OPERATORS:
            node.target = _INPLACE_OPERATORS[node.target]
            return f"{node.name}: in-place operator -> out-of-place"
        name = node.target.__name__
        twin = getattr(torch, name[:-1], None)
        if twin is not None:
            node.target = twin
            return f"{node.name}: torch.{name} -> torch.{name[:-1]}"
    if node.op == "call_method":
        name = str(node.target)
        if hasattr(torch.Tensor, name[:-1]):
            node.target = name[:-1]
            return f"{node.name}: .{name}() -> .{name[:-1]}()"
    src = node.args[0]  # no twin: clone the input first
    with node.graph.inserting_before(node):
        clone = derive(node.graph.call_method("clone", (src,)), src, "clone")
    node.replace_input_with(src, clone)
    return f"{node.name}: input cloned before an in-place op"
