"""The teacher_mkldnn pass: a ResNet-34 teacher run as one oneDNN subgraph gives the plain graph's tap values
(rtol 1e-5 of each tap's scale) at an odd input size, follows new teacher weights after compile, leaves the teacher
module and the state_dict as they were, falls back to the plain subgraph where oneDNN cannot run it, and is refused
beside the other teacher passes."""
from __future__ import annotations

import pytest
import torch

import kdgraph
from kdgraph.compiler.passes.teacher_mkldnn import HOLDER, MkldnnTeacher, fast_copy
from kdgraph.errors import SpecError
from kdgraph.compiler.nodeinfo import Role, role_of
from test_teacher_passes import SPEC, TAPS, _close, _compile, _taps, _teacher, batch, nets  # noqa: F401 (fixtures)


def test_one_onednn_call_gives_the_plain_teachers_taps(nets, batch):
    plain, d = _compile(nets), _compile(nets, teacher_mkldnn=True)
    r = d.report.pass_result("teacher_mkldnn")
    assert r.changed and len(r.details["converted"]) == 36  # ResNet-34's convolutions
    assert set(r.details["retapped"]) == set(TAPS)
    teacher_nodes = [n for n in d.graph_module.graph.nodes if role_of(n) is Role.TEACHER]
    calls = [n for n in teacher_nodes if n.op == "call_module"]
    assert [n.target for n in calls] == [HOLDER] and len(teacher_nodes) == 1 + len(TAPS)  # the call + one item each
    assert fast_copy(d.graph_module) is None  # built at the first CPU call, not at compile
    fast, ref = _taps(d, batch), _taps(plain, batch)
    holder = d.graph_module.get_submodule(HOLDER)
    assert holder.builds == 1 and fast_copy(d.graph_module) is not None
    code = fast_copy(d.graph_module).code  # it really ran in the blocked layout, BatchNorms folded
    assert "to_mkldnn" in code and "onednn_conv_35" in code and "bn" not in code
    for t in TAPS + ["loss"]:
        assert fast[t].dtype == torch.float32 and fast[t].layout == torch.strided
        _close(fast[t], ref[t], 1e-5)
    _close(fast["teacher:@output"], nets[0](batch[0]).detach(), 1e-5)
    _taps(d, batch)
    assert holder.builds == 1  # same weights: the copy is reused


def test_teacher_module_state_dict_and_training_step_are_as_without_the_pass(nets, batch):
    before = {k: v.clone() for k, v in nets[0].state_dict().items()}
    plain, d = _compile(nets), _compile(nets, teacher_mkldnn=True)
    assert list(d.state_dict()) == list(plain.state_dict())
    assert not list(d.graph_module.get_submodule(HOLDER).parameters())  # the teacher is not listed twice
    for p in d.parameters():
        p.grad = None
    out = d(*batch)
    out.loss.backward()
    assert all(p.grad is None for p in d.teacher.parameters())
    assert sum(float(p.grad.abs().sum()) for p in d.student.parameters() if p.grad is not None) > 0
    assert all(torch.equal(v, before[k]) for k, v in nets[0].state_dict().items())


def test_new_teacher_weights_after_compile_rebuild_the_copy(nets, batch):
    d = _compile(nets, teacher_mkldnn=True)
    first = _taps(d, batch)
    other = _teacher(7)
    d.teacher.load_state_dict(other.state_dict())
    try:
        again = _taps(d, batch)
        assert d.graph_module.get_submodule(HOLDER).builds == 2
        _close(again["teacher:@output"], other(batch[0]).detach(), 1e-5)
        assert not torch.allclose(again["teacher:@output"], first["teacher:@output"])
    finally:
        d.teacher.load_state_dict(nets[0].state_dict())


def test_falls_back_to_the_plain_subgraph_where_onednn_cannot_run(nets, batch):
    d = _compile(nets, teacher_mkldnn=True)
    holder: MkldnnTeacher = d.graph_module.get_submodule(HOLDER)
    x = batch[0]
    expected = holder.plain(x)
    with torch.enable_grad():  # autograd on: oneDNN tensors have none
        assert torch.equal(holder(x)[0], expected[0])
    with torch.no_grad():
        y = holder(x.double().float().contiguous())[0]  # the usable case, for contrast
        assert holder.builds == 1
        d.teacher.double()
        try:
            z = holder(x.double())[0]  # another dtype: the plain subgraph, no build
            assert z.dtype == torch.float64 and holder.builds == 1
        finally:
            d.teacher.float()
        d.teacher.layer1.train()  # a teacher module in training mode
        try:
            holder(x)
            assert holder.builds == 1
        finally:
            d.teacher.layer1.eval()
    _close(y, expected[0].detach(), 1e-5)


@pytest.mark.parametrize("other", [{"fold_teacher_bn": True}, {"teacher_channels_last": True},
                                   {"teacher_dtype": "bf16"}])
def test_refused_beside_the_other_teacher_passes(nets, other):
    with pytest.raises(SpecError) as e:
        kdgraph.compile({**SPEC, "runtime": {"teacher_mkldnn": True, **other}}, teacher=nets[0], student=nets[1])
    text = str(e.value)
    assert "runtime" in text and "teacher_mkldnn" in text and next(iter(other)) in text


class _Awkward(torch.nn.Module):
    """In-place ops whose inputs are read again, ops oneDNN does not run, a pooling it cannot, a conv with bias
    feeding two readers, and a strided, dilated, grouped convolution."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.pool = nn.AdaptiveAvgPool2d((2, 3))  # not divisible: stays dense
        self.maxpool = nn.MaxPool2d(3, 2, 1)

    def forward(self, x):
        a = self.bn1(self.conv1(x))
        b = self.relu(a)            # in place: a's later readers see b
        c = a * 0.5 + b             # a read after the in-place ReLU (dense op on a blocked value)
        d = self.bn2(self.conv2(c))
        d.mul_(2.0)                 # in place, run dense on a converted copy: conv3 must read the doubled value
        e = self.conv3(d)           # two readers: not folded into anything, read twice
        f = torch.relu_(e) + torch.sigmoid(e)
        g = self.maxpool(f)
        g += g                      # in-place add
        return self.pool(g), torch.flatten(g, 1), e


def test_onednn_copy_keeps_eager_in_place_semantics_and_runs_other_ops_dense():
    from kdgraph.compiler.passes.onednn_layout import OneDNNConv, onednn_copy
    torch.manual_seed(3)
    m = _Awkward().eval()
    for bn in (m.bn1, m.bn2):
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 1.5)
    gm = torch.fx.symbolic_trace(m)
    fast = onednn_copy(gm)
    convs = [mod for mod in fast.modules() if isinstance(mod, OneDNNConv)]
    assert len(convs) == 3 and [c.folded for c in convs] == [True, True, False]
    assert "to_mkldnn" in fast.code and "torch.sigmoid" in fast.code
    x = torch.randn(2, 3, 17, 23)
    with torch.no_grad():
        expected, got = m(x.clone()), fast(x.clone())
    for e, g in zip(expected, got):
        assert g.layout == torch.strided and g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert list(gm.state_dict()) == list(m.state_dict())  # the traced module is not changed
