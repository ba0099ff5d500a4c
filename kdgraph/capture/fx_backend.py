"""The torch.fx capture backend: a scope-recording symbolic tracer, node naming, and shape propagation.

:func:`capture` symbolically traces a module with :class:`_ScopeTracer` (which records, for every node, the
module whose forward created it, and every module call's input and output), names each node for taps
(:class:`~kdgraph.capture.network.TracedNetwork`), and records every node's shape and dtype on fake tensors
(:func:`propagate_shapes`). Errors are one :class:`~kdgraph.errors.TraceError` sentence saying what to do.
"""
from __future__ import annotations

import contextlib
import io
import operator
import re
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import TraceError
from .network import ModuleCall, TracedNetwork, name_ops

__all__ = ["NAME", "capture", "trace_network", "propagate_shapes"]

#: the backend's name in :data:`kdgraph.capture.BACKENDS`
NAME = "fx"


class _ScopeTracer(fx.Tracer):
    """Records, for every node, the path of the module whose forward created it."""

    def __init__(self, leaf_types: tuple[type, ...]):
        from ..models.timm_support import timm_autowrap_functions

        # functions a model library marks as not traceable are called as one node (timm's, when imported)
        super().__init__(autowrap_functions=timm_autowrap_functions())
        self.leaf_types = leaf_types
        self.kd_path = ""
        self.calls: dict[str, list[ModuleCall]] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        path = self.path_of_module(m)
        outer = self.kd_path
        self.kd_path = path
        try:
            out = super().call_module(m, forward, args, kwargs)
        finally:
            self.kd_path = outer
        first = args[0] if args else next(iter(kwargs.values()), None)
        self.calls.setdefault(path, []).append(ModuleCall(
            path,
            first.node if isinstance(first, fx.Proxy) else None,
            out.node if isinstance(out, fx.Proxy) else None,
        ))
        return out

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):  # noqa: D401 - fx signature
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.meta["kd_scope"] = self.kd_path
        return node


def _op_stem(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    if node.op == "get_attr":
        return "getattr"
    target = node.target
    name = getattr(target, "__name__", None) or str(target)
    if target is operator.getitem:
        return "getitem"
    return re.sub(r"\W", "_", name).strip("_") or "op"


def capture(module: nn.Module, role: str, leaf_types: Iterable[type] = (),
            example: Optional[torch.Tensor] = None) -> TracedNetwork:
    """Trace ``module``, name its nodes and, given an ``example`` input, record every node's shape."""
    net = trace_network(module, role, leaf_types)
    if example is not None:
        propagate_shapes(net, example)
    return net


def trace_network(module: nn.Module, role: str, leaf_types: Iterable[type] = ()) -> TracedNetwork:
    """Symbolically trace ``module`` and name each node (``leaf_types``: called as one node, traced as is).

    Raises :class:`TraceError` with what to do."""
    tracer = _ScopeTracer(tuple(leaf_types))
    try:
        graph = tracer.trace(module)
    except Exception as e:  # noqa: BLE001 - fx raises many types; all mean the same to the user
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TraceError(
            f"torch.fx cannot trace the {role} ({type(module).__name__}): {type(e).__name__}: {first}. "
            f"This usually means data-dependent control flow (an `if` on a tensor value) or an untraceable "
            f"call inside some module. Mark that module class as a leaf in the spec:\n"
            f"  leaf_modules:\n    - {{module: 'package.module:ClassName', reason: 'why'}}\n"
            f"so it becomes one node (its inside can then not be tapped).") from None
    gm = fx.GraphModule(module, graph, class_name=f"{role.capitalize()}Traced")
    input_node = output_node = None
    ops: list[tuple[fx.Node, str, str]] = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            input_node = input_node or node
            continue
        if node.op == "output":
            out = node.args[0]
            output_node = out if isinstance(out, fx.Node) else None
            continue
        if node.op == "call_module":
            continue
        ops.append((node, node.meta.get("kd_scope", ""), _op_stem(node)))
    op_names, node_names = name_ops(ops)
    net = TracedNetwork(role, module, gm, tracer.calls, op_names, node_names, input_node, output_node, NAME)
    for path, calls in net.calls.items():
        for k, c in enumerate(calls):
            if c.output is not None and c.output not in node_names:
                node_names[c.output] = path if k == len(calls) - 1 else f"{path}#{k}"
    return net


def _failed_node(net: TracedNetwork, e: Exception) -> str:
    """`` at layer1.0.conv1`` when ShapeProp's message names the node that failed, else ``""``."""
    m = re.search(r"node=%?(\w+)", str(e))
    if not m:
        return ""
    for node in net.graph_module.graph.nodes:
        if node.name == m.group(1):
            name = net.node_names.get(node) or (node.target if node.op == "call_module" else node.name)
            return f" at {name}"
    return ""


@torch.no_grad()
def propagate_shapes(net: TracedNetwork, example: torch.Tensor) -> None:
    """Record every node's shape/dtype for an input like ``example`` (eval mode, no grad).

    Runs on fake tensors (no arithmetic, any input size costs the same); a network with an op that
    fake tensors cannot run is propagated on the real example instead. torch's ShapeProp prints the
    failing op's traceback to stderr; that print is swallowed and the error told in one sentence
    (which node failed and torch's one-line reason).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    module = net.module
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            try:
                fake = FakeTensorMode(allow_non_fake_inputs=True)
                ShapeProp(net.graph_module, fake_mode=fake).propagate(fake.from_tensor(example))
            except Exception:  # noqa: BLE001 - fall back to a real run, which gives the real error if any
                ShapeProp(net.graph_module).propagate(example)
    except Exception as e:  # noqa: BLE001
        node = _failed_node(net, e)
        cause = e.__cause__ if isinstance(e.__cause__, Exception) else e
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise TraceError(f"the {net.role} fails on an input of shape {list(example.shape)}{node}: {first}. "
                         f"Check the spec's `input` (channels, size: each layer needs a large enough input)."
                         ) from None
    finally:
        for m, mode in modes.items():
            m.training = mode
