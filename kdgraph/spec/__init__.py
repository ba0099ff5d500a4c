"""The spec: a YAML file validated by pydantic v2 (``extra="forbid"`` everywhere).

This package knows nothing of torch.fx. Its modules, in the order a spec goes through them:

- :mod:`~kdgraph.spec.yaml_loader`: YAML read safely (a spec never executes code; no aliases, duplicate keys or
  deep nesting), with the line of every field;
- :mod:`~kdgraph.spec.schema`: the pydantic models (:class:`Spec` and its parts);
- :mod:`~kdgraph.spec.taps`: the tap grammar (:class:`Tap`, :func:`parse_tap`);
- :mod:`~kdgraph.spec.validate`: validation errors turned into one :class:`SpecError` whose lines name the field
  path (``stages[0].losses[1].inputs``), the YAML line, what was wrong and what is allowed;
- :mod:`~kdgraph.spec.load`: :func:`load_spec` from a path, YAML text, a dict or a :class:`Spec`.
"""
from __future__ import annotations

from .load import load_spec
from .location import fmt_loc
from .recipe import ClipSpec, EmaSpec, describe_recipe
from .schema import (AdapterSpec, DataSpec, DataWrapperSpec, Float, InputSpec, Int, LeafModule, LossSpec,
                     MAX_INPUT_VALUES, MAX_NAME, MAX_SIDE, ModelRef, OptimizerSpec, PretrainSpec, Reference,
                     RuntimeSpec, SchedulerSpec, Spec, StageSpec, TransformSpec)
from .taps import TAP_GRAMMAR, Tap, TapStr, parse_tap
from .validate import validate_spec
from .yaml_loader import MAX_DEPTH, MAX_SPEC_BYTES, SpecLoader, parse_yaml

__all__ = ["AdapterSpec", "DataSpec", "DataWrapperSpec", "Float", "InputSpec", "Int", "LeafModule", "LossSpec",
           "MAX_DEPTH", "MAX_INPUT_VALUES", "MAX_NAME", "MAX_SIDE", "MAX_SPEC_BYTES", "ModelRef", "OptimizerSpec",
           "PretrainSpec", "Reference", "RuntimeSpec", "SchedulerSpec", "ClipSpec", "EmaSpec", "describe_recipe", "Spec", "SpecLoader", "StageSpec",
           "TAP_GRAMMAR", "Tap", "TapStr", "TransformSpec", "fmt_loc", "load_spec", "parse_tap", "parse_yaml",
           "validate_spec"]
