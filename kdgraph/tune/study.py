"""A tune's Optuna study: opened, verified before it is trusted, and its trials counted exactly once.

* **Verified**: a new study records the spec's fingerprint, the search space and the trial budget's fixed
  overrides (user attributes); a study that exists is used only with ``--resume`` and only when all three match,
  else one clear error (a study tuned for another spec or space is never mixed in).
* **Killed trials**: every trial records its host, process id and that process's start time. A RUNNING trial
  whose process on this host is gone (``kill -9``, a crash, a lost machine under an RDB heartbeat) is marked
  FAIL when a worker starts (:func:`fail_dead_trials`); a failed trial never counts towards ``--trials``, so it is
  neither counted twice nor lost: a new trial takes its place.
* **Exactly N trials** across processes and hosts (:func:`claim`): a worker asks Optuna for a trial (each trial
  number is unique in the storage, so no two workers run the same trial), then keeps it only when fewer than N
  live (running, pruned or complete) trials have a smaller number; otherwise it gives it back as a FAIL marked
  ``kdgraph_surplus`` (a race between workers, left out of the table) and stops.
"""
from __future__ import annotations

import json
import os
import socket
from typing import Any, Optional

from ..bench.tuned import SPEC_ATTR
from ..errors import KDGraphError

__all__ = ["TuneError", "open_study", "sampler_for", "pruner_for", "fail_dead_trials", "claim", "live_states", "SURPLUS_ATTR"]

SPACE_ATTR = "kdgraph_space"
FIXED_ATTR = "kdgraph_fixed_set"
SURPLUS_ATTR = "kdgraph_surplus"


class TuneError(KDGraphError):
    """A study or storage cannot be used as asked (mismatch, missing --resume, unreachable database)."""


def live_states() -> tuple:
    from optuna.trial import TrialState

    return (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)


def sampler_for(space: Any, salt: int = 0) -> Any:
    """The space's sampler; ``salt`` (the study's trial count, the worker) keeps workers and resumed runs from
    drawing the same sequence again, while a fresh single-worker tune stays reproducible."""
    import optuna

    s = space.sampler
    seed = None if s.seed is None else (s.seed + salt) % (2 ** 32)
    if s.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=s.startup_trials)


def pruner_for(space: Any) -> Any:
    import optuna

    p = space.pruner
    if p.type == "none":
        return optuna.pruners.NopPruner()
    if p.type == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_epochs, reduction_factor=p.reduction_factor)
    return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_epochs)


def open_study(storage: Any, name: str, fingerprint: str, space: Any, fixed: list[str], resume: bool,
               where: str) -> Any:
    """Create the study, or (``resume``) load and verify the one that exists; see the module docstring."""
    import optuna

    names = [s.study_name for s in storage.get_all_studies()]
    space_json = json.dumps(space.to_json(), sort_keys=True)
    if name in names and not resume:
        n = len(optuna.load_study(study_name=name, storage=storage).trials)
        raise TuneError(f"study {name!r} already exists in {where} ({n} trial(s)). Pass --resume to continue it "
                        f"(or, on another host, to join it), or choose a new --study name or --out folder.")
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", sampler=sampler_for(space),
                                pruner=pruner_for(space), load_if_exists=True)
    attrs = study.user_attrs
    if SPEC_ATTR not in attrs:
        study.set_user_attr(SPEC_ATTR, fingerprint)
        study.set_user_attr(SPACE_ATTR, space_json)
        study.set_user_attr(FIXED_ATTR, list(fixed))
        return study
    problems = []
    if attrs.get(SPEC_ATTR) != fingerprint:
        problems.append(f"the spec differs (study: fingerprint {attrs.get(SPEC_ATTR)}, now {fingerprint})")
    if not _same_space(attrs.get(SPACE_ATTR), space):
        problems.append("the search space differs (params, ranges, validation, sampler or pruner)")
    if list(attrs.get(FIXED_ATTR) or []) != list(fixed):
        problems.append(f"the trials' fixed overrides differ (study: {attrs.get(FIXED_ATTR)}, now {fixed})")
    if problems:
        raise TuneError(f"study {name!r} in {where} was made for another tune: {'; '.join(problems)}. Its trials "
                        f"cannot be mixed with these; use a new --study name (or --out folder), or the spec and "
                        f"space it was made with.")
    return study


def _same_space(saved: Any, space: Any) -> bool:
    """The study's recorded space is ``space`` once read by today's schema (a study made before a field was added
    to the space's schema has no value for it; the field's default, which keeps the earlier behaviour, fills in)."""
    try:
        return type(space).model_validate(json.loads(saved)).to_json() == space.to_json()
    except (TypeError, ValueError):  # not JSON, or not a space (pydantic's ValidationError is a ValueError)
        return False


def _start_time(pid: int) -> Optional[str]:
    """The process's start time (clock ticks since boot, Linux), to tell a reused process id apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _start_time(pid)
    return started is None or now is None or now == started


def owner_attrs() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pid_start": _start_time(pid)}


def fail_dead_trials(study: Any, say: Any = None) -> list[int]:
    """Mark FAIL every RUNNING trial whose process (on this host) is gone; RDB storages with a heartbeat
    also fail those of other hosts that stopped beating. Returns the trial numbers failed."""
    import optuna
    from optuna.trial import TrialState

    failed = []
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "experimental" (since v2.9)
            optuna.storages.fail_stale_trials(study)  # RDB heartbeat (other hosts); a no-op without one
    except Exception:  # noqa: BLE001 - storages without heartbeats
        pass
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        a = t.user_attrs
        if a.get("host") != host or not isinstance(a.get("pid"), int):
            continue
        if not _alive(a["pid"], a.get("pid_start")):
            try:  # the reason first: a finished trial takes no more attributes
                study._storage.set_trial_user_attr(t._trial_id, "kdgraph_failed", "its process ended mid-trial")
                if study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                    failed.append(t.number)
            except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed it first
                pass
    if failed and say:
        say(f"trial(s) {', '.join(map(str, failed))}: their process ended mid-run (killed?); marked failed, "
            f"not counted; new trials take their place")
    return failed


def count_live(study: Any) -> int:
    return len(study.get_trials(deepcopy=False, states=live_states()))


def claim(study: Any, n_trials: int) -> Optional[Any]:
    """A new trial of the study this process owns, or None when the study has its N trials (see the module
    docstring: exact even when several workers ask at once)."""
    from optuna.trial import TrialState

    if count_live(study) >= n_trials:
        return None
    trial = study.ask()
    for k, v in owner_attrs().items():
        trial.set_user_attr(k, v)
    before = [t for t in study.get_trials(deepcopy=False, states=live_states()) if t.number < trial.number]
    if len(before) >= n_trials:
        trial.set_user_attr(SURPLUS_ATTR, True)
        study.tell(trial, state=TrialState.FAIL)
        return None
    return trial
