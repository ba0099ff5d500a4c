"""The compiler: two traced networks + a spec -> one fused ``torch.fx.GraphModule`` per stage.

It knows no method by name. It binds taps to nodes, instantiates the adapters and losses the
registry names (asking each class for its inferred arguments and shape checks), and writes one
graph per stage::

    images, targets, extras  ->  [transform]  ->  teacher nodes  +  student nodes
        -> adapter calls -> loss calls -> weight * loss -> sum -> {loss, terms, logits}

Passes over that graph: in-place safety (an in-place op that would overwrite a tapped value is
made out-of-place), dead-code elimination (teacher nodes no loss needs disappear; a stage that
trains no student and taps none drops the student entirely). The teacher's parameters are frozen
by the distiller, so no autograd graph is ever recorded for it.
"""
from __future__ import annotations

import copy
import inspect
import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn

from .errors import KDGraphError, ShapeError, SpecError, did_you_mean
from .methods.args import check_args
from .methods.base import Adapter, DistillLoss, InputTransform
from .registry import ADAPTERS, DATA_WRAPPERS, LOSSES, TRANSFORMS
from .spec import Spec, StageSpec, Tap, parse_tap
from .trace import TracedNetwork

Shape = Optional[tuple[int, ...]]


# --------------------------------------------------------------------------------------------
# What the compiler reports (CLI summary, viz, tests)
# --------------------------------------------------------------------------------------------


@dataclass
class TapReport:
    tap: str
    node: str  # the fused graph's node name
    shape: Shape
    dtype: Optional[str]
    used_by: list[str] = field(default_factory=list)


@dataclass
class AdapterReport:
    name: str
    type: str
    args: dict[str, Any]
    inputs: dict[str, str]
    parameters: int
    trainable: bool
    side: str  # teacher | student | mixed (which network its inputs come from)
    output_shape: Shape


@dataclass
class LossReport:
    name: str
    type: str
    weight: float
    inputs: dict[str, str]


@dataclass
class StageReport:
    stage: str
    index: int
    train: list[str]
    taps: list[TapReport]
    adapters: list[AdapterReport]
    losses: list[LossReport]
    batch_inputs: list[str]
    trainable_parameters: int = 0
    teacher_nodes: int = 0
    teacher_nodes_pruned: int = 0
    pruned_nodes: list[dict[str, Any]] = field(default_factory=list)
    inplace_fixed: list[str] = field(default_factory=list)
    uses_teacher: bool = True
    uses_student: bool = True
    transform: Optional[str] = None


# --------------------------------------------------------------------------------------------
# Preparation: shapes, adapters, losses (once per distiller, all stages)
# --------------------------------------------------------------------------------------------


def _params(fn) -> tuple[list[str], list[str]]:
    """(required, optional) keyword names of ``fn`` (forward), excluding self / *args / **kwargs."""
    req, opt = [], []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name == "self":
            continue
        (req if p.default is p.empty else opt).append(p.name)
    return req, opt


def _instantiate(cls: type, args: dict[str, Any], where: str) -> nn.Module:
    try:
        return cls(**args)
    except TypeError as e:
        req, opt = _params(cls.__init__)
        raise SpecError(f"{where}: {cls.__name__}({', '.join(f'{k}={v!r}' for k, v in args.items())}) failed: {e}. "
                        f"Required args: {', '.join(req) or 'none'}; optional: {', '.join(opt) or 'none'}.") from None
    except (ValueError, KDGraphError) as e:
        raise SpecError(f"{where}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a torch error in a constructor: say which piece and args
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SpecError(f"{where}: {cls.__name__}({', '.join(f'{k}={v!r}' for k, v in args.items())}) cannot be "
                        f"built: {first}. Check its args.") from None


def bind_inputs(cls: type, given: dict[str, str], where: str) -> dict[str, str]:
    """Bind forward arguments to taps: spec inputs over class defaults; check none is missing or unknown."""
    req, opt = _params(cls.forward)
    declared = list(getattr(cls, "inputs", ()) or (req + opt))
    defaults = dict(getattr(cls, "default_inputs", {}) or {})
    unknown = [k for k in given if k not in req + opt]
    if unknown:
        raise SpecError(f"{where}.inputs: {cls.__name__} takes no input {unknown[0]!r}. "
                        f"Its inputs: {', '.join(declared)}.")
    bound = {k: given.get(k, defaults.get(k)) for k in req + opt if given.get(k, defaults.get(k)) is not None}
    missing = [k for k in req if k not in bound]
    if missing:
        raise SpecError(f"{where}.inputs: {cls.__name__} needs a tap for {', '.join(repr(m) for m in missing)} "
                        f"(its inputs: {', '.join(declared)}). Example: inputs: {{{missing[0]}: \"student:layer4\"}}")
    return bound


class Prepared:
    """Everything built once for a spec: traced networks with shapes, adapters, losses, transforms."""

    def __init__(self, spec: Spec, teacher: TracedNetwork, student: TracedNetwork, batch_shape: tuple[int, ...]):
        self.spec = spec
        self.nets = {"teacher": teacher, "student": student}
        self.batch_shape = batch_shape
        self.adapters = nn.ModuleDict()
        self.adapter_inputs: dict[str, dict[str, str]] = {}
        self.adapter_args: dict[str, dict[str, Any]] = {}
        self.adapter_shapes: dict[str, Any] = {}  # name -> shape or tuple of shapes
        self.losses = nn.ModuleDict()
        self.loss_inputs: dict[tuple[str, str], dict[str, str]] = {}
        self.transforms = nn.ModuleDict()
        self._check_num_classes()
        self._build_adapters()
        self._build_losses_and_transforms()
        self._check_wiring()

    # ---------------------------------------------------------------- shapes
    def tap_shape(self, tap: Tap) -> Shape:
        if tap.source in ("teacher", "student"):
            net = self.nets[tap.source]
            return net.shape(net.resolve(tap))
        if tap.source == "adapter":
            shape = self.adapter_shapes.get(tap.path)
            if tap.index is not None:
                if not isinstance(shape, list):
                    raise SpecError(f"tap {tap.text!r}: adapter {tap.path!r} returns one tensor, not a tuple; "
                                    f"write 'adapter:{tap.path}'")
                if tap.index >= len(shape):
                    raise SpecError(f"tap {tap.text!r}: adapter {tap.path!r} returns {len(shape)} values")
                return shape[tap.index]
            if isinstance(shape, list):
                raise SpecError(f"tap {tap.text!r}: adapter {tap.path!r} returns a tuple of {len(shape)}; pick one "
                                f"with 'adapter:{tap.path}.0' .. '.{len(shape) - 1}'")
            return shape
        if tap.path == "images":
            return self.batch_shape
        if tap.path == "targets":
            return (self.batch_shape[0],)
        return None

    # ---------------------------------------------------------------- adapters
    def _adapter_order(self) -> list[str]:
        order: list[str] = []
        state: dict[str, int] = {}

        def visit(name: str, chain: list[str]) -> None:
            if state.get(name) == 2:
                return
            if state.get(name) == 1:
                cycle = " -> ".join(chain[chain.index(name):] + [name])
                raise SpecError(f"adapters form a cycle: {cycle}. An adapter may read another adapter's output only "
                                f"if that one does not (directly or not) read it back.")
            state[name] = 1
            ad = self.spec.adapters[name]
            deps = [t for t in [*ad.inputs.values(), *([ad.match] if ad.match else [])]]
            for text in deps:
                tap = parse_tap(text)
                if tap.source == "adapter":
                    visit(tap.path, chain + [name])
            state[name] = 2
            order.append(name)

        for name in self.spec.adapters:
            visit(name, [])
        return order

    def _build_adapters(self) -> None:
        for name in self._adapter_order():
            ad = self.spec.adapters[name]
            where = f"adapters.{name}"
            cls = ADAPTERS.get(ad.type, where=f"{where}.type")
            given = check_args(cls, dict(ad.args), ("adapters", name), self.spec, f"adapter {name!r} ({ad.type})")
            bound = bind_inputs(cls, dict(ad.inputs), where)
            shapes = {k: self.tap_shape(parse_tap(t)) for k, t in bound.items()}
            match_shape = self.tap_shape(parse_tap(ad.match)) if ad.match else None
            infer = getattr(cls, "infer_args", None)
            try:
                args = infer(given, shapes, match_shape) if infer else given
            except ShapeError as e:
                raise e if str(e).startswith(where) else ShapeError(f"{where}: {e}") from None
            except (KeyError, ValueError, TypeError) as e:
                raise SpecError(f"{where}: cannot infer the arguments of {cls.__name__} from the shapes "
                                f"{shapes} (match: {match_shape}): {e}. Give them under args.") from None
            module = _instantiate(cls, args, where)
            self.adapters[name] = module
            self.adapter_inputs[name] = bound
            self.adapter_args[name] = args
            self.adapter_shapes[name] = self._probe(module, shapes, where)
            out = self.adapter_shapes[name]
            if match_shape is not None and not isinstance(out, list) and out is not None \
                    and tuple(out[1:]) != tuple(match_shape[1:]):
                raise ShapeError(f"{where}: output shape {list(out)} does not match {ad.match} "
                                 f"(shape {list(match_shape)}); check its args {args}.")

    @torch.no_grad()
    def _probe(self, module: nn.Module, shapes: dict[str, Shape], where: str) -> Any:
        """Run an adapter once on zeros of the input shapes to learn its output shape(s)."""
        if any(s is None for s in shapes.values()):
            return None
        was = module.training
        module.eval()
        try:
            out = module(**{k: torch.zeros(s) for k, s in shapes.items()})
        except Exception as e:  # noqa: BLE001
            raise ShapeError(f"{where}: fails on inputs of shapes {({k: list(s) for k, s in shapes.items()})}: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        finally:
            module.train(was)
        if isinstance(out, (tuple, list)):
            return [tuple(o.shape) if isinstance(o, torch.Tensor) else None for o in out]
        return tuple(out.shape) if isinstance(out, torch.Tensor) else None

    # ---------------------------------------------------------------- losses
    def _build_losses_and_transforms(self) -> None:
        for si, stage in enumerate(self.spec.stages):
            per_stage = nn.ModuleDict()
            for li, ls in enumerate(stage.losses):
                where = f"stages[{si}].losses[{li}] ({ls.name})"
                cls = LOSSES.get(ls.type, where=f"stages[{si}].losses[{li}].type")
                bound = bind_inputs(cls, dict(ls.inputs), where)
                taps = {k: parse_tap(t) for k, t in bound.items()}
                for t in taps.values():
                    if t.source == "adapter" and t.path not in self.spec.adapters:
                        raise SpecError(f"{where}: {t.text!r} names no declared adapter")
                shapes = {k: self.tap_shape(t) for k, t in taps.items()}
                check = getattr(cls, "check_shapes", None)
                if check is not None:
                    check(shapes, bound, where)
                args = check_args(cls, dict(ls.args), ("stages", si, "losses", li), self.spec,
                                  f"loss {ls.name!r} ({ls.type})")
                per_stage[ls.name] = _instantiate(cls, args, where)
                self.loss_inputs[(stage.name, ls.name)] = bound
            self.losses[stage.name] = per_stage
            if stage.transform is not None:
                cls = TRANSFORMS.get(stage.transform.type, where=f"stages[{si}].transform.type")
                args = check_args(cls, dict(stage.transform.args), ("stages", si, "transform"), self.spec,
                                  f"transform {stage.transform.type!r}")
                self.transforms[stage.name] = _instantiate(cls, args, f"stages[{si}].transform")

    # ---------------------------------------------------------------- wiring checks
    def _check_num_classes(self) -> None:
        """``input.num_classes`` must be the width of the student's logits (its traced output)."""
        net = self.nets["student"]
        shape = net.shape(net.output_node) if net.output_node is not None else None  # a tuple output: unchecked
        k = self.spec.input.num_classes
        if shape is not None and len(shape) == 2 and shape[1] != k:
            raise SpecError(f"{self.spec.where('input', 'num_classes')}: is {k} but the student's logits "
                            f"(student:@output) have {shape[1]} classes (shape {list(shape)}); set num_classes to "
                            f"{shape[1]} or build the student with {k} outputs (e.g. kwargs: {{num_classes: {k}}})")

    def _data_batch_keys(self) -> Optional[set[str]]:
        """Validate ``data.wrapper`` (type and args) and return the batch keys it adds (None: undeclared)."""
        w = self.spec.data.wrapper
        if w is None:
            return set()
        fn = DATA_WRAPPERS.get(w.type, where=self.spec.where("data", "wrapper", "type"))
        check_args(fn, dict(w.args), ("data", "wrapper"), self.spec, f"data wrapper {w.type!r}",
                   fn=getattr(fn, "__init__", None) if isinstance(fn, type) else fn)
        keys = getattr(fn, "batch_keys", None)
        return set(keys) if keys is not None else None

    def _check_wiring(self) -> None:
        """Per stage: batch keys exist, batch-only inputs read the batch, every loss reaches a trained tensor."""
        wrapper_keys = self._data_batch_keys()
        for si, stage in enumerate(self.spec.stages):
            trained = set(stage.train)
            for li, ls in enumerate(stage.losses):
                cls = LOSSES.get(ls.type)
                bound = self.loss_inputs[(stage.name, ls.name)]
                for k in getattr(cls, "batch_only_inputs", ()):
                    tap = parse_tap(bound[k]) if k in bound else None
                    if tap is not None and tap.source != "batch":
                        raise SpecError(f"{self.spec.where('stages', si, 'losses', li, 'inputs', k)}: {ls.type} reads {k!r} from the batch (labels / sample "
                                        f"indices), but it is bound to {bound[k]!r}, a {tap.source} value; bind it to "
                                        f"a batch tap such as 'batch:{'targets' if k == 'targets' else k}'")
                if wrapper_keys is not None:
                    declared = [parse_tap(t).path for t in (getattr(cls, "default_inputs", None) or {}).values()
                                if parse_tap(t).source == "batch"]
                    allowed = {"images", "targets", *wrapper_keys, *getattr(cls, "batch_keys", ()), *declared}
                    for k, text in bound.items():
                        tap = parse_tap(text)
                        if tap.source == "batch" and tap.path not in allowed:
                            hint = did_you_mean(tap.path, sorted(allowed))
                            raise SpecError(f"{self.spec.where('stages', si, 'losses', li, 'inputs', k)}: "
                                            f"{text!r} names batch key {tap.path!r}, which no batch "
                                            f"carries.{hint} Batches hold: {', '.join(sorted(allowed))} (extra keys "
                                            f"come from data.wrapper)")
                if not any(self._depends_on_trained(t, trained) for t in bound.values()):
                    raise SpecError(
                        f"{self.spec.where('stages', si, 'losses', li)}: loss {ls.name!r} depends on nothing that "
                        f"stage {stage.name!r} trains (train: {', '.join(stage.train)}); its inputs "
                        f"{', '.join(f'{k}={v!r}' for k, v in bound.items())} are all frozen (teacher, batch or "
                        f"untrained adapters on them), so it has no gradient. Tap the student or an adapter the "
                        f"stage trains, or add that adapter to train")

    def _depends_on_trained(self, text: str, trained: set[str]) -> bool:
        tap = parse_tap(text)
        if tap.source == "student":
            return "student" in trained
        if tap.source == "adapter":
            return tap.path in trained or any(self._depends_on_trained(t, trained)
                                              for t in self.adapter_inputs.get(tap.path, {}).values())
        return False


# --------------------------------------------------------------------------------------------
# Building one stage's graph
# --------------------------------------------------------------------------------------------


def _is_inplace(node: fx.Node, root: nn.Module) -> bool:
    if node.op == "call_module":
        try:
            mod = root.get_submodule(node.target)
        except AttributeError:
            return False
        return bool(getattr(mod, "inplace", False))
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return bool(node.kwargs.get("inplace", False)) or (name.endswith("_") and not name.endswith("__")) \
            or node.target in (operator.iadd, operator.imul, operator.isub, operator.itruediv)
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    return False


def _make_out_of_place(node: fx.Node, root: nn.Module, safe: nn.ModuleDict) -> str:
    """Rewrite an in-place op as its out-of-place twin. Returns a description of the change."""
    if node.op == "call_module":
        mod = root.get_submodule(node.target)
        key = node.target.replace(".", "__")
        if key not in safe:
            twin = copy.copy(mod)  # shares parameters; only the flag differs
            twin.inplace = False
            safe[key] = twin
        old = node.target
        node.target = f"inplace_safe.{key}"
        return f"{old} (inplace=True) -> out-of-place copy"
    if node.op == "call_function":
        if node.kwargs.get("inplace"):
            node.kwargs = {**node.kwargs, "inplace": False}
            return f"{node.name}: inplace=False"
        iop = {operator.iadd: operator.add, operator.imul: operator.mul, operator.isub: operator.sub,
               operator.itruediv: operator.truediv}
        if node.target in iop:
            node.target = iop[node.target]
            return f"{node.name}: in-place operator -> out-of-place"
        name = node.target.__name__
        twin = getattr(torch, name[:-1], None)
        if twin is not None:
            node.target = twin
            return f"{node.name}: torch.{name} -> torch.{name[:-1]}"
    if node.op == "call_method":
        name = str(node.target)
        if hasattr(torch.Tensor, name[:-1]):
            node.target = name[:-1]
            return f"{node.name}: .{name}() -> .{name[:-1]}()"
    # no twin: clone the input first
    src = node.args[0]
    with node.graph.inserting_before(node):
        clone = node.graph.call_method("clone", (src,))
    node.replace_input_with(src, clone)
    return f"{node.name}: input cloned before an in-place op"


class _StageBuilder:
    def __init__(self, prep: Prepared, si: int, root: nn.Module):
        self.prep = prep
        self.spec = prep.spec
        self.stage: StageSpec = prep.spec.stages[si]
        self.si = si
        self.root = root
        self.g = fx.Graph()
        self.values: dict[str, fx.Node] = {}  # tap text -> fused node
        self.env: dict[str, dict[fx.Node, fx.Node]] = {"teacher": {}, "student": {}}
        self.tap_users: dict[str, list[str]] = {}
        self.report = StageReport(self.stage.name, si, list(self.stage.train), [], [], [], [])

    # -- which taps / adapters this stage needs
    def _needed(self) -> tuple[list[str], list[str], set[str]]:
        """Adapters (topological order) and taps the stage's losses need, and which networks."""
        adapters: list[str] = []
        taps: list[str] = []

        def need_tap(text: str, user: str) -> None:
            tap = parse_tap(text)
            self.tap_users.setdefault(text, []).append(user)
            if text not in taps:
                taps.append(text)
            if tap.source == "adapter" and tap.path not in adapters:
                for k, t in self.prep.adapter_inputs[tap.path].items():
                    need_tap(t, f"adapter {tap.path}")
                adapters.append(tap.path)

        for ls in self.stage.losses:
            for text in self.prep.loss_inputs[(self.stage.name, ls.name)].values():
                need_tap(text, f"loss {ls.name}")
        nets = {parse_tap(t).source for t in taps} & {"teacher", "student"}
        if "student" in self.stage.train:
            nets.add("student")
        return adapters, taps, nets

    def _copy_network(self, role: str, x: fx.Node) -> Optional[fx.Node]:
        net = self.prep.nets[role]
        env = self.env[role]
        first = True
        for node in net.graph_module.graph.nodes:
            if node.op == "placeholder":
                if first:
                    env[node] = x
                    first = False
                    continue
                default = node.args[0] if node.args else None
                env[node] = default  # extra optional forward args keep their defaults
                continue
            if node.op == "output":
                continue
            target = f"{role}.{node.target}" if node.op in ("call_module", "get_attr") else node.target
            new = self.g.create_node(node.op, target, fx.map_arg(node.args, lambda n: env[n]),
                                     fx.map_arg(node.kwargs, lambda n: env[n]), name=f"{role}_{node.name}",
                                     type_expr=node.type)
            new.meta = {k: v for k, v in node.meta.items() if k in ("tensor_meta", "kd_scope", "stack_trace")}
            new.meta["kdgraph"] = {"role": role, "name": net.node_names.get(node),
                                   "module_path": node.target if node.op == "call_module" else None}
            env[node] = new
        return env.get(net.output_node) if net.output_node is not None else None

    def _tap_value(self, text: str, inputs: dict[str, fx.Node]) -> fx.Node:
        if text in self.values:
            return self.values[text]
        tap = parse_tap(text)
        if tap.source in ("teacher", "student"):
            net = self.prep.nets[tap.source]
            value = self.env[tap.source][net.resolve(tap)]
        elif tap.source == "batch":
            value = inputs[tap.path]
        else:
            value = self.values[f"adapter:{tap.path}"]
            if tap.index is not None:
                value = self.g.call_function(operator.getitem, (value, tap.index))
                value.meta["kdgraph"] = {"role": "adapter", "name": text}
        self.values[text] = value
        return value

    def build(self) -> tuple[fx.GraphModule, StageReport]:
        stage, g, prep = self.stage, self.g, self.prep
        adapters, taps, nets = self._needed()
        batch_keys = sorted({parse_tap(t).path for t in taps if parse_tap(t).source == "batch"}
                            - {"images", "targets"})
        inputs = {"images": g.placeholder("images"),
                  "targets": g.placeholder("targets", default_value=None)}
        for k in batch_keys:
            inputs[k] = g.placeholder(k, default_value=None)
        for n in inputs.values():
            n.meta["kdgraph"] = {"role": "input", "name": f"batch:{n.name}"}
        self.report.batch_inputs = batch_keys
        x = inputs["images"]
        if stage.name in prep.transforms:
            x = g.call_module(f"transforms.{stage.name}", (x,))
            x.meta["kdgraph"] = {"role": "transform", "name": stage.transform.type}
            self.report.transform = stage.transform.type
        outputs = {}
        for role in ("teacher", "student"):
            if role in nets:
                outputs[role] = self._copy_network(role, x)
        self.report.uses_teacher, self.report.uses_student = "teacher" in nets, "student" in nets

        # adapters, in dependency order
        for name in adapters:
            kwargs = {k: self._tap_value(t, inputs) for k, t in prep.adapter_inputs[name].items()}
            node = g.call_module(f"adapters.{name}", (), kwargs)
            node.meta["kdgraph"] = {"role": "adapter", "name": name, "module_path": f"adapters.{name}",
                                    "trainable": name in stage.train}
            self.values[f"adapter:{name}"] = node

        # losses, weights, total
        terms: dict[str, fx.Node] = {}
        total: Optional[fx.Node] = None
        for ls in stage.losses:
            bound = prep.loss_inputs[(stage.name, ls.name)]
            kwargs = {k: self._tap_value(t, inputs) for k, t in bound.items()}
            node = g.call_module(f"losses.{stage.name}.{ls.name}", (), kwargs)
            node.meta["kdgraph"] = {"role": "loss", "name": ls.name, "module_path": f"losses.{stage.name}.{ls.name}"}
            weighted = node if ls.weight == 1.0 else g.call_function(operator.mul, (node, float(ls.weight)))
            weighted.meta.setdefault("kdgraph", {"role": "loss", "name": f"{ls.weight} * {ls.name}"})
            terms[ls.name] = weighted
            total = weighted if total is None else g.call_function(operator.add, (total, weighted))
            total.meta.setdefault("kdgraph", {"role": "loss", "name": "total"})
            self.report.losses.append(LossReport(ls.name, ls.type, ls.weight, dict(bound)))
        logits = outputs.get("student") if "student" in nets else None
        out = g.output({"loss": total, "terms": terms, "logits": logits})
        out.meta["kdgraph"] = {"role": "output", "name": "output"}

        # passes
        safe = nn.ModuleDict()
        self.root.inplace_safe = safe
        self._inplace_safety(taps, safe)
        gm = fx.GraphModule(self.root, g, class_name=f"Distill_{stage.name}")
        self.g = gm.graph
        self._prune()
        self._teacher_no_grad()
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
        self._fill_report(taps, adapters)
        return gm, self.report

    def _inplace_safety(self, taps: list[str], safe: nn.ModuleDict) -> None:
        order = {n: i for i, n in enumerate(self.g.nodes)}
        consumers = {n for n in self.g.nodes if n.meta.get("kdgraph", {}).get("role") in ("adapter", "loss")}
        for text in taps:
            node = self.values.get(text)
            if node is None or parse_tap(text).source not in ("teacher", "student"):
                continue
            for user in list(node.users):
                if user in consumers or order[user] <= order[node]:
                    continue
                if _is_inplace(user, self.root):
                    self.report.inplace_fixed.append(f"{text}: {_make_out_of_place(user, self.root, safe)}")

    def _prune(self) -> None:
        def role(n: fx.Node) -> Optional[str]:
            return n.meta.get("kdgraph", {}).get("role")

        before = [n for n in self.g.nodes if role(n) == "teacher"]
        # the teacher's own nodes, all of them (for the report's total)
        self.report.teacher_nodes = len(self.prep.nets["teacher"].graph_module.graph.nodes) - 2 \
            if self.report.uses_teacher else 0
        order = {n: i for i, n in enumerate(self.g.nodes)}

        def impure(n: fx.Node) -> bool:
            # an in-place op whose mutated input is read later must stay even if its result is unused
            if n.op in ("placeholder", "output"):
                return True
            if _is_inplace(n, self.root) and n.args and isinstance(n.args[0], fx.Node):
                return any(order[u] > order[n] for u in n.args[0].users if u is not n)
            return n.is_impure()

        self.g.eliminate_dead_code(is_impure_node=impure)
        alive = set(self.g.nodes)
        pruned = [n for n in before if n not in alive]
        self.report.teacher_nodes_pruned = len(pruned) if self.report.uses_teacher else self.report.teacher_nodes
        self.report.pruned_nodes = [{"name": n.name, "tap": n.meta["kdgraph"].get("name"), "op": n.op,
                                     "target": str(n.target), "shape": _shape(n)}
                                    for n in pruned]

    def _teacher_no_grad(self) -> None:
        """Run the teacher's nodes with autograd off (``torch.no_grad`` semantics, inside the graph).

        The teacher's parameters are frozen already, so no graph would be recorded; switching grad
        mode off also skips autograd's per-op bookkeeping, as a hand-written ``with torch.no_grad()``
        does. The previous mode is restored right after the teacher's last node.
        """
        nodes = [n for n in self.g.nodes if n.meta.get("kdgraph", {}).get("role") == "teacher"]
        if not nodes:
            return
        with self.g.inserting_before(nodes[0]):
            prev = self.g.call_function(teacher_grad_off, ())
            prev.meta["kdgraph"] = {"role": "grad_mode", "name": "teacher_grad_off"}
        with self.g.inserting_after(nodes[-1]):
            end = self.g.call_function(teacher_grad_restore, (prev,))
            end.meta["kdgraph"] = {"role": "grad_mode", "name": "teacher_grad_restore"}

    def _fill_report(self, taps: list[str], adapters: list[str]) -> None:
        prep = self.prep
        for text in taps:
            node = self.values.get(text)
            shape = prep.tap_shape(parse_tap(text))
            meta = node.meta.get("tensor_meta") if node is not None else None
            self.report.taps.append(TapReport(text, node.name if node is not None else "?", shape,
                                              str(meta.dtype).replace("torch.", "") if meta is not None else None,
                                              self.tap_users.get(text, [])))
        for name in adapters:
            module = prep.adapters[name]
            srcs = {parse_tap(t).source for t in prep.adapter_inputs[name].values()}
            side = "teacher" if srcs <= {"teacher"} else "student" if srcs <= {"student"} else "mixed"
            out = prep.adapter_shapes.get(name)
            self.report.adapters.append(AdapterReport(
                name, self.spec.adapters[name].type, dict(prep.adapter_args[name]),
                dict(prep.adapter_inputs[name]), sum(p.numel() for p in module.parameters()),
                name in self.stage.train, side, out if not isinstance(out, list) else tuple(out)))


def teacher_grad_off() -> bool:
    """Switch autograd off for the teacher's nodes; return the mode to restore."""
    prev = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)
    return prev


def teacher_grad_restore(prev: bool) -> None:
    """Restore the grad mode saved by :func:`teacher_grad_off`."""
    torch._C._set_grad_enabled(prev)


def _shape(n: fx.Node) -> Shape:
    meta = n.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def with_tap_outputs(gm: fx.GraphModule, report: StageReport) -> fx.GraphModule:
    """A copy of a stage's graph whose output also holds every tap's value: ``out["taps"][text]``.

    The stage's own GraphModule is not changed (its output and its generated code stay as they
    are), so asking for tap values costs nothing unless this variant runs. Modules are shared."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = g.graph_copy(gm.graph, env)
    by_name = {n.name: n for n in gm.graph.nodes}
    taps = {t.tap: env[by_name[t.node]] for t in report.taps if t.node in by_name}
    node = g.output({**out, "taps": taps})
    node.meta["kdgraph"] = {"role": "output", "name": "output"}
    return fx.GraphModule(gm, g, class_name=f"{type(gm).__name__}_taps")


def build_stage(prep: Prepared, stage_index: int, teacher: nn.Module, student: nn.Module) -> tuple[fx.GraphModule, StageReport]:
    """Build the fused GraphModule of one stage. Modules are shared with the caller, not copied."""
    root = nn.Module()
    root.teacher = teacher
    root.student = student
    root.adapters = prep.adapters
    root.losses = prep.losses
    root.transforms = prep.transforms
    return _StageBuilder(prep, stage_index, root).build()
