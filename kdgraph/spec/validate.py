"""Validation of a parsed spec into :class:`Spec`, with one :class:`SpecError` whose lines name the field path
(``stages[0].losses[1].inputs``), the YAML line, what was wrong and what is allowed.
"""
from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Optional, Union

from pydantic import BaseModel, ValidationError

from ..errors import SpecError, did_you_mean
from .for_each import expand_for_each
from .location import fmt_loc
from .schema import Spec
from .yaml_loader import _non_finite, _yaml_lines


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
    where = fmt_loc(loc)
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
    data, lines = expand_for_each(data, lines, source)  # for_each entries become ordinary ones, lines moved along
    bad = _non_finite(data)
    if bad is not None:
        line = lines.get(bad)
        raise SpecError(f"{source}: invalid spec (1 problem):\n  - {fmt_loc(bad)}{f' (line {line})' if line else ''}: "
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
