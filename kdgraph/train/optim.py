"""Optimizers of a stage: the parameter groups (no weight decay on biases / norm layers, lr multipliers by name
pattern, layer-wise lr decay) and the optimizer built from :data:`OPTIMIZERS`, a table of builders by type.

``lr_used = optimizer.lr * world_size / reference_world_size``: linear scaling by the number of processes,
relative to the number the spec's lr was tuned for; the effective batch is ``batch_size * world_size``.

Another optimizer plugs in as one entry of :data:`OPTIMIZERS` (``name -> builder(groups, lr, spec)``) plus its
name in :data:`kdgraph.spec.recipe.OPTIMIZER_TYPES`; the groups it receives already carry their ``lr`` and
``weight_decay``. The schedules are in :mod:`.schedule`.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..errors import SpecError, TrainingError
from ..spec import StageSpec
from .schedule import build_scheduler  # noqa: F401 - re-exported (kdgraph.train.loop's API)

__all__ = ["lr_used", "build_optimizer", "build_scheduler", "param_groups", "OPTIMIZERS", "NORM_LAYERS"]

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)


def lr_used(stage: StageSpec | Any, world_size: int) -> float:
    """The explicit scaling rule: ``lr * world_size / reference_world_size``."""
    return stage.optimizer.lr * world_size / stage.reference_world_size


def _kw(o: Any, **names: str) -> dict[str, Any]:
    """The spec's options that are set, under the optimizer's argument names."""
    return {arg: getattr(o, field) for arg, field in names.items() if getattr(o, field) is not None}


def _rmsprop_tf(groups: list[dict], lr: float, o: Any) -> torch.optim.Optimizer:
    try:
        from timm.optim import RMSpropTF
    except ImportError:
        raise SpecError("optimizer type rmsprop_tf is timm's RMSpropTF (TensorFlow's RMSprop: eps inside the square "
                        "root, lr inside the momentum), and timm is not installed; pip install 'kdgraph[timm]', or "
                        "use type rmsprop (torch's)") from None
    return RMSpropTF(groups, lr=lr, momentum=o.momentum, **_kw(o, alpha="alpha", eps="eps"))


def _sgd_dot(groups: list[dict], lr: float, o: Any) -> torch.optim.Optimizer:
    from .dot import DOT  # kdgraph.train.dot: two momenta, stepped with the terms (StepLoop)

    (group,) = groups  # the schema refuses no_decay / param_groups / layer_decay with sgd_dot
    return DOT(group["params"], lr=group.get("lr", lr), momentum=o.momentum,
               delta=0.075 if o.delta is None else o.delta, weight_decay=group.get("weight_decay", o.weight_decay))


#: optimizer builders by spec type: (parameter groups with lr / weight_decay set, lr, OptimizerSpec) -> optimizer
OPTIMIZERS: dict[str, Callable[[list[dict], float, Any], torch.optim.Optimizer]] = {
    "sgd": lambda g, lr, o: torch.optim.SGD(g, lr=lr, momentum=o.momentum, nesterov=o.nesterov),
    "adam": lambda g, lr, o: torch.optim.Adam(g, lr=lr, **_kw(o, betas="betas", eps="eps")),
    "adamw": lambda g, lr, o: torch.optim.AdamW(g, lr=lr, **_kw(o, betas="betas", eps="eps")),
    "rmsprop": lambda g, lr, o: torch.optim.RMSprop(g, lr=lr, momentum=o.momentum, **_kw(o, alpha="alpha", eps="eps")),
    "rmsprop_tf": _rmsprop_tf,
    "sgd_dot": _sgd_dot,
}


def glob_regex(pattern: str, hash_group: bool = False) -> re.Pattern:
    """A spec's name glob as a regex: ``*`` any text, ``?`` one character, ``#`` a layer number (captured)."""
    out = []
    for ch in pattern:
        out.append(".*" if ch == "*" else "." if ch == "?" else r"(\d+)" if ch == "#" and hash_group
                   else re.escape(ch))
    return re.compile("".join(out))


def _no_decay(name: str, p: nn.Parameter, norm_ids: set[int], rules: Sequence[str]) -> bool:
    return (("bias" in rules and name.endswith(".bias")) or ("norm" in rules and id(p) in norm_ids)
            or ("1d" in rules and p.ndim <= 1))


def param_groups(stage: StageSpec | Any, named: list[tuple[str, nn.Parameter]], lr: float,
                 modules: Optional[nn.Module] = None) -> list[dict[str, Any]]:
    """The optimizer's parameter groups of ``named`` (name, parameter), in order, each with ``lr``,
    ``weight_decay`` and ``names``; parameters with the same settings share a group. ``modules`` (the
    Distiller) tells which parameters belong to normalisation layers."""
    o = stage.optimizer
    norm_ids = {id(p) for m in (modules.modules() if modules is not None else ()) if isinstance(m, NORM_LAYERS)
                for p in m.parameters(recurse=False)}
    patterns = [glob_regex(g.params) for g in o.param_groups]
    used = [False] * len(patterns)
    layer_of: dict[str, int] = {}
    n_layers = 0
    if o.layer_decay is not None:
        layers = glob_regex(o.layer_decay.layers, hash_group=True)
        emb = glob_regex(o.layer_decay.embeddings) if o.layer_decay.embeddings else None
        for name, _ in named:
            m = layers.fullmatch(name)
            if m:
                layer_of[name] = int(m.group(1)) + 1
                n_layers = max(n_layers, layer_of[name])
            elif emb is not None and emb.fullmatch(name):
                layer_of[name] = 0
        if not n_layers:
            raise SpecError(f"stage {stage.name!r}: optimizer.layer_decay.layers {o.layer_decay.layers!r} matches no "
                            f"trainable parameter; names look like {', '.join(n for n, _ in named[:3])}")
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, p in named:
        mult, wd = 1.0, o.weight_decay
        if _no_decay(name, p, norm_ids, o.no_decay):
            wd = 0.0
        for i, rx in enumerate(patterns):
            if rx.fullmatch(name):
                used[i] = True
                g = o.param_groups[i]
                mult *= g.lr_mult
                wd = g.weight_decay if g.weight_decay is not None else wd
                break
        if o.layer_decay is not None:
            mult *= o.layer_decay.rate ** (n_layers + 1 - layer_of.get(name, n_layers + 1))
        key = (lr * mult, wd)
        grp = groups.setdefault(key, {"params": [], "names": [], "lr": key[0], "weight_decay": wd})
        grp["params"].append(p)
        grp["names"].append(name)
    for i, ok in enumerate(used):
        if not ok:
            raise SpecError(f"stage {stage.name!r}: optimizer.param_groups[{i}].params {o.param_groups[i].params!r} "
                            f"matches no trainable parameter; names look like "
                            f"{', '.join(n for n, _ in named[:3])} (globs: * any text, ? one character)")
    return list(groups.values())


def named_trainable(task: nn.Module, params: list[nn.Parameter]) -> list[tuple[str, nn.Parameter]]:
    """``params`` with their names in ``task`` (``student.fc.weight``), in the order given."""
    names = {id(p): n for n, p in task.named_parameters(remove_duplicate=True)}
    return [(names.get(id(p), f"param{i}"), p) for i, p in enumerate(params)]


def build_optimizer(stage: StageSpec | Any, params: list[nn.Parameter], lr: float,
                    task: Optional[nn.Module] = None) -> torch.optim.Optimizer:
    """The stage's optimizer over ``params`` at learning rate ``lr``, in the groups :func:`param_groups` makes
    (names and norm layers read from ``task``, the Distiller, when given)."""
    o = stage.optimizer
    if not params:
        raise TrainingError(f"stage {stage.name!r}: nothing to optimise (no trainable parameter); check its `train` list")
    named = named_trainable(task, params) if task is not None else [(f"param{i}", p) for i, p in enumerate(params)]
    groups = param_groups(stage, named, lr, task)
    if o.type not in OPTIMIZERS:  # pragma: no cover - the schema allows only OPTIMIZER_TYPES
        raise TrainingError(f"unknown optimizer type {o.type!r}")
    return OPTIMIZERS[o.type](groups, lr, o)
