"""Where a network's weights come from: a file, a torchvision enum, or kdgraph's cache (``cache:NAME``).

* :func:`state_dict_of` is the one place that takes a network's ``state_dict`` out of something: a module
  (unwrapping DDP's ``module.``, ``torch.compile``'s ``_orig_mod.``, or a Distiller's teacher / student /
  adapter) or what a weights file holds (a kdgraph checkpoint, ``{"state_dict": ...}``, ``{"model": ...}``,
  a plain state_dict). It returns plain contiguous CPU tensors without wrapper prefixes.
* ``cache:NAME`` (:func:`weights_path`, :func:`resolve`): a network trained once and kept in
  ``$KDGRAPH_CACHE`` (default ``$XDG_CACHE_HOME/kdgraph`` or ``~/.cache/kdgraph``). With a ``pretrain:``
  section the file is ``NAME-<key>.pt``, ``<key>`` a hash of the model reference, the pretrain settings, the
  data set and input size (so changing any of them trains a new network instead of reusing a stale one);
  without one it is ``NAME.pt``. A ``weights`` path with a ``pretrain`` section is that exact path. Making a
  missing entry is the trainer's job (``kdgraph train SPEC`` pretrains it first, see
  :mod:`kdgraph.train.pretrain`); here a missing entry is a clear error saying so.
* Shipped entries (:func:`shipped`): a pretrain target missing from the cache is taken from the package's
  ``kdgraph/models/pretrained/NAME-<key>.safetensors`` when there is one (the same key, so only the exact recipe
  matches), after checking the file's sha256 against ``kdgraph/models/pretrained/SHA256SUMS``; a mismatch is an
  error, never a silent retrain. ``KDGRAPH_SHIPPED_WEIGHTS=0`` ignores them (to retrain from scratch).
* :func:`load_weights` loads what ``ModelRef.weights`` names into a network (strict), files verified against
  their content hash (:mod:`kdgraph.models.weightio`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..errors import CheckpointError, ModelError, did_you_mean
from ..spec import ModelRef, Spec
from ..spec.recipe import KEYLESS_DEFAULTS
from .weightio import CHECKPOINT_MARK, file_sha256, load_file

__all__ = ["CACHE_PREFIX", "cache_dir", "pretrain_key", "weights_path", "resolve", "state_dict_of",
           "unwrap_module", "is_checkpoint", "load_weights", "shipped", "shipped_dir", "SHIPPED_ENV"]

CACHE_PREFIX = "cache:"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile


# --------------------------------------------------------------------------------------------
# state_dict extraction
# --------------------------------------------------------------------------------------------


def unwrap_module(module: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(module, (DistributedDataParallel, DataParallel)):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod
        else:
            return module


def is_checkpoint(obj: Any) -> bool:
    """Whether ``obj`` (what a file holds) is a kdgraph checkpoint."""
    return isinstance(obj, dict) and CHECKPOINT_MARK in obj


def _clean(sd: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in sd.items():
        for prefix in _WRAPPER_PREFIXES:
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v.detach().to("cpu").contiguous() if isinstance(v, torch.Tensor) else v
    return out


def _prefixed(sd: Any, prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in (sd or {}).items() if k.startswith(prefix)}


def state_dict_of(source: Any, role: Optional[str] = None, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The weights of one network in ``source``, as plain contiguous CPU tensors without wrapper prefixes.

    ``source`` is a module or what a weights file holds. ``role`` picks the network: ``"student"``,
    ``"teacher"`` or ``"adapters.NAME"`` inside a Distiller or a kdgraph checkpoint (its ``distiller``
    state; for the student, its ``student`` entry first; any other role reads a checkpoint's student);
    ``None`` is the module itself (of a checkpoint: its student). A plain file
    (``{"state_dict": ...}``, ``{"model": ...}``, ``{"student": ...}`` or a dict of tensors) is one network's
    weights whatever ``role`` says. ``what`` names the source in errors (:class:`CheckpointError`).
    """
    if isinstance(source, nn.Module):
        module = unwrap_module(source)
        for part in (role.split(".") if role else []):
            module = unwrap_module(getattr(module, part) if not isinstance(module, nn.ModuleDict) else module[part])
        return _clean(module.state_dict())
    if is_checkpoint(source):
        net = role if role == "teacher" or (role or "").startswith("adapters.") else "student"
        if net == "student" and isinstance(source.get("student"), dict):
            return _clean(source["student"])
        sd = _prefixed(source.get("distiller"), f"{net}.")
        if sd:
            return _clean(sd)
        raise CheckpointError(f"{what}: a kdgraph checkpoint without {net} weights")
    if isinstance(source, dict):
        for key in ("state_dict", "model", "student"):
            if isinstance(source.get(key), dict):
                return _clean(source[key])
        if source and all(isinstance(v, torch.Tensor) for v in source.values()):
            return _clean(source)
    raise CheckpointError(f"{what} holds no state_dict (expected a kdgraph checkpoint, {{'state_dict': ...}} or a "
                          f"dict of tensors)")


# --------------------------------------------------------------------------------------------
# cache:NAME
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    env = os.environ.get("KDGRAPH_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kdgraph"


def pretrain_key(ref: ModelRef, spec: Spec) -> str:
    """8 hex digits identifying what a pretraining run produces."""
    assert ref.pretrain is not None
    pretrain = ref.pretrain.model_dump(mode="json")
    sched = pretrain.get("scheduler")
    if sched and sched.get("type") != "multistep":  # milestones and gamma only shape a multistep schedule
        sched.pop("milestones", None)
        sched.pop("gamma", None)
    for part in ("optimizer", "scheduler"):  # recipe fields added later, at their defaults: the key stays as it was
        for k, v in KEYLESS_DEFAULTS.get(part, {}).items():
            if (pretrain.get(part) or {}).get(k, v) == v:
                (pretrain.get(part) or {}).pop(k, None)
    opt = pretrain.get("optimizer") or {}
    if opt.get("type") != "sgd_dot":  # delta only shapes sgd_dot (DOT): keys of other optimizers stay as they were
        opt.pop("delta", None)
    ident = {"model": ref.model, "kwargs": ref.kwargs, "pretrain": pretrain,
             "dataset": spec.data.dataset, "input": spec.input.model_dump(mode="json"),
             "train_subset": ref.pretrain.train_subset or spec.data.train_subset, "seed": ref.pretrain.seed}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:8]


def weights_path(ref: ModelRef, spec: Spec, role: str) -> Optional[Path]:
    """The file behind ``ref.weights`` when it is a cache entry or a pretrain target; None otherwise
    (a torchvision enum name or a plain file, which :func:`load_weights` reads)."""
    w = ref.weights
    if not w:
        return None
    if w.startswith(CACHE_PREFIX):
        name = w[len(CACHE_PREFIX):]
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name) or name.startswith("."):
            raise ModelError(f"{role}.weights: {w!r}: a cache name is letters, digits, '_', '-' and '.'")
        if ref.pretrain is not None:
            return cache_dir() / f"{name}-{pretrain_key(ref, spec)}.pt"
        return cache_dir() / f"{name}.pt"
    if ref.pretrain is not None:
        return Path(w).expanduser()
    return None


SHIPPED_ENV = "KDGRAPH_SHIPPED_WEIGHTS"
_SUMS = "SHA256SUMS"


def shipped_dir() -> Path:
    """The package's folder of trained networks shipped with kdgraph (``kdgraph/models/pretrained``)."""
    from importlib.resources import files

    return Path(str(files("kdgraph.models"))) / "pretrained"


def shipped(path: Path, role: str = "teacher") -> Optional[Path]:
    """The shipped file standing in for the missing cache entry ``path`` (``NAME-<key>.pt``), its whole-file
    sha256 checked against ``SHA256SUMS``; None when none is shipped (or ``KDGRAPH_SHIPPED_WEIGHTS=0``)."""
    if os.environ.get(SHIPPED_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    folder = shipped_dir()
    candidate = folder / f"{path.stem}.safetensors"
    if not candidate.is_file():
        return None
    sums = {}
    try:
        for line in (folder / _SUMS).read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                sums[parts[1].lstrip("*")] = parts[0]
    except OSError:
        pass
    expected = sums.get(candidate.name)
    actual = file_sha256(candidate)
    if expected != actual:
        raise ModelError(f"{role}.weights: the shipped file {str(candidate)!r} does not match its sha256 in "
                         f"{folder / _SUMS} (expected {expected or 'an entry'}, found {actual}); it was not used. "
                         f"Restore it (git checkout), or set {SHIPPED_ENV}=0 to train the {role} from scratch.")
    return candidate


def resolve(spec: Spec, role: str, require: bool = True) -> Optional[Path]:
    """Point ``spec.<role>.weights`` at the concrete file. Returns the file when it is to be made by
    pretraining and does not exist yet (``require=False``, the trainer's call); raises when a plain
    ``cache:`` entry is missing, or (``require=True``) when a pretrain target has not been made yet.
    A missing pretrain target that kdgraph ships (:func:`shipped`) resolves to the shipped file."""
    ref: ModelRef = getattr(spec, role)
    path = weights_path(ref, spec, role)
    if path is None:
        return None
    if path.exists():
        ref.weights = str(path)
        return None
    ship = shipped(path, role) if ref.pretrain is not None else None
    if ship is not None:
        ref.weights = str(ship)
        return None
    if ref.pretrain is None:
        raise ModelError(f"{role}.weights: {ref.weights!r} is not in kdgraph's cache ({path} does not exist). Put "
                         f"a state_dict there, or add a `pretrain:` section to {role} so `kdgraph train SPEC` "
                         f"makes it.")
    if require:
        raise ModelError(f"{role}.weights: {ref.weights!r} has not been trained yet ({path} does not exist). "
                         f"Create it by running `kdgraph train SPEC` on this spec once: it pretrains the {role} "
                         f"as its `pretrain:` section says and caches it there, and later loads find it.")
    ref.weights = str(path)
    return path


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _is_file_ref(w: str) -> bool:
    return os.path.sep in w or w.endswith((".pt", ".pth", ".bin", ".ckpt", ".safetensors")) or os.path.exists(w)


def _torchvision_weights(ref: ModelRef, role: str) -> dict[str, torch.Tensor]:
    w = ref.weights
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
        member = enum.DEFAULT if w == "DEFAULT" else enum[w]
        return member.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # noqa: BLE001 - network / cache errors
        raise ModelError(
            f"{role}.weights: could not fetch torchvision {name} {w} ({type(e).__name__}: {e}). Without network, "
            f"download the file elsewhere, put it in $TORCH_HOME/hub/checkpoints/, or set "
            f"{role}.weights to a local path.") from None


def _load_hf(model: nn.Module, ref: ModelRef, role: str) -> bool:
    """An ``hf:`` network's weights: a save_pretrained folder or a weights file (see :mod:`kdgraph.models.hf_support`)."""
    from .gguf_support import is_gguf, read_gguf_weights
    from .hf_support import hf_folder_state_dict, is_hf_folder, load_hf_weights

    w = str(ref.weights)
    what = f"{role}.weights: {w!r}"
    if is_gguf(w):  # llama.cpp's format, dequantised (kdgraph.models.gguf_support)
        sd = read_gguf_weights(model, w, ref.sha256, f"{role}.weights")
    elif is_hf_folder(w):
        sd = hf_folder_state_dict(w, what)
    elif os.path.isfile(w):
        try:
            sd = state_dict_of(load_file(w, f"{role}.weights"), role, what)
        except CheckpointError as e:
            raise ModelError(str(e)) from None
    else:
        raise ModelError(f"{what} is neither a save_pretrained folder (model.safetensors, its sharded index or "
                         f"pytorch_model.bin) nor a weights file; kdgraph never downloads (a hub name is not read)")
    load_hf_weights(model, sd, what)
    return True


def load_weights(model: nn.Module, ref: ModelRef, role: str = "model") -> bool:
    """Load the weights ``ref.weights`` names into ``model`` (strict). Returns False when none are named.

    ``weights`` is a local file (a state_dict or a kdgraph checkpoint, whose ``role`` network is taken) or a
    torchvision weights enum member name (``IMAGENET1K_V1``, ``DEFAULT``), fetched through torchvision's cache.
    An ``hf:`` network also reads a ``save_pretrained`` folder (:mod:`kdgraph.models.hf_support`).
    A ``cache:NAME`` reference must be resolved to its file first (:func:`resolve`).
    """
    w = ref.weights
    if not w:
        return False
    if w.startswith(CACHE_PREFIX):
        raise ModelError(f"{role}.weights: {w!r} is a cache entry; resolve it first (kdgraph.models.weights.resolve, "
                         f"as Distiller.load_weights does)")
    if ref.sha256 is not None and not w.lower().endswith(".gguf"):  # a .gguf file is checked where it is read
        from .gguf_support import check_file_sha256

        if not os.path.isfile(w):
            raise ModelError(f"{role}.sha256 pins one weights file, but {role}.weights {w!r} is not a file (a "
                             f"folder or a torchvision name); remove sha256 or name the file")
        check_file_sha256(Path(w), ref.sha256, f"{role}.weights")
    if ref.model.startswith("hf:"):
        return _load_hf(model, ref, role)
    if _is_file_ref(w):
        if not os.path.exists(w):
            raise ModelError(f"{role}.weights: file {w!r} does not exist")
        obj = load_file(w, f"{role}.weights")  # weights_only=True, verified against its content hash
        try:
            sd = state_dict_of(obj, role, f"{role}.weights: {w!r}")
        except CheckpointError as e:
            raise ModelError(str(e)) from None
    else:
        sd = _torchvision_weights(ref, role)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ModelError(f"{role}.weights: {w!r} does not fit {ref.model}: {str(e).splitlines()[0]}") from None
    return True
