"""The generic ``connector`` adapter: same outputs and gradients as torchdistill 1.1.5's ConvReg (FitNet),
Connector4DAB's connector and Linear4CCKD's linear when initialised from the same weights; widths inferred from
the taps; clear shape errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from torchdistill.models.adaptation import ConvReg
from torchdistill.models.wrapper import Connector4DAB, Linear4CCKD

from kdgraph.errors import ShapeError, SpecError
from kdgraph.methods.args import check_args
from kdgraph.methods.registry import ADAPTERS
from conftest import assert_rel

Connector = ADAPTERS.get("connector")


def _build(args: dict, x_shape: tuple, match: tuple | None) -> nn.Module:
    args = check_args(Connector, args, ("adapters", "c"))
    return Connector(**Connector.infer_args(args, {"x": x_shape}, match))


def _compare(td: nn.Module, ours: nn.Module, x: torch.Tensor, what: str, rename=lambda n: n) -> None:
    """Same output and the same gradients of the input and of every parameter (``rename``: our name -> theirs)."""
    td.train(), ours.train()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_td, out = td(xa), ours(xb)
    assert_rel(out, out_td, f"{what}: output")
    g = torch.randn_like(out_td)
    (out_td * g).sum().backward()
    (out * g).sum().backward()
    assert_rel(xb.grad, xa.grad, f"{what}: gradient of the input")
    td_params = dict(td.named_parameters())
    for name, p in ours.named_parameters():
        assert_rel(p.grad, td_params[rename(name)].grad, f"{what}: gradient of {name}")
    # BatchNorm running statistics updated alike
    for name, buf in ours.named_buffers():
        if buf.is_floating_point():
            assert_rel(buf, dict(td.named_buffers())[rename(name)], f"{what}: buffer {name}")


def test_connector_equals_fitnet_convreg():
    torch.manual_seed(0)
    td = ConvReg(16, 24, kernel_size=1, stride=1, padding=0, uses_relu=True)
    ours = _build({"kernel_size": 1, "padding": 0, "bias": True, "bn": True, "relu": True}, (2, 16, 8, 8),
                  (2, 24, 8, 8))
    assert [n for n, _ in ours.named_children()] == ["conv", "bn", "relu"]
    ours.load_state_dict(td.state_dict(), strict=True)  # the same names: ConvReg's state dict loads as it is
    _compare(td, ours, torch.randn(3, 16, 8, 8), "ConvReg 1x1")


def test_connector_equals_dab_connector_3x3_and_strided():
    torch.manual_seed(1)
    for conv_kwargs, x_shape, match in [
            (dict(in_channels=8, out_channels=32, kernel_size=1, stride=1, padding=0, bias=False),
             (2, 8, 6, 6), (2, 32, 6, 6)),
            (dict(in_channels=8, out_channels=12, kernel_size=3, stride=1, padding=1, bias=False),
             (2, 8, 6, 6), (2, 12, 6, 6)),
            (dict(in_channels=8, out_channels=12, kernel_size=3, stride=2, padding=1, bias=False),
             (2, 8, 6, 6), (2, 12, 3, 3))]:
        td = Connector4DAB.build_connector(conv_kwargs, {"num_features": conv_kwargs["out_channels"]})
        args = {k: conv_kwargs[k] for k in ("kernel_size", "stride")}
        ours = _build(args, x_shape, match)  # padding k // 2, no bias, BN: the defaults
        assert (ours.conv.in_channels, ours.conv.out_channels, ours.conv.padding) == \
            (conv_kwargs["in_channels"], conv_kwargs["out_channels"], (conv_kwargs["padding"],) * 2)
        ours.load_state_dict({k.replace("0.", "conv.", 1).replace("1.", "bn.", 1): v
                              for k, v in td.state_dict().items()}, strict=True)
        _compare(td, ours, torch.randn(x_shape[0] + 1, *x_shape[1:]), f"Connector4DAB {conv_kwargs}",
                 rename=lambda n: n.replace("conv.", "0.").replace("bn.", "1."))


def test_connector_equals_cckd_linear():
    torch.manual_seed(2)
    student = nn.Sequential(nn.Conv2d(3, 10, 3), nn.AdaptiveAvgPool2d(1))
    td = Linear4CCKD({"path": "model.1", "io": "output"}, {"in_features": 10, "out_features": 6, "bias": True},
                     torch.device("cpu"), None, False, student_model=student)
    ours = _build({"layer": "linear", "out_features": 6}, (2, 10, 1, 1), None)
    assert ours.linear.in_features == 10 and ours.linear.bias is not None
    ours.linear.load_state_dict(td.linear.state_dict())
    feats = student(torch.randn(3, 3, 8, 8)).detach()
    # Linear4CCKD flattens its input module's output and applies its linear
    _compare(nn.Sequential(nn.Flatten(1), td.linear), ours, feats, "Linear4CCKD",
             rename=lambda n: n.replace("linear.", "1."))


def test_connector_infers_widths_and_rejects_bad_shapes():
    args = Connector.infer_args({}, {"x": (2, 64, 56, 56)}, (2, 256, 56, 56))
    assert args["in_channels"] == 64 and args["out_channels"] == 256
    args = Connector.infer_args({"layer": "linear"}, {"x": (2, 512, 1, 1)}, (2, 128))
    assert args["in_features"] == 512 and args["out_features"] == 128
    with pytest.raises(ShapeError, match="3 x 3.*match tap is 6 x 6"):
        Connector.infer_args({"kernel_size": 3, "stride": 2}, {"x": (2, 8, 6, 6)}, (2, 8, 6, 6))
    with pytest.raises(ShapeError, match="out_channels is unknown"):
        Connector.infer_args({}, {"x": (2, 8, 6, 6)}, None)
    with pytest.raises(ShapeError, match="layer: linear"):
        Connector.infer_args({}, {"x": (2, 8)}, (2, 8))
    with pytest.raises(ShapeError, match="belong to layer: conv"):
        Connector.infer_args({"layer": "linear", "bn": True}, {"x": (2, 8)}, (2, 4))
    with pytest.raises(SpecError, match=r"adapters\.c\.args\.layer"):
        check_args(Connector, {"layer": "conv3d"}, ("adapters", "c"))
    with pytest.raises(SpecError, match="takes no argument 'kernel'"):
        check_args(Connector, {"kernel": 3}, ("adapters", "c"))
