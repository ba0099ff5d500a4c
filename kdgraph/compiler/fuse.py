"""The fuser: writes one stage's graph from the captured networks, its taps, adapters, losses and output.

::

    images, targets, extras  ->  [transform]  ->  teacher nodes  +  student nodes
        -> adapter calls -> loss calls -> weight * loss -> sum -> {loss, terms, logits}

Only what the stage's losses need is written: the adapters they read (in dependency order), the
networks they tap (the student always when the stage trains it). Every node it creates gets a
:class:`~kdgraph.compiler.nodeinfo.NodeInfo`. The result is a :class:`FusedStage`, whose GraphModule the
passes (:mod:`kdgraph.compiler.passes`) then rewrite.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import torch.fx as fx
from torch import nn

from ..errors import KDGraphError
from .nodeinfo import NodeInfo, Role, info_of, set_info
from ..spec import StageSpec, parse_tap
from ..spec.schedule import Schedule
from .cached import cached_taps
from .prepare import Prepared

__all__ = ["FusedStage", "fuse_stage"]

_NETWORK_ROLES = {"teacher": Role.TEACHER, "student": Role.STUDENT}


@dataclass
class FusedStage:
    """One stage's fused GraphModule, before the passes, and what the fuser learnt writing it."""

    gm: fx.GraphModule
    taps: dict[str, fx.Node]  # tap text -> the node whose value it reads, in the order first needed
    tap_users: dict[str, list[str]]  # tap text -> "loss kd", "adapter conn", ...
    adapters: list[str]  # the adapters it calls, in dependency order
    networks: set[str]  # "teacher" and/or "student"
    batch_inputs: list[str]  # the batch keys beyond images / targets, sorted
    optional_inputs: list[str]  # those a batch may leave out (every reader lists it in optional_batch_inputs)
    transform: Optional[str] = None  # the input transform's type
    cached_taps: dict[str, str] = field(default_factory=dict)  # tap text -> batch key (teacher output cache)
    output_node: Optional[fx.Node] = field(default=None, repr=False)


class _Fuser:
    def __init__(self, prep: Prepared, si: int):
        self.prep = prep
        self.stage: StageSpec = prep.spec.stages[si]
        self.g = fx.Graph()
        self.values: dict[str, fx.Node] = {}  # tap text -> fused node
        self.env: dict[str, dict[fx.Node, fx.Node]] = {"teacher": {}, "student": {}}
        self.tap_users: dict[str, list[str]] = {}
        self.cached = cached_taps(prep.spec, self.stage)  # tap text -> batch key

    def needed(self) -> tuple[list[str], list[str], set[str]]:
        """Adapters (dependency order) and taps the stage's losses need, and which networks."""
        adapters: list[str] = []
        taps: list[str] = []

        def need_tap(text: str, user: str) -> None:
            tap = parse_tap(text)
            self.tap_users.setdefault(text, []).append(user)
            if text not in taps:
                taps.append(text)
            if tap.source == "adapter" and tap.path not in adapters:
                for t in self.prep.adapter_inputs[tap.path].values():
                    need_tap(t, f"adapter {tap.path}")
                adapters.append(tap.path)

        for ls in self.stage.losses:
            for text in self.prep.loss_inputs[(self.stage.name, ls.name)].values():
                need_tap(text, f"loss {ls.name}")
        self.cached = {t: k for t, k in self.cached.items() if t in taps}
        nets = {parse_tap(t).source for t in taps if t not in self.cached} & {"teacher", "student"}
        if "student" in self.stage.train:
            nets.add("student")
        return adapters, taps, nets

    def copy_network(self, role: str, x: fx.Node | dict[str, fx.Node]) -> Optional[fx.Node]:
        """Copy the captured network's nodes (modules under ``<role>.``); return the node of its output.

        ``x``: the node of its input, or (named inputs) the batch's node for each input name."""
        net = self.prep.nets[role]
        env = self.env[role]
        first = True
        for node in net.graph_module.graph.nodes:
            if node.op == "placeholder" and isinstance(x, dict):
                if node.name not in x:
                    raise KDGraphError(f"the {role}'s captured graph takes an input {node.name!r}, which is not "
                                       f"among the spec's input.named ({', '.join(x)})")
                env[node] = x[node.name]
                continue
            if node.op == "placeholder":
                if first:
                    env[node] = x
                    first = False
                    continue
                env[node] = node.args[0] if node.args else None  # extra optional forward args keep their defaults
                continue
            if node.op == "output":
                continue
            target = f"{role}.{node.target}" if node.op in ("call_module", "get_attr") else node.target
            new = self.g.create_node(node.op, target, fx.map_arg(node.args, lambda n: env[n]),
                                     fx.map_arg(node.kwargs, lambda n: env[n]), name=f"{role}_{node.name}",
                                     type_expr=node.type)
            new.meta = {k: v for k, v in node.meta.items() if k in ("tensor_meta", "kd_scope", "stack_trace")}
            set_info(new, NodeInfo(_NETWORK_ROLES[role], net.node_names.get(node),
                                   node.target if node.op == "call_module" else None))
            env[node] = new
        return env.get(net.output_node) if net.output_node is not None else None

    def tap_value(self, text: str, inputs: dict[str, fx.Node]) -> fx.Node:
        if text in self.values:
            return self.values[text]
        tap = parse_tap(text)
        if text in self.cached:  # read from the batch: the teacher cache's stored value for this view
            value = inputs[self.cached[text]]
        elif tap.source in ("teacher", "student"):
            net = self.prep.nets[tap.source]
            value = self.env[tap.source][net.resolve(tap)]
        elif tap.source == "batch":
            value = inputs[tap.path]
        else:
            value = self.values[f"adapter:{tap.path}"]
            if tap.index is not None:
                value = set_info(self.g.call_function(operator.getitem, (value, tap.index)),
                                 NodeInfo(Role.ADAPTER, text))
        self.values[text] = value
        return value

    def fuse(self, root: nn.Module) -> FusedStage:
        stage, g, prep = self.stage, self.g, self.prep
        adapters, taps, nets = self.needed()
        batch_keys = sorted({parse_tap(t).path for t in taps if parse_tap(t).source == "batch"}
                            - {"images", "targets"} | set(self.cached.values()))
        named = list(prep.spec.input.named)
        batch_keys = [k for k in batch_keys if k not in named]
        optional = self.optional_keys(batch_keys, adapters)
        if named:  # one placeholder per named input, in the spec's order, then targets and the extras
            inputs = {k: g.placeholder(k) for k in named}
            inputs["targets"] = g.placeholder("targets", default_value=None)
        else:
            inputs = {"images": g.placeholder("images"), "targets": g.placeholder("targets", default_value=None)}
        for k in batch_keys:
            inputs[k] = g.placeholder(k, default_value=None)
        for n in inputs.values():
            set_info(n, NodeInfo(Role.INPUT, f"batch:{n.name}"))
        x = {k: inputs[k] for k in named} if named else inputs["images"]
        transform = None
        if stage.name in prep.transforms and not named:
            transform = stage.transform.type
            x = set_info(g.call_module(f"transforms.{stage.name}", (x,)), NodeInfo(Role.TRANSFORM, transform))
        outputs = {role: self.copy_network(role, x) for role in ("teacher", "student") if role in nets}

        for name in adapters:  # in dependency order
            kwargs = {k: self.tap_value(t, inputs) for k, t in prep.adapter_inputs[name].items()}
            node = g.call_module(f"adapters.{name}", (), kwargs)
            set_info(node, NodeInfo(Role.ADAPTER, name, f"adapters.{name}", trainable=name in stage.train))
            self.values[f"adapter:{name}"] = node

        terms: dict[str, fx.Node] = {}
        total: Optional[fx.Node] = None
        for ls in stage.losses:
            kwargs = {k: self.tap_value(t, inputs) for k, t in prep.loss_inputs[(stage.name, ls.name)].items()}
            node = g.call_module(f"losses.{stage.name}.{ls.name}", (), kwargs)
            set_info(node, NodeInfo(Role.LOSS, ls.name, f"losses.{stage.name}.{ls.name}"))
            if isinstance(ls.weight, Schedule):  # the weight follows the stage's progress: a module computes it
                factor = g.call_module(f"schedules.{stage.name}.{ls.name}", ())
                set_info(factor, NodeInfo(Role.LOSS, f"weight of {ls.name}: {ls.weight.describe()}"))
                weighted = g.call_function(operator.mul, (node, factor))
            else:
                weighted = node if ls.weight == 1.0 else g.call_function(operator.mul, (node, float(ls.weight)))
            if info_of(weighted) is None:
                set_info(weighted, NodeInfo(Role.LOSS, f"{ls.weight} * {ls.name}"))
            terms[ls.name] = weighted
            total = weighted if total is None else g.call_function(operator.add, (total, weighted))
            if info_of(total) is None:
                set_info(total, NodeInfo(Role.LOSS, "total"))
        out = g.output({"loss": total, "terms": terms, "logits": outputs.get("student")})
        set_info(out, NodeInfo(Role.OUTPUT, "output"))
        gm = fx.GraphModule(root, g, class_name=f"Distill_{stage.name}")
        return FusedStage(gm, {t: self.values[t] for t in taps}, self.tap_users, adapters, nets,
                          [k for k in batch_keys if k not in optional], optional, transform, dict(self.cached), out)

    def optional_keys(self, batch_keys: list[str], adapters: list[str]) -> list[str]:
        """The batch keys only read by loss inputs their class lists in ``optional_batch_inputs`` (the loss's
        forward default applies when the batch leaves them out; e.g. the token losses' step count)."""
        optional, required = set(), set(self.cached.values())
        readers = [(self.prep.adapter_inputs[a], ()) for a in adapters]
        readers += [(self.prep.loss_inputs[(self.stage.name, ls.name)],
                     getattr(self.prep.losses[self.stage.name][ls.name], "optional_batch_inputs", ()))
                    for ls in self.stage.losses]
        for bound, may_omit in readers:
            for name, text in bound.items():
                tap = parse_tap(text)
                if tap.source == "batch" and tap.path in batch_keys:
                    (optional if name in may_omit else required).add(tap.path)
        return sorted(optional - required)


def fuse_stage(prep: Prepared, stage_index: int, root: nn.Module) -> FusedStage:
    """Write stage ``stage_index``'s graph over ``root`` (which holds teacher, student, adapters, losses and
    transforms as submodules; the GraphModule shares them)."""
    return _Fuser(prep, stage_index).fuse(root)
