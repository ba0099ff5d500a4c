"""Pass: run the frozen teacher on the CPU in oneDNN's blocked layout, its BatchNorms folded, as one call.

The teacher's nodes that survived pruning become one subgraph (its inputs: what they read from outside the
teacher; its outputs: every teacher value read outside it, i.e. the taps and the logits), called by one node,
:class:`MkldnnTeacher`. On a CPU float32 input with autograd off, that call runs a copy of the subgraph made by
:func:`~.onednn_layout.onednn_copy`: each ``Conv2d`` with its weight reordered once for oneDNN and the BatchNorm
after it folded in, the activations kept in oneDNN's blocked layout between the ops that support it
(convolution, ReLU, pooling, addition) and converted back to dense tensors only where a value leaves the
subgraph or meets another op. An eager teacher reorders every activation into and out of that layout at every
convolution, and reorders the weights at every call; that is what this pass saves.

The copy is derived data, like ``fold_teacher_bn``'s folded weights: the teacher module, its ``state_dict`` and
checkpoints are the user's and stay as they are; the copy is rebuilt when a teacher parameter or buffer changes
(weights loaded when training starts, ``load_state_dict``, ``--resume``), at the next call. It costs memory: one
oneDNN copy of the teacher's convolution weights (ResNet-34: ~85 MB). Exact up to float rounding (a folded,
reordered convolution sums in another order: ~1e-6 relative on ResNet-34's logits; docs/training.md).

Everything else runs the plain subgraph, the teacher's own modules: an input on another device or in another
dtype, autograd on, a teacher module in training mode, tracing by ``torch.compile``. That keeps the graph correct
after ``.to("cuda")``; the pass itself is for the CPU (on a GPU, ``teacher_channels_last`` and ``teacher_dtype``
are the teacher passes to use).

Switched by ``runtime.teacher_mkldnn`` (default off). It folds and lays out the teacher itself, so the spec
refuses it together with ``fold_teacher_bn``, ``teacher_channels_last`` or ``teacher_dtype``.
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn

from ..nodeinfo import NodeInfo, Role, role_of, set_info
from ..report import PassResult
from .context import PassContext
from .onednn_layout import onednn_copy

__all__ = ["NAME", "run", "MkldnnTeacher", "HOLDER"]

NAME = "teacher_mkldnn"
HOLDER = "teacher_mkldnn"  # the GraphModule's submodule that runs the teacher's subgraph
_CONVERTED = (nn.Conv2d,)  # the modules onednn_copy reorders for oneDNN


class MkldnnTeacher(nn.Module):
    """The teacher's subgraph, run through its oneDNN copy when it can be (see the module docstring).

    ``plain`` calls the teacher's own modules; it is held as a plain attribute, not a submodule, so the graph's
    ``state_dict`` and ``parameters()`` do not list the teacher a second time (the Distiller holds the teacher)."""

    def __init__(self, plain: fx.GraphModule):
        super().__init__()
        object.__setattr__(self, "_plain", plain)
        object.__setattr__(self, "_fast", None)  # (key, the optimised copy)
        # the teacher's modules the subgraph calls (not the containers fx made for them), looked up once
        object.__setattr__(self, "_modules_called", [plain.get_submodule(str(n.target)) for n in plain.graph.nodes
                                                     if n.op == "call_module"])
        self.builds = 0  # how many times the copy was (re)built, for tests and the curious

    @property
    def plain(self) -> fx.GraphModule:
        return self._plain

    def represented_parameters(self) -> list[nn.Parameter]:
        """The teacher's parameters this call stands for (for views that count parameters per node)."""
        return list(self._plain.parameters())

    def _usable(self, args: tuple, tensors: list[torch.Tensor]) -> bool:
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return False
        if not all(isinstance(a, torch.Tensor) and a.device.type == "cpu" and a.dtype == torch.float32
                   and a.layout == torch.strided for a in args):
            return False
        if any(m.training for m in self._modules_called):
            return False
        return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors if t.is_floating_point())

    def build(self) -> fx.GraphModule:
        """A fresh oneDNN copy of the subgraph for the teacher's current weights."""
        fast = onednn_copy(self._plain)
        self.builds += 1
        return fast

    def forward(self, *args: Any) -> Any:
        tensors = [*self._plain.parameters(), *self._plain.buffers()]  # listed once per call, read twice
        if not self._usable(args, tensors):
            return self._plain(*args)
        key = tuple((t._version, t.data_ptr(), t.device, t.dtype) for t in tensors)
        if self._fast is None or self._fast[0] != key:
            object.__setattr__(self, "_fast", None)  # free the stale copy before building the next one
            object.__setattr__(self, "_fast", (key, self.build()))
        return self._fast[1](*args)

    def extra_repr(self) -> str:
        return f"{len(self._plain.graph.nodes)} node(s), oneDNN layout on the CPU"


def _subgraph(gm: fx.GraphModule, nodes: list[fx.Node]) -> tuple[fx.GraphModule, list[fx.Node], list[fx.Node]]:
    """The teacher's ``nodes`` as a GraphModule over ``gm``'s modules; the outside nodes it reads (its inputs, in
    order) and the teacher nodes read outside it (its outputs, in order)."""
    members = set(nodes)
    inputs: list[fx.Node] = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in members and a not in inputs:
                inputs.append(a)
    outputs = [n for n in nodes if any(u not in members for u in n.users)]
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, a in enumerate(inputs):
        env[a] = g.placeholder(f"input_{i}")
    for n in nodes:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[o] for o in outputs))
    return fx.GraphModule(gm, g, class_name="TeacherSubgraph"), inputs, outputs


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if not ctx.teacher_mkldnn:
        return PassResult(NAME, False, "off (runtime.teacher_mkldnn: true turns it on)", {"teacher_nodes": 0})
    graph = gm.graph
    nodes = [n for n in graph.nodes if role_of(n) is Role.TEACHER]
    if not nodes:
        return PassResult(NAME, False, "no teacher nodes", {"teacher_nodes": 0})
    converted = [n for n in nodes if n.op == "call_module" and type(gm.get_submodule(str(n.target))) in _CONVERTED]
    if not converted:
        return PassResult(NAME, False, "the teacher calls no Conv2d module (an exported graph's aten "
                                       "convolutions are not converted)", {"teacher_nodes": len(nodes)})
    sub, inputs, outputs = _subgraph(gm, nodes)
    order = {n: i for i, n in enumerate(graph.nodes)}
    if any(order[a] > order[nodes[0]] for a in inputs):
        return PassResult(NAME, False, "the teacher reads a value computed after its first node; left as it is",
                          {"teacher_nodes": len(nodes)})
    gm.add_submodule(HOLDER, MkldnnTeacher(sub))
    with graph.inserting_before(nodes[0]):
        call = set_info(graph.call_module(HOLDER, tuple(inputs)), NodeInfo(Role.TEACHER, "teacher (oneDNN)", HOLDER))
        items: dict[fx.Node, fx.Node] = {}
        for i, o in enumerate(outputs):
            items[o] = set_info(graph.call_function(operator.getitem, (call, i)),
                                NodeInfo(Role.TEACHER, f"teacher (oneDNN)/{i}", derived_from=o.name))
            items[o].meta.update({k: v for k, v in o.meta.items() if k == "tensor_meta"})
    members = set(nodes)
    for o, item in items.items():
        for u in [u for u in o.users if u not in members]:
            u.replace_input_with(o, item)
    for n in reversed(nodes):
        graph.erase_node(n)
    retapped = {text: items[node].name for text, node in ctx.taps.items() if node in items}
    return PassResult(NAME, True, f"teacher's {len(nodes)} node(s) run as one oneDNN subgraph on the CPU "
                                  f"({len(converted)} Conv2d reordered, BatchNorm folded); "
                                  f"{len(outputs)} value(s) leave it",
                      {"teacher_nodes": len(nodes), "converted": [str(n.target) for n in converted],
                       "outputs": [o.name for o in outputs], "retapped": retapped})


def fast_copy(gm: fx.GraphModule) -> Optional[fx.GraphModule]:
    """The oneDNN copy the graph's teacher call last ran (None before its first CPU call), for tests and views."""
    holder = getattr(gm, HOLDER, None)
    return holder._fast[1] if isinstance(holder, MkldnnTeacher) and holder._fast is not None else None
