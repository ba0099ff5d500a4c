"""The pipeline of one stage: fuse the graph, run the passes in order, report what was built and what changed.

    fuse_stage -> PASSES (inplace_safety, chunked_vocab, prune_teacher, fold_teacher_bn, teacher_channels_last,
                          teacher_dtype, teacher_mkldnn, fsdp_schedule, teacher_no_grad, cleanup) -> StageReport
"""
from __future__ import annotations

import torch.fx as fx
from torch import nn

from ..formatting import dtype as fmt_dtype
from .nodeinfo import NodeInfo, Role, set_info
from ..spec import parse_tap
from .fuse import FusedStage, fuse_stage
from .passes import PassContext, fsdp_schedule, inplace_safety, prune_teacher, run_passes
from .prepare import Prepared
from .report import AdapterReport, LossReport, PassResult, StageReport, TapReport

__all__ = ["build_stage", "stage_report", "with_tap_outputs"]


def build_stage(prep: Prepared, stage_index: int, teacher: nn.Module,
                student: nn.Module) -> tuple[fx.GraphModule, StageReport]:
    """Build the fused GraphModule of one stage. Modules are shared with the caller, not copied."""
    root = nn.Module()
    root.teacher = teacher
    root.student = student
    root.adapters = prep.adapters
    root.losses = prep.losses
    root.transforms = prep.transforms
    root.schedules = prep.schedules
    fused = fuse_stage(prep, stage_index, root)
    rt = prep.spec.runtime
    ctx = PassContext(prep.spec.stages[stage_index], fused.taps, fold_teacher_bn=rt.fold_teacher_bn,
                      teacher_channels_last=rt.teacher_channels_last, teacher_dtype=rt.teacher_dtype,
                      teacher_mkldnn=rt.teacher_mkldnn, fsdp=shard_plan(prep.spec, teacher, student),
                      chunked_vocab=rt.chunked_vocab.chunk_tokens if rt.chunked_vocab is not None else None,
                      networks={"teacher": teacher, "student": student})
    results = run_passes(fused.gm, ctx)
    return fused.gm, stage_report(prep, stage_index, fused, results)


def shard_plan(spec, teacher: nn.Module, student: nn.Module) -> fsdp_schedule.ShardPlan | None:
    """The networks ``runtime.distributed: fsdp`` shards and their units (None under ddp)."""
    rt = spec.runtime
    if rt.distributed != "fsdp":
        return None
    roles = {"student": (student, rt.fsdp.student_units)}
    if rt.fsdp.teacher == "sharded":
        roles = {"teacher": (teacher, rt.fsdp.teacher_units), **roles}
    return fsdp_schedule.ShardPlan({role: (net, fsdp_schedule.resolve_units(net, units, f"runtime.fsdp.{role}_units"))
                                    for role, (net, units) in roles.items()})


def stage_report(prep: Prepared, stage_index: int, fused: FusedStage, results: list[PassResult]) -> StageReport:
    """The report of a stage fused as ``fused`` whose passes gave ``results``."""
    stage = prep.spec.stages[stage_index]
    by_name = {r.name: r for r in results}
    inplace = by_name.get(inplace_safety.NAME)
    pruned = by_name.get(prune_teacher.NAME)
    uses_teacher = "teacher" in fused.networks
    report = StageReport(stage.name, stage_index, list(stage.train), [], [], [], list(fused.batch_inputs),
                         uses_teacher=uses_teacher, uses_student="student" in fused.networks,
                         transform=fused.transform, cached_taps=dict(fused.cached_taps), passes=list(results),
                         optional_batch_inputs=list(fused.optional_inputs))
    # the teacher's own nodes, all of them (for the report's total)
    report.teacher_nodes = len(prep.nets["teacher"].graph_module.graph.nodes) - 2 if uses_teacher else 0
    report.pruned_nodes = list(pruned.details["teacher_pruned"]) if pruned is not None else []
    report.teacher_nodes_pruned = len(report.pruned_nodes)
    report.inplace_fixed = list(inplace.details["fixed"]) if inplace is not None else []
    # a pass that hands a tap's readers another node (teacher_dtype, teacher_channels_last, teacher_mkldnn) names it
    retapped = {t: name for r in results for t, name in r.details.get("retapped", {}).items()}
    for text, node in fused.taps.items():
        meta = node.meta.get("tensor_meta")
        report.taps.append(TapReport(text, retapped.get(text, node.name), prep.tap_shape(parse_tap(text)),
                                     fmt_dtype(meta.dtype) if meta is not None else None,
                                     fused.tap_users.get(text, [])))
    for name in fused.adapters:
        srcs = {parse_tap(t).source for t in prep.adapter_inputs[name].values()}
        side = "teacher" if srcs <= {"teacher"} else "student" if srcs <= {"student"} else "mixed"
        out = prep.adapter_shapes.get(name)
        report.adapters.append(AdapterReport(
            name, prep.spec.adapters[name].type, dict(prep.adapter_args[name]), dict(prep.adapter_inputs[name]),
            sum(p.numel() for p in prep.adapters[name].parameters()), name in stage.train, side,
            out if not isinstance(out, list) else tuple(out)))
    for ls in stage.losses:
        report.losses.append(LossReport(ls.name, ls.type, ls.weight, dict(prep.loss_inputs[(stage.name, ls.name)])))
    return report


def with_tap_outputs(gm: fx.GraphModule, report: StageReport) -> fx.GraphModule:
    """A copy of a stage's graph whose output also holds every tap's value: ``out["taps"][text]``.

    The stage's own GraphModule is not changed (its output and its generated code stay as they
    are), so asking for tap values costs nothing unless this variant runs. Modules are shared."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = g.graph_copy(gm.graph, env)
    by_name = {n.name: n for n in gm.graph.nodes}
    taps = {t.tap: env[by_name[t.node]] for t in report.taps if t.node in by_name}
    set_info(g.output({**out, "taps": taps}), NodeInfo(Role.OUTPUT, "output"))
    return fx.GraphModule(gm, g, class_name=f"{type(gm).__name__}_taps")
