"""The spec's schema: pydantic v2 models with ``extra="forbid"`` everywhere and bounds on every number.

Knows nothing of torch.fx or YAML; :mod:`kdgraph.spec.validate` turns its validation errors into one readable
:class:`SpecError`.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional

from pydantic import Field, PrivateAttr, field_validator, model_validator

from ..errors import SpecError, did_you_mean
from .augment import check_augment
from .base import Float, Int, _no_bool, _Strict  # noqa: F401 - re-exported
from .data_section import DataSpec, DataWrapperSpec, HoldoutSpec  # noqa: F401 - re-exported
from .for_each import expand_for_each
from .location import fmt_loc
from .on_policy_section import OnPolicySpec
from .runtime_section import RuntimeSpec  # noqa: F401 - re-exported
from .recipe import ClipSpec, EmaSpec, OptimizerSpec, SchedulerSpec, check_stage_recipe  # noqa: F401
from .schedule import Schedule
from .taps import _IDENT, TapStr, parse_tap


MAX_SIDE = 4096  # input.size: at most this many pixels per side
MAX_INPUT_VALUES = 2 ** 26  # channels x height x width of one input image (compile runs a batch of 2)
MAX_NAME = 100
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class ModelRef(_Strict):
    """A network: ``torchvision:resnet34``, ``timm:resnet34``, or a user factory ``package.module:factory``."""

    model: str = Field(description="'torchvision:NAME', 'timm:NAME' (timm.create_model, random init), "
                                   "'hf:CLASS' (a transformers Auto/model class, built from kwargs.config), "
                                   "'kdgraph.zoo:NAME', 'registered:NAME' or 'package.module:factory'")
    weights: Optional[str] = Field(
        None, description="torchvision weights enum name (IMAGENET1K_V1, DEFAULT) or a local file path; "
                          "loaded when training starts, never when compiling")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the factory")
    sha256: Optional[str] = Field(None, pattern=r"^[0-9a-fA-F]{64}$", description="the weights file's sha256 "
                                  "(sha256sum FILE): checked over the whole file before it is read, a mismatch "
                                  "refused (a .gguf teacher, any downloaded file)")
    capture: Literal["auto", "fx", "export"] = Field(
        "auto", description="how the network is captured as a graph: 'fx' (torch.fx symbolic tracing), "
                            "'export' (torch.export, non-strict) or 'auto' (fx, and torch.export when fx fails)")
    tokenizer: Optional[str] = Field(
        None, description="a local folder with this network's tokenizer.json (save_pretrained): token losses "
                          "refuse a teacher and a student whose tokenizers differ (default: data.tokenizer)")
    pretrain: Optional["PretrainSpec"] = Field(
        None, description="train this network with cross-entropy on the spec's data when its weights file does "
                          "not exist yet, and write it there (kdgraph train; see kdgraph.models.weights). "
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


#: the dtypes a named input may have
InputDtype = Literal["int64", "int32", "float32", "float16", "bfloat16", "bool"]
MAX_NAMED_INPUTS = 16


class NamedInput(_Strict):
    """One named input of networks that take several (a tokenizer's ``input_ids``, ``attention_mask``, ...)."""

    shape: list[Annotated[Int, Field(ge=1, le=1_000_000)]] = Field(
        max_length=8, description="one example's shape, without the batch dimension (e.g. [128]: 128 tokens)")
    dtype: InputDtype = Field("float32", description="the tensor's dtype: int64, int32, float32, float16, "
                                                     "bfloat16 or bool")
    high: Optional[Int] = Field(None, ge=1, le=10_000_000, description=(
        "integer inputs only: capture's example values are drawn from [0, high) (the vocabulary size for "
        "input_ids, 2 for a mask or token types; default 2)"))


class InputSpec(_Strict):
    named: dict[str, NamedInput] = Field(default_factory=dict, description=(
        "the networks' named inputs, passed as keyword arguments (model(**inputs)), e.g. input_ids, "
        "attention_mask, token_type_ids for a BERT; when given, channels and size are not used, batches are "
        "dicts with these keys and 'labels' (or 'targets'), and batch:NAME taps read them"))
    channels: Int = Field(3, ge=1, le=256)
    size: tuple[Annotated[Int, Field(ge=1, le=MAX_SIDE)], Annotated[Int, Field(ge=1, le=MAX_SIDE)]] = Field(
        (224, 224), description=f"[height, width], 1 to {MAX_SIDE} pixels each")
    num_classes: Int = Field(1000, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _bounded(self) -> "InputSpec":
        if len(self.named) > MAX_NAMED_INPUTS:
            raise ValueError(f"named: {len(self.named)} inputs; at most {MAX_NAMED_INPUTS}")
        for key, ni in self.named.items():
            if not re.fullmatch(_IDENT, key) or key in ("images", "targets", "labels"):
                raise ValueError(f"named: input name {key!r} must be an identifier other than images, targets "
                                 f"and labels (the batch's label key)")
            values = 1
            for d in ni.shape:
                values *= d
            if values > MAX_INPUT_VALUES:
                raise ValueError(f"named.{key}.shape: {ni.shape} is {values:,} values per example, more than "
                                 f"kdgraph compiles ({MAX_INPUT_VALUES:,})")
            if ni.high is not None and not ni.dtype.startswith("int"):
                raise ValueError(f"named.{key}.high: only integer inputs (int64, int32) take high; "
                                 f"this one is {ni.dtype}")
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
    weight: Float | Schedule = Field(1.0, description="a finite number multiplying the term, or a schedule of it "
                                     "({schedule: linear_warmup, epochs: 20, to: 8.0}; see kdgraph.spec.schedule)")
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
    clip_grad: Optional[ClipSpec] = Field(None, description="gradient clipping by norm or value before each "
                                                            "optimizer step (of the unscaled gradients under fp16)")
    accumulate: Int = Field(1, ge=1, le=4096, description="micro-batches of batch_size per optimizer step (the "
                                                         "update of one batch accumulate times larger)")
    ema: Optional[EmaSpec] = Field(None, description="an exponential moving average of the student")
    on_policy: Optional[OnPolicySpec] = Field(None, description="causal LMs: a share of batches completed by the "
                                              "student (or teacher) before the step (kdgraph.spec.on_policy_section)")

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
        check_stage_recipe(self)
        return self


class Reference(_Strict):
    """The published figure this spec reproduces (documentation, printed beside results)."""

    top1: Optional[Float] = None
    paper_top1: Optional[Float] = None
    metrics: dict[str, Float] = Field(default_factory=dict, description="other published figures of this spec's "
                                      "student by metric name, in percent (e.g. GLUE test: mcc, f1, accuracy)")
    teacher_metrics: dict[str, Float] = Field(default_factory=dict, description="the same figures of its teacher")
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

    @model_validator(mode="before")
    @classmethod
    def _for_each(cls, data: Any) -> Any:
        # adapters / losses written once with for_each (kdgraph.spec.for_each); validate_spec expanded them already
        return expand_for_each(data)[0]

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

    @model_validator(mode="after")
    def _augment_fits(self) -> "Spec":
        check_augment(self)
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
        return fmt_loc(tuple(loc)) + (f" (line {line})" if line else "")

    def stage(self, key: int | str) -> StageSpec:
        if isinstance(key, int):
            return self.stages[key]
        for s in self.stages:
            if s.name == key:
                return s
        raise SpecError(f"no stage {key!r} in spec {self.name!r}.{did_you_mean(str(key), [s.name for s in self.stages])} "
                        f"Stages: {', '.join(s.name for s in self.stages)}")
