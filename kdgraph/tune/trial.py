"""One trial: the spec with the drawn overrides trained exactly as ``kdgraph train`` trains it, scored on the
held-out validation images, every epoch's score reported to Optuna and the trial stopped when it is pruned.

A trial's run folder is ``OUT/trials/<number>/`` (``train.log``, ``metrics.jsonl``, ``results.json``, ...). The
score is the student's top-1 (GLUE: the task's score) on the held-out images after the last epoch, the number
``kdgraph train --set ...`` prints for the same overrides and seed. The time the tune spends around the training
(drawing, storage writes, pruning decisions, the final ``tell``) is in the folder's ``tune.json``
(``overhead_s`` = the trial's wall time minus ``train_s``).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..bench.tuned import SET_ATTR
from ..errors import KDGraphError
from ..overrides import apply_overrides
from ..spec import Spec
from .space import Space, override_for

__all__ = ["TrialContext", "run_trial", "train_trial"]


@dataclass
class TrialContext:
    """What every trial of one tune shares (picklable: handed to worker processes)."""

    spec: dict  # the spec as data
    space: dict  # Space as JSON
    fixed: list[str]  # overrides every trial gets (the validation split, per-epoch evaluation)
    out: str
    data: Optional[str] = None
    device: Optional[str] = None
    allow_imports: tuple = field(default_factory=tuple)


class _Pruned(Exception):
    """Raised from the per-epoch hook to stop a pruned trial's training."""


def train_trial(ctx: TrialContext, number: int, sets: list[str], team: Any, trial: Any = None,
                reports: Optional[list[float]] = None) -> dict[str, Any]:
    """Train trial ``number`` with its overrides on this rank; returns its outcome (``state``: COMPLETE, PRUNED
    or FAIL, ``value``, ``error``, ``train_s``, ``rank``). ``trial`` (rank 0's, or a single process's): every
    per-epoch score is reported to it and its pruning decided here, then broadcast to the other ranks of
    ``team`` (:mod:`.ranks`), which stop with it."""
    from ..train.loop import TrainOptions, train

    reports = reports if reports is not None else []
    folder = Path(ctx.out) / "trials" / f"{number:04d}"
    final: list[tuple] = []  # (stage, epoch) of the run's last evaluation: a finished trial is never pruned
    unscored: set = set()  # the stages before the space's pruner.from_stage: their epochs are not reported

    def on_eval(ev: dict[str, Any]) -> None:
        verdict = None  # None: go on; "pruned"; or why rank 0 failed the trial
        if trial is not None and ev.get("stage") not in unscored:
            try:
                score = float(ev["top1"])
                trial.report(score, len(reports))
                reports.append(score)
                if (ev.get("stage"), ev.get("epoch")) not in final and trial.should_prune():
                    verdict = "pruned"
            except Exception as e:  # noqa: BLE001 - the other ranks must hear of it, then it fails the trial
                verdict = f"{type(e).__name__}: {e}"
        verdict = team.broadcast(verdict)
        if verdict == "pruned":
            raise _Pruned()
        if verdict is not None:
            raise KDGraphError(verdict if team.leads else f"rank 0: {verdict}")

    train_s, state, value, error = 0.0, "FAIL", None, None
    try:
        spec: Spec = apply_overrides(Spec.model_validate(ctx.spec), list(ctx.fixed) + list(sets), label="trial")
        final.append((spec.stages[-1].name, spec.stages[-1].epochs - 1))
        names = [s.name for s in spec.stages]
        first = (ctx.space.get("pruner") or {}).get("from_stage")
        unscored.update(names[:names.index(first)] if first in names else [])
        folder.mkdir(parents=True, exist_ok=True)
        opts = TrainOptions(out=folder, data=ctx.data, overwrite=True, device=ctx.device, progress=False,
                            tensorboard=False, plot=False, allow_imports=tuple(ctx.allow_imports), on_eval=on_eval)
        t1 = time.perf_counter()
        log_path = folder / "train.log" if team.leads else os.devnull  # the other ranks print nothing anyway
        try:
            with open(log_path, "w") as log, contextlib.redirect_stdout(log):
                res = train(spec, opts)
        finally:
            train_s = time.perf_counter() - t1
        state, value = "COMPLETE", float(res["student"]["top1"])
    except _Pruned:
        state = "PRUNED"
    except KeyboardInterrupt:
        raise
    except KDGraphError as e:
        error = str(e)
    except Exception as e:  # noqa: BLE001 - one broken trial must not stop the tune; logged in full
        error = f"{type(e).__name__}: {e}"
        name = "traceback.txt" if team.leads else f"traceback.rank{team.rank}.txt"
        with contextlib.suppress(OSError):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(traceback.format_exc())
    return {"state": state, "value": value, "error": error, "train_s": train_s, "rank": team.rank}


def _merge(outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    """Every rank's outcome as one: failed when any rank failed (each error once, naming its ranks unless every
    rank met it)."""
    if len(outcomes) == 1:
        return outcomes[0]
    lead = dict(outcomes[0])
    failed = [o for o in outcomes if o["state"] == "FAIL"]
    if failed:
        lead["state"], lead["value"] = "FAIL", None
        ranks: dict[str, list[str]] = {}  # one error met by several ranks is told once
        for o in failed:
            ranks.setdefault(str(o["error"]), []).append(str(o["rank"]))
        lead["error"] = "; ".join(f"rank {', '.join(r)}: {e}" if len(r) < len(outcomes) else e
                                  for e, r in ranks.items())
    elif len({o["state"] for o in outcomes}) > 1:  # cannot happen: pruning is rank 0's decision, broadcast
        lead["state"], lead["value"] = "FAIL", None
        lead["error"] = f"the ranks ended differently: {[o['state'] for o in outcomes]}"
    return lead


def run_trial(study: Any, trial: Any, ctx: TrialContext, say: Any, claim_s: float = 0.0,
              team: Any = None) -> dict[str, Any]:
    """Train one claimed trial and tell the study how it ended; returns a summary (state, value, times).
    ``claim_s``: the time spent claiming it (asking the storage), counted in its overhead. ``team``: under
    torchrun (rank 0), the ranks that train it too (:mod:`.ranks`); their outcomes decide its state."""
    import optuna
    from optuna.storages._heartbeat import get_heartbeat_thread

    from .ranks import SOLO, TeamBroken

    team = team or SOLO
    t0 = time.perf_counter() - claim_s
    space = Space.model_validate(ctx.space)
    params = {path: p.suggest(trial, path) for path, p in space.params.items()}
    sets = [override_for(p, v) for path, v in params.items() for p in space.params[path].paths(path)]
    trial.set_user_attr(SET_ATTR, sets)
    folder = Path(ctx.out) / "trials" / f"{trial.number:04d}"
    trial.set_user_attr("out", str(folder))
    if team.world_size > 1:
        trial.set_user_attr("world_size", team.world_size)
    reports: list[float] = []
    with get_heartbeat_thread(trial._trial_id, study._storage):
        team.broadcast(("trial", trial.number, sets))
        try:
            outcome = _merge(team.settle(train_trial(ctx, trial.number, sets, team, trial, reports)))
        except TeamBroken as e:  # the other ranks are stuck: fail the trial once, then stop the job
            trial.set_user_attr("error", str(e)[:2000])
            study.tell(trial, None, state=optuna.trial.TrialState.FAIL)
            raise
        state = getattr(optuna.trial.TrialState, outcome["state"])
        value, error, train_s = outcome["value"], outcome["error"], outcome["train_s"]
        if error is not None:
            trial.set_user_attr("error", error[:2000])
        trial.set_user_attr("train_s", round(train_s, 3))
        trial.set_user_attr("overhead_s", round(time.perf_counter() - t0 - train_s, 4))
        study.tell(trial, value if state == optuna.trial.TrialState.COMPLETE else None, state=state)
    total = time.perf_counter() - t0
    summary = {"number": trial.number, "state": state.name, "value": value, "train_s": round(train_s, 3),
               "total_s": round(total, 3), "overhead_s": round(total - train_s, 4), "set": sets}
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tune.json").write_text(json.dumps(summary, indent=2))
    shown = f"{value:.2f}" if value is not None else (f"{reports[-1]:.2f} at epoch {len(reports)}" if reports else "-")
    from rich.markup import escape  # say() prints rich markup: an error's "[ce = nan]" is text

    say(escape(f"trial {trial.number}: {state.name.lower()} {shown}  ({', '.join(sets)}; {total:.1f} s)"
               + (f"  error: {error}" if error else "")))
    return summary
