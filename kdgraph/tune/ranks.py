"""``torchrun --nproc_per_node=N -m kdgraph tune ...``: one tuning host whose trials are each trained by all N
processes (kdgraph's normal DDP path), with rank 0 alone talking to Optuna.

* **One process group** for the whole command (:func:`team`): joined once before the first trial and left after
  the last, as ``kdgraph bench`` does (gloo cannot join a group again that each trial would create and destroy).
* **Rank 0 leads** (:meth:`Team.lead`): it opens the storage and study, claims each trial, draws its overrides,
  reports every per-epoch score, decides pruning, tells the study how the trial ended and writes the output
  folder. The other ranks never open the storage.
* **The others follow** (:func:`kdgraph.tune.workers.follow`): rank 0 broadcasts (``torch.distributed`` object
  broadcasts over the run's group) the tune's setup (or its error, raised on every rank alike), then each trial's
  number and overrides, then after every per-epoch evaluation whether the trial goes on, is pruned or failed on
  rank 0; ``None`` when the study has its trials.
* **A failure on any rank** marks the trial failed once: after every trial each rank's outcome is gathered on
  rank 0, which tells the study one FAIL naming the rank and its error.

A failure on one rank alone *inside* a training collective (say, out of memory on one GPU mid-step) cannot be
gathered: the other ranks wait in that collective, and torchrun stops the job as it does for ``kdgraph train``.
The trial then stays RUNNING with rank 0's process gone, and ``--resume`` marks it failed, once
(:func:`kdgraph.tune.study.fail_dead_trials`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import KDGraphError, SpecError

__all__ = ["Team", "team", "under_torchrun", "refuse_workers", "share_setup", "SOLO"]


def under_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (``WORLD_SIZE > 1``)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


@dataclass
class Team:
    """The processes that train each trial together; a world of one (:data:`SOLO`) broadcasts to itself."""

    rank: int = 0
    world_size: int = 1

    @property
    def leads(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.leads else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


SOLO = Team()


class team:
    """``with team(device) as t``: the command's process group under torchrun (joined through
    :func:`kdgraph.train.distributed.setup`, as ``kdgraph bench`` joins it), :data:`SOLO` otherwise."""

    def __init__(self, device: Optional[str]) -> None:
        self.device, self.env = device, None

    def __enter__(self) -> Team:
        if not under_torchrun():
            return SOLO
        from ..train.distributed import setup

        self.env = setup(self.device, group=True)
        return Team(self.env.rank, self.env.world_size)

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
