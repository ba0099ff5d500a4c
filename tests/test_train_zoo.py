"""kdgraph.zoo: the small ResNets of the offline default (28x28 gray input) and their centre-tap convolution."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

import kdgraph
from kdgraph.models.zoo import CenterTapConv2d, resnet18_small, resnet34_small


@pytest.mark.parametrize("stem, sizes", [("imagenet", (7, 4, 2, 1)), ("s2", (14, 7, 4, 2)), ("s1", (28, 14, 7, 4))])
def test_stems_give_the_documented_feature_map_sizes(stem, sizes):
    m = resnet18_small(stem=stem).eval()
    seen = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        getattr(m, name).register_forward_hook(lambda mod, i, o, n=name: seen.__setitem__(n, o.shape[-1]))
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert tuple(seen[f"layer{i}"] for i in range(1, 5)) == sizes


def test_state_dict_is_torchvisions_apart_from_the_stem_and_head():
    small = resnet34_small(in_channels=1, num_classes=10).state_dict()
    tv = torchvision.models.resnet34().state_dict()
    assert list(small) == list(tv)
    differ = {k for k in tv if small[k].shape != tv[k].shape}
    assert differ == {"conv1.weight", "fc.weight", "fc.bias"}


def test_center_tap_is_the_same_function_with_the_same_gradients():
    torch.manual_seed(0)
    plain = resnet18_small(center_tap=False)
    fast = resnet18_small()
    fast.load_state_dict(plain.state_dict())
    swapped = [n for n, m in fast.named_modules() if isinstance(m, CenterTapConv2d)]
    assert "layer4.1.conv2" in swapped and "conv1" not in swapped  # 3x3 / padding-1 convs only, not the 7x7 stem
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    for m in (plain, fast):
        F.cross_entropy(m(x), y).backward()
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)
    for (n, a), b in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")
    conv = CenterTapConv2d(8, 4, 3, 1, 1)
    z = torch.randn(2, 8, 5, 5)  # larger inputs take the ordinary path
    torch.testing.assert_close(conv(z), nn.functional.conv2d(z, conv.weight, conv.bias, 1, 1))


def test_zoo_models_trace_and_tap_like_torchvision_resnets():
    spec = kdgraph.load_spec({
        "name": "zoo", "input": {"channels": 1, "size": [28, 28], "num_classes": 10},
        "teacher": {"model": "kdgraph.zoo:resnet34_small"}, "student": {"model": "kdgraph.zoo:resnet18_small"},
        "stages": [{"name": "main", "optimizer": {"lr": 0.1},
                    "losses": [{"type": "cross_entropy"},
                               {"type": "at", "inputs": {"student": "student:layer4", "teacher": "teacher:layer4"}}]}]})
    d = kdgraph.compile(spec)
    shapes = {t.tap: t.shape for t in d.report.taps}
    assert shapes["student:layer4"] == shapes["teacher:layer4"] == (2, 512, 1, 1)
    out = d(torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,)))
    out.loss.backward()
    assert torch.isfinite(out.loss) and d.student.layer4[1].conv2.weight.grad is not None
