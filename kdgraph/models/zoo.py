"""Small model factories for small images (Fashion-MNIST's 28x28 gray, CIFAR's 32x32), named from specs.

They are torchvision's ResNets with a different stem and head, so taps, adapters and losses written
for ImageNet specs (``student:layer4``, ``teacher:avgpool``, ...) apply unchanged::

    teacher: {model: "kdgraph.zoo:resnet34_small", kwargs: {in_channels: 1, num_classes: 10, stem: imagenet}}
    student: {model: "kdgraph.zoo:resnet18_small"}

``stem`` picks the first layers, and with them the cost and the feature-map sizes (28x28 input;
ResNet-18 training step, batch 128, fp32 channels_last, measured on a 2-core AVX2 VM):

=============  =========================================  =====================  ===========
stem           layers                                     layer1..4 (28x28 in)   ms / image
=============  =========================================  =====================  ===========
``imagenet``   conv 7x7 stride 2 + max-pool 3x3 stride 2   7, 4, 2, 1             2.7
``s2``         conv 3x3 stride 2, no max-pool              14, 7, 4, 2            9.5
``s1``         conv 3x3 stride 1, no max-pool (CIFAR)      28, 14, 7, 4           ~4x ``s2``
=============  =========================================  =====================  ===========

With the ``imagenet`` stem, layer4 sees 1x1 feature maps, where a 3x3 convolution with padding 1 is
a 1x1 convolution by its centre tap (the other taps only ever meet the zero padding). oneDNN's
backward pass is pathologically slow for that case on CPUs (~45% of a ResNet-18 training step), so
``center_tap=True`` (the default) replaces those convolutions by :class:`CenterTapConv2d`, which
computes exactly that: same parameters and ``state_dict`` keys, same outputs and gradients (the
non-centre taps get zero gradient either way), 2.2x faster ResNet-18 training steps on 2 CPU cores.

``tiny_cnn`` is a four-layer network for tests (``norm: batch | group | none``).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models import resnet

Stem = Literal["imagenet", "s2", "s1"]
_STEMS = ("imagenet", "s2", "s1")


class CenterTapConv2d(nn.Conv2d):
    """A 3x3, padding-1 ``nn.Conv2d`` that runs as a 1x1 convolution of its centre tap on 1x1 inputs.

    On a 1x1 input every output is ``sum_c w[o, c, 1, 1] * x[c] + b[o]`` (the other taps only meet
    padding), so this is the same function with the same gradients; it just avoids oneDNN's slow
    backward kernel for that shape. Any other input size runs the ordinary convolution.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == 1 and x.shape[-2] == 1:
            return F.conv2d(x, self.weight[:, :, 1:2, 1:2], self.bias, self.stride, 0, self.dilation, self.groups)
        return super().forward(x)


#: The zoo's classes a capture calls as one node, with the reason (:mod:`kdgraph.capture.leaves` reads it).
ZOO_LEAF_MODULES: dict[type, str] = {
    CenterTapConv2d: "branches on the input's spatial size (a 1x1 input uses the centre tap); one node, like nn.Conv2d",
}


def use_center_tap(model: nn.Module) -> nn.Module:
    """Swap every 3x3 / padding-1 / dilation-1 ``nn.Conv2d`` of ``model`` for :class:`CenterTapConv2d`,
    keeping its parameter tensors (so ``state_dict`` and any optimizer state are unchanged)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) is nn.Conv2d and child.kernel_size == (3, 3) and child.padding == (1, 1)
                    and child.dilation == (1, 1) and child.padding_mode == "zeros"):
                new = CenterTapConv2d(child.in_channels, child.out_channels, 3, child.stride, 1, child.dilation,
                                      child.groups, child.bias is not None, device="meta")
                new.weight = child.weight
                new.bias = child.bias
                setattr(parent, name, new)
    return model


def _widen(model: resnet.ResNet, block: type, layers: list[int], width: int) -> None:
    """Rebuild ``model``'s stages with ``width, 2*width, 4*width, 8*width`` channels (torchvision: 64)."""
    model.inplanes = width
    model.layer1 = model._make_layer(block, width, layers[0])
    model.layer2 = model._make_layer(block, 2 * width, layers[1], stride=2)
    model.layer3 = model._make_layer(block, 4 * width, layers[2], stride=2)
    model.layer4 = model._make_layer(block, 8 * width, layers[3], stride=2)
    model.bn1 = nn.BatchNorm2d(width)
    model.fc = nn.Linear(8 * width, model.fc.out_features)
    for m in model.modules():  # torchvision's own initialisation, for the new modules
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


_LAYERS = {"resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3]}


def _small_resnet(arch: str, in_channels: int, num_classes: int, stem: str, center_tap: bool = True,
                  zero_init_residual: bool = False, width: int = 64) -> resnet.ResNet:
    if stem not in _STEMS:
        raise ValueError(f"stem must be one of {', '.join(_STEMS)}, got {stem!r}")
    if in_channels < 1 or num_classes < 1:
        raise ValueError(f"in_channels and num_classes must be >= 1, got {in_channels}, {num_classes}")
    if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= 1024:
        raise ValueError(f"width must be an integer in 1..1024 (channels of layer1; torchvision's is 64), got {width!r}")
    factory = getattr(resnet, arch)
    model: resnet.ResNet = factory(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)
    if width != 64:
        _widen(model, resnet.BasicBlock, _LAYERS[arch], width)
        if zero_init_residual:
            for m in model.modules():
                if isinstance(m, resnet.BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)
    if stem == "imagenet":
        model.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
    else:
        model.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=2 if stem == "s2" else 1, padding=1,
                                bias=False)
        model.maxpool = nn.Identity()
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return use_center_tap(model) if center_tap else model


def resnet18_small(in_channels: int = 1, num_classes: int = 10, stem: Stem = "imagenet",
                   center_tap: bool = True, zero_init_residual: bool = False, width: int = 64) -> resnet.ResNet:
    """torchvision ResNet-18 with an ``in_channels`` stem (see the module docstring), ``num_classes`` outputs
    and ``width`` channels in layer1 (doubling per stage; torchvision's is 64)."""
    return _small_resnet("resnet18", in_channels, num_classes, stem, center_tap, zero_init_residual, width)


def resnet34_small(in_channels: int = 1, num_classes: int = 10, stem: Stem = "imagenet",
                   center_tap: bool = True, zero_init_residual: bool = False, width: int = 64) -> resnet.ResNet:
    """torchvision ResNet-34 with an ``in_channels`` stem (see the module docstring), ``num_classes`` outputs
    and ``width`` channels in layer1 (doubling per stage; torchvision's is 64)."""
    return _small_resnet("resnet34", in_channels, num_classes, stem, center_tap, zero_init_residual, width)


class TinyCNN(nn.Module):
    """conv-norm-relu x3 + global average pool + linear; a few thousand parameters, for tests."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 8,
                 norm: Literal["batch", "group", "none"] = "batch"):
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            if norm == "batch":
                n: nn.Module = nn.BatchNorm2d(cout)
            elif norm == "group":
                n = nn.GroupNorm(2, cout)
            elif norm == "none":
                n = nn.Identity()
            else:
                raise ValueError(f"norm must be batch, group or none, got {norm!r}")
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=norm == "none"), n, nn.ReLU(inplace=True))

        self.layer1 = block(in_channels, width, 1)
        self.layer2 = block(width, 2 * width, 2)
        self.layer3 = block(2 * width, 4 * width, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def tiny_cnn(in_channels: int = 1, num_classes: int = 10, width: int = 8,
             norm: Literal["batch", "group", "none"] = "batch") -> TinyCNN:
    """A tiny CNN for tests and smoke runs."""
    return TinyCNN(in_channels, num_classes, width, norm)
