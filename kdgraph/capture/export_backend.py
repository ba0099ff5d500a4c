"""The torch.export capture backend: for networks torch.fx cannot trace (a Hugging Face BERT, Python control flow
on a tensor's shape), with the same tap names as the fx backend.

:func:`capture` exports the module with ``torch.export.export(..., strict=False)`` at the example input, then
rewrites the exported graph into a plain :class:`torch.fx.GraphModule` over the *user's own module*:

* the lifted parameter and buffer placeholders become ``get_attr`` nodes on the module's attribute paths, so a
  fused graph reads (and trains) the user's own ``nn.Parameter`` objects, and BatchNorm's running statistics are
  the module's buffers (the training IR updates them in place, as eager does);
* a call of a module whose behaviour depends on ``train()`` / ``eval()`` (``nn.Dropout*``, ``nn.BatchNorm*``) is
  put back as one ``call_module`` node, so the graph follows the module's mode like the eager network does (the
  exported ops would have frozen the mode the network was captured in);
* an in-place op on a value the network computed (``relu_`` after a BatchNorm, ``add_`` of a residual) becomes
  its out-of-place twin, later readers of the value reading the result, so a tap on the value before the op
  reads what the eager module's forward hook sees;
* a device the capture baked into an op (``arange(..., device=cpu)``) becomes the input's device, and
  ``_assert_tensor_metadata`` checks are dropped, so a distiller moved with ``.to()`` after compiling still runs;
  a small constant tensor the forward creates is rebuilt in the graph;
* the output is the network's tensor output, or the ``logits`` of a dict / Hugging Face ``ModelOutput``; a
  transformers model's ``config.use_cache`` is off while it is exported (a causal LM's KV cache is not an output
  export can write, and a training graph never reuses it) and restored after, so ``generate`` still caches.

Names come from each node's ``nn_module_stack`` (the module calls it ran in): a module call's output is the
value computed inside it that is read outside it (or returned), its input the first value from outside that it
reads; torch marks the k-th repeated call of a module ``path@k``, kdgraph's tap grammar writes it ``path#k``.
Functional ops are named ``scope/op`` per scope, the op being the aten name (``layer1.0/add``,
``bert.encoder.layer.0.attention.self/scaled_dot_product_attention``).

The teacher is exported in eval mode, the student in train mode (where modes are not restored by the module
calls above, e.g. an attention function's ``dropout_p`` argument, the captured mode stays). ``leaf_modules``
only concern fx: export traces through every module. Shapes come from the exported graph's fake values.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
from torch import nn

from ..errors import TraceError
from .network import ModuleCall, TracedNetwork, name_ops

__all__ = ["NAME", "capture"]

#: the backend's name in :data:`kdgraph.capture.BACKENDS`
NAME = "export"

#: module types whose forward depends on train()/eval(): called as modules in the captured graph
MODE_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)


def _split_example(example: Any) -> tuple[tuple, dict]:
    if isinstance(example, dict):
        return (), dict(example)
    return (example,), {}


def _export(module: nn.Module, role: str, example: Any) -> torch.export.ExportedProgram:
    args, kwargs = _split_example(example)
    auto = torch.export.Dim.AUTO
    # the batch size (and, for named inputs, every size: a padded sequence's length varies) stays symbolic,
    # so the graph runs at any batch; export specializes only what the network's code requires
    dynamic = ({k: {d: auto for d in range(v.dim())} for k, v in kwargs.items()} if kwargs
               else ({0: auto} if isinstance(args[0], torch.Tensor) and args[0].dim() else None,))
    modes = {m: m.training for m in module.modules()}
    module.train(role == "student")
    config = getattr(module, "config", None)
    cache = getattr(config, "use_cache", None)  # a transformers model's KV cache switch
    if cache:  # a causal LM returns a DynamicCache, which export cannot output; the fused graph never reuses it
        config.use_cache = False
    try:
        return torch.export.export(module, args, kwargs or None, dynamic_shapes=dynamic if kwargs else dynamic,
                                   strict=False)
    except Exception as e:  # noqa: BLE001 - export raises many types; all mean the same to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TraceError(f"torch.export cannot capture the {role} ({type(module).__name__}): {type(e).__name__}: "
                         f"{first[:400]}. Check the spec's input (shapes, dtypes, named inputs) matches what the "
                         f"network's forward takes.") from None
    finally:
        for m, mode in modes.items():
            m.training = mode
        if cache:
            config.use_cache = cache


def _stack(node: fx.Node) -> list[tuple[str, str]]:
    """``[(call key, module path), ...]`` outermost first, without the root module."""
    st = node.meta.get("nn_module_stack") or {}
    out = []
    for key, value in st.items():
        path = value[0] if isinstance(value, tuple) else str(value)
        if path in ("", "L__self__") or path.startswith("_empty_nn_module_stack"):  # the root / torch's placeholder
            continue
        out.append((key, path))
    return out


def _call_label(key: str, path: str) -> tuple[str, int]:
    """(module path, call index) of an nn_module_stack key (``...relu@1`` is the second call)."""
    m = re.search(r"@(\d+)$", key)
    return path, int(m.group(1)) if m else 0


def _op_stem(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        name = target._schema.name.split("::")[-1]
    elif isinstance(target, torch._ops.OpOverloadPacket):
        name = target._qualified_op_name.split("::")[-1]
    else:
        name = getattr(target, "__name__", None) or str(target)
    return re.sub(r"\W", "_", name).strip("_") or "op"


def _is_view(node: fx.Node) -> bool:
    t = node.target
    if not isinstance(t, torch._ops.OpOverload):
        return node.op != "call_function"
    return any(r.alias_info is not None for r in t._schema.returns)


def _functional_twin(target: Any) -> Optional[Any]:
    """``aten.relu.default`` for ``aten.relu_.default`` (an op that writes its first argument), else None."""
    if not isinstance(target, torch._ops.OpOverload):
        return None
    schema = target._schema
    if not schema.arguments or schema.arguments[0].alias_info is None or not schema.arguments[0].alias_info.is_write:
        return None
    base = schema.name.split("::")[-1]
    if not base.endswith("_") or base.startswith("_"):
        return None
    packet = getattr(torch.ops.aten, base[:-1], None)
    overload = target._overloadname
    return getattr(packet, overload, None) if packet is not None else None


class _Rewriter:
    """Copies an exported program's graph into a GraphModule over the user's module (see the module docstring)."""

    def __init__(self, module: nn.Module, ep: torch.export.ExportedProgram, role: str):
        self.module, self.ep, self.role = module, ep, role
        self.g = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.inputs: list[fx.Node] = []
        sig = ep.graph_signature
        self.lifted: dict[str, str] = {}  # placeholder name -> attribute path on the module
        self.user_inputs: list[str] = []
        self.constants: dict[str, torch.Tensor] = {}  # placeholder name -> a constant tensor the forward created
        self.device: Optional[torch.device] = None  # the device the capture ran on
        self.device_node: Optional[fx.Node] = None
        for spec in sig.input_specs:
            kind = spec.kind.name
            if kind in ("PARAMETER", "BUFFER"):
                self.lifted[spec.arg.name] = spec.target
            elif kind == "CONSTANT_TENSOR" and isinstance(ep.constants.get(spec.target), torch.Tensor):
                self.constants[spec.arg.name] = ep.constants[spec.target]
            elif kind == "USER_INPUT":
                self.user_inputs.append(spec.arg.name)
            else:
                raise TraceError(f"torch.export gave the {role} an input of kind {kind}, which kdgraph cannot "
                                 f"rewrite; capture it with fx (capture: fx) or simplify its forward")
        for spec in sig.output_specs:
            if spec.kind.name != "USER_OUTPUT":
                raise TraceError(f"the exported {role} writes {spec.kind.name.lower()} outputs ({spec.target}); "
                                 f"kdgraph needs the network's in-place buffer updates kept in the graph "
                                 f"(torch.export's training IR): export it with a newer torch or use capture: fx")

    # ---------------------------------------------------------------- mode-dependent module calls
    def _mode_groups(self) -> dict[fx.Node, tuple[str, fx.Node, list[fx.Node]]]:
        """first node of a Dropout/BatchNorm call -> (module path, its input, the call's nodes)."""
        groups: dict[str, list[fx.Node]] = {}
        paths: dict[str, str] = {}
        for node in self.ep.graph.nodes:
            st = _stack(node)
            if node.op != "call_function" or not st:
                continue
            key, path = st[-1]
            try:
                sub = self.module.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(sub, MODE_DEPENDENT):
                groups.setdefault(key, []).append(node)
                paths[key] = path
        out = {}
        for key, nodes in groups.items():
            members = set(nodes)
            external = []
            for n in nodes:
                for a in n.all_input_nodes:
                    if a not in members and a.name not in self.lifted and a.name not in self.constants \
                            and a not in external:
                        external.append(a)
            escaping = [n for n in nodes if any(u not in members for u in n.users)]
            if len(external) == 1 and len(escaping) == 1:
                out[nodes[0]] = (paths[key], external[0], nodes)
        return out

    # ---------------------------------------------------------------- what the rewrite adds
    def _runtime_device(self) -> fx.Node:
        """``first_input.device``: where the capture baked its device into an op (``arange(..., device=cpu)``),
        the graph uses the input's, so a distiller moved with ``.to()`` after compiling still runs."""
        if self.device_node is None:
            with self.g.inserting_after(self.inputs[-1]):
                self.device_node = self.g.call_function(getattr, (self.inputs[0], "device"))
        return self.device_node

    def _constant(self, name: str) -> fx.Node:
        c = self.constants[name]
        if c.numel() > 65536:
            raise TraceError(f"the {self.role}'s forward creates a constant tensor of {c.numel():,} values ({name}); "
                             f"kdgraph rebuilds constants in the graph only up to 65,536 values: register it as a "
                             f"buffer of the module instead")
        node = self.g.call_function(torch.tensor, (c.tolist(),), {"dtype": c.dtype, "device": self._runtime_device()})
        node.meta["val"] = c
        return node

    # ---------------------------------------------------------------- rewrite
    def run(self) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]]:
        groups = self._mode_groups()
        skip: set[fx.Node] = set()
        order = {n: i for i, n in enumerate(self.ep.graph.nodes)}
        redirect: dict[fx.Node, fx.Node] = {}  # a value written in place -> the out-of-place result (later readers)
        new_of: dict[fx.Node, fx.Node] = {}  # exported node -> rewritten node (for names)

        def arg(n: fx.Node, at: fx.Node) -> fx.Node:
            while n in redirect and order[redirect[n][0]] < order[at]:
                n = redirect[n][1]
            return self.env[n]

        def mapped(a: Any, at: fx.Node) -> Any:
            if isinstance(a, fx.Node):
                return arg(a, at)
            if isinstance(a, torch.device) and self.device is not None and a == self.device:
                return self._runtime_device()
            if isinstance(a, (list, tuple)):
                return type(a)(mapped(x, at) for x in a)
            if isinstance(a, dict):
                return {k: mapped(v, at) for k, v in a.items()}
            return a

        for node in self.ep.graph.nodes:  # the inputs first: constants and devices are computed from them
            if node.op == "placeholder" and node.name in self.user_inputs:
                new = self.g.placeholder(node.name)
                new.meta = dict(node.meta)
                self.inputs.append(new)
                self.env[node] = new
                val = node.meta.get("val")
                if self.device is None and isinstance(val, torch.Tensor):
                    self.device = val.device
        for node in self.ep.graph.nodes:
            if node in skip or node in self.env:
                continue
            if node.op == "placeholder":
                new = (self.g.get_attr(self.lifted[node.name]) if node.name in self.lifted
                       else self._constant(node.name))
                new.meta = {**node.meta, **new.meta}
                self.env[node] = new
                continue
            if node.op == "output" or node.target is torch.ops.aten._assert_tensor_metadata.default:
                continue  # a check of the capture's device and dtype, which a moved distiller would fail
            if node in groups:
                path, x, members = groups[node]
                new = self.g.call_module(path, (arg(x, node),))
                escaping = next(n for n in members if any(u not in members for u in n.users))
                new.meta = dict(escaping.meta)
                skip.update(members)
                self.env[escaping] = new
                new_of[escaping] = new
                continue
            target = node.target
            twin = _functional_twin(target) if node.op == "call_function" else None
            first = node.args[0] if node.args else None
            if (twin is not None and isinstance(first, fx.Node) and first.op == "call_function"
                    and not _is_view(first)):
                target = twin
                redirect[first] = (node, node)
            new = self.g.create_node(node.op, target, mapped(node.args, node), mapped(node.kwargs, node),
                                     name=node.name)
            new.meta = dict(node.meta)
            self.env[node] = new
            new_of[node] = new
        out = self._output()
        self.g.output(self.env[out])
        for n in list(self.g.nodes):
            if n.op == "get_attr" and not n.users:  # a parameter only a module call put back reads
                self.g.erase_node(n)
        gm = fx.GraphModule(self.module, self.g, class_name=f"{self.role.capitalize()}Exported")
        for n in gm.graph.nodes:
            n.meta.pop("tensor_meta", None)  # symbolic sizes: the shapes at the example come from _propagate
        return gm, new_of

    def _output(self) -> fx.Node:
        """The exported node the network returns: its tensor, or the ``logits`` of a dict / ModelOutput."""
        out_node = next(n for n in self.ep.graph.nodes if n.op == "output")
        flat = list(out_node.args[0])
        spec = self.ep.call_spec.out_spec
        children = [spec.child(i) for i in range(spec.num_children)] if spec is not None else []
        if spec is None or spec.num_leaves == 1 and not children:
            return flat[0]
        keys = spec.context if isinstance(spec.context, list) else None
        if keys and "logits" in keys:
            leaf = 0
            for k, child in zip(keys, children):
                if k == "logits":
                    if child.num_leaves != 1:
                        break
                    return flat[leaf]
                leaf += child.num_leaves
        raise TraceError(f"the {self.role} returns {getattr(spec.type, '__name__', spec.type)}"
                         f"{' with keys ' + ', '.join(map(str, keys)) if keys else ''}; kdgraph distils a network "
                         f"that returns a tensor, or a dict / ModelOutput holding 'logits'")


def _names(gm: fx.GraphModule, role: str, module: nn.Module) -> TracedNetwork:
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    members: dict[tuple[str, int], list[fx.Node]] = {}
    for n in nodes:
        stack = _stack(n)
        if n.op == "call_module":  # a mode-dependent module call put back: it is its own (innermost) call
            pass
        for key, path in stack:
            members.setdefault(_call_label(key, path), []).append(n)
    calls: dict[str, list[ModuleCall]] = {}
    output = next(n for n in gm.graph.nodes if n.op == "output")
    returned = output.args[0]
    for (path, k), ns in sorted(members.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        inside = set(ns)
        escaping = [n for n in ns if n is returned or any(u not in inside for u in n.users)]
        first_in = None
        for n in ns:
            for a in n.all_input_nodes:
                if a not in inside and a.op != "get_attr":
                    first_in = a
                    break
            if first_in is not None:
                break
        out = escaping[-1] if escaping else None
        calls.setdefault(path, [])
        while len(calls[path]) < k:  # a call index torch skipped (a call with no op of its own)
            calls[path].append(ModuleCall(path, None, None))
        calls[path].append(ModuleCall(path, first_in, out))
    # a module call is named by its module; a size (sym_size) is no value to tap
    op_names, node_names = name_ops((n, _stack(n)[-1][1] if _stack(n) else "", _op_stem(n)) for n in nodes
                                    if n.op != "call_module"
                                    and isinstance(n.meta.get("val"), (torch.Tensor, tuple, list)))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    net = TracedNetwork(role, module, gm, calls, op_names, node_names,
                        placeholders[0] if len(placeholders) == 1 else None,
                        returned if isinstance(returned, fx.Node) else None, NAME)
    for path, cs in net.calls.items():
        for k, c in enumerate(cs):
            if c.output is None:
                continue
            stack = _stack(c.output)
            own = bool(stack) and stack[-1][1] == path  # the call's own op (a Linear's linear): the module's name
            if own or c.output not in node_names:
                node_names[c.output] = path if k == len(cs) - 1 else f"{path}#{k}"
    return net


def capture(module: nn.Module, role: str, leaf_types: Iterable[type] = (),
            example: Optional[Any] = None) -> TracedNetwork:
    """Export ``module`` at ``example`` (a tensor, or a dict of named inputs), rewrite it over the module and
    name its nodes. ``leaf_types`` are not used (export traces through every module)."""
    if example is None:
        raise TraceError(f"capturing the {role} with torch.export needs an example input (the spec's input)")
    ep = _export(module, role, example)
    rewriter = _Rewriter(module, ep, role)
    gm, _ = rewriter.run()
    _propagate(gm, module, role, example, rewriter.user_inputs)
    return _names(gm, role, module)


@torch.no_grad()
def _propagate(gm: fx.GraphModule, module: nn.Module, role: str, example: Any, order: list[str]) -> None:
    """Record every node's concrete shape at ``example`` (the graph's own sizes are symbolic), in eval mode on
    fake tensors (no arithmetic), or on the real example if an op cannot run on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.shape_prop import ShapeProp

    args, kwargs = _split_example(example)
    inputs = list(args) if args else [kwargs[k] for k in order]
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        try:
            fake = FakeTensorMode(allow_non_fake_inputs=True)
            ShapeProp(gm, fake_mode=fake).propagate(*[fake.from_tensor(t) for t in inputs])
        except Exception:  # noqa: BLE001 - the real run gives the real error, if any
            ShapeProp(gm).propagate(*inputs)
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TraceError(f"the exported {role} fails on the spec's example input: {first[:300]}") from None
    finally:
        for m, mode in modes.items():
            m.training = mode
