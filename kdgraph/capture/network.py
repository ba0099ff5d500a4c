"""The name index of a captured network: a qualified name for every node, and tap resolution with did-you-mean.

Every node of a captured network gets a name a user can write in a tap (see :data:`kdgraph.spec.TAP_GRAMMAR`):

* a module call is named by its module path (``layer1.0.conv1``); a module that runs several
  times (``layer1.0.relu`` in torchvision's BasicBlock) is addressed by its last call, or ``#k``;
  a non-leaf module (``layer4``, ``layer1.0``) has an output too: the value its forward returned;
* a functional op is named by the module whose forward runs it and its op name, numbered per
  scope: ``layer1.0/add`` is the residual add of block ``layer1.0`` before its ReLU, ``/flatten``
  the top-level flatten.

A capture backend (:mod:`kdgraph.capture.fx_backend`) fills a :class:`TracedNetwork`; everything downstream
(the compiler, ``kdgraph inspect``, the graph view) reads names and shapes from it only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata

from ..errors import TapError, did_you_mean
from ..spec import Tap

__all__ = ["ModuleCall", "TracedNetwork", "name_ops"]


def name_ops(scoped: "Iterable[tuple[fx.Node, str, str]]") -> tuple[dict[str, fx.Node], dict[fx.Node, str]]:
    """Functional-op names ``scope/op``, numbered per scope (``layer1.0/add``, ``layer1.0/add_1``), from
    ``(node, scope, op stem)`` in graph order: ``(name -> node, node -> name)``. Both backends name ops this way."""
    op_names: dict[str, fx.Node] = {}
    node_names: dict[fx.Node, str] = {}
    counts: dict[str, int] = {}
    for node, scope, stem in scoped:
        key = f"{scope}/{stem}"
        k = counts.get(key, 0)
        counts[key] = k + 1
        name = key if k == 0 else f"{key}_{k}"
        op_names[name] = node
        node_names[node] = name
    return op_names, node_names


@dataclass
class ModuleCall:
    """One call of a module during tracing: the node its first input came from and its output node."""

    path: str
    input: Optional[fx.Node]
    output: Optional[fx.Node]


@dataclass
class TracedNetwork:
    """A traced network: its GraphModule, the name of every node, and shapes at the spec's input size."""

    role: str
    module: nn.Module
    graph_module: fx.GraphModule
    calls: dict[str, list[ModuleCall]]  # module path -> calls in order
    op_names: dict[str, fx.Node]  # "scope/op" -> node
    node_names: dict[fx.Node, str] = field(default_factory=dict)  # node -> its tap name
    input_node: Optional[fx.Node] = None
    output_node: Optional[fx.Node] = None  # the node the network returns
    backend: str = "fx"  # the capture backend that built it (kdgraph.capture.BACKENDS)
    fx_error: Optional[str] = None  # capture: auto fell back to torch.export: why fx could not capture it

    # ---------------------------------------------------------------- names
    def entries(self) -> list[tuple[str, fx.Node, str]]:
        """Every tappable name in graph order: (name, node, kind) with kind module|op|input|output."""
        order = {n: i for i, n in enumerate(self.graph_module.graph.nodes)}
        rows: list[tuple[str, fx.Node, str]] = []
        if self.input_node is not None:
            rows.append(("@input", self.input_node, "input"))
        for path, calls in self.calls.items():
            for k, c in enumerate(calls):
                if c.output is None:
                    continue
                label = path if k == len(calls) - 1 else f"{path}#{k}"
                rows.append((label, c.output, "module"))
        for name, node in self.op_names.items():
            rows.append((name, node, "op"))
        rows.sort(key=lambda r: (order.get(r[1], -1), r[2] != "module", r[0]))
        if self.output_node is not None:
            rows.append(("@output", self.output_node, "output"))
        return rows

    def all_names(self) -> list[str]:
        return [r[0] for r in self.entries()]

    # ---------------------------------------------------------------- taps
    def canonical_path(self, path: str, tap: Tap) -> str:
        """Resolve negative indices (``layer4.-1`` -> ``layer4.1``) against the real module tree."""
        if not path:
            return path
        module: nn.Module = self.module
        out: list[str] = []
        for part in path.split("."):
            children = dict(module.named_children())
            if re.fullmatch(r"-?\d+", part) and part not in children:
                keys = list(children)
                i = int(part)
                if not keys or not -len(keys) <= i < len(keys):
                    raise TapError(self._unknown(tap, ".".join(out + [part]),
                                                 f"index {i} is out of range for {'.'.join(out) or 'the network'} "
                                                 f"({len(keys)} children)"))
                part = keys[i]
            if part not in children:
                where = ".".join(out) or self.role
                raise TapError(self._unknown(tap, ".".join(out + [part]),
                                             f"{where} has no child {part!r}"
                                             f" (children: {', '.join(children) or 'none'})"))
            module = children[part]
            out.append(part)
        return ".".join(out)

    def _unknown(self, tap: Tap, name: str, why: str) -> str:
        return (f"tap {tap.text!r}: {why}.{did_you_mean(name, self.all_names())} "
                f"Run `kdgraph inspect` on the spec to list every tappable name of the {self.role}.")

    def resolve(self, tap: Tap) -> fx.Node:
        """The node whose value the tap reads. Raises :class:`TapError` with suggestions."""
        if tap.op is not None:
            path = self.canonical_path(tap.path, tap) if tap.path else ""
            key = f"{path}/{tap.op}"
            if key not in self.op_names:
                scope_ops = [k for k in self.op_names if k.startswith(f"{path}/")]
                listed = f" Ops in {path or 'the top level'}: {', '.join(scope_ops)}." if scope_ops else ""
                raise TapError(self._unknown(tap, key, f"no functional op {tap.op!r} runs in {path or 'the top level'}")
                               + listed)
            return self.op_names[key]
        if not tap.path:
            node = self.input_node if tap.io == "input" else self.output_node
            if node is None and tap.io == "input":
                names = [n.name for n in self.graph_module.graph.nodes if n.op == "placeholder"]
                raise TapError(f"tap {tap.text!r}: the {self.role} takes several inputs ({', '.join(names)}); "
                               f"tap one of them as batch:NAME (e.g. batch:{names[0] if names else 'input_ids'})")
            if node is None:
                raise TapError(f"tap {tap.text!r}: the {self.role} has no single {tap.io} to tap")
            return node
        path = self.canonical_path(tap.path, tap)
        calls = self.calls.get(path)
        if not calls:
            raise TapError(self._unknown(tap, path, f"module {path!r} exists but its forward never runs it"))
        if tap.call is not None:
            if tap.call >= len(calls):
                raise TapError(f"tap {tap.text!r}: {path} runs {len(calls)} time(s); #{tap.call} does not exist "
                               f"(calls are #0..#{len(calls) - 1}, no suffix = the last)")
            call = calls[tap.call]
        else:
            call = calls[-1]
        node = call.input if tap.io == "input" else call.output
        if node is None:
            raise TapError(f"tap {tap.text!r}: the {tap.io} of {path} is not a single tensor (a tuple or constant); "
                           f"tap one of its parts through a functional op name, see `kdgraph inspect`")
        return node

    def shape(self, node: fx.Node) -> Optional[tuple[int, ...]]:
        meta = node.meta.get("tensor_meta")
        if isinstance(meta, TensorMetadata):
            return tuple(meta.shape)
        return None
