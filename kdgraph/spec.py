"""The spec: a YAML file validated by pydantic v2 (``extra="forbid"`` everywhere).

This module knows nothing of torch.fx. It parses the tap grammar (see :class:`Tap`), loads YAML
safely (a spec never executes code) and turns validation errors into one :class:`SpecError`
whose lines name the field path (``stages[0].losses[1].inputs``), the YAML line, what was wrong
and what is allowed.
"""
from __future__ import annotations

import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Optional, Union

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError, field_validator,
                      model_validator)

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


def _no_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got the boolean {str(v).lower()} (YAML reads true/false/yes/no/on/off "
                         f"as booleans; write a number)")
    return v


#: an int / a finite float that refuses booleans (pydantic would take ``true`` as 1)
Int = Annotated[int, BeforeValidator(_no_bool)]
Float = Annotated[float, BeforeValidator(_no_bool)]

MAX_SIDE = 4096  # input.size: at most this many pixels per side
MAX_INPUT_VALUES = 2 ** 26  # channels x height x width of one input image (compile runs a batch of 2)
MAX_NAME = 100
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


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
    channels: Int = Field(3, ge=1, le=256)
    size: tuple[Annotated[Int, Field(ge=1, le=MAX_SIDE)], Annotated[Int, Field(ge=1, le=MAX_SIDE)]] = Field(
        (224, 224), description=f"[height, width], 1 to {MAX_SIDE} pixels each")
    num_classes: Int = Field(1000, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _bounded(self) -> "InputSpec":
        n = self.channels * self.size[0] * self.size[1]
        if n > MAX_INPUT_VALUES:
            raise ValueError(f"an input of {self.channels} x {self.size[0]} x {self.size[1]} = {n:,} values per image "
                             f"is more than kdgraph compiles ({MAX_INPUT_VALUES:,}, e.g. 3 x 4096 x 4096); "
                             f"use a smaller size or fewer channels")
        return self


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
    weight: Float = Field(1.0, description="a finite number multiplying the term")
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
    lr: Float = Field(gt=0)
    momentum: Float = Field(0.9, ge=0, le=1)
    weight_decay: Float = Field(0.0, ge=0)
    nesterov: bool = False


class SchedulerSpec(_Strict):
    type: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: list[Annotated[Int, Field(ge=1)]] = Field(
        default_factory=list, description="epochs (>= 1) after which the lr is multiplied by gamma")
    gamma: Float = Field(0.1, gt=0, description="the lr factor at each milestone, > 0")


class PretrainSpec(_Strict):
    """Plain cross-entropy training of one network (a teacher to distil from), run once and cached."""

    epochs: Int = Field(1, ge=1)
    batch_size: Int = Field(128, ge=1, description="per process")
    reference_world_size: Int = Field(1, ge=1)
    optimizer: OptimizerSpec
    scheduler: Optional[SchedulerSpec] = None
    train_subset: Optional[Int] = Field(None, ge=1, description="use only the first N training images "
                                                                 "(default: data.train_subset)")
    augment: bool = Field(True, description="augment the training images as for the students (in-memory data sets: "
                                            "random translation and flip); off converges faster in few epochs")
    seed: int = Field(0, description="seed of this pretraining run (initialisation and data order); independent "
                                     "of runtime.seed, so students trained with several seeds share one network")


ModelRef.model_rebuild()


class StageSpec(_Strict):
    """One training stage: what trains, with which losses, for how long."""

    name: str
    epochs: Int = Field(1, ge=1)
    batch_size: Int = Field(256, ge=1, description="per process (per GPU)")
    reference_world_size: Int = Field(
        1, ge=1, description="number of processes the reference lr was set for; the trainer scales lr "
                             "linearly by world_size / reference_world_size")
    optimizer: OptimizerSpec
    scheduler: Optional[SchedulerSpec] = None
    train: list[str] = Field(default_factory=lambda: ["student"], min_length=1,
                             description="'student' and/or adapter names whose parameters train (at least one)")
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
    workers: Int = Field(8, ge=0, le=256)
    wrapper: Optional[DataWrapperSpec] = None
    train_subset: Optional[Int] = Field(None, ge=1, description="use only the first N training images")
    val_subset: Optional[Int] = Field(None, ge=1, description="use only the first N validation images")


class RuntimeSpec(_Strict):
    amp: Literal["off", "bf16", "fp16"] = "off"
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    seed: Int = Field(0, ge=0, le=2 ** 63 - 1)
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

    top1: Optional[Float] = None
    paper_top1: Optional[Float] = None
    source: str = ""


class Spec(_Strict):
    """A whole distillation setup. See README "The spec" for every field."""

    version: Literal[1] = 1
    name: str = Field(description=f"the run's name, also a file and folder name (runs/<name>): letters, digits, "
                                  f"'_', '-', '.', at most {MAX_NAME} characters, not starting with '.' or '-', "
                                  f"no '..'")
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

    _lines: dict = PrivateAttr(default_factory=dict)  # field path (tuple) -> YAML line, when loaded from YAML

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not _NAME_RE.fullmatch(v) or ".." in v or len(v) > MAX_NAME:
            raise ValueError(f"name {v[:60]!r}{'...' if len(v) > 60 else ''} cannot be used: it becomes a file and "
                             f"folder name (runs/<name>, --emit-code), so it may hold only letters, digits, '_', '-' "
                             f"and '.', at most {MAX_NAME} characters, must not start with '.' or '-' and must not "
                             f"contain '..'")
        return v

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

    def where(self, *loc: str | int) -> str:
        """``stages[0].losses[1].args.temperature (line 12)``: a field path, with its YAML line when known."""
        line = None
        for n in range(len(loc), 0, -1):
            line = self._lines.get(tuple(loc[:n]))
            if line:
                break
        return _fmt_loc(tuple(loc)) + (f" (line {line})" if line else "")

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


MAX_DEPTH = 64  # nesting of YAML mappings / lists
MAX_SPEC_BYTES = 4 * 2 ** 20


class _Refused(Exception):
    """A YAML construct a spec may not use, at ``line``."""

    def __init__(self, line: int, msg: str):
        super().__init__(msg)
        self.line, self.msg = line, msg


class SpecLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, stricter: no duplicate keys, no anchors / aliases, nesting at most MAX_DEPTH.

    A duplicate key would silently replace the first (a second ``stages:`` drops the first list); aliases make
    exponentially large (an alias bomb) or recursive values; deep nesting exhausts Python's stack.
    """

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):  # noqa: D401 - PyYAML's signature
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise _Refused(event.start_mark.line + 1,
                           f"YAML anchors and aliases (&{event.anchor} / *{event.anchor}) are not allowed in a spec; "
                           f"write the value out where it is used")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(event.start_mark.line + 1,
                               f"the YAML nests deeper than {MAX_DEPTH} levels; a spec needs a handful")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                hash(key)
            except TypeError:
                raise _Refused(line, f"a mapping key must be a plain name, got a {type(key).__name__}") from None
            if key in seen:
                raise _Refused(line, f"duplicate key {key!r} (first at line {seen[key]}); each key may appear once "
                                     f"in a mapping (YAML would silently keep only the last one)")
            seen[key] = line
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, origin: str = "<string>") -> tuple[Any, dict[tuple, int]]:
    """Parse spec text with :class:`SpecLoader`: (data, field path -> 1-based YAML line)."""
    loader = None
    try:
        loader = SpecLoader(text)
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.reader.ReaderError as e:
        line = text[:e.position].count("\n") + 1
        code = e.character if isinstance(e.character, int) else ord(e.character)
        raise SpecError(f"{origin} (line {line}): character U+{code:04X} is not allowed in YAML text "
                        f"(control characters such as NUL are not); remove it") from None
    except _Refused as e:
        raise SpecError(f"{origin} (line {e.line}): {e.msg}.") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{origin}: not valid YAML: {e}") from None
    except RecursionError:
        raise SpecError(f"{origin}: the YAML nests too deeply to read; a spec needs a handful of levels") from None
    finally:
        if loader is not None:
            loader.dispose()
    lines: dict[tuple, int] = {}

    def walk(n, path: tuple) -> None:
        lines[path] = n.start_mark.line + 1
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                lines[path + (k.value,)] = k.start_mark.line + 1
                walk(v, path + (k.value,))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                walk(v, path + (i,))

    if node is not None:
        walk(node, ())
    return data, lines


def _yaml_lines(text: str) -> dict[tuple, int]:
    """Map each field path (tuple of keys / indices) to its 1-based YAML line."""
    try:
        return parse_yaml(text)[1]
    except SpecError:
        return {}


def _non_finite(data: Any, loc: tuple = ()) -> Optional[tuple]:
    """The path of the first NaN / inf number in ``data`` (YAML .nan / .inf), or None."""
    if isinstance(data, float) and not math.isfinite(data):
        return loc
    if isinstance(data, dict):
        items: Any = data.items()
    elif isinstance(data, (list, tuple)):
        items = enumerate(data)
    else:
        return None
    for k, v in items:
        found = _non_finite(v, loc + (k,))
        if found is not None:
            return found
    return None


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


def validate_spec(data: Any, source: str = "<spec>", text: str | None = None,
                  lines: dict[tuple, int] | None = None) -> Spec:
    """Validate a parsed spec (a dict) into :class:`Spec`, raising one readable :class:`SpecError`."""
    if not isinstance(data, dict):
        raise SpecError(f"{source} (top level): a spec is a YAML mapping (key: value lines: name, teacher, student, "
                        f"stages, ...), got a {type(data).__name__}")
    if lines is None:
        lines = _yaml_lines(text) if text else {}
    bad = _non_finite(data)
    if bad is not None:
        line = lines.get(bad)
        raise SpecError(f"{source}: invalid spec (1 problem):\n  - {_fmt_loc(bad)}{f' (line {line})' if line else ''}: "
                        f"{_nested_get(data, bad)} is not allowed; every number in a spec must be finite "
                        f"(no .nan / .inf)")
    try:
        spec = Spec.model_validate(data)
    except ValidationError as e:
        problems = [_describe(err, lines) for err in e.errors()]
        plural = "s" if len(problems) > 1 else ""
        raise SpecError(f"{source}: invalid spec ({len(problems)} problem{plural}):\n  - "
                        + "\n  - ".join(problems)) from None
    spec._lines = dict(lines)
    return spec


def _nested_get(data: Any, loc: tuple) -> Any:
    for part in loc:
        data = data[part]
    return data


def _looks_like_path(source: str) -> bool:
    """Whether a string names a spec file (rather than being the spec's YAML text)."""
    if "\n" in source or len(source) > 4096:
        return False
    if source.endswith((".yaml", ".yml")):
        return True
    if not source.strip():
        return False
    try:
        return Path(source).exists()
    except (OSError, ValueError):  # "File name too long", an embedded NUL: spec text, not a path
        return False


def _read_spec_file(p: Path) -> str:
    try:
        if not p.exists():
            raise SpecError(f"spec file {str(p)!r} does not exist")
        if p.is_dir():
            raise SpecError(f"spec {str(p)!r} is a directory, not a YAML file; pass the spec file inside it")
        if p.stat().st_size > MAX_SPEC_BYTES:
            raise SpecError(f"spec file {str(p)!r} is {p.stat().st_size:,} bytes; a spec is a short YAML file "
                            f"(at most {MAX_SPEC_BYTES:,} bytes)")
        raw = p.read_bytes()
    except OSError as e:
        raise SpecError(f"spec file {str(p)!r} cannot be read: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise SpecError(f"spec file {str(p)!r} (line {line}) is not UTF-8 text: byte {raw[e.start]:#04x} at offset "
                        f"{e.start}; save the file as UTF-8") from None


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
    if isinstance(source, Path) or (isinstance(source, str) and _looks_like_path(source)):
        p = Path(source)
        text = _read_spec_file(p)
        origin = str(p)
        base = p.resolve().parent
    elif isinstance(source, str):
        text = source
        if len(text.encode("utf-8", "replace")) > MAX_SPEC_BYTES:
            raise SpecError(f"the spec text is {len(text):,} characters; a spec is a short YAML document "
                            f"(at most {MAX_SPEC_BYTES:,} bytes)")
    else:
        raise SpecError(f"a spec is a YAML file path, YAML text, a dict or a kdgraph.Spec, got {type(source).__name__}")
    data, lines = parse_yaml(text, origin)
    if data is None:
        raise SpecError(f"{origin}: the spec is empty; a spec is a YAML mapping with at least name, teacher, "
                        f"student and stages")
    spec = validate_spec(data, origin, lines=lines)
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
