"""The training loop behind ``kdgraph train``: stages, epochs, evaluation, checkpoints, resume.

It uses the :class:`~kdgraph.distiller.Distiller` as any user loop would::

    d = kdgraph.compile(spec, teacher=teacher, student=student); d.load_weights()
    for each stage: d.enter_stage(i); opt = SGD(d.trainable_parameters(), lr_used, ...)
        for each batch: out = ddp(d)(images, targets, **extras); out.loss.backward(); opt.step()
        after each epoch: top-1/top-5 of d.student on the validation split; checkpoint

Learning rate: ``lr_used = optimizer.lr * world_size / reference_world_size`` (linear scaling by the
number of processes, relative to the number the spec's lr was tuned for); the effective batch is
``batch_size * world_size``. Both are printed and recorded (``metrics.jsonl``, ``results.json``).

A non-finite loss stops the run (:class:`~kdgraph.errors.TrainingError` naming the term and the
step) before anything is saved after it, and every save first checks that the weights are finite and
give a finite loss on the last batch (the loss of a step is known only after the step changed the
weights), so ``last.pt`` stays the last good state.
"""
from __future__ import annotations

import contextlib
import copy
import json
import random
import shutil
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, DataError, KDGraphError, TrainingError
from ..spec import LossSpec, ModelRef, Spec, StageSpec, load_spec
from . import pretrain as pretrain_mod
from .checkpoint import (atomic_save, brief, clean_state_dict, load_checkpoint, load_file, rng_state, set_rng_state,
                         student_state_dict)
from .data import (DataBundle, build_datasets, check_data, make_loader, subset, unpack_batch,
                   wrap_train_dataset)
from .distributed import DistEnv, all_gather_object, all_reduce_sum, barrier, setup, teardown, wrap
from .monitor import Monitor
from .runlock import RunLock, make_folder
from ..trust import consent


@dataclass
class TrainOptions:
    """How to run (what to train is the spec)."""

    out: Optional[Path] = None  # run folder; default runs/<spec name>
    data: Optional[str] = None  # overrides data.root
    resume: bool = False  # continue from OUT/last.pt when it exists
    overwrite: bool = False  # start over in a folder that holds a run
    only_stages: Sequence[str] = ()  # run only these stages (names)
    device: Optional[str] = None  # cpu | cuda | cuda:N; default cuda when available
    ckpt_every: int = 0  # also checkpoint every N steps within an epoch (0: epoch ends only)
    ckpt_minutes: float = 30.0  # ... and at least this often
    log_every: int = 0  # steps per logged record (0: every step on CPU, 20 on GPU)
    progress: Optional[bool] = None  # rich progress bar (default: when stdout is a terminal)
    tensorboard: bool = True
    plot: bool = True
    started: Optional[float] = None  # time.perf_counter() at command start (for time-to-first-step)
    allow_imports: Sequence[str] = ()  # module prefixes the spec may import (consent, see kdgraph.trust)
    trust_code: bool = False  # the spec may import any module
    skip_bad_images: bool = False  # ImageFolder: skip (and count) unreadable images instead of stopping


def lr_used(stage: StageSpec | Any, world_size: int) -> float:
    """The explicit scaling rule: ``lr * world_size / reference_world_size``."""
    return stage.optimizer.lr * world_size / stage.reference_world_size


def build_optimizer(stage: StageSpec | Any, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    o = stage.optimizer
    if not params:
        raise TrainingError(f"stage {stage.name!r}: nothing to optimise (no trainable parameter); check its `train` list")
    if o.type == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov)
    if o.type == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=o.weight_decay)
    if o.type == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay)
    raise TrainingError(f"unknown optimizer type {o.type!r}")  # pragma: no cover - the schema forbids it


def build_scheduler(stage: StageSpec | Any, opt: torch.optim.Optimizer) -> Optional[Any]:
    """Stepped once per epoch: multistep (milestones in epochs), cosine (over the stage's epochs), constant."""
    s = stage.scheduler
    if s is None or s.type == "constant":
        return None
    if s.type == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(s.milestones), gamma=s.gamma)
    if s.type == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=stage.epochs)
    raise TrainingError(f"unknown scheduler type {s.type!r}")  # pragma: no cover


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic


def topk_counts(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hit = top == targets[:, None]
    return int(hit[:, :1].sum()), int(hit.any(dim=1).sum())


def load_init_from(distiller: nn.Module, path: str) -> list[str]:
    """``init_from``: a kdgraph checkpoint or a plain student state_dict into the student (strict) and,
    from a kdgraph checkpoint, into every adapter of the same name and shapes. Returns what was loaded."""
    obj = load_file(path, "init_from")
    sd = clean_state_dict(student_state_dict(obj, f"init_from {path!r}"))
    try:
        distiller.student.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"init_from {path!r} does not fit the student: {brief(e)}") from None
    loaded = ["student"]
    dist_sd = obj.get("distiller") if isinstance(obj, dict) and "kdgraph_checkpoint" in obj else None
    for name, adapter in distiller.adapters.items():
        prefix = f"adapters.{name}."
        asd = {k[len(prefix):]: v for k, v in (dist_sd or {}).items() if k.startswith(prefix)}
        own = adapter.state_dict()
        if asd and set(asd) == set(own) and all(asd[k].shape == own[k].shape for k in own):
            adapter.load_state_dict(asd, strict=True)
            loaded.append(f"adapter {name}")
    return loaded


@torch.no_grad()
def evaluate_model(model: nn.Module, loader: Any, env: DistEnv, amp: str = "off", channels_last: bool = False,
                   restore: Optional[nn.Module] = None) -> dict[str, Any]:
    """Top-1 / top-5 (%) of ``model`` over a validation loader whose sampler shards without padding, so
    that with several processes every image is counted exactly once (counts are summed)."""
    t0 = time.perf_counter()
    was = model.training
    model.eval()
    if env.distributed:
        import torch.distributed as dist

        for b in model.buffers():  # every process evaluates rank 0's BatchNorm statistics
            dist.broadcast(b.data, 0)
    ctx = (contextlib.nullcontext() if amp == "off" else
           torch.autocast(device_type=env.device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16))
    c1 = c5 = n = 0
    for batch in loader:
        images, targets, _ = unpack_batch(batch)
        images = images.to(env.device, non_blocking=True)
        if channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = targets.to(env.device, non_blocking=True)
        with ctx:
            logits = model(images)
        a, b = topk_counts(logits.float(), targets)
        c1, c5, n = c1 + a, c5 + b, n + int(targets.shape[0])
    c1, c5, n = all_reduce_sum(env, [c1, c5, n])
    if restore is not None:
        restore.train()
    elif was:
        model.train()
    return {"top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1), "images": int(n),
            "seconds": round(time.perf_counter() - t0, 2)}


@dataclass
class _Run:
    """Mutable state of one stage's epochs."""

    name: str
    stage_index: int
    stage: Any
    task: nn.Module
    model: nn.Module
    eval_model: Optional[nn.Module]
    loader: Any
    opt: torch.optim.Optimizer
    sched: Optional[Any]
    scaler: Optional[Any]
    save: bool
    evaluate: str  # "epoch" | "last" | "never"
    batch_inputs: list[str] = field(default_factory=list)
    lr: float = 0.0
    best_top1: Optional[float] = None
    last_eval: Optional[dict[str, Any]] = None
    rates: list[float] = field(default_factory=list)
    epoch_images: int = 0
    epoch_t0: float = 0.0
    last_batch: Optional[tuple[Any, Any, dict[str, Any]]] = None  # what the save-time probe runs on


class Trainer:
    """One ``kdgraph train`` of one spec (see :func:`train`)."""

    def __init__(self, spec: Spec, opts: TrainOptions, env: DistEnv):
        self.spec = spec
        self.opts = opts
        self.env = env
        self.out = Path(opts.out) if opts.out else Path("runs") / spec.name
        self.last_path = self.out / "last.pt"
        self.best_path = self.out / "best.pt"
        self.monitor = Monitor(self.out, enabled=env.is_main, progress=opts.progress, tensorboard=opts.tensorboard)
        self.global_step = 0
        self.t_start = opts.started if opts.started is not None else time.perf_counter()
        self.pretrain_s = 0.0  # time spent training cached networks (a one-time cost, reported apart)
        self.first_step_s: Optional[float] = None
        self.last_saved: Optional[str] = None
        self.history: list[dict[str, Any]] = []
        self.results: dict[str, Any] = {}
        self._ckpt_time = time.perf_counter()
        self._resume_rng: Optional[dict[str, Any]] = None
        self.amp = spec.runtime.amp
        self.flush_every = opts.log_every or (1 if env.device.type == "cpu" else 20)

    # ------------------------------------------------------------------ helpers
    def autocast(self):
        if self.amp == "off":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(device_type=self.env.device.type, dtype=dtype)

    def to_device(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            x = x.to(self.env.device, non_blocking=True)
            if self.spec.runtime.channels_last and x.dim() == 4 and x.is_floating_point():
                x = x.contiguous(memory_format=torch.channels_last)
        return x

    def say(self, text: str) -> None:
        self.monitor.print(text, soft_wrap=True)

    # ------------------------------------------------------------------ entry
    def run(self) -> dict[str, Any]:
        """Train under an exclusive lock on the run folder (rank 0 holds it; see :mod:`.runlock`)."""
        lock = RunLock(self.out).acquire() if self.env.is_main else None
        try:
            return self._run()
        finally:
            if lock is not None:
                lock.release()

    def _run(self) -> dict[str, Any]:
        spec, env, opts = self.spec, self.env, self.opts
        ckpt = self._prepare_folder()
        root = opts.data if opts.data is not None else spec.data.root
        check_data(spec, root)  # before any model is built
        bundle = build_datasets(spec, root, skip_bad_images=opts.skip_bad_images)
        self._skipped, self._skipped_reported = bundle.skipped, 0
        seed_everything(spec.runtime.seed, spec.runtime.deterministic)
        if env.device.type == "cpu":
            # Subnormal floats (weights/gradients decaying towards 0 late in training) run ~20x slower on x86
            # CPUs: one teacher pretraining went from 508 to 19 images/s mid-epoch. Flush them to zero.
            torch.set_flush_denormal(True)
        if env.is_main:
            make_folder(self.out)
            try:
                (self.out / "spec.json").write_text(json.dumps(spec.model_dump(mode="json"), indent=2))
            except OSError as e:
                raise TrainingError(f"cannot write {self.out / 'spec.json'}: {e.strerror or type(e).__name__}; "
                                    f"check that --out {self.out} is writable and the disk has space") from None
            if ckpt is not None:
                self.monitor.load_history()
        self.say(f"[bold]kdgraph train[/] {spec.name}: {bundle.description} ({len(bundle.train)} train / "
                 f"{len(bundle.val)} val images), device {env.device}"
                 + (f" x {env.world_size} processes ({env.backend})" if env.distributed else "")
                 + f", amp {self.amp}, channels_last {spec.runtime.channels_last}, compile {spec.runtime.compile}"
                 + f" -> {self.out}")
        self.monitor.record("start", spec=spec.name, world_size=env.world_size, device=str(env.device),
                            amp=self.amp, resumed=ckpt is not None)

        for role in ("teacher", "student"):
            path = pretrain_mod.resolve(spec, role, require=False)
            if path is not None:
                self._pretrain(role, path, bundle)

        distiller = self._build_distiller(ckpt)
        val_loader = make_loader(bundle.val, batch_size=self._eval_batch(), train=False, workers=spec.data.workers,
                                 seed=spec.runtime.seed, world_size=env.world_size, rank=env.rank,
                                 pin_memory=env.device.type == "cuda")
        teacher_eval = ckpt.get("teacher_eval") if ckpt else None
        if spec.runtime.eval_teacher and teacher_eval is None:
            teacher_eval = self.evaluate(distiller.teacher, val_loader)
            self.say(f"teacher {spec.teacher.model}: top-1 {teacher_eval['top1']:.2f}%  top-5 "
                     f"{teacher_eval['top5']:.2f}% on {teacher_eval['images']} validation images")
            self.monitor.record("teacher_eval", **teacher_eval)
        self.teacher_eval = teacher_eval

        train_ds = wrap_train_dataset(bundle.train, spec)
        stage_results = []
        for i, st in enumerate(spec.stages):
            if opts.only_stages and st.name not in opts.only_stages:
                continue
            resume = None
            if ckpt is not None:
                if ckpt["stage_index"] > i or (ckpt["stage_index"] == i and ckpt.get("stage_done")):
                    self.say(f"stage {st.name}: done in the checkpoint, skipped")
                    stage_results.append(ckpt.get("stage_results", {}).get(st.name, {"name": st.name}))
                    continue
                if ckpt["stage_index"] == i:
                    resume = ckpt
            stage_results.append(self._run_stage(distiller, i, train_ds, val_loader, resume, stage_results))
            ckpt = None
        return self._finish(distiller, stage_results)

    def _prepare_folder(self) -> Optional[dict[str, Any]]:
        opts = self.opts
        if self.env.is_main and self.out.is_dir():
            for stale in self.out.glob(".*.pt.*.tmp"):  # left by a process killed while saving
                stale.unlink(missing_ok=True)
        exists = self.last_path.exists()
        if exists and not opts.resume and not opts.overwrite:
            raise TrainingError(f"{self.out} already holds a run (last.pt). Pass --resume to continue it, --overwrite "
                                f"to start over there, or --out for another folder.")
        if not opts.resume:
            if opts.overwrite and self.env.is_main:
                for name in ("last.pt", "best.pt", "results.json", "metrics.jsonl", "curves.png"):
                    if (self.out / name).exists():
                        (self.out / name).unlink()
                if (self.out / "tb").is_dir():
                    shutil.rmtree(self.out / "tb")
            barrier(self.env)
            return None
        if not exists:
            self.say(f"[yellow]--resume: no checkpoint in {self.out}; starting from scratch[/]")
            return None
        ckpt = load_checkpoint(self.last_path)
        names = [s.name for s in self.spec.stages]
        if ckpt.get("spec_name") != self.spec.name or ckpt.get("stage_names") != names:
            raise CheckpointError(f"{self.last_path} belongs to spec {ckpt.get('spec_name')!r} with stages "
                                  f"{ckpt.get('stage_names')}, not {self.spec.name!r} with stages {names}; "
                                  f"use another --out")
        if ckpt.get("world_size") != self.env.world_size and not ckpt.get("epoch_done"):
            self.say(f"[yellow]resuming mid-epoch with {self.env.world_size} processes, saved with "
                     f"{ckpt.get('world_size')}: the rest of the epoch restarts from its first image[/]")
            ckpt = dict(ckpt, step=0)
        self.global_step = int(ckpt.get("global_step", 0))
        self.history = list(ckpt.get("history", []))
        self.last_saved = self._describe(ckpt)
        self.say(f"resuming from {self.last_path}: {self.last_saved}")
        return ckpt

    def _eval_batch(self) -> int:
        return max(s.batch_size for s in self.spec.stages)

    # ------------------------------------------------------------------ models
    def _build_model(self, ref: ModelRef, role: str) -> nn.Module:
        from ..models import build_model

        m = build_model(ref, role).to(self.env.device)
        return m

    def _build_distiller(self, ckpt: Optional[dict[str, Any]]):
        import kdgraph

        spec, env = self.spec, self.env
        torch.manual_seed(spec.runtime.seed)
        teacher = self._build_model(spec.teacher, "teacher")
        student = self._build_model(spec.student, "student")
        if spec.runtime.sync_bn and env.distributed:
            if env.device.type != "cuda":
                raise TrainingError("runtime.sync_bn: PyTorch's SyncBatchNorm runs on CUDA only; on CPU set "
                                    "sync_bn: false (each process then keeps its own BatchNorm statistics)")
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        first = next((i for i, s in enumerate(spec.stages) if not self.opts.only_stages
                      or s.name in self.opts.only_stages), 0)
        if ckpt is not None:
            first = int(ckpt["stage_index"])
        d = kdgraph.compile(spec, teacher=teacher, student=student, stage=first)
        d.load_weights()
        if ckpt is not None:
            try:
                d.load_state_dict(ckpt["distiller"], strict=True)
            except RuntimeError as e:
                raise CheckpointError(f"{self.last_path} does not fit this spec's networks: "
                                      f"{brief(e)}") from None
        elif spec.init_from:
            loaded = load_init_from(d, spec.init_from)
            self.say(f"init_from {spec.init_from}: loaded {', '.join(loaded)}")
        if spec.runtime.channels_last:
            d.to(memory_format=torch.channels_last)
        if spec.runtime.compile:
            d.use_torch_compile(True)
        return d

    # ------------------------------------------------------------------ pretraining
    def _pretrain(self, role: str, path: Path, bundle: DataBundle) -> None:
        spec, env = self.spec, self.env
        ref: ModelRef = getattr(spec, role)
        pt = ref.pretrain
        assert pt is not None
        t0 = time.perf_counter()
        train_set = subset(bundle.train_full, pt.train_subset or spec.data.train_subset)
        if not pt.augment and getattr(train_set, "augment", False):
            train_set = copy.copy(train_set)  # same images, no augmentation
            train_set.augment = False
        self.say(f"[bold]{role} {ref.model}[/]: no cached weights at {path}; training it once with cross-entropy "
                 f"({pt.epochs} epoch(s) on {len(train_set)} images)")
        torch.manual_seed(pt.seed)
        model = self._build_model(ModelRef(model=ref.model, kwargs=ref.kwargs), role)
        if spec.runtime.channels_last:
            model = model.to(memory_format=torch.channels_last)
        task = pretrain_mod.SupervisedTask(model)
        stage = StageSpec(name=f"pretrain_{role}", epochs=pt.epochs, batch_size=pt.batch_size,
                          reference_world_size=pt.reference_world_size, optimizer=pt.optimizer,
                          scheduler=pt.scheduler, losses=[LossSpec(type="cross_entropy")])
        val_loader = make_loader(bundle.val, batch_size=self._eval_batch(), train=False, workers=spec.data.workers,
                                 seed=spec.runtime.seed, world_size=env.world_size, rank=env.rank,
                                 pin_memory=env.device.type == "cuda")
        task.train()
        run = self._make_run(stage.name, -1, stage, task, model, train_set, save=False, evaluate="last",
                             batch_inputs=[], seed=pt.seed)
        outer_step, self.global_step = self.global_step, 0
        self._epochs(run, val_loader, 0, 0)
        self.global_step = outer_step  # the run's own steps count from 0
        if env.is_main:
            atomic_save(clean_state_dict(model.state_dict()), path)
            pretrain_mod.write_info(path, {"model": ref.model, "kwargs": ref.kwargs, "spec": spec.name,
                                           "pretrain": pt.model_dump(mode="json"), "dataset": spec.data.dataset,
                                           "eval": run.last_eval, "seconds": round(time.perf_counter() - t0, 1)})
        barrier(env)
        ev = run.last_eval or {}
        self.pretrain_s += time.perf_counter() - t0
        self.say(f"{role} trained in {time.perf_counter() - t0:.0f} s: top-1 {ev.get('top1', float('nan')):.2f}% "
                 f"-> cached at {path}")
        del task, model, run

    # ------------------------------------------------------------------ stages
    def _make_run(self, name: str, index: int, stage: Any, task: nn.Module, eval_model: Optional[nn.Module],
                  train_set: Any, save: bool, evaluate: str, batch_inputs: list[str],
                  seed: Optional[int] = None) -> _Run:
        spec, env = self.spec, self.env
        loader = make_loader(train_set, batch_size=stage.batch_size, train=True, workers=spec.data.workers,
                             seed=spec.runtime.seed if seed is None else seed, world_size=env.world_size, rank=env.rank,
                             pin_memory=env.device.type == "cuda")
        lr = lr_used(stage, env.world_size)
        params = task.trainable_parameters()
        opt = build_optimizer(stage, params, lr)
        sched = build_scheduler(stage, opt)
        scaler = torch.amp.GradScaler(env.device.type) if self.amp == "fp16" else None
        model = wrap(task, env)
        return _Run(name, index, stage, task, model, eval_model, loader, opt, sched, scaler, save, evaluate,
                    batch_inputs, lr)

    def _run_stage(self, d: nn.Module, i: int, train_set: Any, val_loader: Any, resume: Optional[dict[str, Any]],
                   done: list[dict[str, Any]]) -> dict[str, Any]:
        spec, env = self.spec, self.env
        st = spec.stages[i]
        d.enter_stage(i)
        d.train()
        trains_student = "student" in st.train
        lr = lr_used(st, env.world_size)
        eff = st.batch_size * env.world_size
        self.say("")
        self.say(f"[bold cyan]stage {st.name}[/] ({i + 1}/{len(spec.stages)}): {st.epochs} epoch(s), trains "
                 f"{', '.join(st.train)}; losses {', '.join(f'{lo.name} x {lo.weight:g}' for lo in st.losses)}")
        self.say(f"  batch {st.batch_size} per process x {env.world_size} process(es) = effective batch {eff}; "
                 f"lr used {lr:g} = {st.optimizer.lr:g} x {env.world_size} / {st.reference_world_size} "
                 f"(lr x world_size / reference_world_size)")
        info = {"name": st.name, "epochs": st.epochs, "batch_size": st.batch_size, "world_size": env.world_size,
                "effective_batch": eff, "lr_spec": st.optimizer.lr, "reference_world_size": st.reference_world_size,
                "lr_used": lr, "trains": list(st.train)}
        self.monitor.record("stage", **info)
        run = self._make_run(st.name, i, st, d, d.student if trains_student else None, train_set, save=True,
                             evaluate="epoch" if trains_student else "never", batch_inputs=d.batch_inputs)
        run.best_top1 = None
        start_epoch, start_step = 0, 0
        self._stage_info = info
        self._done_results = done
        if resume is not None:
            run.opt.load_state_dict(resume["optimizer"])
            if run.sched is not None and resume.get("scheduler") is not None:
                run.sched.load_state_dict(resume["scheduler"])
            if run.scaler is not None and resume.get("scaler") is not None:
                run.scaler.load_state_dict(resume["scaler"])
            run.best_top1 = resume.get("best_top1")
            run.last_eval = resume.get("last_eval")
            start_epoch = int(resume["epoch"]) + (1 if resume.get("epoch_done") else 0)
            start_step = 0 if resume.get("epoch_done") else int(resume["step"])
            rngs = resume.get("rng") or []
            if len(rngs) == env.world_size:
                self._resume_rng = rngs[env.rank]
        self._ckpt_time = time.perf_counter()
        self._epochs(run, val_loader, start_epoch, start_step)
        result = dict(info, last=run.last_eval, best_top1=run.best_top1,
                      train_images_per_s=round(statistics.median(run.rates), 1) if run.rates else None)
        if run.save:
            self._save(run, epoch=st.epochs - 1, step=0, epoch_done=True, stage_done=True, extra_results=result)
        return result

    def _epochs(self, run: _Run, val_loader: Any, start_epoch: int, start_step: int) -> None:
        st, env = run.stage, self.env
        steps_per_epoch = run.loader.sampler.per_rank // st.batch_size
        for epoch in range(start_epoch, st.epochs):
            step = start_step if epoch == start_epoch else 0
            run.loader.sampler.set_epoch(epoch, start=step * st.batch_size)
            run.task.train()
            if self._resume_rng is not None:
                set_rng_state(self._resume_rng)
                self._resume_rng = None
            self.monitor.start_epoch(f"{run.name} {epoch + 1}/{st.epochs}", steps_per_epoch, step)
            pending: list[tuple[int, torch.Tensor, dict[str, torch.Tensor], int]] = []
            t_int = run.epoch_t0 = time.perf_counter()
            run.epoch_images = 0
            checked = False
            for batch in run.loader:
                images, targets, extras = unpack_batch(batch)
                if not checked:
                    missing = [k for k in run.batch_inputs if k not in extras]
                    if missing:
                        raise DataError(f"stage {run.name!r} needs per-batch inputs {missing} that the data does not "
                                        f"provide (it gives {sorted(extras) or 'only images and targets'}); set the "
                                        f"spec's data.wrapper (e.g. {{type: crd}}) so dataset items carry them")
                    checked = True
                images, targets = self.to_device(images), self.to_device(targets)
                kw = {k: self.to_device(extras[k]) for k in run.batch_inputs}
                run.last_batch = (images, targets, kw)
                with self.autocast():
                    out = run.model(images, targets, **kw)
                loss = out.loss
                if run.scaler is not None:
                    run.scaler.scale(loss).backward()
                    run.scaler.step(run.opt)
                    run.scaler.update()
                else:
                    loss.backward()
                    run.opt.step()
                run.opt.zero_grad(set_to_none=True)
                step += 1
                self.global_step += 1
                if self.first_step_s is None:
                    self.first_step_s = time.perf_counter() - self.t_start
                pending.append((step, loss.detach(), {k: v.detach() for k, v in out.terms.items()},
                                int(images.shape[0])))
                due = run.save and self.opts.ckpt_every > 0 and step % self.opts.ckpt_every == 0
                if len(pending) >= self.flush_every or due or step == steps_per_epoch:
                    time_due = self._flush(run, epoch, steps_per_epoch, pending, t_int)
                    t_int = time.perf_counter()
                    if run.save and (due or time_due) and step < steps_per_epoch:
                        self._save(run, epoch=epoch, step=step, epoch_done=False)
            self.monitor.end_epoch()
            self._report_skipped()
            if run.sched is not None:
                run.sched.step()
            last_epoch = epoch == st.epochs - 1
            every = self.spec.runtime.eval_every
            if (run.evaluate == "epoch" and (last_epoch or (epoch + 1) % every == 0)) or \
                    (run.evaluate == "last" and last_epoch):
                ev = self.evaluate(run.eval_model, val_loader, restore=run.task)
                ev.update(stage=run.name, epoch=epoch, global_step=self.global_step)
                run.last_eval = ev
                improved = run.best_top1 is None or ev["top1"] > run.best_top1
                if improved:
                    run.best_top1 = ev["top1"]
                if run.save:
                    self.history.append(ev)
                self.monitor.record("eval", **ev, **({} if run.save else {"pretrain": True}))
                self.say(f"{run.name} epoch {epoch + 1}/{st.epochs}: top-1 {ev['top1']:.2f}%  top-5 {ev['top5']:.2f}%"
                         f"  (best {run.best_top1:.2f}%, {ev['images']} images, {ev['seconds']:.1f} s)")
                if run.save:
                    self._save(run, epoch=epoch, step=0, epoch_done=True, best=improved)
            elif run.save:
                self._save(run, epoch=epoch, step=0, epoch_done=True)
            if self.opts.plot:
                self.monitor.plot()

    def _flush(self, run: _Run, epoch: int, steps_per_epoch: int, pending: list, t0: float) -> bool:
        """Check the pending steps' losses, log their averages; returns whether a timed checkpoint is due."""
        names = list(pending[0][2])
        rows = [torch.stack([p[1].float().reshape(()), *[p[2][k].float().reshape(()) for k in names]])
                for p in pending]
        vals = torch.stack(rows).cpu()  # the one host sync per interval
        elapsed = time.perf_counter() - t0
        finite = torch.isfinite(vals).all(dim=1)
        bad = not bool(finite.all())
        time_due = (time.perf_counter() - self._ckpt_time) > self.opts.ckpt_minutes * 60
        flags = all_reduce_sum(self.env, [float(bad), float(time_due)])
        if flags[0] > 0:
            msg = None
            if bad:
                r = int((~finite).nonzero()[0])
                step = pending[r][0]
                row = vals[r]
                culprits = [n for j, n in enumerate(names) if not torch.isfinite(row[j + 1])]
                shown = ", ".join(f"{n} = {float(row[j + 1]):.4g}" for j, n in enumerate(names))
                gstep = self.global_step - (len(pending) - 1 - r)
                what = (f"loss term{'s' if len(culprits) > 1 else ''} {', '.join(repr(c) for c in culprits)}"
                        if culprits else f"the total loss ({float(row[0])})")
                msg = (f"non-finite {what} at step {gstep} (stage {run.name}, epoch {epoch + 1}, step {step} of "
                       f"{steps_per_epoch}) [{shown}]")
            msgs = [m for m in all_gather_object(self.env, msg) if m]
            where = (f"the last good checkpoint is {self.last_path} ({self.last_saved}), left as it was"
                     if self.last_saved else "no checkpoint had been written yet")
            self.monitor.end_epoch()
            raise TrainingError(f"{msgs[0]}. Training stopped; nothing was saved after that step: {where}. "
                                f"Lower the learning rate, check the inputs, or use amp: off to rule out overflow.")
        n_images = sum(p[3] for p in pending) * self.env.world_size
        rate = n_images / elapsed if elapsed > 0 else 0.0
        run.rates.append(rate)
        run.epoch_images += n_images
        span = time.perf_counter() - run.epoch_t0
        epoch_rate = run.epoch_images / span if span > 0 else rate
        mean = vals.mean(dim=0).tolist()
        lr = run.opt.param_groups[0]["lr"]
        terms = dict(zip(names, mean[1:]))
        self.monitor.update(pending[-1][0], {"img/s": epoch_rate, "loss": mean[0], **(terms if len(terms) > 1 else {}),
                                             "lr": lr})
        self.monitor.record("train", stage=run.name, epoch=epoch, step=pending[-1][0], global_step=self.global_step,
                            loss=mean[0], terms=terms, lr=lr, images_per_s=round(rate, 1),
                            **({} if run.save else {"pretrain": True}))
        pending.clear()
        return flags[1] > 0  # agreed by every process (a checkpoint is a collective)

    def _report_skipped(self) -> None:
        """Log how many unreadable images (--skip-bad-images) have been skipped since the last report."""
        total = self.skipped_images()
        if total > self._skipped_reported:
            self.say(f"[yellow]skipped {total - self._skipped_reported} unreadable image(s) "
                     f"({total} in this run; their paths are on stderr)[/]")
            self.monitor.record("skipped_images", new=total - self._skipped_reported, total=total)
            self._skipped_reported = total

    def skipped_images(self) -> int:
        skipped = getattr(self, "_skipped", None)
        return int(skipped.value) if skipped is not None else 0

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model: nn.Module, loader: Any, restore: Optional[nn.Module] = None) -> dict[str, Any]:
        return evaluate_model(model, loader, self.env, self.amp, self.spec.runtime.channels_last, restore)

    # ------------------------------------------------------------------ checkpoints
    def _describe(self, ck: dict[str, Any]) -> str:
        names = ck.get("stage_names") or []
        si = ck.get("stage_index", 0)
        stage = names[si] if 0 <= si < len(names) else "?"
        if ck.get("stage_done"):
            return f"end of stage {stage}"
        if ck.get("epoch_done"):
            return f"stage {stage}, end of epoch {ck['epoch'] + 1}"
        return f"stage {stage}, epoch {ck['epoch'] + 1}, step {ck['step']}"

    @torch.no_grad()
    def _unfit_weights(self, run: _Run) -> Optional[str]:
        """Why the weights about to be saved are not a good state, or None: a non-finite tensor in the
        task's state, or a non-finite loss / logits when the last batch is run through it again (eval
        mode, so nothing it holds changes). A step's loss is checked only after that step has changed the
        weights, so without this a checkpoint could hold the weights that produce the first NaN."""
        state = [t for t in run.task.state_dict().values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
        ok_state = torch.stack([t.isfinite().all() for t in state]).all() if state else torch.tensor(True)
        ok_forward = torch.tensor(True, device=ok_state.device)
        if run.last_batch is not None:
            images, targets, kw = run.last_batch
            was = run.task.training
            run.task.eval()
            try:
                with self.autocast():
                    out = run.task(images, targets, **kw)
            finally:
                run.task.train(was)
            ok_forward = torch.isfinite(out.loss).all()
            if out.logits is not None:
                ok_forward = ok_forward & torch.isfinite(out.logits).all()
        flags = torch.stack([~ok_state, ~ok_forward.to(ok_state.device)]).float().tolist()  # one host sync
        bad_state, bad_forward = all_reduce_sum(self.env, flags)  # every process agrees (saving is collective)
        if bad_state > 0:
            return "some weights or statistics are not finite"
        if bad_forward > 0:
            return "they give a non-finite loss on the last training batch"
        return None

    def _save(self, run: _Run, *, epoch: int, step: int, epoch_done: bool, stage_done: bool = False,
              best: bool = False, extra_results: Optional[dict[str, Any]] = None) -> None:
        why = self._unfit_weights(run)
        if why is not None:
            where = (f"the last good checkpoint is {self.last_path} ({self.last_saved}), left as it was"
                     if self.last_saved else "no checkpoint had been written yet")
            raise TrainingError(f"the weights after step {self.global_step} (stage {run.name}, epoch {epoch + 1}) "
                                f"diverged: {why}. Training stopped without saving them: {where}. Lower the "
                                f"learning rate, check the inputs, or use amp: off to rule out overflow.")
        rngs = all_gather_object(self.env, rng_state())
        self._ckpt_time = time.perf_counter()
        if not self.env.is_main:
            return
        d = run.task
        stage_results = {r["name"]: r for r in self._done_results if isinstance(r, dict) and "name" in r}
        if extra_results is not None:
            stage_results[extra_results["name"]] = extra_results
        state = {
            "kdgraph_checkpoint": 1,
            "spec_name": self.spec.name,
            "spec": self.spec.model_dump(mode="json"),
            "stage_names": [s.name for s in self.spec.stages],
            "distiller": d.state_dict(),
            "student": clean_state_dict(d.student.state_dict()),
            "optimizer": run.opt.state_dict(),
            "scheduler": run.sched.state_dict() if run.sched is not None else None,
            "scaler": run.scaler.state_dict() if run.scaler is not None else None,
            "rng": rngs,
            "stage": run.name, "stage_index": run.stage_index, "epoch": epoch, "step": step,
            "epoch_done": epoch_done, "stage_done": stage_done,
            "global_step": self.global_step, "world_size": self.env.world_size,
            "samples_done": step * run.stage.batch_size * self.env.world_size,
            "best_top1": run.best_top1, "last_eval": run.last_eval, "history": self.history,
            "teacher_eval": self.teacher_eval, "stage_results": stage_results,
        }
        atomic_save(state, self.last_path)
        if best:
            atomic_save(state, self.best_path)
        self.last_saved = self._describe(state)

    # ------------------------------------------------------------------ end
    def _finish(self, d: nn.Module, stages: list[dict[str, Any]]) -> dict[str, Any]:
        wall = time.perf_counter() - self.t_start
        final = next((s.get("last") for s in reversed(stages) if s.get("last")), None)
        best = max((s["best_top1"] for s in stages if s.get("best_top1") is not None), default=None)
        res = {
            "spec": self.spec.name, "out": str(self.out), "world_size": self.env.world_size,
            "device": str(self.env.device), "amp": self.amp, "channels_last": self.spec.runtime.channels_last,
            "compile": self.spec.runtime.compile, "teacher": self.teacher_eval,
            "teacher_weights": self.spec.teacher.weights, "stages": stages,
            "student": {"top1": final["top1"], "top5": final["top5"], "best_top1": best} if final else None,
            "wall_s": round(wall, 1), "pretrain_s": round(self.pretrain_s, 1),
            "time_to_first_step_s": round(self.first_step_s, 2) if self.first_step_s is not None else None,
            "reference": self.spec.reference.model_dump() if self.spec.reference else None,
            "skipped_images": self.skipped_images(),
        }
        if self.env.is_main:
            tmp = self.out / ".results.json.tmp"
            tmp.write_text(json.dumps(res, indent=2, default=str))
            tmp.replace(self.out / "results.json")
            self.monitor.record("end", **{k: res[k] for k in ("student", "teacher", "wall_s", "time_to_first_step_s")})
            if self.opts.plot:
                self.monitor.plot()
        parts = []
        if self.teacher_eval:
            parts.append(f"teacher top-1 {self.teacher_eval['top1']:.2f}%")
        if final:
            parts.append(f"student top-1 {final['top1']:.2f}% (top-5 {final['top5']:.2f}%, best top-1 {best:.2f}%)")
        self.say("")
        self.say(f"[bold green]done[/] {self.spec.name} in {wall:.0f} s: " + ", ".join(parts)
                 + f". Run folder: {self.out} (last.pt, best.pt, metrics.jsonl, curves.png, tb/)")
        self.monitor.close()
        return res


def train(spec: Any, options: Optional[TrainOptions] = None, **kwargs: Any) -> dict[str, Any]:
    """Train a spec (path, YAML text, dict or :class:`Spec`) end to end; returns what ``results.json`` holds.

    ``kwargs`` override fields of :class:`TrainOptions` (``out=``, ``resume=``, ``device=``, ...).
    Under ``torchrun`` every process calls this; rank 0 alone prints and writes files.
    """
    opts = replace(options or TrainOptions(), **kwargs)
    if opts.started is None:
        opts = replace(opts, started=time.perf_counter())
    s = load_spec(spec).model_copy(deep=True)
    import torch.distributed as dist

    owned = not dist.is_initialized()
    env = setup(opts.device)
    try:
        with consent(opts.allow_imports, opts.trust_code):
            return Trainer(s, opts, env).run()
    except KeyboardInterrupt:
        raise
    finally:
        if owned:
            teardown(env)


__all__ = ["TrainOptions", "Trainer", "train", "lr_used", "build_optimizer", "build_scheduler", "load_init_from",
           "KDGraphError"]
