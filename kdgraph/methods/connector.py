"""The generic ``connector`` adapter: one small trainable map from a tap to another tap's shape.

Feature-based methods compare a student feature with a teacher feature of another width. torchdistill ships one
module per method for this; kdgraph has one adapter that covers them all:

* ``layer: conv`` (default): ``Conv2d(in, out, k, stride, padding)`` [+ ``BatchNorm2d(out)``] [+ ``ReLU``]
    - FitNet's hint regressor (Romero et al., ICLR 2015; torchdistill's ``ConvReg``):
      ``{kernel_size: 1, bias: true, bn: true, relu: true}``
    - DAB's connector (Heo et al., AAAI 2019; torchdistill's ``Connector4DAB``):
      ``{kernel_size: 1, bias: false, bn: true}`` (the defaults)
    - a 3x3 connector: ``{kernel_size: 3}`` (padding 1 keeps H x W)
* ``layer: linear``: ``Linear(in_features, out_features)`` on the input flattened from dim 1
    - CCKD's embedding (Peng et al., ICCV 2019; torchdistill's ``Linear4CCKD``): ``{layer: linear, out_features: 128}``
    - ``flatten: false``: on the last dimension only, e.g. a language model's hidden states ``B x T x H`` ->
      ``B x T x H'`` (a learned projection per token, as in a layer map; docs/causal_lm.md)

The submodules are named ``conv``, ``bn``, ``relu`` and ``linear``, so the state dict of a torchdistill ``ConvReg``
loads as it is. Widths follow from the taps (``infer_args``): ``in_channels`` / ``in_features`` from the input tap,
``out_channels`` / ``out_features`` from the optional ``match`` tap (the teacher feature), so a spec names only
what differs from the default::

    adapters:
      hint: {type: connector, inputs: {x: "student:layer1"}, match: "teacher:layer1",
             args: {kernel_size: 1, bias: true, bn: true, relu: true}}
      embed: {type: connector, inputs: {x: "student:avgpool"}, args: {layer: linear, out_features: 128}}

A ``conv`` connector checks at compile time that its output's H x W equals the ``match`` tap's.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Annotated, Any, Literal, Mapping, Optional

import torch
from pydantic import Field
from torch import nn

from ..errors import ShapeError
from .registry import register_adapter
from .args import Channels, Features, Flag, MethodArgs, PosInt
from .base import Adapter, Shape, _fmt, channels, flat_features, require_arg

Kernel = Annotated[PosInt, Field(le=15)]
Padding = Annotated[int, Field(ge=0, le=15)]


class ConnectorArgs(MethodArgs):
    layer: Literal["conv", "linear"] = Field("conv", description="'conv' (Conv2d on N x C x H x W maps) or 'linear' "
                                                                 "(Linear on the input flattened from dim 1)")
    in_channels: Optional[Channels] = Field(None, description="conv: channels of x, 1 to 16384 (default: from the "
                                                              "input tap)")
    out_channels: Optional[Channels] = Field(None, description="conv: output channels, 1 to 16384 (default: from "
                                                               "match)")
    kernel_size: Kernel = Field(1, description="conv: kernel size, 1 to 15")
    stride: Annotated[PosInt, Field(le=16)] = Field(1, description="conv: stride, 1 to 16")
    padding: Optional[Padding] = Field(None, description="conv: zero padding, 0 to 15 (default kernel_size // 2)")
    in_features: Optional[Features] = Field(None, description="linear: input features (default: the input tap "
                                                              "flattened from dim 1)")
    out_features: Optional[Features] = Field(None, description="linear: output features (default: match flattened "
                                                               "from dim 1)")
    bias: Optional[Flag] = Field(None, description="true / false: the conv's or linear's bias (default: false for "
                                                   "conv, true for linear)")
    bn: Optional[Flag] = Field(None, description="true / false: a BatchNorm after the conv (default: true for conv; "
                                                 "linear: not allowed)")
    relu: Flag = Field(False, description="true / false: a ReLU last")
    flatten: Flag = Field(True, description="linear: flatten the input from dim 1 first (true, the default); false: "
                                            "map the last dimension only (B x T x H -> B x T x out_features)")


@register_adapter("connector")
class Connector(Adapter, nn.Sequential):
    """``conv [+ bn] [+ relu]`` or ``linear [+ relu]`` (see the module docstring)."""

    Args = ConnectorArgs

    def __init__(self, layer: str = "conv", in_channels: Optional[int] = None, out_channels: Optional[int] = None,
                 kernel_size: int = 1, stride: int = 1, padding: Optional[int] = None,
                 in_features: Optional[int] = None, out_features: Optional[int] = None,
                 bias: Optional[bool] = None, bn: Optional[bool] = None, relu: bool = False, flatten: bool = True):
        modules: "OrderedDict[str, nn.Module]" = OrderedDict()
        if layer == "conv":
            if in_channels is None or out_channels is None:
                raise ValueError("a conv connector needs in_channels and out_channels")
            padding = kernel_size // 2 if padding is None else padding
            modules["conv"] = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                        bias=bool(bias))
            if bn is None or bn:
                modules["bn"] = nn.BatchNorm2d(out_channels)
        elif layer == "linear":
            if in_features is None or out_features is None:
                raise ValueError("a linear connector needs in_features and out_features")
            if bn:
                raise ValueError("a linear connector has no BatchNorm (bn: true is for layer: conv)")
            modules["linear"] = nn.Linear(in_features, out_features, bias=True if bias is None else bias)
        else:
            raise ValueError(f"layer must be 'conv' or 'linear', got {layer!r}")
        if relu:
            modules["relu"] = nn.ReLU()
        nn.Sequential.__init__(self, modules)
        self.layer = layer
        self.flatten = bool(flatten)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer == "linear" and self.flatten:
            x = x.flatten(1)
        return nn.Sequential.forward(self, x)

    @classmethod
    def infer_args(cls, args: dict[str, Any], input_shapes: Mapping[str, Shape], match_shape: Shape | None) -> dict[str, Any]:
        args = dict(args)
        x = input_shapes["x"]
        layer = args.get("layer") or "conv"
        if layer == "linear":
            given = [k for k in ("in_channels", "out_channels", "bn") if args.get(k) is not None]
            if given:
                raise ShapeError(f"connector: {', '.join(given)} belong to layer: conv; a linear connector takes "
                                 f"in_features / out_features")
            flat = args.get("flatten", True) is not False
            require_arg(args, "in_features", flat_features(x) if flat else int(x[-1]))
            if match_shape is not None:
                require_arg(args, "out_features", flat_features(match_shape) if flat else int(match_shape[-1]))
            if args.get("out_features") is None:
                raise ShapeError("connector (linear): out_features is unknown; set args.out_features or give the "
                                 "adapter a 'match' tap")
            return args
        if args.get("flatten") is False:
            raise ShapeError("connector: flatten belongs to layer: linear (a conv connector maps N x C x H x W)")
        if len(x) != 4:
            raise ShapeError(f"connector (conv): the input must be N x C x H x W, got shape {_fmt(x)}; use "
                             f"layer: linear for a flat feature")
        require_arg(args, "in_channels", channels(x, "connector input"))
        if match_shape is not None:
            require_arg(args, "out_channels", channels(match_shape, "connector match"))
        if args.get("out_channels") is None:
            raise ShapeError("connector (conv): out_channels is unknown; set args.out_channels or give the adapter "
                             "a 'match' tap (the feature its output is compared with)")
        if match_shape is not None and len(match_shape) == 4:
            k, s = args.get("kernel_size") or 1, args.get("stride") or 1
            p = k // 2 if args.get("padding") is None else args["padding"]
            out_hw = tuple((h + 2 * p - k) // s + 1 for h in x[2:])
            if out_hw != tuple(match_shape[2:]):
                raise ShapeError(
                    f"connector (conv): kernel {k}, stride {s}, padding {p} map the input's {x[2]} x {x[3]} to "
                    f"{out_hw[0]} x {out_hw[1]}, but the match tap is {match_shape[2]} x {match_shape[3]} "
                    f"(shape {_fmt(match_shape)}); change stride / padding or tap a feature of the same size")
        return args
