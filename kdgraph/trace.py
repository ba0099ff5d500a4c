"""torch.fx tracing with a qualified name for every node, and the index that resolves taps.

Every node of a traced network gets a name a user can write in a tap (see
:data:`kdgraph.spec.TAP_GRAMMAR`):

* a module call is named by its module path (``layer1.0.conv1``); a module that runs several
  times (``layer1.0.relu`` in torchvision's BasicBlock) is addressed by its last call, or ``#k``;
  a non-leaf module (``layer4``, ``layer1.0``) has an output too: the value its forward returned;
* a functional op is named by the module whose forward runs it and its op name, numbered per
  scope: ``layer1.0/add`` is the residual add of block ``layer1.0`` before its ReLU, ``/flatten``
  the top-level flatten.

Leaf modules: fx treats ``torch.nn`` modules as leaves. :data:`LEAF_MODULES` adds classes fx
cannot trace through, each with its reason; users add their own in the spec (``leaf_modules``)
or with :func:`register_leaf_module`.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from .errors import TapError, TraceError, did_you_mean
from .spec import Tap

#: class -> reason. Consulted by every trace; extended by register_leaf_module and the spec.
LEAF_MODULES: dict[type, str] = {}


def register_leaf_module(cls: type, reason: str) -> type:
    """Tell the tracer to call ``cls`` as one node instead of tracing its forward, and say why."""
    if not reason or len(reason.strip()) < 3:
        raise ValueError("a leaf module needs a reason (why fx cannot or should not trace it)")
    LEAF_MODULES[cls] = reason
    return cls


def _register_torchvision_leaves() -> None:
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d
        from torchvision.ops.stochastic_depth import StochasticDepth
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return
    LEAF_MODULES.setdefault(StochasticDepth, "branches on self.training and p; one node keeps the graph mode-independent")
    LEAF_MODULES.setdefault(FrozenBatchNorm2d, "a buffer-only normalisation; a single node reads better in taps")


_register_torchvision_leaves()


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


class _ScopeTracer(fx.Tracer):
    """Records, for every node, the path of the module whose forward created it."""

    def __init__(self, leaf_types: tuple[type, ...]):
        super().__init__()
        self.leaf_types = leaf_types
        self.kd_path = ""
        self.calls: dict[str, list[ModuleCall]] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        path = self.path_of_module(m)
        outer = self.kd_path
        self.kd_path = path
        try:
            out = super().call_module(m, forward, args, kwargs)
        finally:
            self.kd_path = outer
        first = args[0] if args else next(iter(kwargs.values()), None)
        self.calls.setdefault(path, []).append(ModuleCall(
            path,
            first.node if isinstance(first, fx.Proxy) else None,
            out.node if isinstance(out, fx.Proxy) else None,
        ))
        return out

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):  # noqa: D401 - fx signature
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.meta["kd_scope"] = self.kd_path
        return node


def _op_stem(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    if node.op == "get_attr":
        return "getattr"
    target = node.target
    name = getattr(target, "__name__", None) or str(target)
    if target is operator.getitem:
        return "getitem"
    return re.sub(r"\W", "_", name).strip("_") or "op"


def trace_network(module: nn.Module, role: str, leaf_types: Iterable[type] = ()) -> TracedNetwork:
    """Symbolically trace ``module`` and name each node. Raises :class:`TraceError` with what to do."""
    leaves = tuple(dict.fromkeys([*LEAF_MODULES, *leaf_types]))
    tracer = _ScopeTracer(leaves)
    try:
        graph = tracer.trace(module)
    except Exception as e:  # noqa: BLE001 - fx raises many types; all mean the same to the user
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TraceError(
            f"torch.fx cannot trace the {role} ({type(module).__name__}): {type(e).__name__}: {first}. "
            f"This usually means data-dependent control flow (an `if` on a tensor value) or an untraceable "
            f"call inside some module. Mark that module class as a leaf in the spec:\n"
            f"  leaf_modules:\n    - {{module: 'package.module:ClassName', reason: 'why'}}\n"
            f"so it becomes one node (its inside can then not be tapped).") from None
    gm = fx.GraphModule(module, graph, class_name=f"{role.capitalize()}Traced")
    op_names: dict[str, fx.Node] = {}
    counts: dict[str, int] = {}
    input_node = output_node = None
    node_names: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            input_node = input_node or node
            continue
        if node.op == "output":
            out = node.args[0]
            output_node = out if isinstance(out, fx.Node) else None
            continue
        if node.op == "call_module":
            continue
        scope = node.meta.get("kd_scope", "")
        stem = _op_stem(node)
        key = f"{scope}/{stem}"
        k = counts.get(key, 0)
        counts[key] = k + 1
        name = key if k == 0 else f"{key}_{k}"
        op_names[name] = node
        node_names[node] = name
    net = TracedNetwork(role, module, gm, tracer.calls, op_names, node_names, input_node, output_node)
    for path, calls in net.calls.items():
        for k, c in enumerate(calls):
            if c.output is not None and c.output not in node_names:
                node_names[c.output] = path if k == len(calls) - 1 else f"{path}#{k}"
    return net


def _failed_node(net: TracedNetwork, e: Exception) -> str:
    """`` at layer1.0.conv1`` when ShapeProp's message names the node that failed, else ``""``."""
    m = re.search(r"node=%?(\w+)", str(e))
    if not m:
        return ""
    for node in net.graph_module.graph.nodes:
        if node.name == m.group(1):
            name = net.node_names.get(node) or (node.target if node.op == "call_module" else node.name)
            return f" at {name}"
    return ""


@torch.no_grad()
def propagate_shapes(net: TracedNetwork, example: torch.Tensor) -> None:
    """Record every node's shape/dtype for an input like ``example`` (eval mode, no grad).

    Runs on fake tensors (no arithmetic, any input size costs the same); a network with an op that
    fake tensors cannot run is propagated on the real example instead. torch's ShapeProp prints the
    failing op's traceback to stderr; that print is swallowed and the error told in one sentence
    (which node failed and torch's one-line reason).
    """
    import contextlib
    import io

    from torch._subclasses.fake_tensor import FakeTensorMode

    module = net.module
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            try:
                fake = FakeTensorMode(allow_non_fake_inputs=True)
                ShapeProp(net.graph_module, fake_mode=fake).propagate(fake.from_tensor(example))
            except Exception:  # noqa: BLE001 - fall back to a real run, which gives the real error if any
                ShapeProp(net.graph_module).propagate(example)
    except Exception as e:  # noqa: BLE001
        node = _failed_node(net, e)
        cause = e.__cause__ if isinstance(e.__cause__, Exception) else e
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise TraceError(f"the {net.role} fails on an input of shape {list(example.shape)}{node}: {first}. "
                         f"Check the spec's `input` (channels, size: each layer needs a large enough input)."
                         ) from None
    finally:
        for m, mode in modes.items():
            m.training = mode
