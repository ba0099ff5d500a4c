"""``torchrun --nproc_per_node=N -m kdgraph tune ...``: one tuning host whose trials are each trained by all N
processes (kdgraph's normal DDP path), with rank 0 alone talking to Optuna.

* **One process group** for the whole command (:func:`team`): joined once before the first trial and left after
  the last, as ``kdgraph bench`` does (gloo cannot join a group again that each trial would create and destroy).
* **Rank 0 leads** (:func:`kdgraph.tune.tune`, ``Team.leads``): it opens the storage and study, claims each
  trial, draws its overrides, reports every per-epoch score, decides pruning, tells the study how the trial ended
  and writes the output folder. The other ranks never open the storage.
* **The others follow** (:func:`kdgraph.tune.workers.follow`): rank 0 broadcasts (``torch.distributed`` object
  broadcasts over the tune's gloo group) the tune's setup (or its error, raised on every rank alike), then each
  trial's number and overrides, then after every per-epoch evaluation whether the trial goes on, is pruned or
  failed on rank 0; ``None`` when the study has its trials.
* **A failure on any rank** marks the trial failed once: after every trial each rank puts its outcome in
  torchrun's key-value store and reads the others' (:meth:`Team.settle`); rank 0 tells the study one FAIL
  naming the rank(s) and the error (an error every rank met is told once).
* **A failure on one rank alone inside a training collective** (out of memory on one GPU mid-step) leaves the
  other ranks waiting in that collective. The failed rank waits :data:`SETTLE_S` for their outcomes, then raises
  :class:`TeamBroken` and exits, and torchrun stops the job. On rank 0 the trial is told FAIL first; when another
  rank failed, rank 0 usually hears of it (its collective breaks when that rank exits) and tells FAIL with that
  rank's error, else the trial stays RUNNING with rank 0's process gone and ``--resume`` marks it failed, once
  (:func:`kdgraph.tune.study.fail_dead_trials`).

The broadcasts go over a gloo group of their own (CPU objects, whatever the training backend), made once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import KDGraphError, SpecError

__all__ = ["Team", "TeamBroken", "team", "under_torchrun", "refuse_workers", "share_setup", "SOLO", "SETTLE_S"]

SETTLE_S = 120.0  # how long a rank whose trial failed waits for the others before it stops the job


class TeamBroken(KDGraphError):
    """The ranks no longer train the same trial (one failed alone while the others wait in a collective)."""


def under_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (``WORLD_SIZE > 1``)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


@dataclass
class Team:
    """The processes that train each trial together; a world of one (:data:`SOLO`) broadcasts to itself."""

    rank: int = 0
    world_size: int = 1
    group: Any = None  # the gloo group of the tune's messages
    store: Any = None  # torchrun's key-value store (each trial's outcome, see settle)
    settled: int = 0  # trials settled so far (the same count on every rank)

    @property
    def leads(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.leads else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def settle(self, outcome: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank's outcome of the trial just trained (JSON), through torchrun's key-value store rather than
        a collective, so that a rank that failed alone can stop waiting: a rank whose trial failed waits
        :data:`SETTLE_S` at most for the others, then raises :class:`TeamBroken` (see the module docstring)."""
        if self.world_size == 1:
            return [outcome]
        import datetime
        import json

        self.settled += 1
        keys = [f"settle/{self.settled}/{r}" for r in range(self.world_size)]
        self.store.set(keys[self.rank], json.dumps(outcome))
        try:
            if outcome.get("state") == "FAIL":
                self.store.wait(keys, datetime.timedelta(seconds=SETTLE_S))
            else:
                self.store.wait(keys)  # the store's timeout (30 min, as the process group's)
        except Exception as e:  # noqa: BLE001 - the store's timeout (DistStoreError) or a store that is gone
            raise TeamBroken(
                f"rank {self.rank}: the trial failed here ({outcome.get('error')}) and the other ranks did not "
                f"end it within {SETTLE_S:.0f} s (they wait in a training collective: a failure on this rank "
                f"alone). The tune stops; the trial is failed (at once on rank 0, else by --resume), never "
                f"counted.") from e
        return [json.loads(self.store.get(k)) for k in keys]


SOLO = Team()


class team:
    """``with team(device) as t``: the command's process group under torchrun (joined through
    :func:`kdgraph.train.distributed.setup`, as ``kdgraph bench`` joins it), :data:`SOLO` otherwise."""

    def __init__(self, device: Optional[str]) -> None:
        self.device, self.env = device, None

    def __enter__(self) -> Team:
        if not under_torchrun():
            return SOLO
        import datetime
        import uuid

        import torch.distributed as dist

        from ..train.distributed import setup

        self.env = setup(self.device, group=True)
        minutes = datetime.timedelta(minutes=30)  # as the process group's
        t = Team(self.env.rank, self.env.world_size, dist.new_group(backend="gloo", timeout=minutes))
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=minutes)  # the one torchrun's processes meet in
        t.store = dist.PrefixStore(f"kdgraph_tune/{t.broadcast(uuid.uuid4().hex)}/", store)  # this tune's keys
        return t

    def __exit__(self, *exc: Any) -> None:
        if self.env is not None:
            from ..train.distributed import teardown

            teardown(self.env)


def refuse_workers(workers: int) -> None:
    """``--workers K`` (K processes each training its own trials) and torchrun (N processes training one trial)
    do not combine: one clear paragraph on every rank."""
    if workers > 1 and under_torchrun():
        raise SpecError(
            f"--workers {workers} cannot be combined with torchrun (WORLD_SIZE={os.environ.get('WORLD_SIZE')}): "
            f"under torchrun every trial is trained by all {os.environ.get('WORLD_SIZE')} processes together, so "
            f"this host runs one trial at a time. Leave out --workers (or pass --workers 1); to train several trials "
            f"at once, start the tune on more hosts (or GPU groups) with the same --storage and --resume.")


def share_setup(t: Team, make: Any) -> tuple[Any, Any]:
    """Run ``make()`` (returning ``(shared, own)``) on rank 0 and hand ``shared`` to every rank (``own`` stays on
    rank 0: storages, paths; the others get ``None``). An error it raises is raised on every rank (the same
    class when it is one of kdgraph's, so every rank exits with code 2)."""
    if t.world_size == 1:
        return make()
    msg, err, own = None, None, None
    if t.leads:
        try:
            shared, own = make()
            msg = ("ok", shared)
        except KDGraphError as e:
            msg, err = ("error", type(e), str(e)), e
        except BaseException as e:
            msg, err = ("error", None, f"{type(e).__name__}: {e}"), e
    msg = t.broadcast(msg)
    if msg[0] == "ok":
        return msg[1], own
    if err is not None:
        raise err
    cls = msg[1] if isinstance(msg[1], type) and issubclass(msg[1], KDGraphError) else KDGraphError
    raise cls(f"{msg[2]} (on rank 0)")
