"""Pass: run the frozen teacher's convolutions in channels_last (NHWC) memory, whatever layout the student uses.

The teacher's input is converted once, right before its first node (:func:`to_channels_last`, a node with the
teacher's role); convolutions, BatchNorm, ReLU, pooling and additions then keep channels_last, which oneDNN (CPU)
and cuDNN (GPU) run faster. Every tapped teacher value is given back to its readers (losses, adapters,
``return_taps``) in the default contiguous layout (:func:`~.tap_values.restore_tap`): a copy, identical values.

The teacher module is not changed: its parameters keep their memory format, so ``state_dict``, checkpoints,
``load_state_dict`` and ``load_weights`` see exactly what they saw before. The weights of calls that
``fold_teacher_bn`` folded are derived data already; this pass asks for them in channels_last
(:attr:`FoldedConvBN.memory_format`, rebuilt with the folded values when the weights change). An unfolded
``Conv2d`` keeps its contiguous weight, which the convolution reorders per call (measured: ~3% of the
teacher's forward on CPU); ``runtime.channels_last`` (both networks, parameters included) avoids that.

Switched by ``runtime.teacher_channels_last`` (default off: the convolutions round differently in NHWC,
~1e-6 relative on the teacher's logits, and kdgraph's default graph is bit-for-bit the eager computation).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..nodeinfo import Role, derive, role_of
from ..report import PassResult
from .context import PassContext
from .fold_teacher_bn import FoldedConvBN
from .tap_values import restore_tap_node, teacher_tap_nodes

__all__ = ["NAME", "run", "to_channels_last"]

NAME = "teacher_channels_last"


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels_last memory when it is a 4-D tensor (an image batch), else ``x`` unchanged."""
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if not ctx.teacher_channels_last:
        return PassResult(NAME, False, "off (runtime.teacher_channels_last: true turns it on)", {})
    graph = gm.graph
    teacher = [n for n in graph.nodes if role_of(n) is Role.TEACHER]
    if not teacher:
        return PassResult(NAME, False, "no teacher nodes", {})
    members = set(teacher)
    # the teacher's inputs: values made outside the teacher (the batch's images, a transform's output)
    inputs: dict[fx.Node, list[fx.Node]] = {}
    for n in teacher:
        for a in n.all_input_nodes:
            if a not in members and role_of(a) is not Role.GRAD_MODE:
                inputs.setdefault(a, []).append(n)
    converted = []
    for x, users in inputs.items():
        with graph.inserting_before(teacher[0]):
            cl = graph.call_function(to_channels_last, (x,))
        derive(cl, teacher[0], "channels_last")
        for u in users:
            u.replace_input_with(x, cl)
        converted.append(x.name)
    folded = []
    for n in teacher:
        mod = gm.get_submodule(str(n.target)) if n.op == "call_module" else None
        if isinstance(mod, FoldedConvBN):
            mod.memory_format = torch.channels_last
            folded.append(n.name)
    restored = {}
    for text, node in teacher_tap_nodes(ctx.taps, graph).items():
        r = restore_tap_node(graph, node, contiguous=True)
        if r is not None:
            restored[text] = r.name
    return PassResult(NAME, True, f"teacher input(s) {', '.join(converted)} in channels_last; "
                                  f"{len(folded)} folded weight(s) derived in channels_last; "
                                  f"{len(restored)} tap(s) given back contiguous",
                      {"inputs": converted, "folded_channels_last": folded, "retapped": restored})
