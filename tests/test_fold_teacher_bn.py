"""The fold_teacher_bn pass: the frozen teacher's Conv2d -> BatchNorm2d pairs as one folded convolution, with the
same losses, taps and state_dict as the unfolded graph, and folded weights that follow the teacher's weights."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models import resnet18

import kdgraph
from kdgraph.compiler.passes.fold_teacher_bn import FoldedConvBN

SPEC = {
    "name": "fold", "input": {"channels": 3, "size": [32, 32], "num_classes": 10},
    "teacher": {"model": "torchvision:resnet18", "kwargs": {"num_classes": 10}},
    "student": {"model": "torchvision:resnet18", "kwargs": {"num_classes": 10}},
    "stages": [{"name": "main", "optimizer": {"lr": 0.1}, "losses": [
        {"type": "cross_entropy"},
        {"name": "kd", "type": "kd", "args": {"temperature": 4.0}},
        {"name": "feat", "type": "mse", "inputs": {"student": "student:layer1.0.bn1", "teacher": "teacher:layer1.0.bn1"}},
        {"name": "raw", "type": "mse", "inputs": {"student": "student:layer2.0.conv1", "teacher": "teacher:layer2.0.conv1"}},
    ]}],
}


def _randomise_bn(model: nn.Module, seed: int) -> None:
    """Non-trivial running statistics and affine terms, so folding has something to get wrong."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)


@pytest.fixture()
def pair():
    torch.manual_seed(0)
    teacher, student = resnet18(num_classes=10), resnet18(num_classes=10)
    _randomise_bn(teacher, 1)
    on = kdgraph.compile(dict(SPEC, runtime={"fold_teacher_bn": True}), teacher=teacher, student=student)
    off = kdgraph.compile(SPEC, teacher=teacher, student=student)  # the default: off
    return teacher, student, on, off


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_folded_graph_gives_the_unfolded_losses_and_taps(pair):
    teacher, _, on, off = pair
    result = on.report.pass_result("fold_teacher_bn")
    assert result.changed and off.report.pass_result("fold_teacher_bn").changed is False
    folded_bns = {f["bn"] for f in result.details["folded"]}
    folded_convs = {f["conv"] for f in result.details["folded"]}
    bns = [n for n, m in teacher.named_modules() if isinstance(m, nn.BatchNorm2d)]
    # every BatchNorm of the teacher folds, except the one after the tapped conv (its raw output is read)
    assert len(folded_bns) == len(bns) - 1 and "teacher.layer2.0.conv1" not in folded_convs
    assert "teacher_layer1_0_bn1" in folded_bns  # a tapped BatchNorm folds: its node still yields the tap
    torch.manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    a, b = on(x, y, return_taps=True), off(x, y, return_taps=True)
    assert set(a.terms) == set(b.terms)
    for k in b.terms:
        assert _close(a.terms[k], b.terms[k]), k
    for t in b.taps:
        assert _close(a.taps[t], b.taps[t]), t
    with torch.no_grad():
        teacher.eval()
        assert _close(a.taps["teacher:layer1.0.bn1"], teacher.bn1.__class__.forward(
            teacher.layer1[0].bn1, teacher.layer1[0].conv1(teacher.maxpool(teacher.relu(teacher.bn1(teacher.conv1(x)))))))


def test_teacher_module_and_state_dicts_are_unchanged(pair):
    teacher, _, on, off = pair
    assert set(on.state_dict()) == set(off.state_dict())
    assert set(teacher.state_dict()) == set(resnet18(num_classes=10).state_dict())
    assert all(isinstance(m, nn.Conv2d) for n, m in teacher.named_modules() if n.endswith("conv1"))
    assert sum(p.numel() for p in on.parameters()) == sum(p.numel() for p in off.parameters())


def test_graph_view_and_picture_of_a_folded_stage(pair, tmp_path):
    """The networkx view counts the teacher's parameters as the unfolded one does; the picture renders."""
    teacher, _, on, off = pair

    def teacher_params(d):
        return sum(a["params"] for _, a in d.graph.nodes(data=True) if a["role"] == "teacher" and not a["pruned"])

    assert teacher_params(on) == teacher_params(off) > 0
    from kdgraph import viz

    viz.render(on, tmp_path / "folded.html")
    assert "layer1.0" in (tmp_path / "folded.html").read_text()


def test_folded_weights_follow_load_state_dict_and_device_moves(pair):
    teacher, _, on, off = pair
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    before = on(x, y).terms["kd"].clone()
    other = resnet18(num_classes=10)
    _randomise_bn(other, 7)
    teacher.load_state_dict(other.state_dict())  # what load_weights, init_from and --resume do
    after_on, after_off = on(x, y).terms["kd"], off(x, y).terms["kd"]
    assert not torch.allclose(before, after_off)  # the new weights change the loss ...
    assert _close(after_on, after_off)  # ... and the folded graph sees them
    on.to(torch.float64)
    off.to(torch.float64)
    assert torch.allclose(on(x.double(), y).loss, off(x.double(), y).loss, rtol=1e-9)


def test_folded_module_matches_conv_then_bn_and_falls_back_in_training_mode():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=True), nn.BatchNorm2d(8)
    _randomise_bn(nn.Sequential(bn), 3)
    folded = FoldedConvBN(conv, bn)
    assert list(folded.parameters()) == [] and list(folded.state_dict()) == []
    x = torch.randn(2, 3, 9, 9)
    bn.eval()
    assert _close(folded(x), bn(conv(x)))
    with torch.no_grad():
        conv.weight.mul_(2.0)  # an in-place change: the cache notices
    assert _close(folded(x), bn(conv(x)))
    bn.train()
    ref = copy.deepcopy(bn)
    assert torch.equal(folded(x), ref(conv(x)))  # training mode: bn(conv(x)), batch statistics
