"""kdgraph tune against a real PostgreSQL server: two processes (as two hosts would) share one study.

The server is a throw-away cluster (Debian's ``postgresql`` package, which ``.ci/run`` installs): ``initdb`` in a
temporary folder, ``pg_ctl start`` listening on a Unix socket only, trust authentication, stopped and deleted at
the end of the session. PostgreSQL refuses to run as root, so as root the cluster runs as the ``postgres`` user.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest

from kdgraph.bench.tuned import open_storage, spec_fingerprint
from kdgraph.spec import load_spec
from kdgraph.tune import fixed_overrides
from kdgraph.tune.space import load_space
from kdgraph.tune.study import TuneError, open_study

from test_tune import _files


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        pytest.fail(f"{name} not found: install Debian's postgresql package (.ci/run does)")
    return found


@pytest.fixture(scope="session")
def postgres_url():
    t0 = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="kdgraph-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server will not run as root
        import pwd

        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, sock, port = root / "data", root, "5439"

    def run(*cmd: str) -> None:
        r = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{' '.join(cmd)}: {r.stdout}\n{r.stderr}"

    run(_pg_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
    run(_pg_bin("pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-o",
        f"-k {sock} -p {port} -c listen_addresses='' -F", "start")
    try:
        run(_pg_bin("createdb"), "-h", str(sock), "-p", port, "-U", "postgres", "kdtune")
        print(f"\nPostgreSQL cluster ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        yield f"postgresql://postgres@/kdtune?host={sock}&port={port}"
    finally:
        subprocess.run([*as_user, _pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def test_two_processes_share_one_postgres_study(postgres_url: str, tmp_path: Path) -> None:
    spec, space = _files(tmp_path, epochs=2, n=256)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "kdgraph", "tune", str(spec), "--space", str(space), "--trials",
                               "4", "--storage", postgres_url, "--study", "shared", "--resume", "--out", f"host{i}"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    study = optuna.load_study(study_name="shared", storage=open_storage(postgres_url))
    trials = [t for t in study.trials if not t.user_attrs.get("kdgraph_surplus")]
    assert len(trials) == 4 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert len({t.number for t in trials}) == 4
    # each trial trained exactly once, by the process that claimed it, in that process's folder
    for t in trials:
        here = [h for h in ("host0", "host1") if (tmp_path / h / "trials" / f"{t.number:04d}" / "tune.json").exists()]
        assert len(here) == 1, (t.number, here)
        assert json.loads((tmp_path / here[0] / "trials" / f"{t.number:04d}" / "tune.json").read_text())["number"] \
            == t.number
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # both processes trained trials
    # both folders report the whole study (the table reads the shared storage)
    for h in ("host0", "host1"):
        assert len(json.loads((tmp_path / h / "best.json").read_text())["trials"]) == len(trials)


def test_a_mismatched_study_in_postgres_is_refused(postgres_url: str, tmp_path: Path) -> None:
    spec, space = _files(tmp_path, epochs=1, n=64)
    other = tmp_path / "other.yaml"
    other.write_text(Path(spec).read_text().replace("lr: 0.05", "lr: 0.02"))
    st = open_storage(postgres_url)
    sp, _ = load_space(space)
    base = load_spec(spec)
    open_study(st, "mismatch", spec_fingerprint(base), sp, fixed_overrides(base, sp), False, "pg")
    changed = load_spec(other)
    with pytest.raises(TuneError, match="the spec differs"):
        open_study(st, "mismatch", spec_fingerprint(changed), sp, fixed_overrides(changed, sp), True, "pg")
