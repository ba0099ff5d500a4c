"""A suite entry's ``tuned: {study:, storage:}``: the overrides of the best trial of a ``kdgraph tune`` study.

    entries:
      - {label: L2-tuned, spec: ../../specs/fashion_mnist/l2.yaml,
         tuned: {study: l2, storage: ../../runs/tune_l2/study.journal}}

``storage`` is an RDB URL (``postgresql://...``, ``sqlite:///...``) or the path of a study's journal file
(relative to the suite file). The study records the fingerprint of the spec it was tuned on
(:func:`spec_fingerprint`); an entry whose spec differs is an error, not a silent mix. The entry is then
trained with the best trial's overrides (then the entry's own ``set:``) on the spec's own data: the full
training split and the evaluation split, not the held-out validation images the trials were scored on.
This module reads studies only (Optuna, the ``kdgraph[tune]`` extra); ``kdgraph.tune`` writes them.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import KDGraphError, SpecError
from ..spec import Spec

__all__ = ["spec_fingerprint", "is_rdb_url", "open_storage", "best_overrides", "SPEC_ATTR", "SET_ATTR"]

SPEC_ATTR = "kdgraph_spec_fingerprint"  # study user attribute: the tuned spec's fingerprint
SET_ATTR = "set"  # trial user attribute: the trial's sampled --set overrides


def spec_fingerprint(spec: Spec) -> str:
    """16 hex digits of the spec as data (``data.root`` left out: the same spec on another host's folder)."""
    data = spec.model_dump(mode="json")
    data.get("data", {}).pop("root", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def is_rdb_url(storage: str) -> bool:
    return "://" in storage


def _need_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise KDGraphError("kdgraph tune and tuned suite entries need Optuna: pip install 'kdgraph[tune]' "
                           "(and 'kdgraph[tune-postgres]', psycopg, for a postgresql:// storage)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def open_storage(storage: str, *, create: bool = False, heartbeat: bool = False) -> Any:
    """An Optuna storage: an RDB URL (connected and checked now) or a journal file (``create``: may be new).

    Any failure is one KDGraphError paragraph; nothing is written to a storage that cannot be opened."""
    optuna = _need_optuna()
    if is_rdb_url(storage):
        scheme, _, rest = storage.partition("://")
        shown = f"{scheme}://...@{rest.split('@', 1)[1]}" if "@" in rest else storage  # no password in messages
        kwargs: dict[str, Any] = {}
        if storage.startswith("postgresql"):
            kwargs["engine_kwargs"] = {"connect_args": {"connect_timeout": 5}, "pool_pre_ping": True}
        if heartbeat:
            kwargs.update(heartbeat_interval=30, grace_period=120)
        try:
            return _rdb_storage(optuna, storage, kwargs)
        except ImportError as e:
            raise KDGraphError(f"--storage {shown}: its database driver is not installed ({e}); for PostgreSQL: "
                               f"pip install 'kdgraph[tune-postgres]' (psycopg 3; a postgresql+psycopg2:// URL uses psycopg2)") from None
        except Exception as e:  # noqa: BLE001 - sqlalchemy's errors: unreachable host, bad password, no database
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise KDGraphError(f"--storage {shown}: cannot open this database ({type(e).__name__}: {first}). Check "
                               f"that the server runs and accepts connections at that address, the user, password "
                               f"and database name; nothing was written.") from None
    path = Path(storage).expanduser()
    if not create and not path.is_file():
        raise KDGraphError(f"study storage {str(path)!r}: no such journal file (a kdgraph tune folder holds "
                           f"study.journal; an RDB storage is a URL such as postgresql://user@host/db)")
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    try:
        return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    except Exception as e:  # noqa: BLE001 - an unreadable or corrupt journal
        raise KDGraphError(f"study storage {str(path)!r}: cannot read it as an Optuna journal ({e})") from None


def _rdb_storage(optuna: Any, url: str, kwargs: dict) -> Any:
    """RDBStorage, retried when another process creates the same tables at the same moment (the first start of
    a study on many hosts): the loser's CREATE fails with a duplicate; a moment later the tables are there."""
    import time

    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except Exception as e:  # noqa: BLE001 - sqlalchemy.exc.IntegrityError / ProgrammingError on a race
            if type(e).__name__ not in ("IntegrityError", "ProgrammingError") or attempt == 4:
                raise
            time.sleep(0.5 + attempt)
    raise AssertionError("unreachable")


def best_overrides(study_name: str, storage: str, spec: Spec, where: str) -> list[str]:
    """The ``--set`` list of the best finished trial of ``study_name``, after checking it tuned ``spec``."""
    optuna = _need_optuna()
    st = open_storage(storage)
    names = [s.study_name for s in st.get_all_studies()]
    if study_name not in names:
        raise SpecError(f"{where}: tuned.study {study_name!r} is not in {storage}.{did(study_name, names)}")
    study = optuna.load_study(study_name=study_name, storage=st)
    fp = study.user_attrs.get(SPEC_ATTR)
    if fp != spec_fingerprint(spec):
        raise SpecError(f"{where}: study {study_name!r} was tuned on another spec (fingerprint {fp}, this entry's "
                        f"spec {spec_fingerprint(spec)}); tune this spec again or point the entry at its study")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise SpecError(f"{where}: study {study_name!r} has no finished trial yet")
    best = max(done, key=lambda t: (t.value, -t.number))
    return list(best.user_attrs.get(SET_ATTR, []))


def did(name: str, names: list[str]) -> str:
    from ..errors import did_you_mean

    return did_you_mean(name, names) + (f" Studies there: {', '.join(names)}." if names else " It holds no study.")
