"""The leaf-module registry: classes every capture calls as one node instead of tracing into, each with its reason.

fx already treats ``torch.nn`` modules as leaves. :data:`LEAF_MODULES` adds classes a tracer cannot (or should
not) trace through; users add their own with :func:`register_leaf_module` or in a spec (``leaf_modules``, read by
:func:`spec_leaf_types`).
"""
from __future__ import annotations

from ..errors import ModelError

__all__ = ["LEAF_MODULES", "register_leaf_module", "leaf_types", "spec_leaf_types"]

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
    from ..timm_support import timm_leaf_modules

    for cls, reason in timm_leaf_modules().items():
        LEAF_MODULES.setdefault(cls, reason)
    return tuple(dict.fromkeys([*LEAF_MODULES, *extra]))


def spec_leaf_types(spec) -> list[type]:
    """The classes a spec's ``leaf_modules`` names, imported (with the caller's consent, see :mod:`kdgraph.trust`)."""
    from ..models import import_object  # models reads LEAF_MODULES: import it on use

    out = []
    for i, lm in enumerate(spec.leaf_modules):
        cls = import_object(lm.module, f"leaf_modules[{i}].module")
        if not isinstance(cls, type):
            raise ModelError(f"leaf_modules[{i}].module: {lm.module} is not a class")
        out.append(cls)
    return out


def _register_torchvision_leaves() -> None:
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d
        from torchvision.ops.stochastic_depth import StochasticDepth
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return
    LEAF_MODULES.setdefault(StochasticDepth, "branches on self.training and p; one node keeps the graph mode-independent")
    LEAF_MODULES.setdefault(FrozenBatchNorm2d, "a buffer-only normalisation; a single node reads better in taps")


_register_torchvision_leaves()
