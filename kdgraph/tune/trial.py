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

__all__ = ["TrialContext", "run_trial"]


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


def run_trial(study: Any, trial: Any, ctx: TrialContext, say: Any, claim_s: float = 0.0) -> dict[str, Any]:
    """Train one claimed trial and tell the study how it ended; returns a summary (state, value, times).
    ``claim_s``: the time spent claiming it (asking the storage), counted in its overhead."""
    import optuna
    from optuna.storages._heartbeat import get_heartbeat_thread

    from ..train.loop import TrainOptions, train

    t0 = time.perf_counter() - claim_s
    space = Space.model_validate(ctx.space)
    params = {path: p.suggest(trial, path) for path, p in space.params.items()}
    sets = [override_for(p, v) for path, v in params.items() for p in space.params[path].paths(path)]
    trial.set_user_attr(SET_ATTR, sets)
    folder = Path(ctx.out) / "trials" / f"{trial.number:04d}"
    trial.set_user_attr("out", str(folder))
    reports: list[float] = []

    final: list[tuple] = []  # (stage, epoch) of the run's last evaluation: a finished trial is never pruned

    def on_eval(ev: dict[str, Any]) -> None:
        score = float(ev["top1"])
        trial.report(score, len(reports))
        reports.append(score)
        if (ev.get("stage"), ev.get("epoch")) not in final and trial.should_prune():
            raise _Pruned()

    train_s = 0.0
    state, value, error = None, None, None
    with get_heartbeat_thread(trial._trial_id, study._storage):
        try:
            spec: Spec = apply_overrides(Spec.model_validate(ctx.spec), list(ctx.fixed) + sets, label="trial")
            final.append((spec.stages[-1].name, spec.stages[-1].epochs - 1))
            folder.mkdir(parents=True, exist_ok=True)
            opts = TrainOptions(out=folder, data=ctx.data, overwrite=True, device=ctx.device, progress=False,
                                tensorboard=False, plot=False, allow_imports=tuple(ctx.allow_imports),
                                on_eval=on_eval)
            t1 = time.perf_counter()
            try:
                with open(folder / "train.log", "w") as log, contextlib.redirect_stdout(log):
                    res = train(spec, opts)
            finally:
                train_s = time.perf_counter() - t1
            value = float(res["student"]["top1"])
            state = optuna.trial.TrialState.COMPLETE
        except _Pruned:
            state = optuna.trial.TrialState.PRUNED
        except KeyboardInterrupt:
            raise
        except KDGraphError as e:
            state, error = optuna.trial.TrialState.FAIL, str(e)
        except Exception as e:  # noqa: BLE001 - one broken trial must not stop the tune; logged in full
            state, error = optuna.trial.TrialState.FAIL, f"{type(e).__name__}: {e}"
            (folder / "traceback.txt").write_text(traceback.format_exc())
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
    say(f"trial {trial.number}: {state.name.lower()} {shown}  ({', '.join(sets)}; {total:.1f} s)"
        + (f"  error: {error}" if error else ""))
    return summary
