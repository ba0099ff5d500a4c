"""The fused graph computes what the eager networks compute; the teacher stays frozen; DCE prunes."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch.nn import functional as F

import kdgraph
from kdgraph.methods.kd import kd_divergence
from kdgraph.compiler.nodeinfo import Role, role_of
from conftest import small_spec


def _grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def test_student_logits_and_gradients_equal_eager(batch):
    x, y = batch
    teacher, student = torchvision.models.resnet34(), torchvision.models.resnet18()
    eager_t, eager_s = copy.deepcopy(teacher).eval(), copy.deepcopy(student)
    d = kdgraph.compile(small_spec("kd_resnet18.yaml"), teacher=teacher, student=student).train()
    assert d.student is student and d.teacher is teacher
    out = d(x, y)
    out.loss.backward()

    with torch.no_grad():
        t_logits = eager_t(x)
    s_logits = eager_s(x)
    ref = 0.5 * F.cross_entropy(s_logits, y) + 0.5 * kd_divergence(s_logits, t_logits, 1.0)
    ref.backward()

    torch.testing.assert_close(out.logits, s_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=1e-6)
    assert set(out.terms) == {"ce", "kd"}
    torch.testing.assert_close(out.terms["ce"] + out.terms["kd"], out.loss)
    g, ge = _grads(student), _grads(eager_s)
    assert set(g) == set(ge) and len(g) == len(list(student.parameters()))
    for name in g:
        torch.testing.assert_close(g[name], ge[name], rtol=1e-4, atol=1e-6, msg=name)
    # BN running statistics advanced exactly as in eager training mode
    torch.testing.assert_close(student.bn1.running_mean, eager_s.bn1.running_mean)
    assert all(p.grad is None for p in teacher.parameters())


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("spec_name,stage", [("kd_resnet18.yaml", "main"), ("at_resnet18.yaml", "main"),
                                             ("l2_resnet18.yaml", "main"), ("ft_resnet18.yaml", "paraphraser"),
                                             ("ft_resnet18.yaml", "main")])
def test_optimizer_steps_change_only_what_the_stage_trains(spec_name, stage, batch):
    x, y = batch
    d = kdgraph.compile(small_spec(spec_name), stage=stage).train()
    assert not d.teacher.training and all(not m.training for m in d.teacher.modules())
    teacher0, student0 = _snapshot(d.teacher), _snapshot(d.student)
    adapters0 = {n: _snapshot(a) for n, a in d.adapters.items()}
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.01, momentum=0.9)
    for _ in range(3):
        out = d(x, y)
        assert torch.isfinite(out.loss)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    train = set(d.spec.stage(stage).train)
    for k, v in d.teacher.state_dict().items():
        assert torch.equal(v, teacher0[k]), f"teacher {k} changed"
    changed = [k for k, v in d.student.state_dict().items() if not torch.equal(v, student0[k])]
    assert bool(changed) == ("student" in train)
    for name, adapter in d.adapters.items():
        moved = any(not torch.equal(v, adapters0[name][k]) for k, v in adapter.state_dict().items())
        assert moved == (name in train), f"adapter {name}: changed={moved}, trains={name in train}"
    expected = sum(p.numel() for p in d.trainable_parameters())
    assert d.report.trainable_parameters == expected > 0


def _teacher_targets(d):
    return {n.target for n in d.graph_module.graph.nodes if role_of(n) is Role.TEACHER
            and n.op == "call_module"}


@pytest.mark.parametrize("spec_name,pruned", [("at_resnet18.yaml", True), ("l2_resnet18.yaml", None),
                                              ("ft_resnet18.yaml", True), ("kd_resnet18.yaml", False)])
def test_dead_teacher_nodes_are_pruned(spec_name, pruned):
    d = kdgraph.compile(small_spec(spec_name))
    targets = _teacher_targets(d)
    assert targets, "teacher nodes missing"
    if pruned is True:  # AT (layer3/layer4) and FT (layer4): avgpool and fc go
        assert "teacher.fc" not in targets and "teacher.avgpool" not in targets
        assert d.report.teacher_nodes_pruned >= 3
        assert {p["tap"] for p in d.report.pruned_nodes} >= {"fc", "avgpool"}
    elif pruned is None:  # L2 taps avgpool: only flatten and fc go
        assert "teacher.fc" not in targets and "teacher.avgpool" in targets
        assert d.report.teacher_nodes_pruned == 2
    else:  # KD needs the logits: nothing goes
        assert "teacher.fc" in targets and d.report.teacher_nodes_pruned == 0
    # the GraphModule holds no reference to pruned modules
    assert not hasattr(d.graph_module.teacher, "fc") or pruned is False


_captured: list[torch.Tensor] = []


@kdgraph.register_loss("test_capture", override=True)
class _Capture(kdgraph.DistillLoss):
    inputs = ("x",)

    def forward(self, x):
        _captured.append(x.detach().clone())
        return x.sum() * 0.0


def test_tap_before_inplace_relu_has_the_eager_value(batch):
    x, _ = batch
    student = torchvision.models.resnet18()
    spec = small_spec("kd_resnet18.yaml")
    spec.stages[0].losses = [kdgraph.spec.LossSpec(name="cap", type="test_capture", inputs={"x": "student:layer1.0/add"}),
                             kdgraph.spec.LossSpec(name="cap_bn", type="test_capture", inputs={"x": "student:bn1"})]
    eager = copy.deepcopy(student).eval()
    d = kdgraph.compile(spec, student=student).eval()
    _captured.clear()
    d(x)
    add_value, bn_value = _captured
    seen = {}
    blk = eager.layer1[0]
    blk.bn2.register_forward_hook(lambda m, i, o: seen.__setitem__("bn2", o.clone()))
    blk.register_forward_pre_hook(lambda m, i: seen.__setitem__("in", i[0].clone()))
    eager.bn1.register_forward_hook(lambda m, i, o: seen.__setitem__("bn1", o.clone()))
    eager(x)
    torch.testing.assert_close(add_value, seen["bn2"] + seen["in"])
    torch.testing.assert_close(bn_value, seen["bn1"])
    assert (add_value < 0).any() and (bn_value < 0).any(), "value was overwritten by the in-place ReLU"
    assert len(d.report.inplace_fixed) == 2


def test_stages_keep_adapters_and_switch_what_trains(batch):
    x, y = batch
    d = kdgraph.compile(small_spec("ft_resnet18.yaml")).train()
    assert d.stages == ["paraphraser", "main"] and d.stage == "paraphraser"
    assert d(x, y).logits is None and not d.report.uses_student  # stage 1 never runs the student
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.01)
    d(x, y).loss.backward()
    opt.step()
    enc = d.adapters["paraphraser_encoder"]
    w = enc[0].weight.detach().clone()
    d.enter_stage("main")
    assert d.adapters["paraphraser_encoder"] is enc and torch.equal(enc[0].weight, w)
    assert not enc[0].weight.requires_grad and not enc.training
    names = {id(p) for p in d.trainable_parameters()}
    assert id(enc[0].weight) not in names and id(d.adapters["translator"][0].weight) in names
    assert "adapters.paraphraser_encoder.0.weight" in d.state_dict()
    out = d(x, y)
    assert out.logits.shape == (4, 1000) and set(out.terms) == {"ce", "ft"}


def test_teacher_stays_in_eval_mode_and_records_no_autograd_graph(batch):
    x, y = batch
    d = kdgraph.compile(small_spec("kd_resnet18.yaml")).train()
    d.train(True)
    assert not any(m.training for m in d.teacher.modules())
    assert all(m.training for m in d.student.modules())
    running = d.teacher.bn1.running_mean.clone()
    seen = {}
    d.teacher.fc.register_forward_hook(lambda m, i, o: seen.__setitem__("t", o))
    d.teacher.conv1.register_forward_hook(lambda m, i, o: seen.__setitem__("t_grad", torch.is_grad_enabled()))
    d.student.conv1.register_forward_hook(lambda m, i, o: seen.__setitem__("s_grad", torch.is_grad_enabled()))
    d(x, y)
    assert seen["t"].grad_fn is None and not seen["t"].requires_grad
    assert seen["t_grad"] is False and seen["s_grad"] is True and torch.is_grad_enabled()
    assert torch.equal(running, d.teacher.bn1.running_mean)


def test_emitted_code_is_python_and_names_both_networks():
    d = kdgraph.compile(small_spec("at_resnet18.yaml"))
    code = d.graph_module.code
    compile(code, "<fused>", "exec")
    assert "self.teacher" in code and "self.student" in code and "self.losses.main.at_layer3" in code


def test_same_architecture_for_teacher_and_student():
    spec = small_spec("kd_resnet18.yaml")
    spec.teacher.model = "torchvision:resnet18"
    d = kdgraph.compile(spec)
    assert d.teacher is not d.student
    assert not {id(p) for p in d.teacher.parameters()} & {id(p) for p in d.student.parameters()}
    with pytest.raises(kdgraph.ModelError):
        m = torchvision.models.resnet18()
        kdgraph.compile(spec, teacher=m, student=m)


_TINY = {
    "name": "tiny", "input": {"channels": 3, "size": [16, 16], "num_classes": 10},
    "teacher": {"model": "user_models:tiny", "kwargs": {"width": 16, "gated": False}},
    "student": {"model": "user_models:tiny", "kwargs": {"gated": False}},
    "stages": [{"name": "main", "optimizer": {"lr": 0.1}, "train": ["student", "late", "early"], "losses": [
        {"type": "cross_entropy"},
        {"name": "feat", "type": "mse", "inputs": {"student": "adapter:late", "teacher": "teacher:body"}}]}],
}


def test_adapters_are_built_after_those_they_read_whatever_the_declaration_order():
    spec = dict(_TINY, adapters={
        "late": {"type": "ft_translator", "inputs": {"x": "adapter:early"}, "match": "teacher:body"},
        "early": {"type": "ft_translator", "inputs": {"x": "student:body"}, "args": {"out_channels": 12}}})
    d = kdgraph.compile(spec, allow_imports=["user_models"])
    assert list(d.adapters) == ["early", "late"]
    assert [a.name for a in d.report.adapters] == ["early", "late"]
    assert d.report.adapters[1].args["in_channels"] == 12  # inferred from early's output


def test_an_adapter_cycle_is_one_clear_error():
    spec = dict(_TINY, adapters={
        "late": {"type": "ft_translator", "inputs": {"x": "adapter:early"}, "match": "teacher:body"},
        "early": {"type": "ft_translator", "inputs": {"x": "adapter:late"}}})
    with pytest.raises(kdgraph.SpecError, match=r"adapters form a cycle: late -> early -> late\. An adapter may read"):
        kdgraph.compile(spec, allow_imports=["user_models"])
