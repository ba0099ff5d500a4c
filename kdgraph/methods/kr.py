"""KR: knowledge review (attention-based fusion + hierarchical context loss).

P. Chen, S. Liu, H. Zhao, J. Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021,
https://arxiv.org/abs/2104.09044

Student features of several levels are fused coarse to fine by attention-based fusion (ABF)
modules; each level's fused output is compared with the teacher feature of the same level.

ABF (one adapter per level, chained by its ``residual`` input)::

    x   = BN(conv1x1_{in -> mid}(F_s))
    if a coarser level exists (residual r, mid channels):
        r' = nearest-upsample(r, size of x)
        z  = sigmoid(conv1x1_{2 mid -> 2}([x, r']))     computed as conv1x1_x(x) + up(conv1x1_r(r))
        x  = x * z[:, 0] + r' * z[:, 1]
    out = BN(conv3x3_{mid -> out}(x))          returns (out, x): tap .0 goes to the loss, .1 to the next level

Hierarchical context loss (HCL) per level, h the student map's height::

    L = [ MSE(s, t) + sum_j w_j MSE(pool_kj(s), pool_kj(t)) ] / (1 + sum_j w_j)

over the pooled sizes k_j of ``output_sizes`` (4, 2, 1) with ``k_j < h`` (strictly smaller than the
map; the 1 x 1 avgpool level is a plain MSE), ``pool_k`` = adaptive average pooling to k x k and
w_j = 1/2, 1/4, 1/8 for the first, second, third pooled size that is used (the weight halves per
used size, as in the authors' code and torchdistill: with ImageNet's 7 x 7 and larger maps all
three are used, so w = 0.5, 0.25, 0.125 for k = 4, 2, 1; a 2 x 2 map uses only k = 1, with w = 0.5).

ImageNet, ResNet-34 -> ResNet-18: five ABFs (mid 512), the last block of layer1..layer4 and the
avgpool output; one ``hcl`` term per level, weight 1 each::

    adapters:
      abf_avgpool: {type: abf, inputs: {x: "student:avgpool"}, match: "teacher:avgpool",
                    args: {mid_channels: 512}}
      abf_layer4: {type: abf, inputs: {x: "student:layer4.-1", residual: "adapter:abf_avgpool.1"},
                   match: "teacher:layer4.-1", args: {mid_channels: 512}}
      ...
    losses:
      - {name: hcl_layer4, type: hcl, inputs: {student: "adapter:abf_layer4.0", teacher: "teacher:layer4.-1"}}

torchdistill's configuration hooks the *input* of ``layerN.-1.relu``; that ReLU runs in place, so the
tensor its hook holds is the block's (post-ReLU) output, i.e. ``layerN.-1`` here. An ABF without a
``residual`` input (the coarsest level) has no attention convolution. A 2-D input (an already
flattened embedding, N x C) is read as N x C x 1 x 1.
"""
from __future__ import annotations

from typing import Any, Literal, Mapping, Optional, Sequence

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from ..errors import ShapeError
from .registry import register_adapter, register_loss
from .args import Channels, Flag, MethodArgs, PosInt
from .base import Adapter, DistillLoss, Shape, _fmt, channels, require_arg, check_reduction


class ABFArgs(MethodArgs):
    in_channels: Optional[Channels] = Field(None, description="channels of x, 1 to 16384 (default: from the input tap)")
    out_channels: Optional[Channels] = Field(None, description="output channels, 1 to 16384 (default: from match)")
    mid_channels: Optional[Channels] = Field(None, description="channels of the fused map, 1 to 16384 (default 512)")
    uses_attention: Optional[Flag] = Field(None, description="true / false (default: whether residual is bound)")
    vector_input: Optional[Flag] = Field(None, description="true / false (default: whether x is N x C)")


class HCLArgs(MethodArgs):
    output_sizes: list[PosInt] = Field([4, 2, 1], min_length=1, max_length=16,
                                       description="a list of pooled sizes, each >= 1, e.g. [4, 2, 1]")
    reduction: Literal["mean", "sum"] = Field("mean", description="'mean' or 'sum'")


@register_adapter("abf")
class AttentionBasedFusion(Adapter):
    """One ABF level: ``forward(x, residual=None) -> (out, x_next)``.

    Args:
        in_channels: channels of ``x`` (from the input tap).
        out_channels: channels of ``out`` (from the ``match`` tap: the teacher feature).
        mid_channels: channels of the fused map ``x_next`` (512 in the ImageNet benchmark); a
            ``residual`` must have this many channels.
        uses_attention: fuse with a residual; inferred from whether the spec binds ``residual``.
        vector_input: ``x`` is N x C (viewed as N x C x 1 x 1); inferred from the input tap.
    """

    inputs = ("x", "residual")
    Args = ABFArgs

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int = 512,
                 uses_attention: bool = False, vector_input: bool = False):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
                                    nn.BatchNorm2d(mid_channels))
        self.attention = (nn.Sequential(nn.Conv2d(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid())
                          if uses_attention else None)
        self.project = nn.Sequential(nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
                                     nn.BatchNorm2d(out_channels))
        # the reference implementation initialises both convolutions with kaiming_uniform_(a=1)
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.project[0].weight, a=1)
        self.in_channels, self.mid_channels, self.out_channels = in_channels, mid_channels, out_channels
        self.vector_input = vector_input

    @classmethod
    def infer_args(cls, args: dict[str, Any], input_shapes: Mapping[str, Shape], match_shape: Shape | None) -> dict[str, Any]:
        args = dict(args)
        x_shape = input_shapes["x"]
        require_arg(args, "in_channels", channels(x_shape, "abf input 'x'"))
        if match_shape is not None:
            require_arg(args, "out_channels", channels(match_shape, "abf match"))
        if args.get("out_channels") is None:
            raise ShapeError("abf: out_channels is unknown; give the adapter a 'match' tap (the teacher feature "
                             "its output is compared with) or set args.out_channels")
        require_arg(args, "mid_channels", 512)
        residual = input_shapes.get("residual")
        require_arg(args, "uses_attention", residual is not None)
        require_arg(args, "vector_input", len(x_shape) == 2)
        if residual is not None:
            if not args["uses_attention"]:
                raise ShapeError("abf: a 'residual' input is bound but args.uses_attention is false; "
                                 "drop the residual or the argument")
            if channels(residual, "abf input 'residual'") != args["mid_channels"]:
                raise ShapeError(
                    f"abf: the residual (shape {_fmt(residual)}) must have mid_channels = {args['mid_channels']} "
                    f"channels: bind it to the '.1' output of the coarser abf adapter (its fused map), and give "
                    f"every abf of the chain the same mid_channels")
            if len(x_shape) == 4 and len(residual) == 4 and any(r > h for r, h in zip(residual[2:], x_shape[2:])):
                raise ShapeError(
                    f"abf: the residual (shape {_fmt(residual)}) is larger than the input 'x' (shape "
                    f"{_fmt(x_shape)}); chain the adapters coarse to fine")
        return args

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.vector_input:
            x = x[:, :, None, None]
        x = self.reduce(x)
        if self.attention is not None:
            if residual is None:
                raise ValueError("abf built with uses_attention=True needs a 'residual' input")
            size = x.shape[-2:]
            conv, mid = self.attention[0], self.mid_channels
            # conv1x1([x, up(r)]) = conv1x1_x(x) + up(conv1x1_r(r)): a 1x1 convolution commutes with nearest
            # upsampling, so the residual's half runs on the coarse map and the concatenation is never built
            logits = F.conv2d(x, conv.weight[:, :mid], conv.bias) \
                + nearest_upsample(F.conv2d(residual, conv.weight[:, mid:]), size)
            z = self.attention[1](logits)
            x = x * z[:, 0:1] + nearest_upsample(residual, size) * z[:, 1:2]
        return self.project(x), x


def nearest_upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode="nearest")``, as an expanded view when ``size`` is an integer multiple.

    The values are the same (nearest with an integer factor k copies each pixel into a k x k block);
    the expanded view is much cheaper than ``upsample_nearest2d`` on contiguous NCHW maps on the CPU
    (measured: 32 x 512 x 14 x 14 -> 28 x 28 took 286 ms through ``F.interpolate`` and 36 ms as a
    view, 2-core Xeon, torch 2.14). A channels_last map keeps ``F.interpolate``, which is fast there.
    """
    n, c, h, w = x.shape
    big_h, big_w = int(size[0]), int(size[1])
    if (h, w) == (big_h, big_w):
        return x
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if channels_last or big_h % h or big_w % w:
        return F.interpolate(x, size=(big_h, big_w), mode="nearest")
    kh, kw = big_h // h, big_w // w
    return x[:, :, :, None, :, None].expand(n, c, h, kh, w, kw).reshape(n, c, big_h, big_w)


def hierarchical_context_loss(student: torch.Tensor, teacher: torch.Tensor, output_sizes: Sequence[int] = (4, 2, 1),
                              reduction: str = "mean") -> torch.Tensor:
    """HCL of one level (see the module docstring): MSE plus halving-weighted pooled MSEs, normalised."""
    loss = F.mse_loss(student, teacher, reduction=reduction)
    h = student.shape[2]
    w, total = 1.0, 1.0
    for k in output_sizes:
        if k >= h:
            continue
        w /= 2.0
        loss = loss + w * F.mse_loss(F.adaptive_avg_pool2d(student, (k, k)),
                                     F.adaptive_avg_pool2d(teacher, (k, k)), reduction=reduction)
        total += w
    return loss / total


@register_loss("hcl")
class HierarchicalContextLoss(DistillLoss):
    """Hierarchical context loss of one level between an ABF output and the teacher feature."""

    inputs = ("student", "teacher")
    same_shape = (("student", "teacher"),)
    Args = HCLArgs

    def __init__(self, output_sizes: Sequence[int] = (4, 2, 1), reduction: Literal["mean", "sum"] = "mean"):
        super().__init__()
        check_reduction(reduction)
        if any(int(k) < 1 for k in output_sizes):
            raise ValueError(f"output_sizes must be positive pooled sizes, got {list(output_sizes)}")
        self.output_sizes = tuple(int(k) for k in output_sizes)
        self.reduction = reduction

    @classmethod
    def check_shapes(cls, shapes: Mapping[str, Shape | None], taps: Mapping[str, str], where: str) -> None:
        super().check_shapes(shapes, taps, where)
        s = shapes.get("student")
        if s is not None and len(s) != 4:
            raise ShapeError(f"{where}: hcl needs B x C x H x W maps, but {taps['student']} has shape {_fmt(s)}; "
                             f"tap the '.0' output of an abf adapter")

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return hierarchical_context_loss(student, teacher, self.output_sizes, self.reduction)
