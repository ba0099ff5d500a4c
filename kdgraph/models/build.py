"""Model references -> ``nn.Module``: torchvision, the zoo, registered models, and (with consent,
see :mod:`kdgraph.models.trust`) ``package.module:factory`` paths.

Building a model never downloads anything: weights are loaded separately by
:func:`kdgraph.models.weights.load_weights` (re-exported here), which ``Distiller.load_weights()`` calls.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any, Callable, Optional

from torch import nn

from ..errors import ModelError, did_you_mean
from ..spec import ModelRef
from .trust import ConsentError, how_to_allow, is_allowed
from .weights import load_weights

__all__ = ["build_model", "register_model", "REGISTERED_MODELS", "load_weights"]


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


#: name -> factory or nn.Module class, filled by :func:`register_model` (spec: ``registered:NAME``).
REGISTERED_MODELS: dict[str, Any] = {}


def register_model(name: str) -> Callable[[Any], Any]:
    """Decorator: let specs name this factory (or ``nn.Module`` class) as ``registered:NAME`` without consent.

    Registering is the user's consent: only code the user imported can call it. ::

        @kdgraph.register_model("my_net")
        def my_net(num_classes: int = 10) -> nn.Module: ...
    """
    if not isinstance(name, str) or not name.strip() or ":" in name:
        raise ValueError(f"register_model: a model name is a non-empty string without ':', got {name!r}")

    def deco(obj: Any) -> Any:
        _check_factory(obj, f"register_model({name!r})")
        REGISTERED_MODELS[name] = obj
        return obj

    return deco


def _zoo_factories() -> dict[str, Any]:
    """The zoo's public factories, listed explicitly (never ``getattr`` on a module by a spec's name)."""
    from . import zoo

    return {"tiny_cnn": zoo.tiny_cnn, "resnet18_small": zoo.resnet18_small, "resnet34_small": zoo.resnet34_small}


def _check_factory(obj: Any, what: str) -> None:
    """An ``nn.Module`` subclass or a plain Python function; anything else (a builtin such as ``os.system``,
    a class that is not a module) is refused before it is called."""
    if inspect.isclass(obj):
        if not issubclass(obj, nn.Module):
            raise ModelError(f"{what}: {obj.__module__}.{obj.__qualname__} is a class but not a torch.nn.Module "
                             f"subclass; a model must be an nn.Module class or a function returning one")
        return
    if not (inspect.isfunction(obj) or inspect.ismethod(obj)):
        raise ModelError(f"{what}: {type(obj).__name__} {obj!r} is neither an nn.Module subclass nor a Python "
                         f"function returning one; it is not called")


def _call_factory(factory: Any, ref: ModelRef, role: str) -> nn.Module:
    _check_factory(factory, f"{role}.model")
    try:
        model = factory(**ref.kwargs)
    except TypeError as e:
        raise ModelError(f"{role}: {ref.model}(**{ref.kwargs}) failed: {e}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{role}: {ref.model} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _refuse(field: str, path: str, module: str) -> ConsentError:
    return ConsentError(
        f"{field}: {path!r} names code in module {module!r}, which a spec may not import without your consent "
        f"(without it a spec names torchvision:NAME, kdgraph.zoo:NAME, or registered:NAME for models registered "
        f"with kdgraph.register_model). Nothing was imported or called. {how_to_allow(module)}")


def _available_memory() -> Optional[int]:
    """Bytes of memory available to allocate now (Linux MemAvailable, else free pages); None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


_CHECK_ABOVE = 4096


def _largest_int(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return max((_largest_int(v) for v in value), default=0)
    return 0


def check_fits_in_memory(ref: ModelRef, role: str = "model", available: Optional[int] = None) -> None:
    """Refuse a network whose parameters and buffers alone cannot fit in the memory available, before any
    of it is allocated: it is built once on the ``meta`` device (shapes, no storage) to count them, its
    modules imported first (outside ``meta``, so no module-level tensor lands there). Not checked: a factory
    that cannot run on ``meta`` (one that reads tensor values while building) and ``hf:`` models
    (transformers imports its modelling code lazily). Only kwargs holding a number above
    ``_CHECK_ABOVE`` are checked: a meta build costs about a third of a real one, and the networks kdgraph
    builds by name at their own sizes fit in a few GB; a width or class count gone wrong does not."""
    import torch

    package = ref.model.partition(":")[0]
    if package == "hf" or _largest_int(ref.kwargs) <= _CHECK_ABOVE:
        return
    try:
        if package in ("torchvision", "timm"):
            importlib.import_module(package)
        elif package not in ("kdgraph.zoo", "registered"):
            if not is_allowed(package):
                return  # refused by the build, which says why
            importlib.import_module(package)
        with torch.device("meta"):
            meta = _build(ref, role)
        tensors = list(meta.parameters()) + list(meta.buffers())
        need = sum(t.numel() * t.element_size() for t in tensors)
        count = sum(t.numel() for t in meta.parameters())
    except Exception:  # noqa: BLE001 - not buildable on meta: the real build reports its own errors
        return
    available = _available_memory() if available is None else available
    if available is None or need <= available:
        return
    ints = {k: v for k, v in ref.kwargs.items() if isinstance(v, int) and not isinstance(v, bool)}
    culprit = max(ints, key=lambda k: ints[k]) if ints else None
    hint = (f" The largest number among them is {role}.kwargs.{culprit} = {ints[culprit]:,}; check it." if culprit
            else "")
    raise ModelError(f"{role}.kwargs: {ref.model} with kwargs {ref.kwargs} would have {count:,} parameters: "
                     f"{_gb(need)} for its parameters and buffers alone (training needs several times that), but "
                     f"this machine has {_gb(available)} of memory available, so it was not built.{hint} "
                     f"Use smaller kwargs or a machine with more memory.")


def build_model(ref: ModelRef, role: str = "model") -> nn.Module:
    """Instantiate the network a :class:`~kdgraph.spec.ModelRef` names, randomly initialised, after checking
    that its parameters fit in memory (:func:`check_fits_in_memory`).

    ``torchvision:NAME``, ``timm:NAME`` (when timm is installed), ``hf:CLASS`` (when transformers is
    installed, :mod:`kdgraph.models.hf_support`), ``kdgraph.zoo:NAME`` and ``registered:NAME``
    always; ``package.module:factory``
    only with the user's consent (:mod:`kdgraph.models.trust`), checked before anything is imported.
    """
    check_fits_in_memory(ref, role)
    return _build(ref, role)


def _build(ref: ModelRef, role: str) -> nn.Module:
    package, _, name = ref.model.partition(":")
    if package == "torchvision":
        import torchvision

        names = _torchvision_names()
        if name not in names:
            raise ModelError(f"{role}.model: torchvision has no classification model {name!r}."
                             f"{did_you_mean(name, names)} Available: {', '.join(names)}.")
        try:
            return torchvision.models.get_model(name, weights=None, **ref.kwargs)
        except TypeError as e:
            raise ModelError(f"{role}.kwargs: torchvision {name} rejected {ref.kwargs}: {e}") from None
    if package == "timm":
        from .timm_support import build_timm_model

        return build_timm_model(name, dict(ref.kwargs), role)
    if package == "hf":
        from .hf_support import build_hf_model

        return build_hf_model(name, dict(ref.kwargs), role)
    if package == "kdgraph.zoo":
        zoo = _zoo_factories()
        if name not in zoo:
            raise ModelError(f"{role}.model: kdgraph.zoo has no model {name!r}.{did_you_mean(name, zoo)} "
                             f"Available: {', '.join(sorted(zoo))}.")
        return _call_factory(zoo[name], ref, role)
    if package == "registered":
        if name not in REGISTERED_MODELS:
            known = sorted(REGISTERED_MODELS)
            raise ModelError(f"{role}.model: no model registered as {name!r}.{did_you_mean(name, known)} "
                             f"Registered: {', '.join(known) or 'none'}. Register one with "
                             f"@kdgraph.register_model({name!r}) in code imported before the spec is compiled.")
        return _call_factory(REGISTERED_MODELS[name], ref, role)
    if not is_allowed(package):
        raise _refuse(f"{role}.model", ref.model, package)
    try:
        module = importlib.import_module(package)
    except ImportError as e:
        raise ModelError(f"{role}.model: cannot import {package!r} ({e}). Use 'torchvision:NAME' or "
                         f"'package.module:factory' with the package importable (on PYTHONPATH).") from None
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise ModelError(f"{role}.model: {package!r} has no callable {name!r}.{did_you_mean(name, public)}")
    return _call_factory(factory, ref, role)
