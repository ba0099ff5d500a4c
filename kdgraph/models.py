"""Model references -> ``nn.Module``: torchvision names and ``package.module:factory`` paths.

Building a model never downloads anything: weights are loaded separately by :func:`load_weights`,
which the trainer calls when training starts (``Distiller.load_weights()``).
"""
from __future__ import annotations

import importlib
import os
from typing import Any

import torch
from torch import nn

from .errors import ModelError, did_you_mean
from .spec import ModelRef


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_model(ref: ModelRef, role: str = "model") -> nn.Module:
    """Instantiate the network a :class:`~kdgraph.spec.ModelRef` names, randomly initialised."""
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
    try:
        module = importlib.import_module(package)
    except ImportError as e:
        raise ModelError(f"{role}.model: cannot import {package!r} ({e}). Use 'torchvision:NAME' or "
                         f"'package.module:factory' with the package importable (on PYTHONPATH).") from None
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise ModelError(f"{role}.model: {package!r} has no callable {name!r}.{did_you_mean(name, public)}")
    try:
        model = factory(**ref.kwargs)
    except TypeError as e:
        raise ModelError(f"{role}: {ref.model}(**{ref.kwargs}) failed: {e}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{role}: {ref.model} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _extract_state_dict(obj: Any, path: str, role: str) -> dict[str, torch.Tensor]:
    """Accept a plain state_dict, ``{"state_dict": ...}``, ``{"model": ...}`` or a kdgraph checkpoint."""
    if isinstance(obj, dict) and "distiller" in obj and isinstance(obj["distiller"], dict):
        prefix = f"{role}."
        sd = {k[len(prefix):]: v for k, v in obj["distiller"].items() if k.startswith(prefix)}
        if sd:
            return sd
    for key in ("state_dict", "model", "student"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return obj[key]
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise ModelError(f"{role}.weights: {path!r} holds no state_dict (expected a dict of tensors, "
                     f"{{'state_dict': ...}} or a kdgraph checkpoint)")


def load_weights(model: nn.Module, ref: ModelRef, role: str = "model") -> bool:
    """Load the weights ``ref.weights`` names into ``model`` (strict). Returns False when none are named.

    ``weights`` is a local file (a state_dict or a kdgraph checkpoint) or a torchvision weights enum
    member name (``IMAGENET1K_V1``, ``DEFAULT``), fetched through torchvision's cache.
    """
    w = ref.weights
    if not w:
        return False
    if os.path.sep in w or w.endswith((".pt", ".pth", ".bin", ".ckpt")) or os.path.exists(w):
        if not os.path.exists(w):
            raise ModelError(f"{role}.weights: file {w!r} does not exist")
        try:
            obj = torch.load(w, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling problem is the same user error
            raise ModelError(f"{role}.weights: cannot read {w!r}: {e}") from None
        sd = _extract_state_dict(obj, w, role)
    else:
        package, _, name = ref.model.partition(":")
        if package != "torchvision":
            raise ModelError(f"{role}.weights: {w!r} is not a file; weights enum names only work for torchvision "
                             f"models. Give a path to a state_dict file.")
        import torchvision

        enum = torchvision.models.get_model_weights(name)
        members = [m.name for m in enum] + ["DEFAULT"]
        if w not in members:
            raise ModelError(f"{role}.weights: {name} has no weights {w!r}.{did_you_mean(w, members)} "
                             f"Available: {', '.join(members)}.")
        try:
            sd = enum[w].get_state_dict(progress=False, check_hash=True) if w != "DEFAULT" else \
                enum.DEFAULT.get_state_dict(progress=False, check_hash=True)
        except Exception as e:  # noqa: BLE001 - network / cache errors
            raise ModelError(
                f"{role}.weights: could not fetch torchvision {name} {w} ({type(e).__name__}: {e}). Without network, "
                f"download the file elsewhere, put it in $TORCH_HOME/hub/checkpoints/, or set "
                f"{role}.weights to a local path.") from None
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ModelError(f"{role}.weights: {w!r} does not fit {ref.model}: {str(e).splitlines()[0]}") from None
    return True


def import_object(path: str, what: str) -> Any:
    """Import ``package.module:Name``."""
    package, sep, name = path.partition(":")
    if not sep:
        raise ModelError(f"{what}: {path!r} must be written 'package.module:Name'")
    try:
        module = importlib.import_module(package)
    except ImportError as e:
        raise ModelError(f"{what}: cannot import {package!r} ({e})") from None
    try:
        return getattr(module, name)
    except AttributeError:
        raise ModelError(f"{what}: {package!r} has no {name!r}") from None
