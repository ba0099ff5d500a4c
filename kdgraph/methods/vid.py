"""VID: variational information distillation.

S. Ahn, S. X. Hu, A. Damianou, N. D. Lawrence, Z. Dai, "Variational Information Distillation for Knowledge
Transfer", CVPR 2019, https://arxiv.org/abs/1904.05835

A regressor (three 1x1 convs with ReLUs between, no bias) predicts the mean ``mu(s)`` of a Gaussian over the
teacher's map from the student's; each teacher channel c has a learned variance
``sigma_c^2 = softplus(alpha_c) + eps`` (alpha initialised so that sigma^2 = ``init_pred_var``). VID maximises a
variational lower bound of the mutual information, i.e. minimises the Gaussian negative log-likelihood::

    L_VID = mean_{b, c, h, w} 1/2 * [ (t - mu(s))^2 / sigma_c^2 + log sigma_c^2 ]

(torchdistill 1.1.5's ``VIDLoss`` drops the constant log(2 pi) / 2 and sums the pairs; kdgraph has one term per
pair). The ``vid_regressor`` adapter returns ``(mu, sigma^2)``: tap ``.0`` and ``.1``. ImageNet (20 epochs, SGD
lr 1e-4): cross-entropy + the four stage outputs, weight 1 each::

    adapters:
      vid1: {type: vid_regressor, inputs: {x: "student:layer1"}, match: "teacher:layer1",
             args: {eps: 1.0e-5, init_pred_var: 5.0}}
    losses:
      - {name: vid_layer1, type: vid,
         inputs: {mean: "adapter:vid1.0", var: "adapter:vid1.1", teacher: "teacher:layer1"}}
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from ..errors import ShapeError
from .registry import register_adapter, register_loss
from .args import Channels, MethodArgs, NoArgs, Positive
from .base import Adapter, DistillLoss, Shape, _fmt, channels, require_arg


class VIDRegressorArgs(MethodArgs):
    in_channels: Optional[Channels] = Field(None, description="channels of x, 1 to 16384 (default: from the input tap)")
    middle_channels: Optional[Channels] = Field(None, description="channels of the two hidden convs, 1 to 16384 "
                                                                  "(default: out_channels)")
    out_channels: Optional[Channels] = Field(None, description="channels of the teacher map, 1 to 16384 (default: "
                                                               "from match)")
    eps: Positive = Field(1e-5, description="the variance's lower bound, > 0")
    init_pred_var: Positive = Field(5.0, description="the initial variance, > eps")


@register_adapter("vid_regressor")
class VIDRegressor(Adapter):
    """``x -> (conv1x1 ReLU conv1x1 ReLU conv1x1 (x), softplus(alpha) + eps)``; the variance is 1 x C x 1 x 1."""

    Args = VIDRegressorArgs

    def __init__(self, in_channels: int, out_channels: int, middle_channels: Optional[int] = None,
                 eps: float = 1e-5, init_pred_var: float = 5.0):
        super().__init__()
        if init_pred_var <= eps:
            raise ValueError(f"init_pred_var ({init_pred_var}) must be larger than eps ({eps})")
        mid = out_channels if middle_channels is None else middle_channels
        self.regressor = nn.Sequential(
            nn.Conv2d(in_channels, mid, kernel_size=1, bias=False), nn.ReLU(),
            nn.Conv2d(mid, mid, kernel_size=1, bias=False), nn.ReLU(),
            nn.Conv2d(mid, out_channels, kernel_size=1, bias=False))
        # softplus^-1(init_pred_var - eps), so that the initial variance is init_pred_var
        self.soft_plus_param = nn.Parameter(
            torch.full((out_channels,), math.log(math.expm1(init_pred_var - eps))))
        self.eps = float(eps)

    @classmethod
    def infer_args(cls, args: dict[str, Any], input_shapes: Mapping[str, Shape], match_shape: Shape | None) -> dict[str, Any]:
        args = dict(args)
        x = input_shapes["x"]
        if len(x) != 4:
            raise ShapeError(f"vid_regressor: the input must be N x C x H x W, got shape {_fmt(x)}")
        require_arg(args, "in_channels", channels(x, "vid_regressor input"))
        if match_shape is not None:
            require_arg(args, "out_channels", channels(match_shape, "vid_regressor match"))
        if args.get("out_channels") is None:
            raise ShapeError("vid_regressor: out_channels is unknown; give the adapter a 'match' tap (the teacher "
                             "map) or set args.out_channels")
        return args

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.regressor(x)
        var = F.softplus(self.soft_plus_param) + self.eps
        return mean, var.view(1, -1, 1, 1)


@register_loss("vid")
class VIDLoss(DistillLoss):
    """``mean(0.5 * ((mean - teacher)^2 / var + log var))``: the Gaussian NLL of the teacher map."""

    inputs = ("mean", "var", "teacher")
    same_shape = (("mean", "teacher"),)
    Args = NoArgs

    @classmethod
    def check_shapes(cls, shapes: Mapping[str, Shape | None], taps: Mapping[str, str], where: str) -> None:
        super().check_shapes(shapes, taps, where)
        v, t = shapes.get("var"), shapes.get("teacher")
        if v is not None and t is not None and (len(v) != len(t) or v[1] != t[1]):
            raise ShapeError(f"{where}: the variance ({taps['var']}, shape {_fmt(v)}) must have one entry per "
                             f"channel of the teacher map ({taps['teacher']}, shape {_fmt(t)}); bind 'var' to the "
                             f"'.1' output of a vid_regressor whose 'match' is that map")

    def forward(self, mean: torch.Tensor, var: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return (0.5 * ((mean - teacher).square() / var + torch.log(var))).mean()
