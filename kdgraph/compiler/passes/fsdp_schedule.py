"""Pass: schedule FSDP2's gathers for the fused graph (``runtime.distributed: fsdp``).

FSDP2 (``torch.distributed.fsdp.fully_shard``) gathers a unit's parameters in a forward *pre-hook* on the unit and
frees them in a forward *post-hook*. The fused graph never calls a unit: it calls the unit's leaf modules directly
(``student.layer1.0.conv1``), so those hooks never fire and the leaves would see sharded parameters. This pass
puts the hooks' work into the graph, one pair of nodes per unit:

    enter(unit, *inputs) -> inputs'   before the unit's first node: FSDP2's pre-forward of the unit (all-gather,
                                      wait, prefetch of the next unit in graph order, and for a network that
                                      trains the post-backward hook on the inputs, which re-shards the unit and
                                      reduce-scatters its gradients once the inputs' gradients are computed)
    exit(unit, *outputs)              after the unit's last node: FSDP2's post-forward (re-shard, and for a
                                      network that trains the pre-backward hook on every value that leaves the
                                      unit, which gathers the unit again before its backward)

The unit's nodes read the inputs through ``enter``'s result. The hook functions are FSDP2's own
(``FSDPState._pre_forward`` / ``_post_forward``), so the backward re-gather, gradient reduction, mixed
precision and prefetching are exactly FSDP2's; only *when* they run is decided here.

Unit boundaries: a node belongs to the deepest unit whose module path contains the node's module (a call's
``module_path``, a functional op's scope ``layer1.0/add``, a ``get_attr``'s owner). A unit's span runs from the
first to the last node that belongs to it or to a unit inside it (spans nest like the modules do); the network
itself is a unit too (its root: stem, head, whatever no unit holds). Spans follow the graph's order, not the
order the modules were defined in, so a network that calls its blocks out of order is gathered correctly; the
prefetch order is the graph's order as well. Taps inside a unit are plain values of the graph, unchanged.

The teacher runs with autograd off (``teacher_no_grad`` brackets these nodes too), so its exit re-shards right
after the last node that needs its parameters and registers nothing for backward.

A parameter read as an attribute (``get_attr``: BERT's position ids, a ViT's class token) would be the tensor
seen when the graph was built; under a sharded network it is read from its module at run time instead
(:class:`LiveAttr`), so it is the gathered one.

Without a process group (``kdgraph compile``, a world of one, shape checks) the units are not FSDP modules and
both nodes pass their values through untouched: the same graph runs sharded and unsharded.
"""
from __future__ import annotations

import fnmatch
import operator
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch.fx as fx
from torch import nn

from ...errors import SpecError, did_you_mean
from ..nodeinfo import NodeInfo, Role, info_of, role_of, set_info
from ..report import PassResult

__all__ = ["NAME", "run", "ShardPlan", "resolve_units", "UnitEnter", "UnitExit", "FrozenEnter", "FrozenExit",
           "LiveAttr", "fsdp_state", "prefetch_order"]

NAME = "fsdp_schedule"
_ROLES = {"teacher": Role.TEACHER, "student": Role.STUDENT}


@dataclass(frozen=True)
class ShardPlan:
    """Per network role: the network module and its unit paths (resolved by :func:`resolve_units`)."""

    networks: Mapping[str, tuple[nn.Module, tuple[str, ...]]] = field(default_factory=dict)


def resolve_units(network: nn.Module, patterns: list[str], where: str) -> tuple[str, ...]:
    """The module paths of ``network`` that ``patterns`` name (exact paths, globs, ``type:CLASS``), in definition
    order. A pattern that matches nothing is a :class:`SpecError` at ``where[i]``."""
    modules = {name: m for name, m in network.named_modules() if name}
    found: dict[str, None] = {}
    for i, pat in enumerate(patterns):
        if pat.startswith("type:"):
            cls = pat[len("type:"):]
            hits = [n for n, m in modules.items() if type(m).__name__ == cls]
            hint = did_you_mean(cls, sorted({type(m).__name__ for m in modules.values()}))
        elif any(c in pat for c in "*?["):  # per dotted component: 'layer*' is layer1, layer2, not layer1.0
            parts = pat.split(".")
            hits = [n for n in modules if len(n.split(".")) == len(parts)
                    and all(fnmatch.fnmatchcase(a, b) for a, b in zip(n.split("."), parts))]
            hint = ""
        else:
            hits = [pat] if pat in modules else []
            hint = did_you_mean(pat, modules)
        if not hits:
            raise SpecError(f"{where}[{i}]: the sharding unit {pat!r} matches no module of the network. A unit is "
                            f"a module path ('layer1.0'), a glob over paths ('layer*.*') or 'type:CLASS' (e.g. "
                            f"'type:BasicBlock'); `kdgraph inspect SPEC` lists the modules.{hint}")
        found.update(dict.fromkeys(hits))
    return tuple(n for n in modules if n in found)


def fsdp_state(unit: nn.Module) -> Any:
    """FSDP2's state of ``unit`` when ``fully_shard`` wrapped it, else ``None``."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    return fully_shard.state(unit) if isinstance(unit, FSDPModule) else None


class _UnitNode(nn.Module):
    """A graph node acting for one FSDP unit; the unit is referenced, not owned (no parameters, no state_dict)."""

    _is_impure = True  # dead-code elimination must keep it

    def __init__(self, unit: nn.Module, path: str):
        super().__init__()
        object.__setattr__(self, "unit", unit)
        self.path = path

    def extra_repr(self) -> str:
        return repr(self.path or "<root>")


class UnitEnter(_UnitNode):
    """FSDP2's pre-forward of the unit: gather its parameters; returns the inputs (hooked for backward)."""

    def forward(self, *inputs: Any) -> tuple:
        state = fsdp_state(self.unit)
        if state is None:
            return inputs
        args, _ = state._pre_forward(self.unit, inputs, {})
        return tuple(args)


class UnitExit(_UnitNode):
    """FSDP2's post-forward of the unit: re-shard, and hook the values leaving it for the backward re-gather."""

    def forward(self, *outputs: Any) -> None:
        state = fsdp_state(self.unit)
        if state is not None:
            state._post_forward(self.unit, (), outputs)


class FrozenEnter(_UnitNode):
    """A frozen network's unit (the teacher, run without autograd): ``unshard()`` it (waiting for the gather the
    previous unit prefetched), start the gather of the next unit in graph order, cast the inputs to the
    unit's ``param_dtype``. Nothing is recorded for backward, so FSDP2's backward prefetch never picks it."""

    def __init__(self, unit: nn.Module, path: str):
        super().__init__(unit, path)
        object.__setattr__(self, "next", None)

    def forward(self, *inputs: Any) -> tuple:
        state = fsdp_state(self.unit)
        if state is None:
            return inputs
        self.unit.unshard()
        if self.next is not None and fsdp_state(self.next) is not None:
            self.next.unshard(async_op=True)
        args, _ = state._cast_forward_inputs(inputs, {})
        return tuple(args)


class FrozenExit(_UnitNode):
    """A frozen network's unit after its last node: ``reshard()`` (free the gathered parameters)."""

    def forward(self, *outputs: Any) -> None:
        if fsdp_state(self.unit) is not None:
            self.unit.reshard()


class LiveAttr(nn.Module):
    """``getattr(owner, name)`` at run time: a parameter or buffer of a sharded network as it is now."""

    def __init__(self, owner: nn.Module, name: str):
        super().__init__()
        object.__setattr__(self, "owner", owner)
        self.attr = name

    def forward(self) -> Any:
        return getattr(self.owner, self.attr)


def _scope(node: fx.Node, prefix: str) -> str:
    """The module path (inside its network) a node of that network belongs to."""
    if node.op == "get_attr":
        return str(node.target)[len(prefix):].rpartition(".")[0]
    info = info_of(node)
    if info.module_path is not None:
        return info.module_path
    # a functional op is named after its scope ('layer1.0/add'), or after its module when it is the module's only
    # op (the export backend's 'bert.encoder.layer.0.attention.self.query' linear)
    return (info.name or "").partition("/")[0]


def _inside(scope: str, unit: str) -> bool:
    return unit == "" or scope == unit or scope.startswith(unit + ".")


def _live_attrs(gm: fx.GraphModule, graph: fx.Graph, nodes: list[fx.Node], network: nn.Module, role: str,
                scopes: dict[fx.Node, str]) -> int:
    """Replace each ``get_attr`` of the network by a :class:`LiveAttr` call right before its first user, so that
    it reads the attribute inside its unit's span (after the gather); its scope is the attribute's owner."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    count = 0
    for n in list(nodes):
        if n.op != "get_attr":
            continue
        owner_path, _, attr = str(n.target)[len(role) + 1:].rpartition(".")
        name = f"fsdp_attr_{role}_{count}"
        gm.add_submodule(name, LiveAttr(network.get_submodule(owner_path), attr))
        first_user = min(n.users, key=order.__getitem__) if n.users else n
        with graph.inserting_before(first_user):
            live = graph.call_module(name, ())
        set_info(live, info_of(n))
        n.replace_all_uses_with(live)
        nodes.remove(n)
        nodes.append(live)
        scopes[live] = scopes.pop(n)
        graph.erase_node(n)
        count += 1
    if count:  # keep ``nodes`` in graph order
        order = {n: i for i, n in enumerate(graph.nodes)}
        nodes.sort(key=order.__getitem__)
    return count


def _schedule_network(gm: fx.GraphModule, role: str, network: nn.Module, units: tuple[str, ...]) -> dict:
    graph = gm.graph
    nodes = [n for n in graph.nodes if role_of(n) is _ROLES[role]]
    if not nodes:
        return {"units": [], "order": []}
    scopes = {n: _scope(n, role + ".") for n in nodes}
    live = _live_attrs(gm, graph, nodes, network, role, scopes)
    # outer units first: an inner unit's inputs are then the outer unit's (already hooked) values
    spans = []
    for path in ("",) + tuple(sorted(units, key=lambda p: p.count("."))):
        members = [n for n in nodes if _inside(scopes[n], path)]
        if members:
            spans.append((path, members))
    order = sorted((p for p, _ in spans), key=lambda p: nodes.index(next(m for pp, m in spans if pp == p)[0]))
    position = {n: i for i, n in enumerate(graph.nodes)}
    report = []
    for path, members in spans:
        inside = set(members)
        first, last = members[0], members[-1]
        inputs = [a for n in members for a in n.all_input_nodes if a not in inside
                  and role_of(a) is not Role.GRAD_MODE and position.get(a, -1) < position[first]]
        inputs = list(dict.fromkeys(inputs))
        outputs = [n for n in members if any(u not in inside for u in n.users)]
        tag = path.replace(".", "_") or "root"
        unit = network.get_submodule(path) if path else network
        enter_cls, exit_cls = (FrozenEnter, FrozenExit) if role == "teacher" else (UnitEnter, UnitExit)
        gm.add_submodule(f"fsdp_{role}_{tag}_enter", enter_cls(unit, path))
        gm.add_submodule(f"fsdp_{role}_{tag}_exit", exit_cls(unit, path))
        label = path or "<root>"
        with graph.inserting_before(first):
            enter = graph.call_module(f"fsdp_{role}_{tag}_enter", tuple(inputs))
            set_info(enter, NodeInfo(_ROLES[role], f"{label}/fsdp_unshard"))
            for i, x in enumerate(inputs):
                got = graph.call_function(operator.getitem, (enter, i))
                set_info(got, NodeInfo(_ROLES[role], f"{label}/fsdp_input{i}", derived_from=x.name))
                for m in members:
                    m.replace_input_with(x, got)
        with graph.inserting_after(last):
            ex = graph.call_module(f"fsdp_{role}_{tag}_exit", tuple(outputs))
            set_info(ex, NodeInfo(_ROLES[role], f"{label}/fsdp_reshard"))
        position = {n: i for i, n in enumerate(graph.nodes)}
        report.append({"unit": label, "first": first.name, "last": last.name, "inputs": len(inputs),
                       "outputs": len(outputs)})
    if role == "teacher":  # each unit prefetches the next one the graph enters
        enters = [gm.get_submodule(str(n.target)) for n in graph.nodes if n.op == "call_module"
                  and str(n.target).startswith(f"fsdp_{role}_") and str(n.target).endswith("_enter")]
        for a, b in zip(enters, enters[1:]):
            object.__setattr__(a, "next", b.unit)
    return {"units": report, "order": [p or "<root>" for p in order], "live_attrs": live}


def prefetch_order(gm: fx.GraphModule) -> dict[str, list[nn.Module]]:
    """Per network role, its unit modules in the order the graph enters them (for forward/backward prefetch)."""
    out: dict[str, list[nn.Module]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            mod = gm.get_submodule(str(n.target))
            if isinstance(mod, (UnitEnter, FrozenEnter)) and mod.path:
                out.setdefault(role_of(n).value, []).append(mod.unit)
    return out


def run(gm: fx.GraphModule, ctx: Any) -> PassResult:
    plan: ShardPlan | None = ctx.fsdp
    if plan is None or not plan.networks:
        return PassResult(NAME, False, "off (runtime.distributed: fsdp turns it on)", {})
    details: dict[str, Any] = {}
    parts = []
    for role, (network, units) in plan.networks.items():
        got = _schedule_network(gm, role, network, units)
        details[role] = got
        if got["units"]:
            parts.append(f"{role}: {len(got['units'])} unit(s) gathered around their nodes "
                         f"({', '.join(got['order'])})")
    if not parts:
        return PassResult(NAME, False, "no sharded network has nodes in this stage", details)
    return PassResult(NAME, True, "; ".join(parts), details)
