"""Pass: fold the frozen teacher's BatchNorm into the convolution before it (exact in eval mode, up to rounding).

A teacher ``Conv2d -> BatchNorm2d`` pair whose convolution output nothing else reads (no tap, no other user)
becomes one call of :class:`FoldedConvBN`: ``conv(x, W * s, (b - mean) * s + beta)`` with
``s = gamma / sqrt(var + eps)``. The BatchNorm's node stays in the graph (same name, same ``NodeInfo``, so a tap on
it reads the same value); only its target and arguments change, and the convolution's node goes.

The teacher module, its ``state_dict`` and checkpoints do not change: :class:`FoldedConvBN` holds no parameters of
its own, only references to the teacher's two modules, and derives the folded weights from them when they change
(``load_state_dict``, ``load_weights``, ``--resume`` and ``.to()`` all write new values or new storage, which
its cache key sees: each tensor's version counter, storage and device). In training mode, or for a BatchNorm
without running statistics, it computes ``bn(conv(x))`` as the graph did before.

Switched by the spec's ``runtime.fold_teacher_bn`` (default off: the folded teacher's outputs differ from the eager
teacher's by float rounding, ~1e-6 relative, and kdgraph's default graph is bit-for-bit the eager computation).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F

from ..nodeinfo import Role, role_of
from ..report import PassResult
from .context import PassContext

__all__ = ["NAME", "run", "FoldedConvBN"]

NAME = "fold_teacher_bn"
HOLDER = "teacher_folded"  # the GraphModule's ModuleDict holding the folded calls


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(weight, bias)`` of one convolution computing ``bn(conv(x))`` in eval mode, from the live modules:
    ``w * s`` and ``(b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    bias = -bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    if bn.bias is not None:
        bias = bias + bn.bias
    weight = conv.weight * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
    return weight.detach(), bias.detach()


class FoldedConvBN(nn.Module):
    """``bn(conv(x))`` computed as one convolution with folded weights, derived from the live modules."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        super().__init__()
        # plain attributes, not submodules: the teacher owns these, and the state_dict must not list them twice
        object.__setattr__(self, "_conv", conv)
        object.__setattr__(self, "_bn", bn)
        object.__setattr__(self, "_cache", None)
        #: the folded weight's memory format (``teacher_channels_last`` sets ``torch.channels_last``), or None: the
        #: convolution weight's own
        self.memory_format: Optional[torch.memory_format] = None
        #: the folded weight's and bias's dtype (``teacher_dtype`` sets bf16 / fp16, the dtype autocast would cast
        #: them to on every call: stored once, half the derived memory, the same values), or None: the weight's own
        self.dtype: Optional[torch.dtype] = None
        self.conv_name, self.bn_name = type(conv).__name__, type(bn).__name__

    def represented_parameters(self) -> list[nn.Parameter]:
        """The teacher's parameters this call stands for (the convolution's and the BatchNorm's), for views that
        count parameters per node; :meth:`parameters` stays empty, so nothing is listed or optimised twice."""
        return [*self._conv.parameters(), *self._bn.parameters()]

    def _sources(self) -> list[Optional[torch.Tensor]]:
        c, b = self._conv, self._bn
        return [c.weight, c.bias, b.weight, b.bias, b.running_mean, b.running_var]

    def _key(self) -> tuple:
        return (self.memory_format, self.dtype) + tuple((t._version, t.data_ptr(), t.device, t.dtype) if t is not None else None
                                             for t in self._sources())

    @torch.no_grad()
    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The folded ``(weight, bias)`` for the modules' current values."""
        weight, bias = fold_conv_bn(self._conv, self._bn)
        if self.dtype is not None:
            weight, bias = weight.to(self.dtype), bias.to(self.dtype)
        if self.memory_format is not None:
            weight = weight.contiguous(memory_format=self.memory_format)
        return weight.detach(), bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, b = self._conv, self._bn
        if b.training or b.running_mean is None:
            return b(c(x))
        if torch.compiler.is_compiling():
            weight, bias = self.folded()
        else:
            key = self._key()
            if self._cache is None or self._cache[0] != key:
                object.__setattr__(self, "_cache", (key, self.folded()))
            weight, bias = self._cache[1]
        if weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            weight, bias = weight.to(x.dtype), bias.to(x.dtype)  # called outside the teacher's autocast
        if c.padding_mode != "zeros":
            return F.conv2d(F.pad(x, c._reversed_padding_repeated_twice, mode=c.padding_mode), weight, bias,
                            c.stride, 0, c.dilation, c.groups)
        return F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, c.groups)

    def extra_repr(self) -> str:
        return f"{self.conv_name} + {self.bn_name}, folded"


def _module(gm: fx.GraphModule, node: fx.Node) -> Any:
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if not ctx.fold_teacher_bn:
        return PassResult(NAME, False, "off (runtime.fold_teacher_bn: true turns it on)", {"folded": []})
    tapped = set(ctx.taps.values())
    pairs = []
    for bn_node in gm.graph.nodes:
        if role_of(bn_node) is not Role.TEACHER or not isinstance(_module(gm, bn_node), nn.BatchNorm2d):
            continue
        conv_node = bn_node.args[0] if len(bn_node.args) == 1 and not bn_node.kwargs else None
        if not isinstance(conv_node, fx.Node) or role_of(conv_node) is not Role.TEACHER:
            continue
        conv = _module(gm, conv_node)
        if type(conv) is not nn.Conv2d or len(conv_node.users) != 1 or conv_node in tapped:
            continue
        bn = _module(gm, bn_node)
        if not bn.track_running_stats or conv.out_channels != bn.num_features:
            continue
        pairs.append((conv_node, bn_node, conv, bn))
    if not pairs:
        return PassResult(NAME, False, "no teacher Conv2d -> BatchNorm2d pair to fold", {"folded": []})
    holder = nn.ModuleDict()
    folded = []
    for conv_node, bn_node, conv, bn in pairs:
        key = f"f{len(folded)}"
        holder[key] = FoldedConvBN(conv, bn)
        bn_node.target = f"{HOLDER}.{key}"
        bn_node.args, bn_node.kwargs = conv_node.args, conv_node.kwargs
        gm.graph.erase_node(conv_node)
        folded.append({"conv": str(conv_node.target), "bn": str(bn_node.name), "as": f"{HOLDER}.{key}"})
    gm.add_submodule(HOLDER, holder)
    return PassResult(NAME, True, f"folded {len(folded)} teacher BatchNorm(s) into their convolutions",
                      {"folded": folded})
