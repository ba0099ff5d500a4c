"""The leaf-module registry: classes every capture calls as one node instead of tracing into, each with its reason.

fx already treats ``torch.nn`` modules as leaves. :data:`LEAF_MODULES` adds classes a tracer cannot (or should
not) trace through; users add their own with :func:`register_leaf_module` or in a spec (``leaf_modules``, read by
:func:`spec_leaf_types`, which imports a class only with the user's consent, :mod:`kdgraph.models.trust`). The model
sources declare theirs (:data:`kdgraph.models.zoo.ZOO_LEAF_MODULES`, timm's); the capture reads them, never the
other way round.
"""
from __future__ import annotations

import importlib
import inspect
import sys
from typing import Any, Optional

from torch import nn

from .._moved import canonical
from ..errors import ModelError
from ..models.timm_support import timm_leaf_modules
from ..models.trust import ConsentError, how_to_allow, is_allowed
from ..models.zoo import ZOO_LEAF_MODULES

__all__ = ["LEAF_MODULES", "register_leaf_module", "leaf_types", "spec_leaf_types", "import_object"]

#: class -> reason. Consulted by every capture; extended by register_leaf_module and the spec.
LEAF_MODULES: dict[type, str] = {}


def register_leaf_module(cls: type, reason: str) -> type:
    """Tell the tracer to call ``cls`` as one node instead of tracing its forward, and say why."""
    if not reason or len(reason.strip()) < 3:
        raise ValueError("a leaf module needs a reason (why fx cannot or should not trace it)")
    LEAF_MODULES[cls] = reason
    return cls


def leaf_types(extra=()) -> tuple[type, ...]:
    """The registered leaf classes, timm's not-traceable ones (when timm is imported), then ``extra`` (a spec's),
    without duplicates."""
    for cls, reason in timm_leaf_modules().items():
        LEAF_MODULES.setdefault(cls, reason)
    return tuple(dict.fromkeys([*LEAF_MODULES, *extra]))


def spec_leaf_types(spec) -> list[type]:
    """The classes a spec's ``leaf_modules`` names, imported (with the caller's consent, see
    :mod:`kdgraph.models.trust`)."""
    out = []
    for i, lm in enumerate(spec.leaf_modules):
        cls = import_object(lm.module, f"leaf_modules[{i}].module")
        if not isinstance(cls, type):
            raise ModelError(f"leaf_modules[{i}].module: {lm.module} is not a class")
        out.append(cls)
    return out


def _known_leaf_class(package: str, name: str) -> Optional[type]:
    """A class a spec may name as a leaf module without consent: one registered with
    :func:`~kdgraph.register_leaf_module`, or an ``nn.Module`` class of an already imported torch /
    torchvision module (looked up in ``sys.modules``: nothing is imported)."""
    package = canonical(package)  # a spec's old path (kdgraph.zoo:CenterTapConv2d) names the class where it is now
    for cls in LEAF_MODULES:
        if cls.__module__ == package and cls.__qualname__ == name:
            return cls
    if package.split(".")[0] in ("torch", "torchvision") and package in sys.modules:
        obj = getattr(sys.modules[package], name, None)
        if inspect.isclass(obj) and issubclass(obj, nn.Module):
            return obj
    return None


def import_object(path: str, what: str) -> Any:
    """Resolve ``package.module:Name`` (a leaf module class): a known class, or an import with consent."""
    package, sep, name = path.partition(":")
    if not sep:
        raise ModelError(f"{what}: {path!r} must be written 'package.module:Name'")
    known = _known_leaf_class(package, name)
    if known is not None:
        return known
    if not is_allowed(package):
        raise ConsentError(
            f"{what}: {path!r} names a class in module {package!r}, which a spec may not import without your "
            f"consent (without it a leaf module is a class registered with kdgraph.register_leaf_module or "
            f"an nn.Module class of torch / torchvision). Nothing was imported. {how_to_allow(package)}")
    try:
        module = importlib.import_module(package)
    except ImportError as e:
        raise ModelError(f"{what}: cannot import {package!r} ({e})") from None
    try:
        return getattr(module, name)
    except AttributeError:
        raise ModelError(f"{what}: {package!r} has no {name!r}") from None


def _register_builtin_leaves() -> None:
    """torchvision's and the zoo's classes that are called as one node."""
    LEAF_MODULES.update(ZOO_LEAF_MODULES)
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d
        from torchvision.ops.stochastic_depth import StochasticDepth
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return
    LEAF_MODULES.setdefault(StochasticDepth, "branches on self.training and p; one node keeps the graph mode-independent")
    LEAF_MODULES.setdefault(FrozenBatchNorm2d, "a buffer-only normalisation; a single node reads better in taps")


_register_builtin_leaves()
