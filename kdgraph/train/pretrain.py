"""Networks trained once and cached: the trainer's side of ``weights: "cache:NAME"`` with a ``pretrain:`` section.

No pretrained weights can be downloaded on an offline machine, so a spec can say how to make its
teacher::

    teacher:
      model: "kdgraph.zoo:resnet34_small"
      weights: "cache:fashion_mnist_resnet34"      # where the trained teacher is kept
      pretrain: {epochs: 2, batch_size: 128, optimizer: {type: sgd, lr: 0.1, momentum: 0.9}}

``kdgraph train`` looks for the file first (where it lives: :mod:`kdgraph.models.weights`); when it is missing,
:func:`pretrain_network` trains the network with cross-entropy on the spec's data (same runtime: devices,
DDP, AMP), evaluates it, and writes it atomically with a JSON side file holding its accuracy and the
settings. Later runs, of this spec or another one naming the same cache entry, load it.
"""
from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..distiller import DistillerOutput
from ..formatting import seconds
from .. import models
from ..spec import LossSpec, ModelRef, Spec, StageSpec
from ..models.weightio import atomic_save
from ..models.weights import CACHE_PREFIX, cache_dir, pretrain_key, resolve, state_dict_of, weights_path  # noqa: F401
from .data import DataBundle, subset
from .distributed import barrier
from .evaluation import validation_loader
from .steps import RunProgress, StepLoop, make_stage_run

__all__ = ["SupervisedTask", "pretrain_network", "info", "write_info", "CACHE_PREFIX", "cache_dir", "pretrain_key",
           "weights_path", "resolve"]


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

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> DistillerOutput:
        logits = self.model(images)
        ce = F.cross_entropy(logits, targets)
        return DistillerOutput(ce, {"ce": ce.detach()}, logits)


def pretrain_network(spec: Spec, role: str, path: Path, bundle: DataBundle, steps: StepLoop) -> float:
    """Train ``spec.<role>`` with cross-entropy as its ``pretrain:`` section says and cache it at ``path``
    (rank 0 writes; every process waits for it). Returns the seconds it took."""
    env, say = steps.env, steps.monitor.print
    ref: ModelRef = getattr(spec, role)
    pt = ref.pretrain
    assert pt is not None
    t0 = time.perf_counter()
    train_set = subset(bundle.train_full, pt.train_subset or spec.data.train_subset)
    if not pt.augment and getattr(train_set, "augment", False):
        train_set = copy.copy(train_set)  # same images, no augmentation
        train_set.augment = False
    say(f"[bold]{role} {ref.model}[/]: no cached weights at {path}; training it once with cross-entropy "
        f"({pt.epochs} epoch(s) on {len(train_set)} images)", soft_wrap=True)
    torch.manual_seed(pt.seed)
    model = models.build_model(ModelRef(model=ref.model, kwargs=ref.kwargs), role).to(env.device)
    if spec.runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    task = SupervisedTask(model)
    stage = StageSpec(name=f"pretrain_{role}", epochs=pt.epochs, batch_size=pt.batch_size,
                      reference_world_size=pt.reference_world_size, optimizer=pt.optimizer,
                      scheduler=pt.scheduler, losses=[LossSpec(type="cross_entropy")])
    task.train()
    run = make_stage_run(stage.name, -1, stage, task, model, train_set, env=env, workers=spec.data.workers,
                         seed=pt.seed, amp=steps.settings.amp, save=False, evaluate="last", batch_inputs=[])
    # its own steps count from 0; the run's first step (time to first step) may be one of them
    own = RunProgress(started=steps.progress.started, first_step_s=steps.progress.first_step_s)
    StepLoop(env, steps.monitor, steps.settings, own, steps.skipped).run_epochs(
        run, validation_loader(spec, bundle.val, env))
    steps.progress.first_step_s = own.first_step_s
    if env.is_main:
        atomic_save(state_dict_of(model), path)
        write_info(path, {"model": ref.model, "kwargs": ref.kwargs, "spec": spec.name,
                          "pretrain": pt.model_dump(mode="json"), "dataset": spec.data.dataset,
                          "eval": run.last_eval, "seconds": round(time.perf_counter() - t0, 1)})
    barrier(env)
    ev = run.last_eval or {}
    took = time.perf_counter() - t0
    say(f"{role} trained in {seconds(took)}: top-1 {ev.get('top1', float('nan')):.2f}% -> cached at {path}",
        soft_wrap=True)
    return took
