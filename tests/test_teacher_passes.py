"""The teacher passes teacher_channels_last and teacher_dtype (with fold_teacher_bn): a ResNet-34 teacher's tap
values equal the plain graph's (channels_last: rtol 1e-5) or stay close to them (bf16), the teacher module and
its state_dict are untouched, new teacher weights take effect after compile, only the student gets gradients."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torchvision.models import resnet18, resnet34

import kdgraph
from kdgraph.cli import main
from kdgraph.compiler.passes.fold_teacher_bn import FoldedConvBN
from kdgraph.compiler.passes.tap_values import restore_tap
from kdgraph.compiler.passes.teacher_dtype import autocast_state_kept, teacher_autocast_on
from kdgraph.errors import SpecError
from kdgraph.models.weights import load_weights

TAPS = ["teacher:layer2", "teacher:layer4", "teacher:@output"]
SPEC = {
    "name": "tpasses", "input": {"channels": 3, "size": [33, 47], "num_classes": 10},
    "teacher": {"model": "torchvision:resnet34", "kwargs": {"num_classes": 10}},
    "student": {"model": "torchvision:resnet18", "kwargs": {"num_classes": 10}},
    "stages": [{"name": "main", "optimizer": {"lr": 0.1}, "losses": [
        {"type": "cross_entropy"},
        {"name": "kd", "type": "kd", "args": {"temperature": 4.0}},
        {"name": "at", "type": "at", "inputs": {"student": "student:layer2", "teacher": "teacher:layer2"}},
        {"name": "feat", "type": "mse", "inputs": {"student": "student:layer4", "teacher": "teacher:layer4"}},
    ]}],
}


def _randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial running statistics and affine terms, so folding and layout have something to get wrong."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model


def _teacher(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return _randomise_bn(resnet34(num_classes=10), seed).eval()


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(1)
    return _teacher(0), resnet18(num_classes=10)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 3, 33, 47, generator=g), torch.randint(0, 10, (2,), generator=g)


def _compile(nets, **runtime):
    d = kdgraph.compile({**SPEC, "runtime": runtime}, teacher=nets[0], student=nets[1])
    d.train()
    return d


def _taps(d, batch) -> dict:
    with torch.no_grad():
        out = d(*batch, return_taps=True)
    return {t: out.taps[t] for t in TAPS} | {"loss": out.loss}


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    # relative to the tap's scale: a channel-last convolution sums in another order (rounding ~1e-7 each)
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()))


@pytest.mark.parametrize("runtime", [{"teacher_channels_last": True},
                                     {"teacher_channels_last": True, "fold_teacher_bn": True}])
def test_channels_last_teacher_taps_equal_the_plain_teachers(nets, batch, runtime):
    plain, fast = _taps(_compile(nets), batch), _taps(_compile(nets, **runtime), batch)
    for t in TAPS:
        assert fast[t].dtype == torch.float32 and fast[t].is_contiguous()
        _close(fast[t], plain[t], 1e-5)
    _close(fast["loss"], plain["loss"], 1e-5)
    # and both are the eager teacher's values
    _close(plain["teacher:@output"], nets[0](batch[0]).detach(), 1e-6)


def test_channels_last_converts_the_teacher_input_and_derives_folded_weights_nhwc(nets):
    d = _compile(nets, teacher_channels_last=True, fold_teacher_bn=True)
    r = d.report.pass_result("teacher_channels_last")
    assert r.changed and r.details["inputs"] == ["images"] and len(r.details["folded_channels_last"]) == 36
    assert set(r.details["retapped"]) == set(TAPS)
    folded = [m for m in d.graph_module.modules() if isinstance(m, FoldedConvBN)]
    assert folded and all(m.memory_format is torch.channels_last for m in folded)
    w, _ = folded[1].folded()
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert all(p.is_contiguous() for p in d.teacher.parameters())  # the user's module is as it was
    assert "to_channels_last" in d.graph_module.code
    # the student's nodes see the images as given
    assert d.report.pass_result("teacher_dtype").changed is False


def test_one_restore_node_per_tap_when_both_passes_run(nets):
    d = _compile(nets, teacher_channels_last=True, teacher_dtype="bf16")
    restores = [n for n in d.graph_module.graph.nodes if n.target is restore_tap]
    assert len(restores) == len(TAPS)
    assert all(n.kwargs == {"contiguous": True, "dtype": torch.float32} for n in restores)
    nodes = {t.tap: t.node for t in d.report.taps}
    assert {nodes[t] for t in TAPS} == {n.name for n in restores}


def test_new_teacher_weights_after_compile_change_the_outputs(nets, batch, tmp_path):
    teacher = _teacher(0)
    d = kdgraph.compile({**SPEC, "runtime": {"teacher_channels_last": True, "fold_teacher_bn": True}},
                        teacher=teacher, student=nets[1])
    before = _taps(d, batch)["teacher:@output"]
    other = _teacher(7)
    teacher.load_state_dict(other.state_dict())
    after = _taps(d, batch)["teacher:@output"]
    expected = other(batch[0]).detach()
    assert (after - before).abs().max() > 1e-2
    _close(after, expected, 1e-5)
    # kdgraph.models.weights.load_weights from a file, as Distiller.load_weights does
    third = _teacher(11)
    torch.save(third.state_dict(), tmp_path / "t.pt")
    ref = d.spec.teacher.model_copy(update={"weights": str(tmp_path / "t.pt")})
    assert load_weights(teacher, ref, "teacher")
    _close(_taps(d, batch)["teacher:@output"], third(batch[0]).detach(), 1e-5)


def test_state_dict_keys_are_those_of_the_plain_graph(nets):
    plain = _compile(nets)
    for rt in ({"teacher_channels_last": True, "fold_teacher_bn": True}, {"teacher_dtype": "bf16"}):
        d = _compile(nets, **rt)
        assert list(d.teacher.state_dict()) == list(nets[0].state_dict())
        assert list(d.state_dict()) == list(plain.state_dict())
        assert {k: v.dtype for k, v in d.state_dict().items()} == {k: v.dtype for k, v in plain.state_dict().items()}


@pytest.mark.parametrize("runtime", [{"teacher_dtype": "bf16"},
                                     {"teacher_dtype": "bf16", "teacher_channels_last": True, "fold_teacher_bn": True},
                                     {"teacher_dtype": "fp16"}])  # fp16 on the CPU too (CPU autocast takes it)
def test_low_precision_teacher_losses_close_to_fp32_and_only_the_student_gets_gradients(nets, batch, runtime):
    plain = _taps(_compile(nets), batch)
    d = _compile(nets, **runtime)
    for p in d.parameters():
        p.grad = None
    out = d(*batch, return_taps=True)
    assert not torch.is_autocast_enabled("cpu")  # the student's side and the caller see fp32
    assert out.logits.dtype == torch.float32
    for t in TAPS:
        assert out.taps[t].dtype == torch.float32
        # bf16: 8 mantissa bits, ~36 layers deep: within 3% of the tap's scale (measured ~0.5-1%); fp16 has 11
        _close(out.taps[t].detach(), plain[t], 3e-2)
    assert torch.isfinite(out.loss) and all(torch.isfinite(v) for v in out.terms.values())
    assert abs(out.loss.item() - plain["loss"].item()) <= 1e-2 * abs(plain["loss"].item())
    out.loss.backward()
    assert all(p.grad is None for p in d.teacher.parameters())
    grads = [p.grad for p in d.student.parameters()]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_folded_weights_are_derived_in_the_teacher_dtype_with_the_values_autocast_used(nets, batch, dtype):
    """fold + teacher_dtype: the folded weights are stored in bf16/fp16 (half the derived memory) and the taps are
    bitwise those of fp32-stored folded weights cast by autocast on every call."""
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    d = _compile(nets, fold_teacher_bn=True, teacher_dtype=dtype)
    r = d.report.pass_result("teacher_dtype")
    assert len(r.details["folded_dtype"]) == 36 and "36 folded weight(s) derived in " + dtype in r.summary
    folded = [m for m in d.graph_module.modules() if isinstance(m, FoldedConvBN)]
    assert len(folded) == 36 and all(m.dtype is low for m in folded)
    stored = _taps(d, batch)
    weights = [m._cache[1] for m in folded]
    assert all(w.dtype is low and b.dtype is low for w, b in weights)
    assert all(p.dtype is torch.float32 for p in d.teacher.parameters())  # the user's module is as it was
    for m in folded:  # the same graph with the folded weights kept in fp32 (autocast casts them per call)
        m.dtype = None
    cast_per_call = _taps(d, batch)
    assert all(m._cache[1][0].dtype is torch.float32 for m in folded)
    for t in TAPS + ["loss"]:
        assert torch.equal(stored[t], cast_per_call[t]), t
    # a low-precision folded call outside autocast computes in its input's dtype
    m = folded[0]
    m.dtype = low
    x = torch.randn(1, m._conv.in_channels, 9, 9)
    y = m(x)
    assert y.dtype is torch.float32
    torch.testing.assert_close(y, m._bn(m._conv(x)), rtol=1e-2, atol=1e-2 * float(y.abs().max()))


def test_autocast_state_is_restored_when_the_teacher_raises():
    assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(RuntimeError):
        with autocast_state_kept("cpu"):
            teacher_autocast_on(torch.zeros(1), torch.bfloat16)
            assert torch.is_autocast_enabled("cpu")
            raise RuntimeError("a module failed inside the teacher")
    assert not torch.is_autocast_enabled("cpu")


def test_restore_tap_casts_low_precision_only_and_keeps_values():
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    y = restore_tap(x, contiguous=True)
    assert y.is_contiguous() and torch.equal(x, y)
    b = x.bfloat16()
    assert restore_tap(b, dtype=torch.float32).dtype == torch.float32
    assert torch.equal(restore_tap(b, dtype=torch.float32), b.float())
    i = torch.arange(3)
    assert restore_tap(i, dtype=torch.float32) is i
    pair = restore_tap((b, i), dtype=torch.float32)
    assert isinstance(pair, tuple) and pair[0].dtype == torch.float32 and pair[1] is i


def test_teacher_dtype_outside_the_allowed_values_is_a_spec_error(nets):
    with pytest.raises(SpecError, match=r"runtime\.teacher_dtype.*(fp32|bf16)"):
        kdgraph.compile({**SPEC, "runtime": {"teacher_dtype": "fp64"}}, teacher=nets[0], student=nets[1])


def test_compile_json_lists_the_teacher_passes(tmp_path):
    import yaml

    spec = {**SPEC, "runtime": {"teacher_channels_last": True, "teacher_dtype": "bf16"}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    r = CliRunner().invoke(main, ["compile", str(path), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    passes = {p["name"]: p for p in json.loads(r.output)["stages"][0]["passes"]}
    assert passes["teacher_channels_last"]["changed"] and passes["teacher_dtype"]["changed"]
    assert passes["teacher_dtype"]["details"]["dtype"] == "bf16"
    assert set(passes["teacher_dtype"]["details"]["retapped"]) == set(TAPS)
    r = CliRunner().invoke(main, ["compile", str(path)], catch_exceptions=False)
    assert "teacher_channels_last" in r.output and "bf16 autocast" in r.output
