"""The passes over a stage's fused graph, listed once, in the order the pipeline runs them.

Each pass is a module with ``NAME`` and ``run(gm, ctx) -> PassResult`` (:class:`~kdgraph.compiler.report.PassResult`):
it rewrites ``gm.graph`` (and submodules) in place, reads only the graph, the node infos and the
:class:`PassContext`, and says what it changed. A new pass is a new file here and one entry in :data:`PASSES`.
"""
from __future__ import annotations

from typing import Iterable

import torch.fx as fx

from ..report import PassResult
from . import (chunked_vocab, cleanup, fold_teacher_bn, fsdp_schedule, inplace_safety, prune_teacher,
               teacher_channels_last, teacher_dtype, teacher_mkldnn, teacher_no_grad)
from .context import PassContext
from .teacher_no_grad import teacher_grad_off, teacher_grad_restore

__all__ = ["PASSES", "PassContext", "run_passes", "teacher_grad_off", "teacher_grad_restore"]

#: in order: in-place safety must see every tap's users before pruning; chunked_vocab rewires token losses from
#: Linear heads' logits to their inputs and drops the heads before pruning; BatchNorm folding works on the teacher
#: nodes that survived pruning; the teacher's layout and precision passes see the folded calls; teacher_mkldnn
#: (exclusive with those three: the spec refuses the mix) turns the surviving teacher into one call; fsdp_schedule
#: brackets each sharding unit's final nodes with its gather/re-shard; no-grad brackets every teacher node (theirs
#: too); cleanup (lint, unused submodules, recompile) is last
PASSES = (inplace_safety, chunked_vocab, prune_teacher, fold_teacher_bn, teacher_channels_last, teacher_dtype,
          teacher_mkldnn, fsdp_schedule, teacher_no_grad, cleanup)


def run_passes(gm: fx.GraphModule, ctx: PassContext, passes: Iterable = PASSES) -> list[PassResult]:
    """Run ``passes`` over ``gm`` in order; their results, in the same order."""
    results = []
    for p in passes:
        result = p.run(gm, ctx)
        assert result.name == p.NAME, f"pass {p.NAME} reported itself as {result.name}"
        results.append(result)
    return results
