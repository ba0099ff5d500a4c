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


def test_capture_for_spec_honours_the_specs_leaf_modules():
    """What `kdgraph inspect SPEC` needs: the spec's leaf_modules apply, so it names what compile accepts."""
    from user_models import tiny

    from kdgraph.capture import capture, capture_for_spec

    spec = kdgraph.load_spec(dict(SPEC, leaf_modules=[{"module": "user_models:DataDependentGate",
                                                       "reason": "branches on x.mean()"}]))
    with pytest.raises(TraceError, match="leaf_modules"):
        capture(tiny(), "student")  # fx cannot trace through the gate
    with kdgraph.consent(["user_models"]):
        net = capture_for_spec(spec, "student", tiny())
    assert "gate" in net.all_names() and not any(n.startswith("gate/") for n in net.all_names())
    gate = net.resolve(parse_tap("student:gate"))
    assert gate.op == "call_module" and gate.target == "gate"
    assert net.shape(gate) == (2, 8, 16, 16) and net.shape(net.output_node) == (2, 10)  # shapes at the spec's input
    assert net.backend == "fx"


def test_inspect_cli_names_what_compile_accepts(tmp_path):
    """`kdgraph inspect SPEC` captures through capture_for_spec: a spec whose leaf_modules make a network
    traceable lists it (with the gate as one module), and without the entry both commands refuse alike."""
    import json

    import yaml
    from click.testing import CliRunner

    from kdgraph.cli import main

    good = dict(SPEC, leaf_modules=[{"module": "user_models:DataDependentGate", "reason": "branches on x.mean()"}])
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(good))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(SPEC))
    runner = CliRunner()
    res = runner.invoke(main, ["inspect", str(tmp_path / "good.yaml"), "--json", "--allow-import", "user_models"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    names = {r["name"]: r for r in rows["student"]}
    assert names["gate"]["kind"] == "module" and names["gate"]["shape"] == "B×8×16×16"
    assert not any(n.startswith("gate/") for n in names)
    for cmd in (["inspect"], ["compile"]):
        res = runner.invoke(main, [*cmd, str(tmp_path / "bad.yaml"), "--allow-import", "user_models"])
        assert res.exit_code == 2 and "leaf_modules" in res.output, res.output


def test_capture_without_an_example_records_no_shapes_and_an_unknown_backend_is_named():
    import torchvision

    from kdgraph.capture import capture

    net = capture(torchvision.models.resnet18(), "teacher")
    assert net.shape(net.output_node) is None
    with pytest.raises(kdgraph.KDGraphError, match="unknown capture backend 'onnx'; backends: auto, fx, export"):
        capture(torchvision.models.resnet18(), "teacher", backend="onnx")
