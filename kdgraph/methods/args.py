"""Declarative argument schemas of losses, adapters, transforms and data wrappers.

Each class sets ``Args``, a pydantic model (``extra="forbid"``, one described field per constructor
argument, finite numbers, no booleans taken as numbers). The compiler validates a spec's ``args``
against it before building anything (:func:`check_args`), so ``rate: 0`` or ``temprature: 2`` is a
:class:`~kdgraph.errors.SpecError` naming ``adapters.NAME.args.rate`` (and its YAML line), not a torch
error. Only the arguments the spec gives are passed on: the constructor's defaults stay the reference.
A class without ``Args`` (user code) is checked against its constructor's signature only.
"""
from __future__ import annotations

import inspect
from typing import Annotated, Any, Callable, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError

from ..errors import SpecError, did_you_mean


def _no_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got the boolean {str(v).lower()}")
    return v


MAX_CHANNELS = 16384
MAX_FEATURES = 1 << 20

#: positive channel / feature counts, finite floats; ``Flag`` is a real boolean (not "yes" or 1)
Channels = Annotated[int, BeforeValidator(_no_bool), Field(ge=1, le=MAX_CHANNELS)]
Features = Annotated[int, BeforeValidator(_no_bool), Field(ge=1, le=MAX_FEATURES)]
PosInt = Annotated[int, BeforeValidator(_no_bool), Field(ge=1)]
Float = Annotated[float, BeforeValidator(_no_bool)]
Positive = Annotated[float, BeforeValidator(_no_bool), Field(gt=0)]
NonNegative = Annotated[float, BeforeValidator(_no_bool), Field(ge=0)]
Fraction = Annotated[float, BeforeValidator(_no_bool), Field(ge=0, le=1)]
Flag = StrictBool


class MethodArgs(BaseModel):
    """Base of every ``Args`` schema: unknown arguments and non-finite numbers are errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class NoArgs(MethodArgs):
    """A method that takes no arguments."""


def _fmt_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def _where(spec: Any, loc: tuple) -> str:
    if spec is not None and hasattr(spec, "where"):
        return spec.where(*loc)
    return _fmt_loc(loc)


def _signature_args(fn: Callable) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def describe_args(schema: type[BaseModel]) -> str:
    """``temperature (softening, > 0), ...``: the allowed arguments, for error messages."""
    parts = []
    for name, f in schema.model_fields.items():
        parts.append(f"{name} ({f.description})" if f.description else name)
    return ", ".join(parts) or "none"


def check_args(owner: Any, args: dict[str, Any], loc: tuple, spec: Any = None, what: Optional[str] = None,
               fn: Optional[Callable] = None) -> dict[str, Any]:
    """Validate ``args`` (the spec's ``loc + ("args",)``) against ``owner.Args``; return them, coerced.

    ``owner`` is a loss / adapter / transform class or a data wrapper function; ``fn`` the callable whose
    signature is checked when the owner declares no ``Args`` (default: the class's ``__init__``).
    """
    what = what or getattr(owner, "__name__", str(owner))
    schema = getattr(owner, "Args", None)
    if schema is None:
        accepted = _signature_args(fn or owner.__init__)
        takes_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn or owner.__init__).parameters.values())
        for key in args:
            if key not in accepted and not takes_any:
                raise SpecError(f"{_where(spec, loc + ('args', key))}: {what} takes no argument {key!r}."
                                f"{did_you_mean(key, accepted)} Its arguments: {', '.join(accepted) or 'none'}.")
        return dict(args)
    try:
        model = schema.model_validate(args)
    except ValidationError as e:
        err = e.errors()[0]
        key_loc = tuple(err["loc"])
        at = _where(spec, loc + ("args", *key_loc))
        if err["type"] == "extra_forbidden":
            key = str(key_loc[-1])
            raise SpecError(f"{at}: {what} takes no argument {key!r}.{did_you_mean(key, schema.model_fields)} "
                            f"Its arguments: {describe_args(schema)}.") from None
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        field = schema.model_fields.get(str(key_loc[0])) if key_loc else None
        allowed = f" Allowed: {field.description}." if field is not None and field.description else ""
        got = err.get("input")
        shown = "" if isinstance(got, (dict, list)) or err["type"] in ("value_error", "missing") else f" (got {got!r})"
        raise SpecError(f"{at}: invalid argument of {what}: {msg}{shown}.{allowed}") from None
    return {k: getattr(model, k) for k in model.model_fields_set}
