"""Networks trained once and cached: ``weights: "cache:NAME"`` and a ``pretrain:`` section.

No pretrained weights can be downloaded on an offline machine, so a spec can say how to make its
teacher::

    teacher:
      model: "kdgraph.zoo:resnet34_small"
      weights: "cache:fashion_mnist_resnet34"      # where the trained teacher is kept
      pretrain: {epochs: 2, batch_size: 128, optimizer: {type: sgd, lr: 0.1, momentum: 0.9}}

``kdgraph train`` looks for the file first; when it is missing it trains the network with
cross-entropy on the spec's data (same runtime: devices, DDP, AMP), evaluates it, and writes it
atomically, with a JSON side file holding its accuracy and the settings. Later runs, of this spec
or another one naming the same cache entry, load it.

``cache:NAME`` is ``$KDGRAPH_CACHE/NAME-<key>.pt`` (default folder ``$XDG_CACHE_HOME/kdgraph`` or
``~/.cache/kdgraph``); ``<key>`` is a hash of the model reference, the pretrain settings, the data
set and input size, so changing any of them trains a new network instead of reusing a stale one.
Without a ``pretrain`` section, ``cache:NAME`` is the file ``NAME.pt`` in that folder. A
``weights`` path with a ``pretrain`` section works the same way with that exact path.
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
from torch.nn import functional as F

from ..errors import ModelError
from ..spec import ModelRef, Spec

CACHE_PREFIX = "cache:"


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
    ident = {"model": ref.model, "kwargs": ref.kwargs, "pretrain": pretrain,
             "dataset": spec.data.dataset, "input": spec.input.model_dump(mode="json"),
             "train_subset": ref.pretrain.train_subset or spec.data.train_subset, "seed": ref.pretrain.seed}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:8]


def weights_path(ref: ModelRef, spec: Spec, role: str) -> Optional[Path]:
    """The file behind ``ref.weights`` when it is a cache entry or a pretrain target; None otherwise
    (a torchvision enum name or a plain file, which :func:`kdgraph.models.load_weights` reads)."""
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


def resolve(spec: Spec, role: str, require: bool = True) -> Optional[Path]:
    """Point ``spec.<role>.weights`` at the concrete file. Returns the file when it is (to be) made by
    pretraining and does not exist yet; raises when a plain ``cache:`` entry is missing."""
    ref: ModelRef = getattr(spec, role)
    path = weights_path(ref, spec, role)
    if path is None:
        return None
    if path.exists():
        ref.weights = str(path)
        return None
    if ref.pretrain is None:
        raise ModelError(f"{role}.weights: {ref.weights!r} is not in kdgraph's cache ({path} does not exist). Put "
                         f"a state_dict there, or add a `pretrain:` section to {role} so kdgraph train makes it.")
    if require:
        raise ModelError(f"{role}.weights: {ref.weights!r} has not been trained yet ({path} does not exist); "
                         f"run `kdgraph train` on the spec once, which trains and caches it")
    ref.weights = str(path)
    return path


def info(path: Path) -> dict[str, Any]:
    """The side file written with a pretrained network (accuracy, settings), or {}."""
    side = path.with_suffix(".json")
    try:
        return json.loads(side.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_info(path: Path, data: dict[str, Any]) -> None:
    side = path.with_suffix(".json")
    tmp = side.with_name(f".{side.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, side)


class SupervisedTask(nn.Module):
    """A plain network trained with cross-entropy, shaped like a Distiller for the training loop."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def batch_inputs(self) -> list[str]:
        return []

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def forward(self, images: torch.Tensor, targets: torch.Tensor):
        from ..distiller import DistillerOutput

        logits = self.model(images)
        ce = F.cross_entropy(logits, targets)
        return DistillerOutput(ce, {"ce": ce.detach()}, logits)
