"""OFD: overhaul of feature distillation (pre-ReLU features, a margin ReLU on the teacher, partial L2).

B. Heo, J. Kim, S. Yun, H. Park, N. Kwak, J. Y. Choi, "A Comprehensive Overhaul of Feature Distillation",
ICCV 2019, https://arxiv.org/abs/1904.01866 (code: clovaai/overhaul-distillation; the port used as the oracle:
megvii-research/mdistiller ``mdistiller/distillers/OFD.py``)

Both networks are tapped *before* the ReLU (for a torchvision ResNet block: its residual ``add``, e.g.
``teacher:layer3.5/add``); the student's map goes through a 1x1 conv + BN connector (``ofd_connector``) to the
teacher's channels. The teacher's negative responses are replaced by the margin ``m_c = E[x | x < 0]`` of a
Gaussian with the mean and std of the BatchNorm before that ReLU (``beta_c``, ``|gamma_c|``; ``-3 |gamma_c|``
when ``Phi(-beta/|gamma|) <= 0.001``); with ``t = max(teacher, m)`` the partial L2 skips positions where the
student is already below a negative target::

    L_OFD = 1/B * sum_{c,h,w} [ (s - m)^2 if s > m >= t_raw   |  (s - t)^2 if s > t_raw, m < t_raw <= 0
                                | (s - t)^2 if t_raw > 0 ]

(the teacher map average-pooled to the student's size). ``margin_bn`` names the teacher's BatchNorm; the margins
follow its current weights at every step (so loading the teacher after compiling is fine). mdistiller sums the
stages with weights ``w / 2^(n - 1 - i)`` (the deepest stage 1): one entry per stage with that weight::

    adapters:
      c4: {type: ofd_connector, inputs: {x: "student:layer4.1/add"}, match: "teacher:layer4.2/add"}
    losses:
      - {name: ofd4, type: ofd, weight: 1.0e-4, args: {margin_bn: "teacher:layer4.2.bn2"},
         inputs: {student: "adapter:c4", teacher: "teacher:layer4.2/add"}}
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from ..errors import ShapeError
from .registry import register_adapter, register_loss
from .args import Channels, MethodArgs, PosInt
from .base import Adapter, DistillLoss, Shape, _fmt, channels, require_arg


class OFDArgs(MethodArgs):
    margin_bn: str = Field(description="the teacher's BatchNorm before the tapped ReLU, as a module tap, "
                                       "e.g. 'teacher:layer4.2.bn2'")


class ConnectorArgs(MethodArgs):
    in_channels: Channels | None = Field(None, description="student channels (default: from the input tap)")
    out_channels: Channels | None = Field(None, description="teacher channels (default: from the match tap)")
    kernel_size: PosInt = Field(1, description="conv kernel size (odd; 1 in the paper)")


def bn_margin(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``E[x | x < 0]`` for ``x ~ N(bias, |weight|^2)`` per channel (``-3 |weight|`` where P(x < 0) <= 0.001)."""
    s, m = weight.detach().double().abs(), bias.detach().double()
    cdf = torch.special.ndtr(-m / s)
    pdf = torch.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi)
    return torch.where(cdf > 0.001, -s * pdf / cdf + m, -3 * s)


def partial_l2(source: torch.Tensor, target: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """The paper's partial L2 distance against the margin-ReLU'd target, summed per image, averaged over B."""
    loss = ((source - margin) ** 2 * ((source > margin) & (target <= margin)).float()
            + (source - target) ** 2 * ((source > target) & (target > margin) & (target <= 0)).float()
            + (source - target) ** 2 * (target > 0).float())
    return torch.abs(loss).mean(dim=0).sum()


@register_loss("ofd")
class OFDLoss(DistillLoss):
    """Partial L2 between the connected student map and the teacher's pre-ReLU map with BN-derived margins."""

    inputs = ("student", "teacher")
    #: arguments that name a network's module; the compiler passes the module itself to the constructor
    module_args = ("margin_bn",)
    Args = OFDArgs

    def __init__(self, margin_bn: nn.Module):
        super().__init__()
        if not isinstance(margin_bn, nn.modules.batchnorm._BatchNorm) or not margin_bn.affine:
            raise ValueError(f"margin_bn must be an affine BatchNorm of the teacher, got {type(margin_bn).__name__}")
        self._bn = (margin_bn,)  # a tuple: not a submodule of the loss (the teacher owns and moves it)

    def margin(self) -> torch.Tensor:
        bn = self._bn[0]
        return bn_margin(bn.weight, bn.bias).view(1, -1, 1, 1)

    @classmethod
    def check_shapes(cls, shapes: Mapping[str, Shape | None], taps: Mapping[str, str], where: str) -> None:
        s, t = shapes.get("student"), shapes.get("teacher")
        if s is not None and t is not None and (len(s) != 4 or len(t) != 4 or s[:2] != t[:2]):
            raise ShapeError(f"{where}: OFD compares B x C x H x W maps with the teacher's channels, but "
                             f"{taps['student']} has shape {_fmt(s)} and {taps['teacher']} {_fmt(t)}; put an "
                             f"ofd_connector adapter (match: the teacher tap) on the student map")

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        margin = self.margin()
        if margin.shape[1] != teacher.shape[1]:
            raise ShapeError(f"OFD: margin_bn has {margin.shape[1]} channels, the teacher map {teacher.shape[1]}")
        target = F.adaptive_avg_pool2d(teacher, student.shape[-2:]).detach()
        return partial_l2(student, target, margin.to(student))


@register_adapter("ofd_connector")
class OFDConnector(Adapter):
    """1x1 conv (no bias) + BatchNorm from the student's channels to the teacher's (He-initialised, BN 1 / 0)."""

    inputs = ("x",)
    Args = ConnectorArgs

    @classmethod
    def infer_args(cls, args: dict[str, Any], input_shapes: Mapping[str, Shape], match_shape: Shape | None) -> dict[str, Any]:
        args = dict(args)
        require_arg(args, "in_channels", channels(input_shapes["x"], "ofd_connector input"))
        if args.get("out_channels") is None:
            if match_shape is None:
                raise ShapeError("ofd_connector: give out_channels or a match tap (the teacher's map)")
            args["out_channels"] = channels(match_shape, "ofd_connector match")
        return args

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=(kernel_size - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        n = kernel_size * kernel_size * out_channels
        nn.init.normal_(self.conv.weight, 0.0, math.sqrt(2.0 / n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))
