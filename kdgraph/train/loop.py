"""The training run behind ``kdgraph train``: the run folder, then pretraining, then the stages in order.

    d = kdgraph.compile(spec, teacher=teacher, student=student); d.load_weights()     (networks)
    for each stage: d.enter_stage(i); opt = SGD(d.trainable_parameters(), lr_used, ...) (optim)
        for each batch: out = ddp(d)(images, targets, **extras); out.loss.backward(); opt.step()  (steps)
        (runtime.distributed: fsdp: d is sharded once by fsdp.shard instead, checkpoints are sharded folders)
        after each epoch: top-1/top-5 of d.student on the validation split; checkpoint  (evaluation, checkpoint)

The jobs live in their own modules: :mod:`.runfolder` (lock, resume, files), :mod:`.networks`,
:mod:`.pretrain` (cached teachers), :mod:`.steps` (epochs, logging, NaN checks), :mod:`.optim`
(optimizers, schedules, ``lr_used = lr * world_size / reference_world_size``), :mod:`.evaluation`,
:mod:`.checkpoint` and :mod:`.data`. The effective batch is ``batch_size * world_size``; both are printed
and recorded (``metrics.jsonl``, ``results.json``).
"""
from __future__ import annotations

import functools
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..errors import KDGraphError
from ..formatting import seconds
from ..spec import Spec, describe_recipe, load_spec
from ..models.trust import consent
from ..models.weights import resolve, state_dict_of
from .checkpoint import Checkpoint
from .data import DataBundle, build_datasets, check_data, wrap_train_dataset
from .data.augment import mixing_view
from .distributed import DistEnv, all_gather_object, setup, teardown
from .evaluation import describe, eval_task, evaluate_model, topk_counts, validation_loader  # noqa: F401 - part of this module's API
from .fsdp import require_processes
from .monitor import Monitor
from .networks import build_distiller, first_stage, load_init_from
from .optim import build_optimizer, build_scheduler, lr_used
from .options import TrainOptions
from .pretrain import pretrain_network
from .rng import rng_state, seed_everything
from .runfolder import RunFolder
from .token_count import data_batch_inputs
from .steps import LoopSettings, Position, RunProgress, SkipCounter, StageRun, StepLoop, make_stage_run

__all__ = ["TrainOptions", "Trainer", "train", "lr_used", "build_optimizer", "build_scheduler", "load_init_from",
           "evaluate_model", "topk_counts", "seed_everything", "KDGraphError"]


class Trainer:
    """One ``kdgraph train`` of one spec (see :func:`train`): the run folder and the sequence of stages."""

    def __init__(self, spec: Spec, opts: TrainOptions, env: DistEnv):
        self.spec, self.opts, self.env = spec, opts, env
        self.sharded = spec.runtime.distributed == "fsdp"  # FSDP2 instead of DDP (train.fsdp.shard)
        self.folder = RunFolder(Path(opts.out) if opts.out else Path("runs") / spec.name, env, sharded=self.sharded)
        self.out = self.folder.out
        self.monitor = Monitor(self.out, enabled=env.is_main, progress=opts.progress, tensorboard=opts.tensorboard)
        if spec.data.dataset == "text":  # rows of max_length tokens: train records also carry positions_per_s
            self.monitor.tokens_per_row = spec.data.max_length

    def say(self, text: str) -> None:
        self.monitor.print(text, soft_wrap=True)

    def run(self) -> dict[str, Any]:
        """Train under an exclusive lock on the run folder (rank 0 holds it; see :mod:`.runlock`)."""
        with self.folder.locked():
            return self._run()

    def _run(self) -> dict[str, Any]:
        spec, env, opts = self.spec, self.env, self.opts
        resume = self.folder.prepare(spec, opts.resume, opts.overwrite, self.say)
        root = opts.data if opts.data is not None else spec.data.root
        check_data(spec, root)  # before any model is built
        bundle = build_datasets(spec, root, skip_bad_images=opts.skip_bad_images)
        seed_everything(spec.runtime.seed, spec.runtime.deterministic)
        if env.device.type == "cpu":
            # Subnormal floats (weights/gradients decaying towards 0 late in training) run ~20x slower on x86
            # CPUs: one teacher pretraining went from 508 to 19 images/s mid-epoch. Flush them to zero.
            torch.set_flush_denormal(True)
        self.folder.begin(spec)
        if resume is not None:
            self.monitor.load_history()
        self._announce(bundle, resumed=resume is not None)
        progress = RunProgress(started=opts.started if opts.started is not None else time.perf_counter(),
                               last_path=self.folder.last_path)
        if resume is not None:
            progress.global_step, progress.history = resume.global_step, list(resume.history)
            progress.last_saved = resume.describe()
        steps = StepLoop(env, self.monitor, self._settings(), progress, SkipCounter(bundle.skipped))
        pretrain_s = 0.0
        for role in ("teacher", "student"):
            path = resolve(spec, role, require=False)  # a cached network that is not there yet: train it now
            if path is not None:
                pretrain_s += pretrain_network(spec, role, path, bundle, steps)
        d = build_distiller(spec, env, first_stage(spec, opts.only_stages, resume), resume, self.folder.last_path,
                            self.say)
        if self.sharded:
            from . import fsdp, sharded_checkpoint

            fsdp.shard(d)
            if resume is not None:
                sharded_checkpoint.load(self.folder.last_path, d)
        val_loader = validation_loader(spec, bundle.val, env)
        steps.reference = d.teacher  # an LM evaluation's KL to the teacher (kdgraph.train.lm_metrics)
        teacher_eval = resume.teacher_eval if resume is not None else None
        if spec.runtime.eval_teacher and teacher_eval is None:
            teacher_eval = steps.evaluate(d.teacher, val_loader)
            self.say(f"teacher {spec.teacher.model}: {describe(teacher_eval)}" if "task" in teacher_eval else
                     f"teacher {spec.teacher.model}: top-1 {teacher_eval['top1']:.2f}%  top-5 "
                     f"{teacher_eval['top5']:.2f}% on {teacher_eval['images']} validation images")
            self.monitor.record("teacher_eval", **teacher_eval)
        cache = self._open_teacher_cache(d, bundle, root)
        train_set = wrap_train_dataset(bundle.train, spec)
        results: list[dict[str, Any]] = []
        for i, st in enumerate(spec.stages):
            if opts.only_stages and st.name not in opts.only_stages:
                continue
            if resume is not None and resume.is_done(i):
                self.say(f"stage {st.name}: done in the checkpoint, skipped")
                results.append(resume.stage_results.get(st.name, {"name": st.name}))
                continue
            here = resume if resume is not None and resume.stage_index == i else None
            save = functools.partial(self._save, progress=progress, teacher_eval=teacher_eval)
            results.append(self._run_stage(d, i, train_set, val_loader, here, steps, save, list(results), cache))
            resume = None
        return self._finish(results, progress, teacher_eval, pretrain_s, steps.skipped.total)

    def _settings(self) -> LoopSettings:
        rt, opts = self.spec.runtime, self.opts
        return LoopSettings(amp=rt.amp, channels_last=rt.channels_last,
                            flush_every=opts.log_every or (1 if self.env.device.type == "cpu" else 20),
                            ckpt_every=opts.ckpt_every, ckpt_minutes=opts.ckpt_minutes, eval_every=rt.eval_every,
                            plot=opts.plot, task=eval_task(self.spec), on_eval=opts.on_eval)

    def _announce(self, bundle: DataBundle, resumed: bool) -> None:
        spec, env = self.spec, self.env
        self.say(f"[bold]kdgraph train[/] {spec.name}: {bundle.description} ({len(bundle.train)} train / "
                 f"{len(bundle.val)} val images), device {env.device}"
                 + (f" x {env.world_size} processes ({env.backend})" if env.distributed else "")
                 + f", amp {spec.runtime.amp}, channels_last {spec.runtime.channels_last}, compile "
                   f"{spec.runtime.compile} -> {self.out}")
        if spec.data.augment is not None or not spec.data.drop_last:
            aug = spec.data.augment.describe() if spec.data.augment is not None else "default augmentation"
            self.say(f"  training data: {aug}; last partial batch {'dropped' if spec.data.drop_last else 'kept'}")
        self.monitor.record("start", spec=spec.name, world_size=env.world_size, device=str(env.device),
                            amp=spec.runtime.amp, resumed=resumed)

    # ------------------------------------------------------------------ one stage
    def _run_stage(self, d: nn.Module, i: int, train_set: Any, val_loader: Any, resume: Optional[Checkpoint],
                   steps: StepLoop, save: Any, done: list[dict[str, Any]], cache: Any = None) -> dict[str, Any]:
        spec, env = self.spec, self.env
        st = spec.stages[i]
        d.enter_stage(i)
        if self.sharded:  # the student units' prefetch order follows this stage's graph
            from .fsdp import set_prefetch

            set_prefetch(d)
        d.train()
        info = self._announce_stage(i)
        trains_student = "student" in st.train
        view = self._replay_view(d, train_set, cache) or mixing_view(spec, train_set)
        run = make_stage_run(st.name, i, st, d, d.student if trains_student else None, train_set, env=env,
                             workers=spec.data.workers, seed=spec.runtime.seed, amp=spec.runtime.amp, save=True,
                             evaluate="epoch" if trains_student else "never", batch_inputs=data_batch_inputs(d),
                             view=view, drop_last=spec.data.drop_last)
        start, rng = (0, 0), None
        if resume is not None:
            if self.sharded:  # the optimizer's state, re-sharded for this world size
                from . import sharded_checkpoint

                sharded_checkpoint.load(self.folder.last_path, d, run.opt)
            start, rng = _restore(run, resume, env)
        steps.run_epochs(run, val_loader, start, rng, functools.partial(save, done=done))
        result = dict(info, last=run.last_eval, best_top1=run.best_top1,
                      train_images_per_s=round(statistics.median(run.rates), 1) if run.rates else None)
        steps.checkpoint(run, Position(st.epochs - 1, 0, epoch_done=True, stage_done=True),
                         functools.partial(save, done=done + [result]))
        return result

    def _open_teacher_cache(self, d: nn.Module, bundle: DataBundle, root: Any) -> Any:
        """``runtime.teacher_cache``, checked against this run (spec, loaded teacher, data) before any step."""
        if not self.spec.runtime.teacher_cache:
            return None
        from .teacher_cache import open_for_training

        return open_for_training(self.spec, d.teacher, bundle.train, root)

    def _replay_view(self, d: nn.Module, train_set: Any, cache: Any) -> Any:
        """The training view replaying the cache's draws, for a stage that reads cached taps (else None)."""
        cached = d.report.cached_taps
        if cache is None or not cached:
            return None
        from .teacher_cache import ReplayView

        online = [t.tap for t in d.report.taps if t.tap.startswith("teacher:") and t.tap not in cached]
        if hasattr(cache, "sparse"):  # a causal LM's per-token top-K cache: dict batches of sequences
            from .teacher_cache.token_reader import TokenReplayView

            self.say(f"  teacher cache: {', '.join(cached)} read from {cache.folder} (top-{cache.topk} per token); "
                     f"online teacher: " + (", ".join(online) if online else "none (pruned)"))
            return TokenReplayView(train_set, cache)
        self.say(f"  teacher cache: {', '.join(cached)} replayed from {cache.folder} ({cache.views} views per image"
                 + (f", top-{cache.topk}" if cache.topk else "") + "); online teacher: "
                 + (", ".join(online) if online else "none (pruned)"))
        return ReplayView(train_set, self.spec.runtime.seed, cache)

    def _announce_stage(self, i: int) -> dict[str, Any]:
        st, env = self.spec.stages[i], self.env
        lr, eff = lr_used(st, env.world_size), st.batch_size * env.world_size
        self.say("")
        self.say(f"[bold cyan]stage {st.name}[/] ({i + 1}/{len(self.spec.stages)}): {st.epochs} epoch(s), trains "
                 f"{', '.join(st.train)}; losses {', '.join(f'{lo.name} x {lo.weight:g}' for lo in st.losses)}")
        self.say(f"  batch {st.batch_size} per process x {env.world_size} process(es) = effective batch {eff}; "
                 f"lr used {lr:g} = {st.optimizer.lr:g} x {env.world_size} / {st.reference_world_size} "
                 f"(lr x world_size / reference_world_size)")
        self.say(f"  recipe: {describe_recipe(st)}")
        info = {"name": st.name, "epochs": st.epochs, "batch_size": st.batch_size, "world_size": env.world_size,
                "effective_batch": eff, "lr_spec": st.optimizer.lr, "reference_world_size": st.reference_world_size,
                "lr_used": lr, "trains": list(st.train), "recipe": describe_recipe(st)}
        self.monitor.record("stage", **info)
        return info

    def _save(self, run: StageRun, where: Position, best: bool, *, progress: RunProgress,
              teacher_eval: Optional[dict[str, Any]], done: list[dict[str, Any]]) -> None:
        """Write ``last.pt`` (and ``best.pt``): every process hands in its generator states, rank 0 writes.
        Under fsdp every process writes its shards into ``last.sharded/`` (and ``best.sharded/``)."""
        rngs = all_gather_object(self.env, rng_state())
        if not self.env.is_main and not self.sharded:
            return
        d, sharded = run.task, self.sharded  # sharded: the tensors go to the shards, the rest to trainer.pt
        ck = Checkpoint(
            spec_name=self.spec.name, spec=self.spec.model_dump(mode="json"),
            stage_names=[s.name for s in self.spec.stages], distiller={} if sharded else state_dict_of(d),
            student={} if sharded else _student_weights(run),
            ema=run.ema.state_dict() if run.ema is not None else None,
            stage=run.name, stage_index=run.index, epoch=where.epoch,
            step=where.step, epoch_done=where.epoch_done, stage_done=where.stage_done,
            optimizer=None if sharded else run.opt.state_dict(),
            scheduler=run.sched.state_dict() if run.sched is not None else None,
            scaler=run.scaler.state_dict() if run.scaler is not None else None, rng=rngs,
            global_step=progress.global_step, world_size=self.env.world_size,
            samples_done=where.step * run.stage.batch_size * self.env.world_size, best_top1=run.best_top1,
            last_eval=run.last_eval, history=progress.history, teacher_eval=teacher_eval,
            stage_results={r["name"]: r for r in done if isinstance(r, dict) and "name" in r})
        if sharded:
            self.folder.save_sharded(ck, d, run.opt, best)  # every process
        else:
            self.folder.save(ck, best)
        progress.last_saved = ck.describe()

    # ------------------------------------------------------------------ end
    def _finish(self, stages: list[dict[str, Any]], progress: RunProgress, teacher_eval: Optional[dict[str, Any]],
                pretrain_s: float, skipped: int) -> dict[str, Any]:
        spec, env = self.spec, self.env
        wall = time.perf_counter() - progress.started
        final = next((s.get("last") for s in reversed(stages) if s.get("last")), None)
        best = max((s["best_top1"] for s in stages if s.get("best_top1") is not None), default=None)
        res = {
            "spec": spec.name, "out": str(self.out), "world_size": env.world_size, "device": str(env.device),
            "amp": spec.runtime.amp, "channels_last": spec.runtime.channels_last, "compile": spec.runtime.compile,
            "teacher": teacher_eval, "teacher_weights": spec.teacher.weights, "stages": stages,
            "student": {"top1": final["top1"], "top5": final["top5"], "best_top1": best,  # + an LM's metrics
                        **{k: final[k] for k in _LM_KEYS if k in final}} if final else None,
            "wall_s": round(wall, 1), "pretrain_s": round(pretrain_s, 1),
            "time_to_first_step_s": round(progress.first_step_s, 2) if progress.first_step_s is not None else None,
            "reference": spec.reference.model_dump() if spec.reference else None, "skipped_images": skipped,
        }
        self.folder.write_results(res)
        self.monitor.record("end", **{k: res[k] for k in ("student", "teacher", "wall_s", "time_to_first_step_s")})
        if self.opts.plot:
            self.monitor.plot()
        parts = [f"teacher {describe(teacher_eval)}"] if teacher_eval else []
        if final and "task" in final:
            parts.append(f"student {describe(final)}, best score {best:.2f}%")
        elif final:
            parts.append(f"student top-1 {final['top1']:.2f}% (top-5 {final['top5']:.2f}%, best top-1 {best:.2f}%)")
        self.say("")
        self.say(f"[bold green]done[/] {spec.name} in {seconds(wall)}: " + ", ".join(parts)
                 + f". Run folder: {self.out} "
                 + ("(last.sharded/, best.sharded/, " if self.sharded else "(last.pt, best.pt, ")
                 + "metrics.jsonl, curves.png, tb/)")
        self.monitor.close()
        return res


def _student_weights(run: StageRun) -> dict[str, torch.Tensor]:
    """What a checkpoint's ``student`` holds: the EMA's weights when the stage reports its EMA, else the student."""
    if run.ema is not None and run.ema.spec.report:
        return state_dict_of(run.ema.module)
    return state_dict_of(run.task, "student")


def _restore(run: StageRun, ck: Checkpoint, env: DistEnv) -> tuple[tuple[int, int], Optional[dict[str, Any]]]:
    """Put the checkpoint's optimizer, schedule, scaler and best accuracy into ``run``; returns where to
    start (epoch, step) and this process's generator states to restore (None: another world size)."""
    if ck.optimizer is not None:  # None: a sharded checkpoint, its optimizer state loaded by the trainer
        run.opt.load_state_dict(ck.optimizer)
    if run.sched is not None and ck.scheduler is not None:
        run.sched.load_state_dict(ck.scheduler)
    if run.scaler is not None and ck.scaler is not None:
        run.scaler.load_state_dict(ck.scaler)
    if run.ema is not None and ck.ema is not None:
        run.ema.load_state_dict(ck.ema)
    run.best_top1, run.last_eval = ck.best_top1, ck.last_eval
    return ck.resume_point(), ck.rng_of(env.rank, env.world_size)


_LM_KEYS = ("perplexity", "bits_per_token", "kl_to_teacher", "tokens")  # data.dataset text: kdgraph bench's metric


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
    env = setup(opts.device, group=s.runtime.distributed == "fsdp")  # fsdp: a group even of one
    try:
        require_processes(s, env.world_size)
        with consent(opts.allow_imports, opts.trust_code):
            return Trainer(s, opts, env).run()
    finally:
        if owned:
            teardown(env)
