"""Preparation, once per spec for all stages: build adapters, losses and transforms, bind inputs, check wiring.

:class:`Prepared` asks each adapter class for the arguments that follow from the captured shapes
(``infer_args``), runs it once on zeros to learn its output shape, checks each loss's shapes
(``check_shapes``) and argument schema, and checks the wiring of every stage (batch keys exist, batch-only inputs
read the batch, every loss reaches something the stage trains). Errors are one :class:`SpecError` /
:class:`ShapeError` paragraph naming the spec path.
"""
from __future__ import annotations

import graphlib
import inspect
from typing import Any, Optional

import torch
from torch import nn

from ..capture import TracedNetwork
from ..errors import KDGraphError, ShapeError, SpecError, did_you_mean
from ..methods.args import check_args
from ..methods.progress import Progress, ScheduledArg, ScheduledValue
from ..methods.registry import ADAPTERS, DATA_WRAPPERS, LOSSES, TRANSFORMS
from ..spec import Spec, Tap, parse_tap
from ..spec.schedule import Schedule, is_schedule
from .report import Shape

__all__ = ["Prepared", "bind_inputs"]


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
        #: the stages' progress, read by scheduled weights (``schedules``) and scheduled loss arguments
        self.progress = Progress()
        self.schedules = nn.ModuleDict()
        self._check_num_classes()
        self._build_adapters()
        self._build_losses_and_transforms()
        self._check_wiring()
        self._check_soft_targets()

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
        if tap.path in self.spec.input.named:
            return (self.batch_shape[0], *self.spec.input.named[tap.path].shape)
        if tap.path == "images":
            return self.batch_shape
        if tap.path == "targets":
            return (self.batch_shape[0],)
        return None

    # ---------------------------------------------------------------- adapters
    def _adapter_order(self) -> list[str]:
        """Adapters with each one after those it reads (inputs and ``match``); among the ready ones, spec order."""
        index = {name: i for i, name in enumerate(self.spec.adapters)}
        deps = {name: [t.path for t in map(parse_tap, [*ad.inputs.values(), *([ad.match] if ad.match else [])])
                       if t.source == "adapter"]
                for name, ad in self.spec.adapters.items()}
        sorter = graphlib.TopologicalSorter(deps)
        try:
            sorter.prepare()
        except graphlib.CycleError as e:
            cycle = list(reversed(e.args[1][:-1]))  # graphlib lists dependency -> reader; say reader -> dependency
            start = min(range(len(cycle)), key=lambda i: index[cycle[i]])
            cycle = cycle[start:] + cycle[:start]
            raise SpecError(f"adapters form a cycle: {' -> '.join(cycle + cycle[:1])}. An adapter may read another "
                            f"adapter's output only if that one does not (directly or not) read it back.") from None
        order: list[str] = []
        ready: list[str] = []
        while sorter.is_active():
            ready = sorted([*ready, *sorter.get_ready()], key=index.__getitem__)
            order.append(ready.pop(0))
            sorter.done(order[-1])
        return order

    def _build_adapters(self) -> None:
        for name in self._adapter_order():
            ad = self.spec.adapters[name]
            where = f"adapters.{name}"
            cls = ADAPTERS.get(ad.type, where=f"{where}.type")
            raw, scheduled = self._split_schedules(dict(ad.args), ("adapters", name, "args"))
            given = check_args(cls, raw, ("adapters", name), self.spec, f"adapter {name!r} ({ad.type})")
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
            self._schedule_args(module, scheduled, cls, ("adapters", name, "args"), raw)
            self.adapters[name] = module
            self.adapter_inputs[name] = bound
            self.adapter_args[name] = {**args, **{k: sch.describe() for k, sch in scheduled.items()}}  # as reported
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
                raw, scheduled = self._split_schedules(dict(ls.args), ("stages", si, "losses", li, "args"))
                args = check_args(cls, raw, ("stages", si, "losses", li), self.spec, f"loss {ls.name!r} ({ls.type})")
                check = getattr(cls, "check_shapes", None)
                if check is not None:  # a check that takes ``args`` sees the spec's validated arguments
                    if "args" in inspect.signature(check).parameters:
                        check(shapes, bound, where, args=args)
                    else:
                        check(shapes, bound, where)
                for key in getattr(cls, "module_args", ()):
                    if isinstance(args.get(key), str):
                        args[key] = self._network_module(args[key], self.spec.where("stages", si, "losses", li,
                                                                                    "args", key))
                per_stage[ls.name] = _instantiate(cls, args, where)
                self._schedule_args(per_stage[ls.name], scheduled, cls, ("stages", si, "losses", li, "args"), raw)
                if isinstance(ls.weight, Schedule):
                    if stage.name not in self.schedules:
                        self.schedules[stage.name] = nn.ModuleDict()
                    self.schedules[stage.name][ls.name] = ScheduledValue(ls.weight, self.progress)
                self.loss_inputs[(stage.name, ls.name)] = bound
            self.losses[stage.name] = per_stage
            if stage.transform is not None and self.spec.input.named:
                raise SpecError(f"{self.spec.where('stages', si, 'transform')}: a stage transform acts on images, "
                                f"but this spec's networks take named inputs ({', '.join(self.spec.input.named)}); "
                                f"remove the transform (prepare such inputs in your data pipeline)")
            if stage.transform is not None:
                cls = TRANSFORMS.get(stage.transform.type, where=f"stages[{si}].transform.type")
                args = check_args(cls, dict(stage.transform.args), ("stages", si, "transform"), self.spec,
                                  f"transform {stage.transform.type!r}")
                self.transforms[stage.name] = _instantiate(cls, args, f"stages[{si}].transform")

    def _split_schedules(self, args: dict[str, Any], loc: tuple) -> tuple[dict[str, Any], dict[str, Schedule]]:
        """Args with scheduled values replaced by their start value (checked as such), and the schedules."""
        scheduled: dict[str, Schedule] = {}
        for key, value in args.items():
            if is_schedule(value):
                try:
                    scheduled[key] = Schedule.model_validate(value)
                except ValueError as e:
                    errs = getattr(e, "errors", lambda: [{"loc": (), "msg": str(e)}])()
                    at = self.spec.where(*loc, key, *errs[0]["loc"])
                    raise SpecError(f"{at}: invalid schedule: {errs[0]['msg']}. A schedule is {{schedule: "
                                    f"linear_warmup | linear | cosine, to, epochs, from?, start?, per?, "
                                    f"count_from?}}") from None
        for key, sch in scheduled.items():  # checked at its start value here, at its end value once built
            args[key] = sch.initial
        return args, scheduled

    def _schedule_args(self, module: nn.Module, scheduled: dict[str, Schedule], cls: type, loc: tuple,
                       raw: dict[str, Any]) -> None:
        """Check each scheduled argument at its end value too, then let the schedule set it before every call."""
        for key, sch in scheduled.items():
            check_args(cls, {**raw, key: sch.to}, loc[:-1], self.spec, f"{cls.__name__} (schedule end value)")
            if not isinstance(getattr(module, key, None), float):
                raise SpecError(f"{self.spec.where(*loc, key)}: {cls.__name__} keeps no number attribute {key!r}, "
                                f"so this argument cannot follow a schedule; give a number")
            module.register_forward_pre_hook(ScheduledArg(key, sch, self.progress))

    def _network_module(self, text: str, where: str) -> nn.Module:
        """The module a ``module_args`` argument names (``teacher:layer4.2.bn2``), for the loss's constructor."""
        try:
            tap = parse_tap(text)
        except (ValueError, SpecError) as e:
            raise SpecError(f"{where}: {e}") from None
        if tap.source not in ("teacher", "student") or "@" in text or tap.call is not None or tap.op is not None \
                or not tap.path:
            raise SpecError(f"{where}: {text!r} must name a module of a network, e.g. 'teacher:layer4.2.bn2' "
                            f"(no @input/@output, no #call)")
        module = self.nets[tap.source].module
        names = [n for n, _ in module.named_modules() if n]
        if tap.path not in names:
            raise SpecError(f"{where}: the {tap.source} has no module {tap.path!r}.{did_you_mean(tap.path, names)}")
        return module.get_submodule(tap.path)

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
                    allowed = {"images", "targets", *self.spec.input.named, *wrapper_keys, *getattr(cls, "batch_keys", ()), *declared}
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

    def _check_soft_targets(self) -> None:
        """With mixup / cutmix (``data.augment``) the targets are soft: every loss or adapter input bound to
        ``batch:targets`` must be one its class lists in ``soft_target_inputs``."""
        aug = self.spec.data.augment
        if aug is None or not aug.mixes:
            return
        option = f"data.augment.{aug.mixes[0]}"
        readers = [(self.spec.where('stages', si, 'losses', li, 'inputs', k), f"loss {ls.name!r} ({ls.type})",
                    LOSSES.get(ls.type), k, text)
                   for si, stage in enumerate(self.spec.stages) for li, ls in enumerate(stage.losses)
                   for k, text in self.loss_inputs[(stage.name, ls.name)].items()]
        readers += [(self.spec.where('adapters', name, 'inputs', k), f"adapter {name!r} ({ad.type})",
                     ADAPTERS.get(ad.type), k, text)
                    for name, ad in self.spec.adapters.items() for k, text in ad.inputs.items()]
        for where, what, cls, k, text in readers:
            tap = parse_tap(text)
            if tap.source == "batch" and tap.path == "targets" and k not in getattr(cls, "soft_target_inputs", ()):
                raise SpecError(f"{where}: {what} reads class labels ({k!r} = 'batch:targets'), but with {option} "
                                f"the targets are soft (B x num_classes probabilities) and this {what.split()[0]} "
                                f"takes only class indices (its soft_target_inputs: "
                                f"{', '.join(getattr(cls, 'soft_target_inputs', ())) or 'none'}). Remove "
                                f"{' / '.join('data.augment.' + m for m in aug.mixes)}, or this term")

    def _depends_on_trained(self, text: str, trained: set[str]) -> bool:
        tap = parse_tap(text)
        if tap.source == "student":
            return "student" in trained
        if tap.source == "adapter":
            return tap.path in trained or any(self._depends_on_trained(t, trained)
                                              for t in self.adapter_inputs.get(tap.path, {}).values())
        return False
