"""Capture: qualified names, leaf modules with reasons, actionable trace errors."""
from __future__ import annotations

import pytest
import torch

import kdgraph
from kdgraph.errors import TraceError
from kdgraph.spec import parse_tap
from kdgraph.capture import LEAF_MODULES, trace_network

SPEC = {
    "name": "tiny", "input": {"channels": 3, "size": [16, 16], "num_classes": 10},
    "teacher": {"model": "user_models:tiny", "kwargs": {"width": 16}},
    "student": {"model": "user_models:tiny"},
    "adapters": {"conn": {"type": "ft_translator", "inputs": {"x": "student:body"}, "match": "teacher:body"}},
    "stages": [{"name": "main", "optimizer": {"lr": 0.1}, "losses": [
        {"type": "cross_entropy"},
        {"name": "feat", "type": "mse", "inputs": {"student": "adapter:conn", "teacher": "teacher:body"}}]}],
}


def test_untraceable_module_gives_a_leaf_module_hint():
    with pytest.raises(TraceError) as e:
        kdgraph.compile(SPEC, allow_imports=["user_models"])
    msg = str(e.value)
    assert "leaf_modules" in msg and "cannot trace the teacher" in msg


def test_leaf_module_from_the_spec_makes_it_one_node():
    spec = dict(SPEC, leaf_modules=[{"module": "user_models:DataDependentGate", "reason": "branches on x.mean()"}])
    d = kdgraph.compile(spec, allow_imports=["user_models"])
    gate = [n for n in d.graph_module.graph.nodes if n.op == "call_module" and n.target == "student.gate"]
    assert len(gate) == 1
    assert d.report.adapters[0].args["out_channels"] == 16  # inferred from the teacher's 'body' tap
    out = d(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    assert torch.isfinite(out.loss) and set(out.terms) == {"cross_entropy", "feat"}


def test_leaf_registry_needs_a_reason():
    from user_models import DataDependentGate

    with pytest.raises(ValueError):
        kdgraph.capture.register_leaf_module(DataDependentGate, "")
    assert all(len(reason) > 10 for reason in LEAF_MODULES.values())


def test_repeated_module_calls_and_functional_ops_have_names():
    import torchvision

    net = trace_network(torchvision.models.resnet18(), "student")
    names = net.all_names()
    assert names.index("layer1.0.relu#0") < names.index("layer1.0/add") < names.index("layer1.0.relu")
    assert net.resolve(parse_tap("student:layer4.-1")) is net.resolve(parse_tap("student:layer4.1"))
    assert net.resolve(parse_tap("student:layer4")) is net.resolve(parse_tap("student:layer4.1.relu"))
    assert net.resolve(parse_tap("student:fc@input")) is net.resolve(parse_tap("student:/flatten"))
    assert net.resolve(parse_tap("student:layer2.0.downsample.0@input")) is \
        net.resolve(parse_tap("student:layer1"))
