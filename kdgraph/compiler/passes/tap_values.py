"""Helper of the teacher passes: the one node that gives the losses a tapped teacher value in the form they expect.

A teacher pass that changes how the teacher computes (channels_last, bf16) must not change what a loss, an
adapter or ``return_taps`` reads. :func:`restore_tap_node` puts one :func:`restore_tap` call right after a tapped
teacher node and points every reader outside the teacher at it; a second pass reuses that node and only sets its
own keyword (``dtype=``, ``contiguous=``), so a tap costs at most one copy whatever passes ran.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx as fx

from ..nodeinfo import Role, derive, role_of

__all__ = ["restore_tap", "restore_tap_node", "teacher_tap_nodes", "RETAP_META"]

RETAP_META = "kdgraph_restore_tap"  # node.meta flag on the restore_tap node of a tap
_LOW = (torch.bfloat16, torch.float16)


def restore_tap(x: Any, dtype: Optional[torch.dtype] = None, contiguous: bool = False) -> Any:
    """``x`` (a tensor, or a tuple/list of them) with bf16/fp16 values cast to ``dtype`` and, if ``contiguous``,
    in the default (row-major) memory format; values are unchanged by the layout part (a copy, not a rounding)."""
    if isinstance(x, torch.Tensor):
        fmt = torch.contiguous_format if contiguous else torch.preserve_format
        if dtype is not None and x.dtype in _LOW:
            return x.to(dtype, memory_format=fmt)
        return x.contiguous() if contiguous else x
    if isinstance(x, (tuple, list)):
        return type(x)(restore_tap(v, dtype, contiguous) for v in x)
    return x


def restore_tap_node(graph: fx.Graph, tapped: fx.Node, **kwargs: Any) -> Optional[fx.Node]:
    """The :func:`restore_tap` node of teacher node ``tapped`` (created right after it, or the one an earlier pass
    created, whose keywords ``kwargs`` update); ``None`` when nothing outside the teacher reads ``tapped``."""
    existing = next((u for u in tapped.users if u.meta.get(RETAP_META)), None)
    if existing is not None:
        existing.kwargs = {**existing.kwargs, **kwargs}
        return existing
    readers = [u for u in tapped.users if role_of(u) is not Role.TEACHER]
    if not readers:
        return None
    with graph.inserting_after(tapped):
        node = derive(graph.call_function(restore_tap, (tapped,), dict(kwargs)), tapped, "restored")
    node.meta[RETAP_META] = True
    for u in readers:
        u.replace_input_with(tapped, node)
    return node


def teacher_tap_nodes(taps: dict, graph: fx.Graph) -> dict[str, fx.Node]:
    """Tap text -> the teacher node it reads, for the taps on the teacher that are still in ``graph``."""
    alive = set(graph.nodes)
    return {t: n for t, n in taps.items() if n in alive and role_of(n) is Role.TEACHER}
