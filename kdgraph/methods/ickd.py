"""ICKD: inter-channel correlation knowledge distillation.

L. Liu, Q. Huang, S. Lin, H. Xie, B. Wang, X. Chang, X. Liang, "Exploring Inter-Channel Correlation for
Diversity-Preserved Knowledge Distillation", ICCV 2021, https://arxiv.org/abs/2202.03680
(torchdistill 1.1.5: ``ChSimLoss`` + ``Student4ICKD`` / ``ChannelSimilarityEmbed``)

The student's feature map goes through an embedding (``ickd_embed``: 3x3 conv without bias + BatchNorm, to the
teacher's channel count). For each sample, the C x C inter-channel Gram matrix ``G = F F^T`` (F: C x HW) has its
rows L2-normalised; the loss is the squared difference of the two, summed and divided by ``C * B^2``
(torchdistill's and the authors' normalisation)::

    L_ICKD = 1 / (C B^2) * sum_b || n(G_s[b]) - n(G_t[b]) ||_F^2

ImageNet (ResNet-34 -> ResNet-18, torchdistill's ``configs/sample/ilsvrc2012/ickd``: KD with alpha 0.5, T 1, plus
500 x ICKD on layer4; AdamW)::

    adapters:
      embed: {type: ickd_embed, inputs: {x: "student:layer4"}, match: "teacher:layer4"}
    losses:
      - {name: ce, type: cross_entropy, weight: 0.5}
      - {name: kd, type: kd, weight: 0.5, args: {temperature: 1.0}}
      - {name: ickd, type: ickd, weight: 500.0, inputs: {student: "adapter:embed", teacher: "teacher:layer4"}}
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from ..errors import ShapeError
from .registry import register_adapter, register_loss
from .args import Channels, NoArgs, MethodArgs
from .base import Adapter, DistillLoss, Shape, _fmt, channels, require_arg


class ICKDEmbedArgs(MethodArgs):
    in_channels: Optional[Channels] = Field(None, description="channels of x, 1 to 16384 (default: from the input tap)")
    out_channels: Optional[Channels] = Field(None, description="output channels, 1 to 16384 (default: from match)")


@register_adapter("ickd_embed")
class ICKDEmbed(Adapter):
    """``BN(conv3x3(x))``, no conv bias: torchdistill's ``ChannelSimilarityEmbed`` (``conv2d``, ``l2norm``)."""

    Args = ICKDEmbedArgs

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv2d = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.l2norm = nn.BatchNorm2d(out_channels)

    @classmethod
    def infer_args(cls, args: dict[str, Any], input_shapes: Mapping[str, Shape], match_shape: Shape | None) -> dict[str, Any]:
        args = dict(args)
        require_arg(args, "in_channels", channels(input_shapes["x"], "ickd_embed input"))
        if match_shape is not None:
            require_arg(args, "out_channels", channels(match_shape, "ickd_embed match"))
        if args.get("out_channels") is None:
            raise ShapeError("ickd_embed: out_channels is unknown; give the adapter a 'match' tap (the teacher "
                             "feature map) or set args.out_channels")
        return args

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2norm(self.conv2d(x))


def channel_gram(f: torch.Tensor) -> torch.Tensor:
    """Per-sample C x C Gram matrix of the flattened map, rows L2-normalised."""
    f = f.flatten(2)
    return F.normalize(torch.bmm(f, f.transpose(1, 2)), dim=2)


@register_loss("ickd")
class ICKDLoss(DistillLoss):
    """``sum (n(G_s) - n(G_t))^2 / (C * B^2)`` over per-sample inter-channel Gram matrices."""

    inputs = ("student", "teacher")
    same_shape = (("student", "teacher"),)
    Args = NoArgs

    @classmethod
    def check_shapes(cls, shapes: Mapping[str, Shape | None], taps: Mapping[str, str], where: str) -> None:
        super().check_shapes(shapes, taps, where)
        for name in cls.inputs:
            s = shapes.get(name)
            if s is not None and len(s) < 3:
                raise ShapeError(f"{where}: ickd needs B x C x H x W maps, but {taps[name]} has shape {_fmt(s)}")

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        b, c = student.shape[0], student.shape[1]
        diff = channel_gram(student) - channel_gram(teacher)
        return (diff * diff).sum() / (c * b * b)
