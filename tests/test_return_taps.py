"""distiller(images, targets, return_taps=True): every tap's value, equal to what forward hooks read, at no cost
to the default graph."""
from __future__ import annotations

import torch
import torchvision

import kdgraph
from conftest import ROOT

TAPS_SPEC = {
    "name": "taps",
    "input": {"channels": 3, "size": [32, 32], "num_classes": 10},
    "teacher": {"model": "torchvision:resnet34", "kwargs": {"num_classes": 10}},
    "student": {"model": "torchvision:resnet18", "kwargs": {"num_classes": 10}},
    "stages": [{"name": "main", "train": ["student"], "optimizer": {"type": "sgd", "lr": 0.1}, "losses": [
        {"name": "ce", "type": "cross_entropy"},
        {"name": "at", "type": "at", "weight": 10.0,
         "inputs": {"student": "student:layer3", "teacher": "teacher:layer3"}},
        {"name": "res", "type": "mse", "inputs": {"student": "student:layer1.0/add", "teacher": "teacher:layer1.0/add"}},
        {"name": "kd", "type": "kd", "inputs": {"student": "student:@output", "teacher": "teacher:@output"}},
    ]}],
}


def _hooked(d, images):
    """The same values read eagerly with forward hooks on the very modules (cloned: ReLUs are in place)."""
    seen = {}
    handles = []
    for role, net in (("teacher", d.teacher), ("student", d.student)):
        handles.append(net.layer3.register_forward_hook(
            lambda m, i, o, role=role: seen.__setitem__(f"{role}:layer3", o.detach().clone())))
        # the block's shared ReLU runs twice; its last call's input is the residual add
        handles.append(net.layer1[0].relu.register_forward_pre_hook(
            lambda m, i, role=role: seen.__setitem__(f"{role}:layer1.0/add", i[0].detach().clone())))
    try:
        with torch.no_grad():
            seen["teacher:@output"] = d.teacher(images)
            seen["student:@output"] = d.student(images)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_tap_values_equal_forward_hook_values():
    d = kdgraph.compile(TAPS_SPEC)
    d.eval()  # the student's BN in eval mode: the eager reference run sees the same statistics
    assert isinstance(d.student, torchvision.models.ResNet)
    images, targets = torch.randn(3, 3, 32, 32), torch.randint(0, 10, (3,))
    out = d(images, targets, return_taps=True)
    expected = _hooked(d, images)
    assert set(out.taps) == set(expected) | {"batch:targets"}
    for text, value in expected.items():
        assert torch.equal(out.taps[text], value), text
    assert torch.equal(out.taps["batch:targets"], targets)
    plain = d(images, targets)
    assert plain.taps is None and torch.equal(plain.loss, out.loss)
    assert all(torch.equal(plain.terms[k], out.terms[k]) for k in plain.terms)


def test_default_graph_and_state_are_unchanged_and_student_taps_carry_gradients():
    d = kdgraph.compile(TAPS_SPEC).train()
    code, nodes, keys = d.graph_module.code, len(d.graph_module.graph.nodes), list(d.state_dict())
    images, targets = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    out = d(images, targets, return_taps=True)
    assert d.graph_module.code == code and len(d.graph_module.graph.nodes) == nodes
    assert list(d.state_dict()) == keys  # the taps variant is no submodule: checkpoints are unaffected
    assert out.taps["student:layer3"].requires_grad and not out.taps["teacher:layer3"].requires_grad
    out.taps["student:layer3"].square().mean().backward()  # your own loss on a tap
    assert d.student.layer3[0].conv1.weight.grad is not None and d.student.layer4[0].conv1.weight.grad is None
    assert all(p.grad is None for p in d.teacher.parameters())


def test_adapter_taps_of_every_stage():
    spec = kdgraph.load_spec(ROOT / "specs" / "ft_resnet18.yaml", overrides=["input.size=[32, 32]"])
    d = kdgraph.compile(spec).eval()
    images, targets = torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2,))
    first = d(images, targets, return_taps=True).taps
    assert set(first) == {"teacher:layer4", "adapter:paraphraser_encoder", "adapter:paraphraser_decoder"}
    with torch.no_grad():
        feat = d.teacher.layer4(d.teacher.layer3(d.teacher.layer2(d.teacher.layer1(d.teacher.maxpool(
            d.teacher.relu(d.teacher.bn1(d.teacher.conv1(images))))))))
        enc = d.adapters["paraphraser_encoder"](feat)
    assert torch.equal(first["teacher:layer4"], feat) and torch.equal(first["adapter:paraphraser_encoder"], enc)
    assert torch.equal(first["adapter:paraphraser_decoder"], d.adapters["paraphraser_decoder"](enc))
    second = d.enter_stage(1)(images, targets, return_taps=True).taps
    assert "adapter:translator" in second and "adapter:paraphraser_encoder" in second
    assert torch.equal(second["adapter:translator"], d.adapters["translator"](second["student:layer4"]))
