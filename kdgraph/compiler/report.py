"""What the compiler reports about a stage: its taps, adapters, losses, and what each pass ran and changed.

Read by the CLI's compile summary (``kdgraph compile``, ``--json``), the graph view, the drawing and tests.
:meth:`StageReport.to_dict` is the plain-data (JSON-able) form.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["Shape", "TapReport", "AdapterReport", "LossReport", "PassResult", "StageReport"]

Shape = Optional[tuple[int, ...]]


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


@dataclass(frozen=True)
class PassResult:
    """What one pass over a stage's graph did: its name, whether it changed the graph, a one-line summary for
    people, and plain-data details (node names, counts) for tools."""

    name: str
    changed: bool
    summary: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "changed": self.changed, "summary": self.summary, "details": dict(self.details)}


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
    cached_taps: dict[str, str] = field(default_factory=dict)  # tap -> batch key, read from the teacher cache
    passes: list[PassResult] = field(default_factory=list)  # in the order they ran
    optional_batch_inputs: list[str] = field(default_factory=list)  # batch keys read when given (num_tokens)

    def pass_result(self, name: str) -> Optional[PassResult]:
        """The result of the pass called ``name``, or ``None`` if it did not run."""
        return next((p for p in self.passes if p.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """Plain data: lists for tuples, the passes as dicts (``json.dumps`` takes it as is)."""
        out = dataclasses.asdict(self)
        out["passes"] = [p.to_dict() for p in self.passes]
        return out
