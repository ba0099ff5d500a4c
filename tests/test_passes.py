"""Each pass alone, on a small hand-made GraphModule whose nodes carry NodeInfo: exactly what it changes.

Plus the pipeline: PASSES runs in the order listed, and the compile report lists exactly those passes.
"""
from __future__ import annotations

import json
import operator

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F

import kdgraph
from kdgraph.compiler import PASSES, PassContext, PassResult, run_passes
from kdgraph.compiler.passes import cleanup, inplace_safety, prune_teacher, teacher_no_grad
from kdgraph.compiler.nodeinfo import NodeInfo, Role, info_of, role_of, set_info
from kdgraph.spec import StageSpec

from conftest import small_spec

STAGE = StageSpec(name="main", train=["student"], optimizer={"lr": 0.1}, losses=[{"type": "cross_entropy"}])


class _Net(nn.Module):
    def __init__(self, inplace_relu: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=inplace_relu)
        self.fc = nn.Linear(4 * 8 * 8, 5)


def _root(inplace_relu: bool = False) -> nn.Module:
    torch.manual_seed(0)
    root = nn.Module()
    root.teacher = _Net(inplace_relu)
    root.student = _Net(inplace_relu)
    return root


class _Builder:
    """fx.Graph by hand: every node gets a NodeInfo, as the fuser would give it."""

    def __init__(self):
        self.g = fx.Graph()

    def node(self, role: Role, name: str, op: str, target, *args, **kwargs) -> fx.Node:
        module_path = target if op == "call_module" else None
        return set_info(self.g.create_node(op, target, args, kwargs, name=name), NodeInfo(role, name, module_path))

    def module(self, root: nn.Module, name: str = "Hand") -> fx.GraphModule:
        return fx.GraphModule(root, self.g, class_name=name)


def _x():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------------------------------- prune_teacher
def _prune_graph():
    b = _Builder()
    x = b.node(Role.INPUT, "images", "placeholder", "images")
    t_conv = b.node(Role.TEACHER, "teacher_conv", "call_module", "teacher.conv", x)
    # in place, result unused, but the loss reads t_conv afterwards: must stay
    b.node(Role.TEACHER, "teacher_relu_", "call_method", "relu_", t_conv)
    t_flat = b.node(Role.TEACHER, "teacher_flatten", "call_function", torch.flatten, t_conv, 1)
    t_fc = b.node(Role.TEACHER, "teacher_fc", "call_module", "teacher.fc", t_flat)
    b.node(Role.TEACHER, "teacher_add_", "call_method", "add_", t_fc, 1.0)  # in place on a value nobody reads
    s_conv = b.node(Role.STUDENT, "student_conv", "call_module", "student.conv", x)
    loss = b.node(Role.LOSS, "mse", "call_function", F.mse_loss, s_conv, t_conv)
    set_info(b.g.output({"loss": loss}), NodeInfo(Role.OUTPUT, "output"))
    return b.module(_root())


def test_prune_removes_exactly_the_dead_teacher_nodes_and_keeps_a_needed_inplace_op():
    gm = _prune_graph()
    root = _root()
    expected = F.mse_loss(root.student.conv(_x()), torch.relu(root.teacher.conv(_x())))
    result = prune_teacher.run(gm, PassContext(STAGE))
    assert isinstance(result, PassResult) and result.name == "prune_teacher" and result.changed
    names = [n.name for n in gm.graph.nodes]
    assert names == ["images", "teacher_conv", "teacher_relu_", "student_conv", "mse", "output"]
    assert [p["name"] for p in result.details["teacher_pruned"]] == ["teacher_flatten", "teacher_fc", "teacher_add_"]
    assert result.details["other_removed"] == []
    assert "removed 3 teacher node(s)" in result.summary
    gm.recompile()
    torch.testing.assert_close(gm(_x())["loss"], expected)  # the kept relu_ still acts on the tapped value
    again = prune_teacher.run(gm, PassContext(STAGE))
    assert not again.changed and again.details["teacher_pruned"] == []


# ------------------------------------------------------------------------------------------- teacher_no_grad
def _two_network_graph():
    b = _Builder()
    x = b.node(Role.INPUT, "images", "placeholder", "images")
    t_conv = b.node(Role.TEACHER, "teacher_conv", "call_module", "teacher.conv", x)
    t_relu = b.node(Role.TEACHER, "teacher_relu", "call_function", torch.relu, t_conv)
    s_conv = b.node(Role.STUDENT, "student_conv", "call_module", "student.conv", x)
    loss = b.node(Role.LOSS, "mse", "call_function", F.mse_loss, s_conv, t_relu)
    set_info(b.g.output({"loss": loss, "teacher": t_relu, "student": s_conv}), NodeInfo(Role.OUTPUT, "output"))
    return b.module(_root())


def test_no_grad_brackets_exactly_the_teacher_nodes():
    gm = _two_network_graph()
    result = teacher_no_grad.run(gm, PassContext(STAGE))
    assert result.changed and result.details == {"teacher_nodes": 2, "first": "teacher_conv", "last": "teacher_relu"}
    nodes = list(gm.graph.nodes)
    roles = [role_of(n) for n in nodes]
    assert roles == [Role.INPUT, Role.GRAD_MODE, Role.TEACHER, Role.TEACHER, Role.GRAD_MODE, Role.STUDENT,
                     Role.LOSS, Role.OUTPUT]
    assert nodes[1].target is teacher_no_grad.teacher_grad_off
    assert nodes[4].target is teacher_no_grad.teacher_grad_restore and nodes[4].args == (nodes[1],)
    gm.recompile()
    # the teacher's parameters still require grad here: only the bracket keeps autograd off
    assert all(p.requires_grad for p in gm.teacher.parameters())
    out = gm(_x())
    assert not out["teacher"].requires_grad and out["student"].requires_grad and out["loss"].requires_grad
    assert torch.is_grad_enabled()  # the mode is restored after the teacher's last node
    out["loss"].backward()
    assert gm.student.conv.weight.grad is not None and gm.teacher.conv.weight.grad is None


def test_no_grad_leaves_a_graph_without_teacher_alone():
    b = _Builder()
    x = b.node(Role.INPUT, "images", "placeholder", "images")
    s = b.node(Role.STUDENT, "student_conv", "call_module", "student.conv", x)
    b.g.output({"loss": s})
    gm = b.module(_root())
    before = [n.name for n in gm.graph.nodes]
    result = teacher_no_grad.run(gm, PassContext(STAGE))
    assert not result.changed and [n.name for n in gm.graph.nodes] == before


# ------------------------------------------------------------------------------------------- inplace_safety
def _inplace_graph():
    b = _Builder()
    x = b.node(Role.INPUT, "images", "placeholder", "images")
    s_conv = b.node(Role.STUDENT, "student_conv", "call_module", "student.conv", x)  # tapped: student:conv
    s_relu = b.node(Role.STUDENT, "student_relu", "call_module", "student.relu", s_conv)  # ReLU(inplace=True)
    s_flat = b.node(Role.STUDENT, "student_flatten", "call_function", torch.flatten, s_relu, 1)
    s_add = b.node(Role.STUDENT, "student_iadd", "call_function", operator.iadd, s_flat, 1.0)  # on an untapped value
    s_fc = b.node(Role.STUDENT, "student_fc", "call_module", "student.fc", s_add)
    t_conv = b.node(Role.TEACHER, "teacher_conv", "call_module", "teacher.conv", x)  # tapped: teacher:conv
    t_copy = b.node(Role.TEACHER, "teacher_copy_", "call_method", "copy_", t_conv, s_conv)
    loss = b.node(Role.LOSS, "cap", "call_function", F.mse_loss, s_conv, t_conv)
    set_info(b.g.output({"loss": loss, "logits": s_fc, "tap": s_conv, "t": t_copy}), NodeInfo(Role.OUTPUT, "output"))
    gm = b.module(_root(inplace_relu=True))
    return gm, {"student:conv": s_conv, "teacher:conv": t_conv, "batch:images": x}


def test_inplace_safety_replaces_exactly_the_op_that_would_overwrite_a_tap():
    gm, taps = _inplace_graph()
    result = inplace_safety.run(gm, PassContext(STAGE, taps))
    assert result.changed and result.details["nodes"] == ["student_relu", "teacher_copy_"]
    assert result.details["fixed"][0] == "student:conv: student.relu (inplace=True) -> out-of-place copy"
    nodes = {n.name: n for n in gm.graph.nodes}
    relu = nodes["student_relu"]
    assert relu.target == "inplace_safe.student__relu"
    twin = gm.get_submodule(relu.target)
    assert isinstance(twin, nn.ReLU) and not twin.inplace and gm.get_submodule("student.relu").inplace
    assert nodes["student_iadd"].target is operator.iadd  # overwrites no tapped value: left alone
    # copy_ has no out-of-place twin: its input is cloned first, and the clone says what it stands for
    clone = nodes["teacher_copy_"].args[0]
    assert clone.op == "call_method" and clone.target == "clone" and clone.args == (taps["teacher:conv"],)
    assert info_of(clone) == NodeInfo(Role.TEACHER, "teacher_conv/clone", "teacher.conv", derived_from="teacher_conv")
    gm.recompile()
    out = gm(_x())
    conv = gm.student.conv(_x())
    torch.testing.assert_close(out["tap"], conv)
    assert (out["tap"] < 0).any(), "the tapped value was overwritten by the in-place ReLU"
    again = inplace_safety.run(gm, PassContext(STAGE, taps))
    assert not again.changed and again.details["fixed"] == []


# ------------------------------------------------------------------------------------------- cleanup
def test_cleanup_drops_exactly_the_modules_no_node_calls():
    gm = _prune_graph()
    prune_teacher.run(gm, PassContext(STAGE))
    result = cleanup.run(gm, PassContext(STAGE))
    assert result.changed and result.details["removed_submodules"] == ["teacher.fc"]
    assert hasattr(gm.teacher, "conv") and not hasattr(gm.teacher, "fc")
    assert "teacher_flatten" not in gm.code and "teacher_relu_" in gm.code  # code regenerated


# ------------------------------------------------------------------------------------------- the pipeline
def test_passes_run_in_the_listed_order_and_the_report_lists_them():
    assert [p.NAME for p in PASSES] == ["inplace_safety", "chunked_vocab", "prune_teacher", "fold_teacher_bn",
                                       "teacher_channels_last",
                                       "teacher_dtype", "teacher_mkldnn", "fsdp_schedule", "teacher_no_grad",
                                       "cleanup"]
    gm = _two_network_graph()
    results = run_passes(gm, PassContext(STAGE))
    assert [r.name for r in results] == [p.NAME for p in PASSES]
    d = kdgraph.compile(small_spec("ft_resnet18.yaml"), stage="main")
    report = d.report
    assert [p.name for p in report.passes] == [p.NAME for p in PASSES]
    prune = report.pass_result("prune_teacher")
    assert prune.changed and prune.details["teacher_pruned"] == report.pruned_nodes
    assert report.teacher_nodes_pruned == len(report.pruned_nodes) == 3
    assert report.pass_result("teacher_no_grad").details["teacher_nodes"] == sum(
        role_of(n) is Role.TEACHER for n in d.graph_module.graph.nodes)
    data = json.loads(json.dumps(report.to_dict()))
    assert [p["name"] for p in data["passes"]] == [p.NAME for p in PASSES]
    assert data["passes"][2]["summary"] == prune.summary and data["teacher_nodes_pruned"] == 3


def test_every_node_of_a_compiled_stage_has_node_info():
    d = kdgraph.compile(small_spec("kr_resnet18.yaml"))
    infos = [info_of(n) for n in d.graph_module.graph.nodes]
    assert all(isinstance(i, NodeInfo) for i in infos)
    assert {i.role for i in infos} == set(Role) - {Role.TRANSFORM}
    assert [i.name for i in infos if i.role is Role.ADAPTER and i.module_path] == [a.name for a in d.report.adapters]
    assert all(i.trainable == (i.name in d.spec.stages[0].train) for i in infos
               if i.role is Role.ADAPTER and i.module_path)


def test_run_passes_checks_that_a_pass_names_itself():
    class Liar:
        NAME = "liar"

        @staticmethod
        def run(gm, ctx):
            return PassResult("someone_else", False, "")

    with pytest.raises(AssertionError, match="liar"):
        run_passes(_two_network_graph(), PassContext(STAGE), passes=(Liar,))
