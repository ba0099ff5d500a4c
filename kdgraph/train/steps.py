"""The step loop: a stage's (or a pretraining's) epochs of steps, logging intervals, NaN checks, checkpoints.

For each batch: forward the task (a Distiller, or a network with cross-entropy), backward; after every
``accumulate`` micro-batches (the loss divided by their number; DDP's gradient all-reduce only on the last, the
others under ``no_sync``): clip the gradients (unscaled first under fp16), optimizer step, a per-step
scheduler step, the EMA update.
Losses stay on the device and are checked once per logging interval (one host sync): a non-finite loss
stops the run (:class:`~kdgraph.errors.TrainingError` naming the term and the step) before anything is saved
after it. Every save first checks that the weights are finite and give a finite loss on the last batch (the
loss of a step is known only after the step changed the weights), so ``last.pt`` stays the last good state.
After each epoch: a per-epoch scheduler steps, the student is evaluated (every ``eval_every`` epochs and at the
last), and the run is checkpointed through the ``save`` callback the trainer hands in.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..errors import DataError, TrainingError
from ..formatting import seconds
from ..spec import StageSpec
from .data import make_loader, unpack_batch
from .distributed import DistEnv, all_gather_object, all_reduce_sum, wrap
from .ema import StudentEMA
from .step_checks import check_batch_inputs as _check_batch_inputs, nan_message as _nan_message
from .evaluation import autocast, batch_size, describe, evaluate_model
from .monitor import Monitor
from .on_policy import generated_batches, on_policy_for_stage
from .optim import build_optimizer, build_scheduler, lr_used
from .rng import set_rng_state
from .token_count import KEY, step_token_counts, token_counter

__all__ = ["StageRun", "Position", "LoopSettings", "RunProgress", "SkipCounter", "StepLoop", "make_stage_run", "optimizer_step"]


@dataclass
class StageRun:
    """One stage's training (or a pretraining's): what trains, with what, and how far it got."""

    name: str
    index: int  # the stage's index in the spec; -1 for a pretraining
    stage: StageSpec
    task: nn.Module  # the Distiller (or a pretrain.SupervisedTask)
    model: nn.Module  # ``task``, DDP-wrapped with several processes
    eval_model: Optional[nn.Module]  # evaluated after epochs (the student); None: nothing to evaluate
    loader: Any
    opt: torch.optim.Optimizer
    sched: Optional[Any]
    scaler: Optional[Any]
    lr: float
    batch_inputs: list[str]  # per-batch inputs beyond images and targets (CRD's index)
    save: bool  # checkpoint it (False for a pretraining)
    evaluate: str  # "epoch" | "last" | "never"
    best_top1: Optional[float] = None
    last_eval: Optional[dict[str, Any]] = None
    rates: list[float] = field(default_factory=list)  # images/s of every logging interval
    last_batch: Optional[tuple[Any, Any, dict[str, Any]]] = None  # what the save-time probe runs on
    ema: Optional[StudentEMA] = None  # the student's EMA (stages[i].ema)
    student: Optional[nn.Module] = None  # what the EMA averages
    on_policy: Any = None  # stages[i].on_policy: generated completions (kdgraph.train.on_policy.OnPolicy)

    @property
    def per_step_schedule(self) -> bool:
        """Whether the scheduler advances after every optimizer step (else after every epoch)."""
        s = getattr(self.stage, "scheduler", None)
        return self.sched is not None and s is not None and s.interval == "step"


@dataclass(frozen=True)
class Position:
    """Where a checkpoint is taken: ``step`` steps into ``epoch`` (0 with ``epoch_done``)."""

    epoch: int
    step: int = 0
    epoch_done: bool = False
    stage_done: bool = False


@dataclass(frozen=True)
class LoopSettings:
    """How the steps run: precision, memory format, logging and checkpoint intervals."""

    amp: str = "off"
    channels_last: bool = False
    flush_every: int = 1  # steps per logged record
    ckpt_every: int = 0  # also checkpoint every N steps within an epoch
    ckpt_minutes: float = 30.0  # ... and at least this often
    eval_every: int = 1
    plot: bool = True
    task: Optional[str] = None  # a GLUE task: evaluation reports its metrics (glue_metrics), top1 = their mean; "lm"
    on_eval: Optional[Callable[[dict[str, Any]], None]] = None  # TrainOptions.on_eval


@dataclass
class RunProgress:
    """What the whole run has done so far (across stages), saved with every checkpoint."""

    started: float  # time.perf_counter() at command start
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # every evaluation of the stages
    first_step_s: Optional[float] = None
    last_saved: Optional[str] = None  # what last.pt holds, for people ("stage main, end of epoch 2")
    last_path: Any = None  # where it is
    ckpt_time: float = field(default_factory=time.perf_counter)  # when the last checkpoint was written

    def last_good(self) -> str:
        return (f"the last good checkpoint is {self.last_path} ({self.last_saved}), left as it was"
                if self.last_saved else "no checkpoint had been written yet")


class SkipCounter:
    """Reports how many unreadable images (--skip-bad-images) were skipped since the last report."""

    def __init__(self, counter: Any = None):
        self.counter, self.reported = counter, 0

    @property
    def total(self) -> int:
        return int(self.counter.value) if self.counter is not None else 0

    def report(self, monitor: Monitor) -> None:
        total = self.total
        if total > self.reported:
            monitor.print(f"[yellow]skipped {total - self.reported} unreadable image(s) ({total} in this run; their "
                          f"paths are on stderr)[/]", soft_wrap=True)
            monitor.record("skipped_images", new=total - self.reported, total=total)
            self.reported = total


def make_stage_run(name: str, index: int, stage: Any, task: nn.Module, eval_model: Optional[nn.Module],
                   train_set: Any, *, env: DistEnv, workers: int, seed: int, amp: str, save: bool, evaluate: str,
                   batch_inputs: list[str], view: Any = None, drop_last: bool = True) -> StageRun:
    """The loader, optimizer, schedule, grad scaler and DDP wrapper of one stage over ``train_set`` (read
    through ``view`` when given: the teacher cache's replay)."""
    loader = make_loader(train_set, batch_size=stage.batch_size, train=True, workers=workers, seed=seed,
                         world_size=env.world_size, rank=env.rank, pin_memory=env.device.type == "cuda", view=view,
                         drop_last=drop_last)
    lr = lr_used(stage, env.world_size)
    opt = build_optimizer(stage, task.trainable_parameters(), lr, task)
    per_rank = loader.sampler.per_rank  # micro-batches per epoch: the last partial one counts when it is kept
    sched = build_scheduler(stage, opt, per_rank // stage.batch_size if drop_last else -(-per_rank // stage.batch_size))
    scaler = torch.amp.GradScaler(env.device.type) if amp == "fp16" else None
    ema_spec = getattr(stage, "ema", None)
    ema = StudentEMA(eval_model, ema_spec) if ema_spec is not None and eval_model is not None else None
    shown = ema.module if ema is not None and ema_spec.report else eval_model
    return StageRun(name, index, stage, task, wrap(task, env), shown, loader, opt, sched, scaler, lr,
                    list(batch_inputs), save, evaluate, ema=ema, student=eval_model,
                    on_policy=on_policy_for_stage(stage, task, env.rank, seed, index))


def optimizer_step(run: StageRun) -> None:
    """One optimizer step of ``run`` after its gradients are accumulated: clip (the unscaled gradients under an
    fp16 GradScaler: ``unscale_`` first), step (through the scaler), zero the gradients, then the per-step
    schedule and the EMA."""
    clip = getattr(run.stage, "clip_grad", None)
    if clip is not None:
        if run.scaler is not None:
            run.scaler.unscale_(run.opt)
        params = [p for g in run.opt.param_groups for p in g["params"]]
        if clip.max_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, clip.max_norm, norm_type=clip.norm_type)
        else:
            torch.nn.utils.clip_grad_value_(params, clip.max_value)
    if run.scaler is not None:
        run.scaler.step(run.opt)
        run.scaler.update()
    else:
        run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    if run.per_step_schedule:
        run.sched.step()
    if run.ema is not None:
        run.ema.update(run.student)


SaveFn = Callable[[StageRun, Position, bool], None]  # (run, where, best): write the checkpoint (every process)


class StepLoop:
    """Runs the epochs of :class:`StageRun` s on one process of a run (collectives agree across processes)."""

    def __init__(self, env: DistEnv, monitor: Monitor, settings: LoopSettings, progress: RunProgress,
                 skipped: SkipCounter):
        self.env, self.monitor, self.settings, self.progress, self.skipped = env, monitor, settings, progress, skipped

    def to_device(self, x: Any) -> Any:
        if isinstance(x, dict):  # named inputs
            return {k: self.to_device(v) for k, v in x.items()}
        if isinstance(x, torch.Tensor):
            x = x.to(self.env.device, non_blocking=True)
            if self.settings.channels_last and x.dim() == 4 and x.is_floating_point():
                x = x.contiguous(memory_format=torch.channels_last)
        return x

    def evaluate(self, model: nn.Module, loader: Any, restore: Optional[nn.Module] = None) -> dict[str, Any]:
        return evaluate_model(model, loader, self.env, self.settings.amp, self.settings.channels_last, restore,
                              task=self.settings.task, reference=getattr(self, "reference", None))

    # ------------------------------------------------------------------ epochs
    def run_epochs(self, run: StageRun, val_loader: Any, start: tuple[int, int] = (0, 0),
                   rng: Optional[dict[str, Any]] = None, save: Optional[SaveFn] = None) -> None:
        """Epochs ``start[0]..`` of ``run`` (the first from step ``start[1]``; ``rng``: the generator states
        to restore first, when resuming)."""
        st = run.stage
        save = save if run.save else None
        steps_per_epoch = (run.loader.sampler.per_rank // st.batch_size if run.loader.drop_last
                           else -(-run.loader.sampler.per_rank // st.batch_size))  # data.drop_last: false
        self.progress.ckpt_time = time.perf_counter()
        for epoch in range(start[0], st.epochs):
            first = start[1] if epoch == start[0] else 0
            run.loader.sampler.set_epoch(epoch, start=first * st.batch_size)
            run.task.train()
            if rng is not None:
                set_rng_state(rng)
                rng = None
            self.monitor.start_epoch(f"{run.name} {epoch + 1}/{st.epochs}", steps_per_epoch, first)
            self._steps(run, epoch, first, steps_per_epoch, save)
            self.monitor.end_epoch()
            self.skipped.report(self.monitor)
            if run.sched is not None and not run.per_step_schedule:
                run.sched.step()
            self._end_epoch(run, epoch, val_loader, save)
            if self.settings.plot:
                self.monitor.plot()

    def _steps(self, run: StageRun, epoch: int, step: int, steps_per_epoch: int, save: Optional[SaveFn]) -> None:
        pending: list[tuple[int, torch.Tensor, dict[str, torch.Tensor], int]] = []
        interval = _Interval()
        checked = False
        k = getattr(run.stage, "accumulate", 1)
        batches = (run.loader if run.on_policy is None  # GKD: completions generated before the token count
                   else generated_batches(run.loader, run.on_policy, self.to_device, epoch, step, self.monitor))
        for batch, num_tokens in step_token_counts(batches, token_counter(run.task), self.env, step,
                                                   steps_per_epoch, k):  # num_tokens: batch:num_tokens readers
            images, targets, extras = unpack_batch(batch)
            if not checked:
                _check_batch_inputs(run, extras)
                checked = True
            images, targets = self.to_device(images), self.to_device(targets)
            kw = {k: self.to_device(extras[k]) for k in run.batch_inputs}
            kw.update({} if num_tokens is None else {KEY: self.to_device(num_tokens)})
            run.last_batch = (images, targets, kw)
            if hasattr(run.task, "progress"):  # scheduled loss weights / arguments (kdgraph.methods.progress)
                run.task.progress.update(epoch, step, steps_per_epoch, run.stage.epochs)
            lr = run.opt.param_groups[0]["lr"]
            if hasattr(run.opt, "step_terms"):  # term-wise optimizers (sgd_dot): task and distillation apart
                boundary = True  # the schema refuses accumulate, clip_grad and fp16 with sgd_dot
                with autocast(self.settings.amp, self.env.device):
                    out = run.model(images, targets, **kw)
                loss = out.loss
                run.opt.step_terms(out.terms, run.task.task_terms())
                run.opt.zero_grad(set_to_none=True)
                if run.per_step_schedule:
                    run.sched.step()
                if run.ema is not None:
                    run.ema.update(run.student)
            else:
                group = min(k, steps_per_epoch - step // k * k)  # micro-batches in this optimizer step
                boundary = (step + 1) % k == 0 or step + 1 == steps_per_epoch
                sync = (contextlib.nullcontext() if boundary or not hasattr(run.model, "no_sync")
                        else run.model.no_sync())
                with sync:
                    with autocast(self.settings.amp, self.env.device):
                        out = run.model(images, targets, **kw)
                    loss = out.loss
                    part = loss / group if group > 1 else loss
                    (run.scaler.scale(part) if run.scaler is not None else part).backward()
                if boundary:
                    optimizer_step(run)
            step += 1
            self.progress.global_step += 1
            if self.progress.first_step_s is None:
                self.progress.first_step_s = time.perf_counter() - self.progress.started
            pending.append((step, loss.detach(), {n: v.detach() for n, v in out.terms.items()}, batch_size(images),
                            lr))
            due = save is not None and self.settings.ckpt_every > 0 and step % self.settings.ckpt_every == 0
            if len(pending) >= self.settings.flush_every or due or step == steps_per_epoch:
                time_due = self._flush(run, epoch, steps_per_epoch, pending, interval)
                if save is not None and (due or time_due) and step < steps_per_epoch and boundary:
                    self.checkpoint(run, Position(epoch, step), save)

    def _end_epoch(self, run: StageRun, epoch: int, val_loader: Any, save: Optional[SaveFn]) -> None:
        st = run.stage
        last = epoch == st.epochs - 1
        due = (run.evaluate == "epoch" and (last or (epoch + 1) % self.settings.eval_every == 0)) or \
              (run.evaluate == "last" and last)
        improved = False
        if due:
            ev = self.evaluate(run.eval_model, val_loader, restore=run.task)
            ev.update(stage=run.name, epoch=epoch, global_step=self.progress.global_step)
            run.last_eval = ev
            improved = run.best_top1 is None or ev["top1"] > run.best_top1
            if improved:
                run.best_top1 = ev["top1"]
            if run.save:
                self.progress.history.append(ev)
            self.monitor.record("eval", **ev, **({} if run.save else {"pretrain": True}))
            self.monitor.print(f"{run.name} epoch {epoch + 1}/{st.epochs}: {describe(ev)}  "
                               f"(best {run.best_top1:.2f}%, {ev['images']} images, "
                               f"{seconds(ev['seconds'])})", soft_wrap=True)
            if self.settings.on_eval is not None and run.save:
                self.settings.on_eval(dict(ev))
        if save is not None:
            self.checkpoint(run, Position(epoch, 0, epoch_done=True), save, best=improved)

    # ------------------------------------------------------------------ logging and NaN checks
    def _flush(self, run: StageRun, epoch: int, steps_per_epoch: int, pending: list, interval: "_Interval") -> bool:
        """Check the pending steps' losses, log their averages; returns whether a timed checkpoint is due."""
        names = list(pending[0][2])
        rows = [torch.stack([p[1].float().reshape(()), *[p[2][k].float().reshape(()) for k in names]])
                for p in pending]
        vals = torch.stack(rows).cpu()  # the one host sync per interval
        elapsed = time.perf_counter() - interval.t0
        finite = torch.isfinite(vals).all(dim=1)
        bad = not bool(finite.all())
        time_due = (time.perf_counter() - self.progress.ckpt_time) > self.settings.ckpt_minutes * 60
        flags = all_reduce_sum(self.env, [float(bad), float(time_due)])
        if flags[0] > 0:
            msg = _nan_message(vals, finite, names, pending, run.name, epoch, steps_per_epoch,
                               self.progress.global_step) if bad else None
            msgs = [m for m in all_gather_object(self.env, msg) if m]
            self.monitor.end_epoch()
            raise TrainingError(f"{msgs[0]}. Training stopped; nothing was saved after that step: "
                                f"{self.progress.last_good()}. Lower the learning rate, check the inputs, or use "
                                f"amp: off to rule out overflow.")
        n_images = sum(p[3] for p in pending) * self.env.world_size
        rate = n_images / elapsed if elapsed > 0 else 0.0
        run.rates.append(rate)
        interval.images += n_images
        span = time.perf_counter() - interval.epoch_t0
        epoch_rate = interval.images / span if span > 0 else rate
        mean = vals.mean(dim=0).tolist()
        lr = pending[-1][4]  # the lr the interval's last step used
        terms = dict(zip(names, mean[1:]))
        self.monitor.update(pending[-1][0], {"img/s": epoch_rate, "loss": mean[0], **(terms if len(terms) > 1 else {}),
                                             "lr": lr})
        self.monitor.record("train", stage=run.name, epoch=epoch, step=pending[-1][0],
                            global_step=self.progress.global_step, loss=mean[0], terms=terms, lr=lr,
                            images_per_s=round(rate, 1), **({} if run.save else {"pretrain": True}))
        pending.clear()
        interval.t0 = time.perf_counter()
        return flags[1] > 0  # agreed by every process (a checkpoint is a collective)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, run: StageRun, where: Position, save: SaveFn, best: bool = False) -> None:
        """Save through ``save`` after checking the weights are a good state (every process takes part)."""
        why = self._unfit_weights(run)
        if why is not None:
            raise TrainingError(f"the weights after step {self.progress.global_step} (stage {run.name}, epoch "
                                f"{where.epoch + 1}) diverged: {why}. Training stopped without saving them: "
                                f"{self.progress.last_good()}. Lower the learning rate, check the inputs, or use "
                                f"amp: off to rule out overflow.")
        save(run, where, best)
        self.progress.ckpt_time = time.perf_counter()

    @torch.no_grad()
    def _unfit_weights(self, run: StageRun) -> Optional[str]:
        """Why the weights about to be saved are not a good state, or None: a non-finite tensor in the
        task's state, or a non-finite loss / logits when the last batch is run through it again (eval
        mode, so nothing it holds changes). A step's loss is checked only after that step has changed the
        weights, so without this a checkpoint could hold the weights that produce the first NaN."""
        state = [getattr(t, "to_local", lambda t=t: t)() for t in run.task.state_dict().values()  # FSDP: own shard
                 if isinstance(t, torch.Tensor) and t.is_floating_point()]
        ok_state = torch.stack([t.isfinite().all() for t in state]).all() if state else torch.tensor(True)
        ok_forward = torch.tensor(True, device=ok_state.device)
        if run.last_batch is not None:
            images, targets, kw = run.last_batch
            was = run.task.training
            run.task.eval()
            try:
                with autocast(self.settings.amp, self.env.device):
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


@dataclass
class _Interval:
    """Timing of the logging interval and the epoch in progress."""

    t0: float = field(default_factory=time.perf_counter)
    epoch_t0: float = field(default_factory=time.perf_counter)
    images: int = 0  # of the epoch so far, all processes
