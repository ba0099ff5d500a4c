"""A benchmark suite: which specs to run, how often, and the published numbers to print beside them.

A suite is a small YAML file validated like a spec (pydantic v2, unknown keys rejected, errors naming the
field path and YAML line)::

    title: "ResNet-18 from ResNet-34 on Fashion-MNIST"
    seeds: 3                       # or an explicit list: [0, 1, 2]
    baseline: baseline             # the label of the no-distillation entry
    entries:
      - {label: baseline, method: "none (CE only)", spec: ../../specs/fashion_mnist/baseline.yaml}
      - label: KD
        spec: ../../specs/fashion_mnist/kd.yaml
        set: ["stages.main.epochs=10"]             # --set-style overrides (optional)
        reference: {torchdistill: 71.37, paper: null}

An entry may take the best overrides of a ``kdgraph tune`` study: ``tuned: {study: NAME, storage: URL or
journal file}`` (:mod:`kdgraph.bench.tuned`). Spec paths are relative to the suite file. Every entry is run once per seed with ``runtime.seed``
set to the seed (the teacher's own pretraining seed is separate, so every seed distils from the
same cached teacher).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import SpecError, did_you_mean
from ..spec import Spec, load_spec, parse_yaml
from ..spec.load import _read_spec_file
from ..spec.validate import _describe
from ..spec.yaml_loader import _yaml_lines

_LABEL = r"[A-Za-z0-9][A-Za-z0-9_.+\-]*"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ReferenceTop1(_Strict):
    """Published top-1 (%) figures printed beside kdgraph's own."""

    torchdistill: Optional[float] = Field(None, description="torchdistill 1.1.5's reproduction (its table)")
    paper: Optional[float] = Field(None, description="the method's paper")


class TunedRef(_Strict):
    """The ``kdgraph tune`` study whose best trial's overrides this entry uses (see :mod:`kdgraph.bench.tuned`)."""

    study: str = Field(description="the study's name (kdgraph tune --study; default the spec's name)")
    storage: str = Field(description="an RDB URL, or the study's journal file (relative to the suite file)")


class SuiteEntry(_Strict):
    """One row of the results table: a spec, optionally changed by overrides."""

    label: str = Field(description="the row's name in the table and its run folder's name")
    spec: str = Field(description="path of the spec file, relative to the suite file")
    method: str = Field("", description="what the row is, in words (default: the spec's description)")
    set: list[str] = Field(default_factory=list, description="--set-style overrides, e.g. 'stages.main.epochs=2'")
    reference: ReferenceTop1 = Field(default_factory=ReferenceTop1, description="published numbers")
    tuned: Optional[TunedRef] = Field(None, description="apply the best overrides of a kdgraph tune study first")

    @field_validator("label")
    @classmethod
    def _label(cls, v: str) -> str:
        if not re.fullmatch(_LABEL, v) or len(v) > 64:
            raise ValueError(f"label {v!r} must be 1-64 letters, digits, '_', '.', '+' or '-' (it names a folder)")
        return v


class Suite(_Strict):
    """A benchmark: entries run for every seed, one of them the no-distillation baseline."""

    title: str = Field(description="the table's title")
    description: str = Field("", description="what the suite measures (printed in results.md)")
    seeds: Union[int, list[int]] = Field(3, description="number of seeds (0..N-1) or the list of seeds")
    baseline: str = Field(description="label of the entry every other row is compared with")
    data: Optional[str] = Field(None, description="default data folder (as --data; the command's --data wins)")
    entries: list[SuiteEntry] = Field(min_length=1, description="the rows, in table order")
    metric: Literal["top1", "perplexity"] = Field(
        "top1", description="the student's result the table compares: top1 (%, higher is better) or perplexity "
                            "(a causal LM's validation perplexity, data.dataset text; lower is better)")

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds(cls, v: Union[int, list[int]]) -> Union[int, list[int]]:
        if isinstance(v, bool):
            raise ValueError("seeds is a count or a list of integers, not a boolean")
        if isinstance(v, int):
            if not 1 <= v <= 100:
                raise ValueError(f"seeds must be between 1 and 100, got {v}")
        else:
            if not isinstance(v, list) or not v or len(set(map(repr, v))) != len(v) or \
                    any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in v):
                raise ValueError(f"seeds must be a non-empty list of distinct non-negative integers, got {v}")
        return v

    @model_validator(mode="after")
    def _labels(self) -> "Suite":
        labels = [e.label for e in self.entries]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"entries: labels must be distinct; repeated: {', '.join(dup)}")
        if self.baseline not in labels:
            raise ValueError(f"baseline: {self.baseline!r} is not the label of an entry.{did_you_mean(self.baseline, labels)} "
                             f"Labels: {', '.join(labels)}")
        return self

    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)


class LoadedSuite:
    """A validated suite with its file's folder (spec paths resolve against it)."""

    def __init__(self, suite: Suite, path: Optional[Path]):
        self.suite = suite
        self.path = path
        self.folder = path.parent if path is not None else Path.cwd()

    def spec_path(self, entry: SuiteEntry) -> Path:
        p = Path(entry.spec).expanduser()
        return p if p.is_absolute() else (self.folder / p).resolve()

    def load_entry(self, entry: SuiteEntry, seed: Optional[int] = None) -> Spec:
        """The entry's spec with its overrides (and ``runtime.seed``) applied; SpecError naming the entry."""
        from ..spec.overrides import apply_overrides

        where = f"suite entry {entry.label!r}"
        path = self.spec_path(entry)
        if not path.is_file():
            raise SpecError(f"{where}: spec file {str(path)!r} does not exist (entries[].spec is relative to the "
                            f"suite file {self.path})")
        sets = list(entry.set) + ([f"runtime.seed={seed}"] if seed is not None else [])
        try:
            base = load_spec(path)
            if entry.tuned is not None:
                sets = self.tuned_sets(entry, base) + sets
            return apply_overrides(base, sets)
        except SpecError as e:
            raise SpecError(f"{where} ({path}): {e}") from None


    def tuned_sets(self, entry: SuiteEntry, base: Spec) -> list[str]:
        """The best overrides of the entry's tuned study (read once per entry)."""
        cache = self.__dict__.setdefault("_tuned", {})
        if entry.label not in cache:
            from .tuned import best_overrides, is_rdb_url

            ref = entry.tuned
            storage = ref.storage if is_rdb_url(ref.storage) else str((self.folder / ref.storage).resolve())
            cache[entry.label] = best_overrides(ref.study, storage, base, "tuned")
        return list(cache[entry.label])


def load_suite(source: Union[str, Path, dict, Suite]) -> LoadedSuite:
    """Read and validate a suite file (or dict); every spec it names is checked to exist."""
    if isinstance(source, Suite):
        return LoadedSuite(source, None)
    text, origin, path = None, "<suite>", None
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        origin = str(path)
        try:
            text = _read_spec_file(path)  # the spec's rules: size, UTF-8, a file not a folder
        except SpecError as e:
            raise SpecError(str(e).replace("spec file", "suite file", 1).replace("spec ", "suite ", 1)) from None
        data, lines = parse_yaml(text, origin)  # the spec's strict YAML: no duplicate keys, aliases, deep nesting
    if not isinstance(data, dict):
        raise SpecError(f"{origin}: a suite is a YAML mapping (title, seeds, baseline, entries), "
                        f"got {type(data).__name__}")
    try:
        suite = Suite.model_validate(data)
    except ValidationError as e:
        lines = _yaml_lines(text) if text else {}
        problems = [_describe(err, lines, root=Suite) for err in e.errors()]
        raise SpecError(f"{origin}: invalid suite ({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n  - "
                        + "\n  - ".join(problems)) from None
    loaded = LoadedSuite(suite, path.resolve() if path else None)
    for i, entry in enumerate(suite.entries):
        p = loaded.spec_path(entry)
        if not p.is_file():
            raise SpecError(f"{origin}: entries[{i}].spec: {entry.spec!r} ({p}) does not exist; spec paths are "
                            f"relative to the suite file")
    return loaded
