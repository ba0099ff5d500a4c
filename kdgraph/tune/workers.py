"""Running trials: one loop per worker process (:func:`work`), ``--workers K`` processes on one machine, and
under torchrun the other ranks' part (:func:`follow`: train every trial rank 0 broadcasts, see :mod:`.ranks`).

Every worker opens the storage itself, fails the trials of dead processes, then claims and trains trials until
the study holds its N (:func:`kdgraph.tune.study.claim`). With ``K > 1`` the workers are spawned processes with
``cores // K`` threads each; they die with their parent (Linux ``PR_SET_PDEATHSIG``), so a ``kill -9`` of the
``kdgraph tune`` process leaves no orphan finishing a trial that ``--resume`` has already failed.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import time
import zlib
from typing import Any, Callable, Optional

from ..bench.tuned import is_rdb_url, open_storage
from ..errors import KDGraphError
from .space import Space
from .ranks import TeamBroken
from .study import claim, fail_dead_trials, pruner_for, sampler_for
from .trial import TrialContext, run_trial, train_trial

__all__ = ["work", "run_workers", "follow"]


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def work(storage_url: str, study_name: str, n_trials: int, ctx: TrialContext, threads: int = 0,
         say: Optional[Callable[[str], None]] = None, child: bool = False, index: int = 0,
         team: Any = None) -> list[dict[str, Any]]:
    """Claim and train trials until the study has ``n_trials`` live ones; returns this worker's summaries.
    ``team``: under torchrun, rank 0's view of the ranks that train each trial with it (:mod:`.ranks`): they
    hear of every trial, and of the end (or of an error here, so that no rank waits for ever)."""
    if team is None or team.world_size == 1:
        return _loop(storage_url, study_name, n_trials, ctx, threads, say, child, index, None)
    try:
        done = _loop(storage_url, study_name, n_trials, ctx, threads, say, child, index, team)
    except TeamBroken:  # the other ranks wait in a training collective: torchrun stops them
        raise
    except BaseException as e:  # between trials (the storage, a draw): the other ranks wait for a broadcast
        team.broadcast(("abort", f"{type(e).__name__}: {e}"))
        raise
    team.broadcast(None)  # the study has its trials
    return done


def _loop(storage_url: str, study_name: str, n_trials: int, ctx: TrialContext, threads: int,
          say: Optional[Callable[[str], None]], child: bool, index: int, team: Any) -> list[dict[str, Any]]:
    import optuna
    import torch

    if child:
        _die_with_parent()
    if threads > 0:
        torch.set_num_threads(threads)
    say = say or (lambda text: print(text, flush=True))
    storage = open_storage(storage_url, create=False, heartbeat=True)
    space = Space.model_validate(ctx.space)
    salt = 1000 * len(storage.get_all_trials(storage.get_study_id_from_name(study_name), deepcopy=False)) + index
    if is_rdb_url(storage_url):  # other hosts run the same command: their draws must differ too
        salt += zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode())
    study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler_for(space, salt),
                              pruner=pruner_for(space))
    fail_dead_trials(study, say)
    done = []
    while True:
        t0 = time.perf_counter()
        trial = claim(study, n_trials)
        if trial is None:
            return done
        done.append(run_trial(study, trial, ctx, say, claim_s=time.perf_counter() - t0, team=team))


def follow(t: Any, ctx: Any) -> int:
    """A non-zero rank's part of the tune: train every trial rank 0 broadcasts, until it says the study has its
    trials (``None``) or stops (``("abort", message)``). Returns the number of trials trained."""
    n = 0
    while True:
        msg = t.broadcast(None)
        if msg is None:
            return n
        if msg[0] == "abort":
            raise KDGraphError(f"the tune stopped on rank 0: {msg[1]}")
        _, number, sets = msg
        t.settle(train_trial(ctx, number, sets, t))  # TeamBroken: this rank failed alone; torchrun ends the job
        n += 1


def _child(args: tuple) -> list[dict[str, Any]]:
    storage_url, study_name, n_trials, ctx, threads, ppid, index = args
    if os.getppid() != ppid:  # the parent died before this worker started
        return []
    return work(storage_url, study_name, n_trials, ctx, threads, child=True, index=index)


def run_workers(storage_url: str, study_name: str, n_trials: int, ctx: TrialContext, workers: int,
                say: Callable[[str], None], team: Any = None) -> list[dict[str, Any]]:
    """Train the study's remaining trials here (``workers == 1``; under torchrun with ``team``, rank 0 leading
    the ranks that train each trial together) or in ``workers`` processes."""
    if workers <= 1:
        return work(storage_url, study_name, n_trials, ctx, 0, say, team=team)
    import multiprocessing as mp

    threads = max(1, (os.cpu_count() or 1) // workers)
    say(f"{workers} worker processes x {threads} thread(s)")
    with mp.get_context("spawn").Pool(workers) as pool:
        parts = pool.map(_child, [(storage_url, study_name, n_trials, ctx, threads, os.getpid(), i)
                                  for i in range(workers)], chunksize=1)
    return [s for part in parts for s in part]
