"""Helper of ``teacher_mkldnn``: a copy of an inference subgraph that runs in oneDNN's blocked layout on the CPU.

:func:`onednn_copy` walks the subgraph once, in order:

- a ``Conv2d`` call (zero padding given as numbers) becomes a :class:`OneDNNConv`, its weight reordered once for
  oneDNN; when the convolution's only reader is an eval-mode ``BatchNorm2d`` with running statistics and the
  convolution's own value does not leave the subgraph, the BatchNorm is folded into it;
- ReLU (module or function), max / average / adaptive average pooling modules and ``+`` of two blocked values
  stay in the blocked layout;
- every other node runs as it is, on dense tensors, and so does every value that leaves the subgraph: a
  ``to_mkldnn`` / ``to_dense`` conversion is inserted where the layout changes (once per value).

An in-place op (``ReLU(inplace=True)``, ``relu_``, ``+=``, ``x.add_(y)``) runs in place on the blocked value, or as
an out-of-place twin, or on a converted copy; the nodes after it that read its input read its result instead,
which is what they read in the eager in-place computation. The copy holds only the reordered convolution weights (the other modules are the
subgraph's own, shared); each folded weight exists densely only while it is being reordered.
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn

from .fold_teacher_bn import fold_conv_bn

__all__ = ["OneDNNConv", "onednn_copy"]

_RELU_FNS = (torch.relu, torch.relu_, torch.nn.functional.relu)
_ADDS = (operator.add, operator.iadd, torch.add)
_IN_PLACE_FNS = (operator.iadd, operator.isub, operator.imul, operator.itruediv, torch.relu_)


class OneDNNConv(nn.Module):
    """A ``Conv2d`` (with a following eval-mode BatchNorm folded in) whose weight is reordered once for oneDNN;
    its input and output are oneDNN (``torch._mkldnn``) tensors."""

    def __init__(self, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d] = None):
        super().__init__()
        with torch.no_grad():
            if bn is not None:
                weight, bias = fold_conv_bn(conv, bn)
            else:
                weight, bias = conv.weight.detach(), conv.bias.detach() if conv.bias is not None else None
            self.padding, self.stride = list(conv.padding), list(conv.stride)
            self.dilation, self.groups = list(conv.dilation), conv.groups
            self.weight = torch._C._nn.mkldnn_reorder_conv2d_weight(
                weight.contiguous().to_mkldnn(), self.padding, self.stride, self.dilation, self.groups)
            self.bias = bias.contiguous().to_mkldnn() if bias is not None else None
        self.folded = bn is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride, self.dilation,
                                        self.groups)

    def extra_repr(self) -> str:
        return f"oneDNN, stride {self.stride}, padding {self.padding}" + (", BatchNorm folded" if self.folded else "")


def _convertible(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and conv.weight.dtype == torch.float32)


def _foldable(bn: nn.Module) -> bool:
    return (type(bn) is nn.BatchNorm2d and not bn.training and bn.track_running_stats
            and bn.running_mean is not None and bn.running_var is not None)


def _pool_ok(m: Optional[nn.Module]) -> bool:
    """A pooling module oneDNN runs on blocked tensors as torch does on dense ones."""
    if type(m) is nn.MaxPool2d:
        return not m.return_indices
    if type(m) is nn.AvgPool2d:
        return m.divisor_override is None
    if type(m) is nn.AdaptiveAvgPool2d:  # oneDNN needs the input size divisible by the output size: 1 always is
        return m.output_size in (1, (1, 1), [1, 1])
    return False


def _in_place(n: fx.Node, gm: fx.GraphModule) -> bool:
    if n.op == "call_module":
        return getattr(gm.get_submodule(str(n.target)), "inplace", False) is True
    if n.op == "call_function":
        return n.target in _IN_PLACE_FNS or n.kwargs.get("inplace") is True
    if n.op == "call_method":
        name = str(n.target)
        return name.endswith("_") and not name.endswith("__")
    return False


def onednn_copy(plain: fx.GraphModule) -> fx.GraphModule:
    """The oneDNN copy of ``plain`` (see the module docstring); ``plain`` and its modules are not changed."""
    graph = plain.graph
    outputs = {a for n in graph.nodes if n.op == "output" for a in n.all_input_nodes}
    g = fx.Graph()
    attrs: dict[str, Any] = {}  # the copy's modules and attributes, by target
    env: dict[fx.Node, fx.Node] = {}
    blocked: set[fx.Node] = set()  # nodes of the copy whose value is a oneDNN tensor
    to_dense: dict[fx.Node, fx.Node] = {}
    to_blocked: dict[fx.Node, fx.Node] = {}
    folded_into: dict[fx.Node, fx.Node] = {}  # a folded BatchNorm's node -> the copy's convolution node

    def dense(v: Any) -> Any:
        if isinstance(v, fx.Node) and v in blocked:
            if v not in to_dense:
                to_dense[v] = g.call_method("to_dense", (v,))
            return to_dense[v]
        return v

    def as_blocked(v: fx.Node) -> fx.Node:
        if v in blocked:
            return v
        if v not in to_blocked:
            to_blocked[v] = g.call_method("to_mkldnn", (v,))
            blocked.add(to_blocked[v])
        return to_blocked[v]

    def blocked_result(n: fx.Node, new: fx.Node) -> None:
        blocked.add(new)
        env[n] = new
        if _in_place(n, plain) and isinstance(n.args[0], fx.Node):
            env[n.args[0]] = new  # later readers of the input read what the in-place op left there

    for n in graph.nodes:
        if n in folded_into:
            env[n] = folded_into[n]
            continue
        if n.op == "placeholder":
            env[n] = g.placeholder(n.target)
            continue
        if n.op == "output":
            g.output(fx.map_arg(n.args[0], lambda a: dense(env[a])))
            continue
        args = [env[a] if isinstance(a, fx.Node) else a for a in n.args]
        mod = plain.get_submodule(str(n.target)) if n.op == "call_module" else None
        single = len(n.args) == 1 and not n.kwargs and isinstance(n.args[0], fx.Node)
        if mod is not None and _convertible(mod) and single:
            users = list(n.users)
            bn_node = users[0] if len(users) == 1 and n not in outputs else None
            bn = plain.get_submodule(str(bn_node.target)) if bn_node is not None and bn_node.op == "call_module" \
                else None
            if bn is None or not _foldable(bn) or bn.num_features != mod.out_channels or len(bn_node.args) != 1:
                bn_node, bn = None, None
            target = f"onednn_conv_{sum(isinstance(m, OneDNNConv) for m in attrs.values())}"
            attrs[target] = OneDNNConv(mod, bn)
            new = g.call_module(target, (as_blocked(args[0]),))
            blocked_result(n, new)
            if bn_node is not None:
                folded_into[bn_node] = new
            continue
        source = args[0] if args else None
        if single and source in blocked and (isinstance(mod, nn.ReLU) or _pool_ok(mod) or n.target in _RELU_FNS):
            if _pool_ok(mod):
                attrs[str(n.target)] = mod
                new = g.call_module(str(n.target), (source,))
            else:  # in place where the original was (no new buffer; its readers are redirected below)
                new = g.call_function(torch.relu_ if _in_place(n, plain) else torch.relu, (source,))
            blocked_result(n, new)
            continue
        if (n.op == "call_function" and n.target in _ADDS and len(n.args) == 2 and not n.kwargs
                and all(a in blocked for a in args if isinstance(a, fx.Node)) and all(isinstance(a, fx.Node) for a in args)):
            blocked_result(n, g.call_function(operator.add, tuple(args)))
            continue
        # anything else: as it is, on dense tensors
        new = g.node_copy(n, lambda a: dense(env[a]))
        if n.op in ("call_module", "get_attr"):
            attrs[str(n.target)] = plain.get_submodule(str(n.target)) if n.op == "call_module" \
                else _get_attr(plain, str(n.target))
        env[n] = new
        if _in_place(n, plain) and n.args and isinstance(n.args[0], fx.Node):
            env[n.args[0]] = new
    return fx.GraphModule(attrs, g, class_name="OneDNNTeacher")


def _get_attr(gm: fx.GraphModule, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)
