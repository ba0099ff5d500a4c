"""The spec: a YAML file validated by pydantic v2 (``extra="forbid"`` everywhere).

This module knows nothing of torch.fx. It parses the tap grammar (see :class:`Tap`), loads YAML
safely (a spec never executes code) and turns validation errors into one :class:`SpecError`
whose lines name the field path (``stages[0].losses[1].inputs``), the YAML line, what was wrong
and what is allowed.
"""
from __future__ import annotations

import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import SpecError, did_you_mean

# --------------------------------------------------------------------------------------------
# Tap grammar
# --------------------------------------------------------------------------------------------

TAP_GRAMMAR = """\
tap      := network ":" target | "adapter:" NAME ["." INDEX] | "batch:" NAME
network  := "teacher" | "student"
target   := "@output" | "@input"                      the whole network's output (logits) / input
          | MODPATH ["#" CALL] ["@output" | "@input"]  a module call (default: its last call, output)
          | [MODPATH] "/" OP                          a functional op inside MODPATH's forward
MODPATH  := PART ("." PART)*   PART := identifier | integer (negative counts from the end)
OP       := the op's fx name in that scope: add, add_1, flatten, ...
examples: teacher:layer4   student:layer4.-1   student:fc@input   teacher:layer1.0/add
          student:layer1.0.relu#0   adapter:paraphraser   adapter:abf4.1   batch:targets"""

_IDENT = r"[A-Za-z_]\w*"
_PART = rf"(?:{_IDENT}|-?\d+)"
_MODPATH = rf"{_PART}(?:\.{_PART})*"
_NET_RE = re.compile(r"^(teacher|student):(.*)$")
_OP_RE = re.compile(rf"^(?P<path>{_MODPATH})?/(?P<op>{_IDENT})$")
_MOD_RE = re.compile(rf"^(?P<path>{_MODPATH})(?:#(?P<call>\d+))?(?:@(?P<io>input|output))?$")
_WHOLE_RE = re.compile(r"^@(?P<io>input|output)$")
_ADAPTER_RE = re.compile(rf"^adapter:(?P<name>{_IDENT})(?:\.(?P<index>\d+))?$")
_BATCH_RE = re.compile(rf"^batch:(?P<name>{_IDENT})$")


@dataclass(frozen=True)
class Tap:
    """A parsed tap. ``text`` is what the user wrote; every error quotes it."""

    text: str
    source: Literal["teacher", "student", "adapter", "batch"]
    path: str = ""  # module path ("" = whole network), adapter name or batch key
    io: Literal["input", "output"] = "output"
    call: Optional[int] = None  # which call of a module that runs several times; None = last
    op: Optional[str] = None  # functional op name inside ``path``
    index: Optional[int] = None  # element of an adapter's tuple output

    @property
    def network(self) -> Optional[str]:
        return self.source if self.source in ("teacher", "student") else None

    def __str__(self) -> str:
        return self.text


def parse_tap(text: str) -> Tap:
    """Parse one tap string; raise ``ValueError`` (turned into a SpecError) if it fits no rule."""
    if not isinstance(text, str):
        raise ValueError(f"a tap is a string, got {type(text).__name__}")
    s = text.strip()
    m = _NET_RE.match(s)
    if m:
        net, target = m.group(1), m.group(2)
        if w := _WHOLE_RE.match(target):
            return Tap(s, net, "", io=w.group("io"))
        if o := _OP_RE.match(target):
            return Tap(s, net, o.group("path") or "", op=o.group("op"))
        if mm := _MOD_RE.match(target):
            call = mm.group("call")
            return Tap(s, net, mm.group("path"), io=mm.group("io") or "output",
                       call=int(call) if call is not None else None)
    elif a := _ADAPTER_RE.match(s):
        idx = a.group("index")
        return Tap(s, "adapter", a.group("name"), index=int(idx) if idx is not None else None)
    elif b := _BATCH_RE.match(s):
        return Tap(s, "batch", b.group("name"))
    raise ValueError(f"{text!r} is not a tap. The grammar:\n{TAP_GRAMMAR}")


TapStr = Annotated[str, Field(description="a tap, see kdgraph.spec.TAP_GRAMMAR")]


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelRef(_Strict):
    """A network: ``torchvision:resnet34`` or a user factory ``package.module:factory``."""

    model: str = Field(description="'torchvision:NAME' or 'package.module:factory'")
    weights: Optional[str] = Field(
        None, description="torchvision weights enum name (IMAGENET1K_V1, DEFAULT) or a local file path; "
                          "loaded when training starts, never when compiling")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the factory")
    pretrain: Optional["PretrainSpec"] = Field(
        None, description="train this network with cross-entropy on the spec's data when its weights file does "
                          "not exist yet, and write it there (kdgraph train; see kdgraph.train.pretrain). "
                          "Needs weights: a local path or 'cache:NAME' (kdgraph's cache folder)")

    @field_validator("model")
    @classmethod
    def _has_colon(cls, v: str) -> str:
        if ":" not in v or v.startswith(":") or v.endswith(":"):
            raise ValueError(f"{v!r} is not a model reference: write 'torchvision:resnet18' or "
                             f"'package.module:factory'")
        return v

    @model_validator(mode="after")
    def _pretrain_needs_weights(self) -> "ModelRef":
        if self.pretrain is not None and not self.weights:
            raise ValueError("pretrain needs weights: where the trained network is kept, e.g. "
                             "weights: 'cache:my_teacher' (kdgraph's cache folder) or a local .pt path")
        return self


class LeafModule(_Strict):
    """A module class that fx must not trace into (it is called as one node), with the reason."""

    module: str = Field(description="'package.module:ClassName'")
    reason: str = Field(min_length=3, description="why fx cannot (or should not) trace it")


class InputSpec(_Strict):
    channels: int = Field(3, ge=1)
    size: tuple[int, int] = (224, 224)
    num_classes: int = Field(1000, ge=1)


class AdapterSpec(_Strict):
    """A module between taps and losses. Declared once; stages reference it by name."""

    type: str
    inputs: dict[str, TapStr] = Field(default_factory=dict)
    match: Optional[TapStr] = Field(
        None, description="a tap whose shape the adapter's output must have; channel args left out follow from it")
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("inputs")
    @classmethod
    def _taps(cls, v: dict[str, str]) -> dict[str, str]:
        for t in v.values():
            parse_tap(t)
        return v

    @field_validator("match")
    @classmethod
    def _match(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            parse_tap(v)
        return v


class LossSpec(_Strict):
    name: Optional[str] = Field(None, description="the term's name in out.terms (default: type)")
    type: str
    inputs: dict[str, TapStr] = Field(default_factory=dict)
    weight: float = 1.0
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("inputs")
    @classmethod
    def _taps(cls, v: dict[str, str]) -> dict[str, str]:
        for t in v.values():
            parse_tap(t)
        return v

    @model_validator(mode="after")
    def _default_name(self) -> "LossSpec":
        if self.name is None:
            self.name = self.type
        if not re.fullmatch(_IDENT, self.name):
            raise ValueError(f"loss name {self.name!r} must be an identifier (letters, digits, _)")
        return self


class TransformSpec(_Strict):
    type: str
    args: dict[str, Any] = Field(default_factory=dict)


class OptimizerSpec(_Strict):
    type: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    nesterov: bool = False


class SchedulerSpec(_Strict):
    type: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: list[int] = Field(default_factory=list)
    gamma: float = 0.1


class PretrainSpec(_Strict):
    """Plain cross-entropy training of one network (a teacher to distil from), run once and cached."""

    epochs: int = Field(1, ge=1)
    batch_size: int = Field(128, ge=1, description="per process")
    reference_world_size: int = Field(1, ge=1)
    optimizer: OptimizerSpec
    scheduler: Optional[SchedulerSpec] = None
    train_subset: Optional[int] = Field(None, ge=1, description="use only the first N training images "
                                                                 "(default: data.train_subset)")
    augment: bool = Field(True, description="augment the training images as for the students (in-memory data sets: "
                                            "random translation and flip); off converges faster in few epochs")
    seed: int = Field(0, description="seed of this pretraining run (initialisation and data order); independent "
                                     "of runtime.seed, so students trained with several seeds share one network")


ModelRef.model_rebuild()


class StageSpec(_Strict):
    """One training stage: what trains, with which losses, for how long."""

    name: str
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(256, ge=1, description="per process (per GPU)")
    reference_world_size: int = Field(
        1, ge=1, description="number of processes the reference lr was set for; the trainer scales lr "
                             "linearly by world_size / reference_world_size")
    optimizer: OptimizerSpec
    scheduler: Optional[SchedulerSpec] = None
    train: list[str] = Field(default_factory=lambda: ["student"],
                             description="'student' and/or adapter names whose parameters train")
    transform: Optional[TransformSpec] = None
    losses: list[LossSpec] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _ident(cls, v: str) -> str:
        if not re.fullmatch(_IDENT, v):
            raise ValueError(f"stage name {v!r} must be an identifier (letters, digits, _)")
        return v

    @model_validator(mode="after")
    def _unique_losses(self) -> "StageSpec":
        seen: set[str] = set()
        for i, loss in enumerate(self.losses):
            if loss.name in seen:
                raise ValueError(f"losses[{i}]: two losses are named {loss.name!r}; give each a distinct 'name'")
            seen.add(loss.name)
        return self


class DataWrapperSpec(_Strict):
    type: str
    args: dict[str, Any] = Field(default_factory=dict)


class DataSpec(_Strict):
    """Where the training data is. ``dataset`` picks the loader; ``root`` may be overridden by --data."""

    dataset: Literal["imagenet", "fashion_mnist", "synthetic"] = "imagenet"
    root: Optional[str] = None
    workers: int = Field(8, ge=0)
    wrapper: Optional[DataWrapperSpec] = None
    train_subset: Optional[int] = Field(None, ge=1, description="use only the first N training images")
    val_subset: Optional[int] = Field(None, ge=1, description="use only the first N validation images")


class RuntimeSpec(_Strict):
    amp: Literal["off", "bf16", "fp16"] = "off"
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    seed: int = 0
    deterministic: bool = False
    eval_every: int = Field(1, ge=1, description="kdgraph train: evaluate every N epochs of a stage (and always "
                                                 "after its last epoch)")
    eval_teacher: bool = Field(False, description="kdgraph train: evaluate the teacher on the validation split "
                                                  "once before training and record its top-1/top-5")

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        # YAML 1.1 reads an unquoted `off` as False
        return "off" if v is False else v


class Reference(_Strict):
    """The published figure this spec reproduces (documentation, printed beside results)."""

    top1: Optional[float] = None
    paper_top1: Optional[float] = None
    source: str = ""


class Spec(_Strict):
    """A whole distillation setup. See README "The spec" for every field."""

    version: Literal[1] = 1
    name: str
    description: str = ""
    input: InputSpec = Field(default_factory=InputSpec)
    teacher: ModelRef
    student: ModelRef
    leaf_modules: list[LeafModule] = Field(default_factory=list)
    adapters: dict[str, AdapterSpec] = Field(default_factory=dict)
    stages: list[StageSpec] = Field(min_length=1)
    init_from: Optional[str] = Field(
        None, description="checkpoint (kdgraph's, or a plain student state_dict) loaded into the student "
                          "and matching adapters before the first stage; relative to the spec file")
    data: DataSpec = Field(default_factory=DataSpec)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    reference: Optional[Reference] = None

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, v: dict[str, AdapterSpec]) -> dict[str, AdapterSpec]:
        for name in v:
            if not re.fullmatch(_IDENT, name) or name in ("student", "teacher"):
                raise ValueError(f"adapter name {name!r} must be an identifier other than 'student'/'teacher'")
        return v

    @model_validator(mode="after")
    def _cross_refs(self) -> "Spec":
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be distinct, got {names}")
        allowed = ["student", *self.adapters]
        for si, stage in enumerate(self.stages):
            for t in stage.train:
                if t not in allowed:
                    raise ValueError(f"stages[{si}].train: {t!r} is neither 'student' nor an adapter."
                                     f"{did_you_mean(t, allowed)} Allowed: {', '.join(allowed)}")
            taps = [(f"stages[{si}].losses[{li}].inputs.{k}", v)
                    for li, loss in enumerate(stage.losses) for k, v in loss.inputs.items()]
            for where, text in taps:
                self._check_adapter_ref(where, text)
        for name, ad in self.adapters.items():
            for k, text in ad.inputs.items():
                self._check_adapter_ref(f"adapters.{name}.inputs.{k}", text)
            if ad.match:
                self._check_adapter_ref(f"adapters.{name}.match", ad.match)
        return self

    def _check_adapter_ref(self, where: str, text: str) -> None:
        tap = parse_tap(text)
        if tap.source == "adapter" and tap.path not in self.adapters:
            raise ValueError(f"{where}: {text!r} names adapter {tap.path!r}, which is not declared under "
                             f"'adapters'.{did_you_mean(tap.path, self.adapters)}")

    def stage(self, key: int | str) -> StageSpec:
        if isinstance(key, int):
            return self.stages[key]
        for s in self.stages:
            if s.name == key:
                return s
        raise SpecError(f"no stage {key!r} in spec {self.name!r}.{did_you_mean(str(key), [s.name for s in self.stages])} "
                        f"Stages: {', '.join(s.name for s in self.stages)}")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _yaml_lines(text: str) -> dict[tuple, int]:
    """Map each field path (tuple of keys / indices) to its 1-based YAML line."""
    lines: dict[tuple, int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines

    def walk(node, path: tuple) -> None:
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = k.value
                lines[path + (key,)] = k.start_mark.line + 1
                walk(v, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + (i,))

    if root is not None:
        walk(root, ())
    return lines


def _fmt_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _unwrap(ann: Any) -> list[Any]:
    origin = typing.get_origin(ann)
    if origin is Annotated:
        return _unwrap(typing.get_args(ann)[0])
    if origin in (Union, types.UnionType):
        return [x for a in typing.get_args(ann) for x in _unwrap(a)]
    if origin in (list, tuple):
        return [x for a in typing.get_args(ann) for x in _unwrap(a)]
    if origin is dict:
        return _unwrap(typing.get_args(ann)[1])
    return [ann]


def _model_at(loc: tuple, root: type[BaseModel] | None = None) -> Optional[type[BaseModel]]:
    """The pydantic model class that holds the field at ``loc`` (to list the allowed keys)."""
    current: list[Any] = [root or Spec]
    for part in loc[:-1]:
        nxt: list[Any] = []
        for c in current:
            if isinstance(c, type) and issubclass(c, BaseModel):
                if isinstance(part, str) and part in c.model_fields:
                    nxt.extend(_unwrap(c.model_fields[part].annotation))
            else:
                nxt.append(c)  # list index / dict key: stay on the element type
        current = nxt or current
        current = [c for c in current if isinstance(c, type)]
    models = [c for c in current if isinstance(c, type) and issubclass(c, BaseModel)]
    return models[0] if models else None


def _describe(err: dict, lines: dict[tuple, int], root: type[BaseModel] | None = None) -> str:
    """One line for one pydantic error: field path, YAML line, what was wrong, what is allowed.
    ``root`` is the model validated (default :class:`Spec`), to list the keys allowed where one is unknown."""
    loc = tuple(err["loc"])
    where = _fmt_loc(loc)
    line = lines.get(loc) or lines.get(loc[:-1])
    at = f" (line {line})" if line else ""
    kind = err["type"]
    if kind == "extra_forbidden":
        model = _model_at(loc, root)
        allowed = sorted(model.model_fields) if model else []
        key = str(loc[-1])
        hint = did_you_mean(key, allowed)
        return f"{where}{at}: unknown key {key!r}.{hint} Allowed here: {', '.join(allowed)}."
    if kind == "missing":
        return f"{where}{at}: required field is missing."
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    got = err.get("input")
    shown = "" if kind in ("value_error", "assertion_error") or isinstance(got, (dict, list)) else f" (got {got!r})"
    return f"{where}{at}: {msg}{shown}"


def validate_spec(data: Any, source: str = "<spec>", text: str | None = None) -> Spec:
    """Validate a parsed spec (a dict) into :class:`Spec`, raising one readable :class:`SpecError`."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a spec is a YAML mapping (key: value lines), got {type(data).__name__}")
    try:
        return Spec.model_validate(data)
    except ValidationError as e:
        lines = _yaml_lines(text) if text else {}
        problems = [_describe(err, lines) for err in e.errors()]
        plural = "s" if len(problems) > 1 else ""
        raise SpecError(f"{source}: invalid spec ({len(problems)} problem{plural}):\n  - "
                        + "\n  - ".join(problems)) from None


def load_spec(source: str | Path | dict | Spec, overrides: Iterable[str] = ()) -> Spec:
    """Load a spec from a YAML path, a YAML string, a dict or a :class:`Spec` (returned as is).

    Relative paths inside the spec (``init_from``, local weight files) are resolved against the
    spec file's folder. ``overrides``: ``KEY=VALUE`` strings applied after loading, with the
    grammar and errors of the CLI's ``--set`` (see :mod:`kdgraph.overrides`), e.g.
    ``["stages.main.losses.crd.args.num_samples=50"]``; the result is a new, validated spec.
    """
    if overrides:
        from .overrides import apply_overrides

        return apply_overrides(load_spec(source), overrides)
    if isinstance(source, Spec):
        return source
    if isinstance(source, dict):
        return validate_spec(source)
    text: str
    origin = "<string>"
    base: Optional[Path] = None
    p = Path(str(source))
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and
                                    (source.endswith((".yaml", ".yml")) or p.exists())):
        if not p.exists():
            raise SpecError(f"spec file {str(p)!r} does not exist")
        text = p.read_text()
        origin = str(p)
        base = p.resolve().parent
    else:
        text = str(source)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{origin}: not valid YAML: {e}") from None
    spec = validate_spec(data, origin, text)
    if base is not None:
        spec = _resolve_paths(spec, base)
    return spec


def _resolve_paths(spec: Spec, base: Path) -> Spec:
    def fix(p: Optional[str]) -> Optional[str]:
        if p and (p.startswith("./") or p.startswith("../")):
            return str((base / p).resolve())
        return p

    spec.init_from = fix(spec.init_from)
    for ref in (spec.teacher, spec.student):
        ref.weights = fix(ref.weights)
    return spec
