"""``kdgraph tune``: a spec's hyper-parameters searched with Optuna, every trial a real training run scored on
training images held out for validation, never on the evaluation split the tables report.

    from kdgraph.tune import tune
    res = tune("specs/fashion_mnist/l2.yaml", "examples/tune/l2_space.yaml", trials=16, out="runs/tune_l2")
    res.best["set"]      # ['stages.main.losses.l2.weight=1.7', ...]: a --set list for kdgraph train / a suite entry

Each trial trains the spec with the drawn overrides (:mod:`.space`) plus the tune's fixed ones: ``data.holdout``
(the validation split: the space's ``validation``, else the spec's ``data.holdout``, else 10 % of the training
split, seed 0), ``runtime.eval_every=1`` (a score every epoch, for pruning) and ``runtime.eval_teacher=false``.
The study lives in Optuna's storage (:mod:`.study`): by default a journal file ``OUT/study.journal``; with
``storage="postgresql://..."`` one study shared by processes on many hosts. ``--resume`` continues (or joins) a
study after verifying it was made for this spec and space. The folder's files: :mod:`.report`.
Under ``torchrun`` every trial is trained by all the processes (DDP), rank 0 alone talking to Optuna (:mod:`.ranks`).
This is runtime above :mod:`kdgraph.bench`: it trains through :func:`kdgraph.train.loop.train` as
``kdgraph train`` does.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional, Union

from ..bench.tuned import open_storage, spec_fingerprint
from ..errors import SpecError
from ..overrides import apply_overrides
from ..spec import load_spec
from .report import TuneResult, summarize, write_all
from .space import Space, check_space, load_space
from .ranks import refuse_workers, share_setup, team
from .study import TuneError, open_study
from .trial import TrialContext
from .workers import follow, run_workers

__all__ = ["tune", "TuneResult", "TuneError", "Space", "load_space", "fixed_overrides"]


def fixed_overrides(spec, space: Space) -> list[str]:
    """The overrides every trial gets: the validation split and a score every epoch."""
    held = space.validation or spec.data.holdout
    holdout = held.model_dump(mode="json", exclude_none=True) if held is not None else {"fraction": 0.1, "seed": 0}
    return [f"data.holdout={json.dumps(holdout, sort_keys=True)}", "runtime.eval_every=1",
            "runtime.eval_teacher=false"]


def tune(spec: Union[str, Path], space: Union[str, Path, dict], *, trials: int, out: Union[str, Path, None] = None,
         storage: Optional[str] = None, study: Optional[str] = None, workers: int = 1, resume: bool = False,
         data: Optional[str] = None, device: Optional[str] = None, allow_imports: tuple = (),
         sets: tuple = (), say: Optional[Callable[[str], None]] = None) -> TuneResult:
    """Run (or with ``resume`` continue / join) a study until it holds ``trials`` finished or running trials,
    then write its table, best overrides, suite and pictures into ``out``; returns them.

    ``sets``: ``--set`` overrides every trial gets (e.g. fewer epochs per trial than the spec trains); they are
    part of the study's fixed overrides, not of the best ``set`` list. Under torchrun every rank calls this and
    gets the same result; ``workers`` must then be 1."""
    if trials < 1:
        raise SpecError(f"--trials must be >= 1, got {trials}")
    if workers < 1:
        raise SpecError(f"--workers must be >= 1, got {workers}")
    refuse_workers(workers)
    say = say or (lambda text: None)
    with team(device) as t:  # under torchrun: one process group, rank 0 leads (see .ranks)
        if not t.leads:
            ctx, _ = share_setup(t, None)
            follow(t, ctx)
            res = t.broadcast(None)
            if res is None:
                raise TuneError("rank 0 could not summarise the study (see its error)")
            return res
        return _lead(t, spec, space, trials=trials, out=out, storage=storage, study=study, workers=workers,
                     resume=resume, data=data, device=device, allow_imports=allow_imports, sets=sets, say=say)


def _lead(t, spec, space, *, trials, out, storage, study, workers, resume, data, device, allow_imports, sets,
          say) -> TuneResult:
    """The tune itself (rank 0 under torchrun): the study, the trials, the output folder."""
    def prepare():
        file_spec = load_spec(spec)
        base = apply_overrides(file_spec, list(sets), label="--set")
        sp, origin = load_space(space)
        check_space(sp, base, origin)
        fixed = list(sets) + fixed_overrides(base, sp)
        apply_overrides(file_spec, fixed, label="tune's fixed override")
        name = study or base.name
        out_dir = Path(out) if out is not None else Path("runs") / f"tune_{name}"
        if storage is None:  # embedded: a journal file in the output folder
            url = str((out_dir / "study.journal").resolve())
            where = url
            if not resume and (out_dir / "study.journal").exists():
                st = open_storage(url, create=False)
            else:
                out_dir.mkdir(parents=True, exist_ok=True)
                st = open_storage(url, create=True)
        else:
            url, where = storage, storage.split("@")[-1]
            st = open_storage(url)  # reached and checked before anything is written
        open_study(st, name, spec_fingerprint(file_spec), sp, fixed, resume, where)
        out_dir.mkdir(parents=True, exist_ok=True)
        ctx = TrialContext(spec=file_spec.model_dump(mode="json"), space=sp.to_json(), fixed=fixed,
                           out=str(out_dir.resolve()), data=data, device=device, allow_imports=tuple(allow_imports))
        return ctx, (base, sp, origin, fixed, name, out_dir, url, where, st)  # the others get ctx alone

    ctx, (base, sp, origin, fixed, name, out_dir, url, where, st) = share_setup(t, prepare)
    spec_path = str(Path(spec).resolve()) if not isinstance(spec, dict) else "<spec>"
    t0 = time.perf_counter()
    say(f"[bold]kdgraph tune[/] {base.name}: study {name!r} in {where}, {trials} trial(s), "
        + (f"each trained by {t.world_size} processes (torchrun)" if t.world_size > 1 else f"{workers} worker(s)")
        + f"; validation: {fixed[len(sets)].split('=', 1)[1]} held-out training images"
        + (f"; every trial with {' '.join(sets)}" if sets else "") + f" -> {out_dir}")
    res, trained = None, False
    try:
        run_workers(url, name, trials, ctx, workers, say, team=t)
        trained = True
        import optuna

        s = optuna.load_study(study_name=name, storage=st)
        res = summarize(s, spec_path, str(origin), fixed, out_dir, trials)
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        write_all(res, s, out_dir, len(sp.params))
    finally:
        if t.world_size > 1 and trained:
            t.broadcast(res)  # the other ranks return the same result (None: it could not be written)
    return res
