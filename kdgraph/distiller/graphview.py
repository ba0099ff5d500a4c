"""A ``networkx.DiGraph`` view of a stage's fused graph, for querying in a notebook and for drawing.

    import networkx as nx
    d = kdgraph.compile("specs/kr_resnet18.yaml")
    G = d.graph                                   # the current stage; to_networkx(d, stage="...") for another
    G.nodes["student_layer4_1_relu_1"]            # {'role': 'student', 'name': 'layer4.1.relu', 'shape': (2, 512, 7, 7), ...}
    tap = tap_node(G, "student:layer4.-1")        # the node a tap reads
    nx.shortest_path(G, tap, G.graph["loss_node"])   # how that tap reaches the total loss
    [n for n, a in G.nodes(data=True) if a["pruned"]]   # teacher nodes no loss needs (removed by DCE)

One node per node of ``distiller.graph_module.graph`` (same names), plus the teacher nodes that
dead-code elimination removed (``pruned=True``, wired as in the traced teacher). Edges are data
dependencies (an edge ``u -> v`` means ``v`` reads ``u``'s value). Node attributes:

=============  ===============================================================================
``role``       a :class:`kdgraph.compiler.nodeinfo.Role` (a ``str`` enum, so ``a["role"] == "loss"`` holds):
               ``input`` | ``transform`` | ``teacher`` | ``student`` | ``adapter`` | ``loss`` | ``output``
               | ``grad_mode``
``name``       tap-style name: ``layer1.0.conv1``, ``layer1.0/add`` (teacher/student), the adapter or
               loss name, ``batch:images``; loss weighting nodes are ``0.5 * kd``, the sum ``total``
``module_path`` the module that computes the node: a module call's path (``layer1.0.conv1``), the
               module whose forward ran a functional op (``layer1.0`` for ``layer1.0/add``, ``""`` at
               top level), ``adapters.<name>``, ``losses.<stage>.<name>``; ``None`` otherwise
``owner``      the part it belongs to: ``teacher``, ``student``, the adapter's name (also for its
               tuple items ``adapter:name.k``), the loss's name (also its ``weight * loss`` node),
               ``total`` for the running sum, the input's name, ``output``
``op``         fx op (``call_module``, ``call_function``, ``call_method``, ``placeholder``, ...)
``target``     fx target as text (``teacher.layer1.0.conv1``, ``<built-in function add>``)
``module_type`` class name of the called module (``Conv2d``, ``AttentionBasedFusion``) or ``None``
``shape``      output shape as traced (batch dimension = ``G.graph["batch_size"]``); a tuple of
               shapes for an adapter returning a tuple; ``()`` for losses; ``None`` if unknown
``dtype``      ``"float32"`` etc. where the tracer recorded it, else ``None``
``params``     parameters of the called module (or ``get_attr`` tensor); 0 for functional ops
``trainable``  the node belongs to a part this stage optimises: the student if the stage's
               ``train`` lists it, an adapter it lists, a loss with trainable parameters
``pruned``     a teacher node removed by dead-code elimination (not in the GraphModule)
``taps``       the taps (spec strings) that read this node's value
``stage``      the stage's name
=============  ===============================================================================

Edge attributes: ``taps`` (the taps read along this edge: the tap's node -> the adapter or loss
that reads it), ``shape`` (the source's shape), ``pruned``. Graph attributes: ``spec``, ``stage``,
``stage_index``, ``train``, ``batch_inputs``, ``transform``, ``batch_size`` (the traced batch),
``loss_node`` (the node whose value is ``out.loss``), ``logits_node``, ``terms`` (loss name ->
the node of its weighted term), ``taps`` (tap -> node), ``batch_factor`` (rows the input transform
makes of each image, e.g. 4 for SSKD's rotations: shapes downstream of it are traced without it, so
their batch dimension is really ``batch_factor`` times larger; the transform node's own shape is
its real output shape).
"""
from __future__ import annotations

from typing import Any, Optional

import networkx as nx
import torch
import torch.fx as fx

from ..errors import KDGraphError, TapError, did_you_mean
from ..formatting import dtype as fmt_dtype
from ..compiler.nodeinfo import NodeInfo, Role, info_of
from ..spec import parse_tap

__all__ = ["to_networkx", "tap_node", "tap_to_loss_path", "collapse"]


def _shape_of(node: fx.Node) -> Optional[tuple[int, ...]]:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _dtype_of(node: fx.Node) -> Optional[str]:
    meta = node.meta.get("tensor_meta")
    return fmt_dtype(meta.dtype) if meta is not None and hasattr(meta, "dtype") else None


def _info(node: fx.Node) -> NodeInfo:
    """The node's info; a node nobody described (inserted by hand) belongs to its first input, as
    :func:`kdgraph.compiler.nodeinfo.derive` would have said."""
    info = info_of(node)
    if info is not None:
        return info
    src = next(iter(node.all_input_nodes), None)
    base = info_of(src) if src is not None else None
    return NodeInfo(base.role if base is not None else Role.OUTPUT,
                    f"{base.name if base is not None and base.name else node.name}/{node.target}",
                    base.module_path if base is not None else None, derived_from=src.name if src else None)


def _module(root: torch.nn.Module, path: str) -> Optional[torch.nn.Module]:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _param_count(root: torch.nn.Module, node: fx.Node) -> tuple[int, Optional[str]]:
    """(parameter count, module class name) of what the node calls or reads."""
    if node.op == "call_module":
        mod = _module(root, str(node.target))
        if mod is None:
            return 0, None
        # a folded teacher call stands for the convolution and BatchNorm it replaced
        params = getattr(mod, "represented_parameters", mod.parameters)()
        return sum(p.numel() for p in params), type(mod).__name__
    if node.op == "get_attr":
        obj: Any = root
        for part in str(node.target).split("."):
            obj = getattr(obj, part, None)
        return (obj.numel() if isinstance(obj, torch.nn.Parameter) else 0), None
    return 0, None


@torch.no_grad()
def _probe_transform(gm: fx.GraphModule, node: fx.Node, images_shape) -> Optional[tuple[int, ...]]:
    """Output shape of the stage's input transform on a zero batch (SSKD's rotations: B -> 4B)."""
    if images_shape is None or node.op != "call_module":
        return None
    mod = _module(gm, str(node.target))
    if mod is None:
        return None
    was = mod.training
    try:
        mod.eval()
        out = mod(torch.zeros(images_shape))
        return tuple(out.shape) if isinstance(out, torch.Tensor) else None
    except Exception:  # noqa: BLE001 - a view must not fail because a transform needs other inputs
        return None
    finally:
        mod.train(was)


def _traced_batch(distiller) -> int:
    for net in distiller.traced.values():
        node = net.input_node
        shape = _shape_of(node) if node is not None else None
        if shape:
            return int(shape[0])
    return 2


def to_networkx(distiller, stage: int | str | None = None) -> nx.DiGraph:
    """The fused graph of ``stage`` (default: the current one) as a :class:`networkx.DiGraph`.

    See the module docstring for the node, edge and graph attributes.
    """
    if stage is None:
        gm, report = distiller.graph_module, distiller.report
    else:
        gm, report = distiller.build_stage(stage)
    stage_spec = distiller.spec.stages[report.index]
    train = set(stage_spec.train)
    G = nx.DiGraph()
    tap_of_node: dict[str, list[str]] = {}
    for t in report.taps:
        tap_of_node.setdefault(t.node, []).append(t.tap)
    batch_shapes = {t.tap: t.shape for t in report.taps if t.tap.startswith("batch:")}
    batch = _traced_batch(distiller)
    images_shape = images_dtype = None
    for net in distiller.traced.values():
        if net.input_node is not None and _shape_of(net.input_node):
            images_shape, images_dtype = _shape_of(net.input_node), _dtype_of(net.input_node)
            break
    adapter_shapes = {a.name: a.output_shape for a in report.adapters}
    adapter_params = {a.name: a.parameters for a in report.adapters}

    graph_nodes = list(gm.graph.nodes)
    batch_factor = 1.0
    owner_of: dict[fx.Node, str] = {}
    loss_node: Optional[str] = None
    logits_node: Optional[str] = None
    terms: dict[str, str] = {}
    for node in graph_nodes:
        info = _info(node)
        role, name, module_path = info.role, info.name, info.module_path
        params, module_type = _param_count(gm, node)
        shape, dtype = _shape_of(node), _dtype_of(node)
        if role.is_network:
            owner = role.value
            if node.op != "call_module":
                module_path = node.meta.get("kd_scope", "")
            trainable = role is Role.STUDENT and "student" in train
        elif role is Role.ADAPTER:
            if node.op == "call_module":
                owner = name
                shape = adapter_shapes.get(name)
                params = adapter_params.get(name, params)
            else:  # an item of a tuple output: adapter:<name>.<k>
                tap = parse_tap(name)
                owner = tap.path
                out = adapter_shapes.get(tap.path)
                shape = out[tap.index] if isinstance(out, tuple) and tap.index is not None \
                    and tap.index < len(out) else None
            trainable = owner in train
        elif role is Role.LOSS:
            if node.op == "call_module":
                owner = name
                mod = _module(gm, str(node.target))
                trainable = mod is not None and any(p.requires_grad for p in mod.parameters())
            elif (module_path or "").startswith("losses."):  # a pass's function standing in for a loss term, its
                owner, trainable = name, False             # item of a call several terms share, or its module
            else:  # "<w> * <loss>" weighting its loss, or the running sum "total"
                src = node.args[0] if node.args else None
                owner = "total" if name == "total" else owner_of.get(src, name) if isinstance(src, fx.Node) else name
                trainable = False
            shape = ()
        elif role is Role.INPUT:
            owner = name.removeprefix("batch:")
            shape = images_shape if owner == "images" else batch_shapes.get(name)
            if owner == "targets" and shape is None:
                shape = (batch,)
            dtype = images_dtype if owner == "images" else dtype
            trainable = False
        elif role is Role.TRANSFORM:
            owner, trainable = "transform", False
            shape = _probe_transform(gm, node, images_shape)
            if shape and images_shape:
                batch_factor = shape[0] / images_shape[0]
        else:
            owner, trainable = role.value, False
        owner_of[node] = owner
        G.add_node(node.name, role=role, name=name, module_path=module_path, owner=owner, op=node.op,
                   target=str(node.target), module_type=module_type, shape=shape, dtype=dtype, params=params,
                   trainable=bool(trainable), pruned=False, taps=list(tap_of_node.get(node.name, [])),
                   stage=report.stage)
        if node.op == "output":
            out = node.args[0]
            if isinstance(out, dict):
                loss_node = out["loss"].name if isinstance(out.get("loss"), fx.Node) else None
                logits_node = out["logits"].name if isinstance(out.get("logits"), fx.Node) else None
                terms = {k: v.name for k, v in out.get("terms", {}).items() if isinstance(v, fx.Node)}
    for node in graph_nodes:
        for src in node.all_input_nodes:
            G.add_edge(src.name, node.name, taps=[], shape=G.nodes[src.name]["shape"], pruned=False)

    # taps on the edges that read them: tap node -> the adapter / loss call that consumes it
    consumers = {}
    for n, a in G.nodes(data=True):
        if a["op"] == "call_module" and a["role"] in (Role.ADAPTER, Role.LOSS):
            consumers[f"{a['role']} {a['name']}"] = n
    for t in report.taps:
        for user in t.used_by:
            dst = consumers.get(user)
            if dst is not None and G.has_edge(t.node, dst) and t.tap not in G.edges[t.node, dst]["taps"]:
                G.edges[t.node, dst]["taps"].append(t.tap)

    _add_pruned(G, distiller, report, gm, graph_nodes)
    G.graph.update(spec=distiller.spec.name, stage=report.stage, stage_index=report.index,
                   train=list(stage_spec.train), batch_inputs=list(report.batch_inputs),
                   transform=report.transform, batch_size=batch, loss_node=loss_node, logits_node=logits_node,
                   terms=terms, taps={t.tap: t.node for t in report.taps}, batch_factor=batch_factor)
    return G


def _add_pruned(G: nx.DiGraph, distiller, report, gm: fx.GraphModule, graph_nodes: list[fx.Node]) -> None:
    """Add the teacher nodes DCE removed, wired as in the traced teacher."""
    if not report.pruned_nodes or "teacher" not in distiller.traced:
        return
    traced = distiller.traced["teacher"]
    by_name = {n.name: n for n in traced.graph_module.graph.nodes}
    # the fused node the teacher's input placeholder became: the transform, or the images
    infos = [(n.name, info_of(n)) for n in graph_nodes]
    x_node = next((n for n, i in infos if i is not None and i.role is Role.TRANSFORM), None)
    x_node = x_node or next((n for n, i in infos if i is not None and i.role is Role.INPUT and i.name == "batch:images"),
                            None)
    pruned_names = {p["name"] for p in report.pruned_nodes}

    def fused(tn: fx.Node) -> Optional[str]:
        if tn.op == "placeholder":
            return x_node if tn is traced.input_node else None
        name = f"teacher_{tn.name}"
        return name if name in G or name in pruned_names else None

    for p in report.pruned_nodes:
        tn = by_name.get(p["name"].removeprefix("teacher_"))
        module_path = None
        params, module_type = 0, None
        dtype = None
        if tn is not None:
            module_path = str(tn.target) if tn.op == "call_module" else tn.meta.get("kd_scope", "")
            params, module_type = _param_count(traced.graph_module, tn)
            dtype = _dtype_of(tn)
        G.add_node(p["name"], role=Role.TEACHER, name=p["tap"], module_path=module_path, owner="teacher", op=p["op"],
                   target=p["target"], module_type=module_type, shape=p["shape"], dtype=dtype, params=params,
                   trainable=False, pruned=True, taps=[], stage=report.stage)
    for p in report.pruned_nodes:
        tn = by_name.get(p["name"].removeprefix("teacher_"))
        if tn is None:
            continue
        for src in tn.all_input_nodes:
            s = fused(src)
            if s is not None:
                G.add_edge(s, p["name"], taps=[], shape=G.nodes[s]["shape"], pruned=True)


def tap_node(G: nx.DiGraph, tap: str) -> str:
    """The node of ``G`` whose value ``tap`` (a spec string, as written in the spec) reads."""
    taps = G.graph.get("taps", {})
    if tap in taps:
        return taps[tap]
    for n, a in G.nodes(data=True):  # the same tap written differently is still found by its node's name
        if tap in a["taps"]:
            return n
    raise TapError(f"stage {G.graph.get('stage')!r} reads no tap {tap!r}.{did_you_mean(tap, taps)} "
                   f"Taps of this stage: {', '.join(taps) or 'none'}.")


def tap_to_loss_path(G: nx.DiGraph, tap: str) -> list[str]:
    """Node names from ``tap``'s node to the total loss (``out.loss``), following data flow."""
    target = G.graph.get("loss_node")
    if target is None:
        raise KDGraphError(f"stage {G.graph.get('stage')!r} has no total loss node")
    return nx.shortest_path(G, tap_node(G, tap), target)


def collapse(G: nx.DiGraph, key) -> nx.DiGraph:
    """Contract ``G`` by ``key(node, attrs) -> group name``: one node per group, edges between groups.

    Group nodes carry ``members`` (the node names), and the edges the union of the member edges'
    ``taps``; self-loops are dropped. Used by :mod:`kdgraph.viz` to draw blocks at module level.
    """
    H = nx.DiGraph()
    group = {}
    for n, a in G.nodes(data=True):
        g = key(n, a)
        if g is None:
            continue
        group[n] = g
        if g not in H:
            H.add_node(g, members=[])
        H.nodes[g]["members"].append(n)
    for u, v, a in G.edges(data=True):
        gu, gv = group.get(u), group.get(v)
        if gu is None or gv is None or gu == gv:
            continue
        if not H.has_edge(gu, gv):
            H.add_edge(gu, gv, taps=[], pruned=True, shapes=[])
        e = H.edges[gu, gv]
        for t in a.get("taps", []):
            if t not in e["taps"]:
                e["taps"].append(t)
                e["shapes"].append(a.get("shape"))
        e["pruned"] = e["pruned"] and bool(a.get("pruned"))
    return H
