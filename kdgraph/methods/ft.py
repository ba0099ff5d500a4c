"""FT: factor transfer, two stages.

J. Kim, S. Park, N. Kwak, "Paraphrasing Complex Network: Network Compression via Factor
Transfer", NeurIPS 2018, https://arxiv.org/abs/1802.04977

A paraphraser (encoder + decoder of 3x3 convs, LeakyReLU(0.1), no BN) learns to reconstruct the
teacher's feature map F_t (stage 1, ``L_rec = mean((D(E(F_t)) - F_t)^2)``, teacher frozen). Its
encoder output is the teacher factor f = E(F_t) (rate k: k*C channels). In stage 2 the encoder is
frozen, a translator (same three convs) maps the student map to the student factor g, and::

    L_FT = mean | g / ||g||_2 - f / ||f||_2 |          (per-sample L2 normalisation, p = 1)

The encoder and decoder are two adapters, so stage 2 runs (and the graph shows) only the encoder::

    adapters:
      paraphraser_encoder: {type: ft_encoder, inputs: {x: "teacher:layer4"}, args: {rate: 0.5}}
      paraphraser_decoder: {type: ft_decoder, inputs: {x: "adapter:paraphraser_encoder"},
                            match: "teacher:layer4"}
      translator: {type: ft_translator, inputs: {x: "student:layer4"}, match: "adapter:paraphraser_encoder"}
"""
from __future__ import annotations

from typing import Annotated, Any, Mapping, Optional

from pydantic import field_validator

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from .registry import register_adapter, register_loss
from .args import Channels, Flag, MethodArgs, PosInt, Positive
from .base import Adapter, DistillLoss, Shape, channels, require_arg

Kernel = Annotated[PosInt, Field(le=15)]


class _FTConvArgs(MethodArgs):
    in_channels: Optional[Channels] = Field(None, description="channels of x, 1 to 16384 (default: from the input tap)")
    kernel_size: Kernel = Field(3, description="odd kernel size, 1 to 15")
    uses_bn: Flag = Field(False, description="true / false: a BatchNorm2d after each conv")

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the convs keep H x W with padding k // 2), got {v}")
        return v


class FTEncoderArgs(_FTConvArgs):
    rate: Annotated[Positive, Field(le=16)] = Field(0.5, description="factor channels = int(rate * in_channels), rate in (0, 16]")


class FTPairArgs(_FTConvArgs):
    out_channels: Optional[Channels] = Field(None, description="output channels, 1 to 16384 (default: from match)")


class FTArgs(MethodArgs):
    p: PosInt = Field(1, description="the norm of the factor difference: 1 (L1, the paper) or an integer >= 2")


def _conv_stack(widths: list[int], transposed: bool, kernel_size: int, uses_bn: bool) -> list[nn.Module]:
    layers: list[nn.Module] = []
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    for c_in, c_out in zip(widths, widths[1:]):
        layers.append(conv(c_in, c_out, kernel_size, stride=1, padding=kernel_size // 2))
        if uses_bn:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.LeakyReLU(0.1))
    return layers


@register_adapter("ft_encoder")
class FTEncoder(Adapter, nn.Sequential):
    """Paraphraser encoder: C -> C -> kC -> kC, 3x3 convs, each followed by LeakyReLU(0.1)."""

    Args = FTEncoderArgs

    def __init__(self, in_channels: int, rate: float = 0.5, kernel_size: int = 3, uses_bn: bool = False):
        factor = int(in_channels * rate)
        if factor < 1:
            raise ValueError(f"rate {rate} of {in_channels} input channels leaves {factor} factor channels; "
                             f"rate * in_channels must be >= 1")
        nn.Sequential.__init__(self, *_conv_stack([in_channels, in_channels, factor, factor], False,
                                                  kernel_size, uses_bn))
        self.out_channels = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.Sequential.forward(self, x)

    @classmethod
    def infer_args(cls, args: dict[str, Any], input_shapes: Mapping[str, Shape], match_shape: Shape | None) -> dict[str, Any]:
        args = dict(args)
        require_arg(args, "in_channels", channels(input_shapes["x"], "ft_encoder input"))
        return args


@register_adapter("ft_decoder")
class FTDecoder(Adapter, nn.Sequential):
    """Paraphraser decoder: kC -> kC -> C -> C, 3x3 transposed convs, each followed by LeakyReLU(0.1)."""

    Args = FTPairArgs

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, uses_bn: bool = False):
        nn.Sequential.__init__(self, *_conv_stack([in_channels, in_channels, out_channels, out_channels], True,
                                                  kernel_size, uses_bn))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.Sequential.forward(self, x)

    @classmethod
    def infer_args(cls, args: dict[str, Any], input_shapes: Mapping[str, Shape], match_shape: Shape | None) -> dict[str, Any]:
        args = dict(args)
        require_arg(args, "in_channels", channels(input_shapes["x"], "ft_decoder input"))
        if match_shape is not None:
            require_arg(args, "out_channels", channels(match_shape, "ft_decoder match"))
        return args


@register_adapter("ft_translator")
class FTTranslator(Adapter, nn.Sequential):
    """Translator on the student map: C_s -> C_s -> C_f -> C_f, 3x3 convs with LeakyReLU(0.1)."""

    Args = FTPairArgs

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, uses_bn: bool = False):
        nn.Sequential.__init__(self, *_conv_stack([in_channels, in_channels, out_channels, out_channels], False,
                                                  kernel_size, uses_bn))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.Sequential.forward(self, x)

    @classmethod
    def infer_args(cls, args: dict[str, Any], input_shapes: Mapping[str, Shape], match_shape: Shape | None) -> dict[str, Any]:
        args = dict(args)
        require_arg(args, "in_channels", channels(input_shapes["x"], "ft_translator input"))
        if match_shape is not None:
            require_arg(args, "out_channels", channels(match_shape, "ft_translator match"))
        return args


@register_loss("ft")
class FTLoss(DistillLoss):
    """``mean |g/||g|| - f/||f|||^p`` over flattened factors (p = 1: L1; else the per-sample p-norm)."""

    inputs = ("student", "teacher")
    same_shape = (("student", "teacher"),)
    Args = FTArgs

    def __init__(self, p: int = 1):
        super().__init__()
        self.p = p

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        g = student.flatten(1)
        f = teacher.flatten(1)
        g = g / g.norm(dim=1, keepdim=True)
        f = f / f.norm(dim=1, keepdim=True)
        if self.p == 1:
            return F.l1_loss(g, f)
        return (g - f).norm(p=self.p, dim=1).mean()
