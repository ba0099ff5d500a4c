"""The search space of ``kdgraph tune``: a validated YAML file naming ``--set`` override paths and their ranges.

    validation: {count: 2000, seed: 0}         # the held-out training images trials are scored on (data.holdout)
    sampler: {type: tpe, seed: 0, startup_trials: 5}
    pruner: {type: median, startup_trials: 3, warmup_epochs: 1}   # or successive_halving, or none
    params:
      stages.main.losses.l2.weight: {type: float, low: 0.5, high: 30, log: true}
      stages.main.optimizer.lr: {type: float, low: 0.0005, high: 0.01, log: true}
      stages.main.losses.kd.args.temperature: {type: float, low: 1, high: 8}
      stages.main.epochs: {type: int, low: 2, high: 6}
      stages.main.optimizer.type: {type: categorical, choices: [sgd, adamw]}

Every path is checked against the spec before any trial runs (:func:`check_space`): a path that does not exist
(with did-you-mean), a range that is empty, a log range that reaches 0, a value the spec (or a loss's ``Args``)
would refuse at either end of the range, a weight that scales every loss of a stage whose optimizer (Adam,
RMSprop) does not see the loss's scale. Errors are :class:`~kdgraph.errors.SpecError` paragraphs naming the
space file and the parameter.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import SpecError, did_you_mean
from ..overrides import apply_overrides
from ..spec import Spec, parse_yaml
from ..spec.load import _read_spec_file
from ..spec.schema import HoldoutSpec
from ..spec.validate import _describe
from ..spec.yaml_loader import _yaml_lines

__all__ = ["Param", "Space", "load_space", "check_space", "override_for"]

Scalar = Union[bool, int, float, str, None]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class Param(_Strict):
    """One searched override: a float or int range (optionally log-scaled or stepped) or a list of choices."""

    type: Literal["float", "int", "categorical"] = Field(description="float, int or categorical")
    low: Optional[float] = Field(None, description="float/int: the smallest value (inclusive)")
    high: Optional[float] = Field(None, description="float/int: the largest value (inclusive), > low")
    log: bool = Field(False, description="float/int: sample on a log scale (low > 0)")
    step: Optional[float] = Field(None, gt=0, description="float/int: a grid step (not with log)")
    choices: Optional[list[Scalar]] = Field(None, description="categorical: the values (numbers, strings, "
                                                              "booleans, null)")
    also: list[str] = Field(default_factory=list, description="more override paths set to the same drawn value "
                                                               "(one searched dimension for tied weights, e.g. "
                                                               "AT's two layers)")

    @model_validator(mode="after")
    def _range(self) -> "Param":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs a non-empty list of choices")
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("a categorical parameter takes choices only (no low, high, log or step)")
            if len(set(map(json.dumps, self.choices))) != len(self.choices):
                raise ValueError(f"choices must be distinct, got {self.choices}")
            return self
        if self.choices is not None:
            raise ValueError(f"a {self.type} parameter takes low and high, not choices (use type: categorical)")
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} parameter needs low and high")
        if not self.low < self.high:
            raise ValueError(f"the range is empty: low ({self.low:g}) must be below high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range must lie above 0, got low = {self.low:g} (a log scale never reaches 0 or "
                             f"below; use a small positive low such as 1e-4, or log: false)")
        if self.log and self.step is not None:
            raise ValueError("log and step do not go together")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)
                                   or (self.step is not None and self.step != int(self.step))):
            raise ValueError("an int parameter takes whole numbers for low, high and step")
        return self

    def ends(self) -> list[Any]:
        """The values every trial may draw from, at their extremes (checked against the spec up front)."""
        if self.type == "categorical":
            return list(self.choices or [])
        if self.type == "int":
            return [int(self.low), int(self.high)]  # type: ignore[arg-type]
        return [float(self.low), float(self.high)]  # type: ignore[arg-type]

    def paths(self, path: str) -> list[str]:
        """The path this parameter is keyed by, then the paths that take the same value (``also``)."""
        return [path, *self.also]

    def suggest(self, trial: Any, name: str) -> Any:
        """Draw this parameter for an Optuna trial."""
        if self.type == "categorical":
            return trial.suggest_categorical(name, self.choices)
        if self.type == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log,  # type: ignore[arg-type]
                                     step=int(self.step) if self.step else 1)
        return trial.suggest_float(name, float(self.low), float(self.high), log=self.log,  # type: ignore[arg-type]
                                   step=self.step)


class SamplerSpec(_Strict):
    """Optuna's sampler: TPE (default) or random search."""

    type: Literal["tpe", "random"] = Field("tpe", description="tpe (optuna.samplers.TPESampler) or random")
    seed: Optional[int] = Field(0, description="the sampler's seed (null: a fresh one every run)")
    startup_trials: int = Field(5, ge=0, description="tpe: random trials before the model is used")


class PrunerSpec(_Strict):
    """Optuna's pruner, fed every epoch's validation score of a trial."""

    type: Literal["median", "successive_halving", "none"] = Field(
        "median", description="median (MedianPruner), successive_halving (SuccessiveHalvingPruner) or none")
    startup_trials: int = Field(2, ge=0, description="median: finished trials before any pruning")
    warmup_epochs: int = Field(0, ge=0, description="median: epochs of a trial never pruned")
    from_stage: Optional[str] = Field(
        None, description="report (and prune on) only the epochs of this stage of the spec and the stages after it, "
                          "counted from its first epoch. An earlier stage that leaves the classifier untrained (FitNet's "
                          "hint stage) scores near chance, and a searched stage length would misalign the epochs of two "
                          "trials. Default: every epoch of every stage")
    min_epochs: int = Field(1, ge=1, description="successive_halving: the first rung (epochs)")
    reduction_factor: int = Field(2, ge=2, description="successive_halving: 1 in this many trials go on at a rung")


class Space(_Strict):
    """What ``kdgraph tune`` searches, and how trials are scored and stopped early."""

    validation: Optional[HoldoutSpec] = Field(
        None, description="held-out training images trials are scored on (count or fraction, seed); default: the "
                          "spec's data.holdout, else fraction 0.1, seed 0")
    sampler: SamplerSpec = Field(default_factory=SamplerSpec, description="how parameters are drawn")
    pruner: PrunerSpec = Field(default_factory=PrunerSpec, description="how bad trials are stopped early")
    params: dict[str, Param] = Field(min_length=1, description="override path -> its range or choices")

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def load_space(source: Union[str, Path, dict]) -> tuple[Space, str]:
    """(the validated space, where it came from); a SpecError naming the file, the field and its line."""
    text, origin = None, "<space>"
    if isinstance(source, dict):
        data = source
    else:
        origin = str(source)
        try:
            text = _read_spec_file(Path(source))
        except SpecError as e:
            raise SpecError(str(e).replace("spec file", "space file", 1)) from None
        data, _ = parse_yaml(text, origin)
    if not isinstance(data, dict):
        raise SpecError(f"{origin}: a search space is a YAML mapping (validation, sampler, pruner, params), got "
                        f"{type(data).__name__}")
    try:
        return Space.model_validate(data), origin
    except ValidationError as e:
        lines = _yaml_lines(text) if text else {}
        problems = [_describe(err, lines, root=Space) for err in e.errors()]
        raise SpecError(f"{origin}: invalid search space ({len(problems)} problem{'s' if len(problems) > 1 else ''}):"
                        "\n  - " + "\n  - ".join(problems)) from None


def override_for(path: str, value: Any) -> str:
    """The ``--set`` string of one drawn value (JSON is YAML, so strings stay strings)."""
    return f"{path}={json.dumps(value)}"


def _owner_args(spec_data: dict, keys: list[str]) -> Optional[tuple[Any, dict, str]]:
    """For ``stages.S.losses.L.args.K`` / ``adapters.A.args.K`` / ``stages.S.transform.args.K``: (the registered
    class, its args, what it is)."""
    from ..methods.registry import ADAPTERS, LOSSES, TRANSFORMS

    def item(items: Any, key: str) -> Optional[dict]:
        if not isinstance(items, list):
            return None
        if key.lstrip("-").isdigit() and -len(items) <= int(key) < len(items):
            return items[int(key)]
        return next((x for x in items if isinstance(x, dict) and x.get("name") == key), None)

    if len(keys) == 6 and keys[0] == "stages" and keys[2] == "losses" and keys[4] == "args":
        stage = item(spec_data.get("stages"), keys[1])
        loss = item((stage or {}).get("losses"), keys[3])
        if loss is not None:
            return LOSSES.get(loss["type"]), dict(loss.get("args") or {}), f"loss {loss.get('name')!r}"
    if len(keys) == 5 and keys[0] == "stages" and keys[2] == "transform" and keys[3] == "args":
        stage = item(spec_data.get("stages"), keys[1])
        tf = (stage or {}).get("transform")
        if isinstance(tf, dict) and tf.get("type"):
            return TRANSFORMS.get(tf["type"]), dict(tf.get("args") or {}), f"stage {keys[1]!r}'s transform"
    if len(keys) == 4 and keys[0] == "adapters" and keys[2] == "args":
        ad = item(spec_data.get("adapters"), keys[1])
        if ad is not None:
            return ADAPTERS.get(ad["type"]), dict(ad.get("args") or {}), f"adapter {ad.get('name')!r}"
    return None


def _check_exists(spec_data: dict, path: str, where: str) -> None:
    """The path names something the spec has (a key of a mapping, an item of a list by name or index)."""
    node: Any = spec_data
    keys = path.split(".")
    for depth, key in enumerate(keys):
        so_far = ".".join(keys[:depth + 1])
        if isinstance(node, list):
            if key == "*":
                node = node[0] if node else None
                continue
            if key.lstrip("-").isdigit():
                if not -len(node) <= int(key) < len(node):
                    raise SpecError(f"{where}: {so_far}: index {key} is out of range (the list has {len(node)} items)")
                node = node[int(key)]
                continue
            names = [str(x.get("name")) for x in node if isinstance(x, dict) and "name" in x]
            if key not in names:
                raise SpecError(f"{where}: {so_far}: the spec has no item named {key!r}.{did_you_mean(key, names)} "
                                f"Items here: {', '.join(names) or 'none'}.")
            node = next(x for x in node if isinstance(x, dict) and x.get("name") == key)
            continue
        if isinstance(node, dict):
            if key not in node:
                if keys[depth - 1:depth] == ["args"] and depth == len(keys) - 1:
                    return  # a loss/adapter/transform argument left at its default: checked against its Args
                raise SpecError(f"{where}: {so_far}: the spec has no {key!r} here.{did_you_mean(key, node)} "
                                f"Keys here: {', '.join(sorted(node)) or 'none'}.")
            if node[key] is None and depth < len(keys) - 1:
                raise SpecError(f"{where}: {so_far} is null in the spec, so {path} does not exist; give "
                                f"{so_far} a value in the spec first")
            node = node[key]
            continue
        raise SpecError(f"{where}: {so_far}: {keys[depth - 1]!r} is a value, not a mapping or a list")


def check_space(space: Space, spec: Spec, origin: str = "<space>") -> None:
    """Every parameter's path exists in ``spec`` and both ends of its range (every choice) give a valid spec."""
    from ..methods.args import check_args

    data = spec.model_dump(mode="json")
    seen: dict[str, str] = {}
    for key, param in space.params.items():
        for path in param.paths(key):
            where = f"{origin}: params.{key!r}" + (f" (also: {path!r})" if path != key else "")
            if path in seen:
                raise SpecError(f"{where}: the path {path!r} is searched twice (also by params.{seen[path]!r}); "
                                f"each override path takes one value per trial")
            seen[path] = key
            _check_path(spec, data, path, param, where, check_args)
        _check_not_scale_free(spec, param.paths(key), f"{origin}: params.{key!r}")
    names = [s.name for s in spec.stages]
    if space.pruner.from_stage is not None and space.pruner.from_stage not in names:
        raise SpecError(f"{origin}: pruner.from_stage: the spec has no stage {space.pruner.from_stage!r}; its stages "
                        f"are {', '.join(repr(n) for n in names)}")


# optimizers whose step divides the gradient by a running estimate of its own size: a loss scaled by c steps alike
SCALE_FREE_OPTIMIZERS = ("adam", "adamw", "rmsprop", "rmsprop_tf")


def _check_not_scale_free(spec: Spec, paths: list[str], where: str) -> None:
    """Refuse a parameter that scales every loss of a stage at once (its only loss's weight, or all of them tied)
    when the stage's optimizer does not see the loss's scale: every trial would train alike."""
    for st in spec.stages:
        weights = {f"stages.{st.name}.losses.{loss.name}.weight" for loss in st.losses}
        if st.optimizer.type in SCALE_FREE_OPTIMIZERS and weights and weights <= set(paths):
            raise SpecError(
                f"{where}: scales every loss of stage {st.name!r} at once ({', '.join(sorted(weights))}), and the "
                f"stage trains with {st.optimizer.type}, whose step divides the gradient by a running estimate of "
                f"its own size: every value would train alike (only the optimizer's eps sees it). Search what "
                f"changes that stage instead: its optimizer.lr, its epochs, a loss's args, or a weight relative to "
                f"another loss of the stage.")


def _check_path(spec: Spec, data: dict, path: str, param: Param, where: str, check_args: Any) -> None:
    if not path or any(not k for k in path.split(".")):
        raise SpecError(f"{where}: an override path is dotted keys such as stages.main.optimizer.lr")
    _check_exists(data, path, where)
    owner = _owner_args(data, path.split("."))
    for value in param.ends():
        try:
            apply_overrides(spec, [override_for(path, value)], label="value")
            if owner is not None:
                cls, args, what = owner
                check_args(cls, {**args, path.split(".")[-1]: value}, (), what=what)
        except SpecError as e:
            raise SpecError(f"{where}: the value {value!r} (an end of the range) is refused by the spec: {e}") \
                from None
