"""Consent to import code: a spec is data, never code.

A spec (or the spec stored inside a checkpoint) may come from anyone, so what it names is looked up,
never imported, unless the *user* consented outside the spec. Without consent a spec may name:

* ``torchvision:NAME`` (classification models), ``timm:NAME`` (``timm.create_model``, random init; the
  arguments that download or read weights refused), ``kdgraph.zoo:NAME`` (the zoo's public factories) and
  ``registered:NAME`` (models registered with :func:`kdgraph.register_model` by code the user imported);
* as ``leaf_modules``: classes registered with :func:`kdgraph.register_leaf_module`, and ``nn.Module``
  classes of torch / torchvision modules that are already imported.

Anything else (``package.module:factory``) is refused with :class:`ConsentError` *before* anything is
imported, unless its module is allowed by one of (all of them add up):

* the command line: ``--allow-import PREFIX`` (repeatable) or ``--trust-code`` (everything);
* the API: ``kdgraph.compile(spec, allow_imports=["mypkg"])`` / ``trust_code=True`` (also
  ``Distiller.from_spec`` and ``kdgraph.train.train``), or ``with kdgraph.consent([...]):``;
* the environment: ``KDGRAPH_ALLOW_IMPORTS=mypkg,otherpkg`` (``*`` for everything).

``PREFIX`` allows that module and its sub-modules (``mypkg`` allows ``mypkg.nets``, not ``mypkgx``).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Any, Callable, Iterable, Iterator, Optional

from ..errors import ModelError

ENV_VAR = "KDGRAPH_ALLOW_IMPORTS"
ALL = "*"

_granted: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("kdgraph_allow_imports", default=())


class ConsentError(ModelError):
    """A spec names code to import that the user has not allowed (see :mod:`kdgraph.models.trust`)."""


def _clean(prefixes: Iterable[str]) -> tuple[str, ...]:
    out = []
    for p in prefixes:
        p = p.strip()
        if p:
            out.append(p)
    return tuple(out)


@contextlib.contextmanager
def consent(allow_imports: Optional[Iterable[str]] = None, trust_code: bool = False) -> Iterator[None]:
    """Within the block, also allow imports of the modules under ``allow_imports`` (all with ``trust_code``)."""
    if isinstance(allow_imports, str):
        allow_imports = [allow_imports]
    extra = _clean(allow_imports or ()) + ((ALL,) if trust_code else ())
    token = _granted.set(_granted.get() + extra)
    try:
        yield
    finally:
        _granted.reset(token)


def allowed_prefixes() -> tuple[str, ...]:
    """What is allowed now: the active :func:`consent` blocks plus ``$KDGRAPH_ALLOW_IMPORTS``."""
    return _granted.get() + _clean(os.environ.get(ENV_VAR, "").split(","))


def is_allowed(module: str) -> bool:
    """Whether importing ``module`` has the user's consent."""
    for p in allowed_prefixes():
        if p == ALL or module == p or module.startswith(p + "."):
            return True
    return False


def how_to_allow(module: str) -> str:
    """The sentence a refusal ends with: every way to consent, for this module."""
    top = module.split(".")[0]
    return (f"If you trust it, allow it outside the spec: `--allow-import {top}` on the command line, "
            f"allow_imports=[{top!r}] in kdgraph.compile / Distiller.from_spec / kdgraph.train.train, or "
            f"{ENV_VAR}={top} in the environment (--trust-code, trust_code=True or {ENV_VAR}='*' allow every "
            f"import). A spec is data: it can never grant this itself.")


def consent_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Click decorator: ``--allow-import PREFIX`` (repeatable) and ``--trust-code``; the command runs inside
    :func:`consent`."""
    import click

    @functools.wraps(command)
    def wrapped(*args: Any, allow_imports: tuple[str, ...] = (), trust_code: bool = False, **kwargs: Any) -> Any:
        with consent(allow_imports, trust_code):
            return command(*args, **kwargs)

    wrapped = click.option("--trust-code", "trust_code", is_flag=True,
                           help="let the spec import any module (only for specs you wrote or trust)")(wrapped)
    wrapped = click.option("--allow-import", "allow_imports", multiple=True, metavar="PREFIX",
                           help=f"let the spec import module PREFIX and its sub-modules, e.g. your own model "
                                f"package (repeatable; also ${ENV_VAR}=a,b)")(wrapped)
    return wrapped
