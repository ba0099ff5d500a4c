"""Pass: run the frozen teacher's nodes in bf16 or fp16 (autocast) while the rest of the step keeps its precision.

A :func:`teacher_autocast_on` node goes right before the teacher's first node and :func:`teacher_autocast_restore`
right after its last: between them the teacher's convolutions and matrix products run in ``runtime.teacher_dtype``
(autocast's rules: conv / linear / matmul in the low precision, reductions and softmax in fp32), on the device its
input is on. The student, adapters and losses run outside, in fp32 or under ``runtime.amp`` as before. Every
tapped teacher value is cast back to fp32 for its readers (:func:`~.tap_values.restore_tap`), so each loss gets
the dtype it gets without this pass.

The teacher module is not changed (autocast casts per call; no bf16 copy of a parameter is stored), so its
``state_dict``, checkpoints and weight loading are untouched and new weights take effect at once. Weights that
``fold_teacher_bn`` derived are derived in the low precision (:attr:`FoldedConvBN.dtype`): the values autocast
would cast them to on every call, stored once at half the size. Not exact: bf16
keeps 8 bits of mantissa (docs/training.md, "Teacher passes", has the measured errors); the teacher gets no
gradient either way. :class:`kdgraph.Distiller` restores the autocast state if a module raises in between.

Switched by ``runtime.teacher_dtype`` (``fp32``, the default: the teacher's nodes are not touched).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ..nodeinfo import NodeInfo, Role, role_of, set_info
from ..report import PassResult
from .context import PassContext
from .fold_teacher_bn import FoldedConvBN
from .tap_values import restore_tap_node, teacher_tap_nodes

__all__ = ["NAME", "run", "DTYPES", "teacher_autocast_on", "teacher_autocast_restore", "autocast_state_kept"]

NAME = "teacher_dtype"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def teacher_autocast_on(x: Any, dtype: torch.dtype) -> tuple:
    """Switch autocast to ``dtype`` on ``x``'s device type; return the state to restore."""
    dev = x.device.type if isinstance(x, torch.Tensor) else "cpu"
    prev = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
    torch.set_autocast_enabled(dev, True)
    torch.set_autocast_dtype(dev, dtype)
    return prev


def teacher_autocast_restore(prev: tuple) -> None:
    """Restore the autocast state saved by :func:`teacher_autocast_on`."""
    dev, enabled, dtype = prev
    torch.set_autocast_enabled(dev, enabled)
    torch.set_autocast_dtype(dev, dtype)


class autocast_state_kept:
    """Context manager: the autocast state of ``device_type`` is the same after the block as before it, even when
    the block raises between :func:`teacher_autocast_on` and :func:`teacher_autocast_restore`."""

    def __init__(self, device_type: str):
        self.dev = device_type

    def __enter__(self) -> None:
        self.prev = (self.dev, torch.is_autocast_enabled(self.dev), torch.get_autocast_dtype(self.dev))

    def __exit__(self, *exc: Any) -> None:
        teacher_autocast_restore(self.prev)


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if ctx.teacher_dtype == "fp32":
        return PassResult(NAME, False, "off (runtime.teacher_dtype: bf16 or fp16 turns it on)", {"dtype": "fp32"})
    graph = gm.graph
    nodes = [n for n in graph.nodes if role_of(n) is Role.TEACHER]
    if not nodes:
        return PassResult(NAME, False, "no teacher nodes", {"dtype": ctx.teacher_dtype})
    members = set(nodes)
    # the teacher's input (the images, or a transform's output): its device decides autocast's device type
    source = next((a for n in nodes for a in n.all_input_nodes if a not in members), None)
    if source is None:
        return PassResult(NAME, False, "the teacher reads no input", {"dtype": ctx.teacher_dtype})
    restored = {}
    for text, node in teacher_tap_nodes(ctx.taps, graph).items():
        r = restore_tap_node(graph, node, dtype=torch.float32)
        if r is not None:
            restored[text] = r.name
    folded = []
    for n in nodes:
        mod = gm.get_submodule(str(n.target)) if n.op == "call_module" else None
        if isinstance(mod, FoldedConvBN):
            mod.dtype = DTYPES[ctx.teacher_dtype]
            folded.append(n.name)
    nodes = [n for n in graph.nodes if role_of(n) is Role.TEACHER]  # with the restore_tap nodes
    with graph.inserting_before(nodes[0]):
        prev = set_info(graph.call_function(teacher_autocast_on, (source, DTYPES[ctx.teacher_dtype])),
                        NodeInfo(Role.GRAD_MODE, "teacher_autocast_on"))
    with graph.inserting_after(nodes[-1]):
        set_info(graph.call_function(teacher_autocast_restore, (prev,)),
                 NodeInfo(Role.GRAD_MODE, "teacher_autocast_restore"))
    return PassResult(NAME, True, f"teacher's {len(nodes)} node(s) under {ctx.teacher_dtype} autocast; "
                                  f"{len(folded)} folded weight(s) derived in {ctx.teacher_dtype}; "
                                  f"{len(restored)} tap(s) cast back to fp32",
                      {"dtype": ctx.teacher_dtype, "teacher_nodes": len(nodes), "folded_dtype": folded,
                       "retapped": restored})
