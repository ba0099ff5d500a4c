"""``timm:NAME`` model references: networks built by ``timm.create_model``, and timm's own fx leaf registry.

    teacher: {model: "timm:resnet34", kwargs: {num_classes: 10}, weights: ./teacher.safetensors}

timm is an optional dependency (``pip install 'kdgraph[timm]'``). A spec may name any architecture timm registers
(``timm.list_models()``), randomly initialised: weights never come from the network (``pretrained``,
``checkpoint_path`` and the other download or file arguments are refused) but from the spec's ``weights:``,
which kdgraph loads and verifies like any other weight file. timm marks some modules and functions as not
traceable by fx (``timm.layers.register_notrace_module`` / ``register_notrace_function``); capture calls those as
single nodes, as timm's own feature extraction does.
"""
from __future__ import annotations

import sys
from typing import Any

from torch import nn

from ..errors import ModelError, did_you_mean

__all__ = ["build_timm_model", "timm_leaf_modules", "timm_autowrap_functions", "REFUSED_KWARGS"]

#: create_model arguments that would fetch or read weights outside kdgraph's verified loading
REFUSED_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")


def _timm(role: str) -> Any:
    try:
        import timm
    except ImportError:
        raise ModelError(f"{role}.model: 'timm:' models need the timm package: pip install 'kdgraph[timm]' "
                         f"(or pip install timm)") from None
    return timm


def build_timm_model(name: str, kwargs: dict[str, Any], role: str) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)`` with errors that name the spec's field."""
    timm = _timm(role)
    refused = [k for k in REFUSED_KWARGS if k in kwargs]
    if refused:
        raise ModelError(f"{role}.kwargs: {', '.join(refused)} not allowed for a timm model: kdgraph never downloads "
                         f"or reads weights through timm; give a local file as {role}.weights instead")
    names = timm.list_models()
    if name not in names:
        raise ModelError(f"{role}.model: timm has no model {name!r}.{did_you_mean(name, names)} "
                         f"(timm.list_models() lists {len(names)})")
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise ModelError(f"{role}.kwargs: timm {name} rejected {kwargs}: {e}") from None


def timm_leaf_modules() -> dict[type, str]:
    """timm's not-traceable module classes with the reason, when timm is imported (else nothing)."""
    if "timm" not in sys.modules:
        return {}
    from timm.layers import _fx

    return {cls: "timm marks it not fx-traceable (timm.layers.register_notrace_module)"
            for cls in _fx.get_notrace_modules() if isinstance(cls, type)}


def timm_autowrap_functions() -> tuple[Any, ...]:
    """timm's not-traceable functions (called as one node), when timm is imported (else none)."""
    if "timm" not in sys.modules:
        return ()
    from timm.layers import _fx

    return tuple(_fx.get_notrace_functions())
