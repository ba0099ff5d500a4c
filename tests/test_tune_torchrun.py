"""``torchrun --nproc_per_node=2 -m kdgraph tune``: every trial trained by both gloo processes (DDP), rank 0 alone
talking to the journal study and deciding pruning for both; a failure marks the trial failed once; ``--workers``
with torchrun refused.

One torchrun tune (3 enqueued trials of the tiny Fashion-MNIST spec of test_tune.py, ``--trials 2``: lr 0.05
learns; lr 1e30 fails with NaN on both ranks and does not count; lr 1e-7 cannot learn and is pruned after its first
epoch) and one torchrun ``kdgraph train`` of the best trial's overrides, whose validation score must equal the
trial's to the last digit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from test_tune import _files, _study  # noqa: E402

from kdgraph.bench.tuned import open_storage  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kdgraph",
           *args]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_tune_trains_each_trial_on_both_ranks_fails_once_and_prunes_on_rank_0(tmp_path: Path) -> None:
    spec, space = _files(tmp_path, epochs=3, n=128, lr="{type: categorical, choices: [0.05, 1.0e-07, 1.0e+30]}")
    out = tmp_path / "out"
    out.mkdir()
    st = open_storage(str(out / "study.journal"), create=True)
    study = optuna.create_study(study_name="tiny_fm", storage=st, direction="maximize")
    study.enqueue_trial({"stages.main.optimizer.lr": 0.05, "stages.main.losses.kd.args.temperature": 4.0})
    study.enqueue_trial({"stages.main.optimizer.lr": 1e30, "stages.main.losses.kd.args.temperature": 4.0})  # NaN
    study.enqueue_trial({"stages.main.optimizer.lr": 1e-7, "stages.main.losses.kd.args.temperature": 4.0})
    r = _torchrun(tmp_path, "tune", "spec.yaml", "--space", "space.yaml", "--trials", "2", "--out", "out",
                  "--resume", "--device", "cpu")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("kdgraph tune tiny_fm") == 1 and "each trained by 2 processes" in r.stdout  # rank 0 speaks

    trials = _study(out).trials
    assert [t.number for t in trials] == [0, 1, 2]  # no trial counted twice, none lost
    t0, t1, t2 = trials
    assert t0.state.name == "COMPLETE" and len(t0.intermediate_values) == 3
    # lr 1e30: NaN on both ranks, one FAIL told once with the error once; it does not count, trial 2 replaces it
    assert t1.state.name == "FAIL" and t1.user_attrs["error"].count("non-finite loss") == 1
    assert "trial 1: fail" in r.stdout and "[ce = nan, kd = nan]" in r.stdout
    # pruned on rank 0 after epoch 1; rank 1 stopped too (ranks that end differently make the trial FAIL)
    assert t2.state.name == "PRUNED" and len(t2.intermediate_values) < 3, t2.user_attrs.get("error")
    assert all(t.user_attrs["world_size"] == 2 and t.user_attrs["pid"] for t in trials)
    evals = [json.loads(x) for x in (out / "trials/0002/metrics.jsonl").read_text().splitlines()]
    assert sum(e.get("event") == "eval" for e in evals) == len(t2.intermediate_values)
    assert not (out / "trials/0002/results.json").exists()
    done = json.loads((out / "trials/0000/results.json").read_text())
    assert done["world_size"] == 2 and done["student"]["top1"] == t0.value
    assert [json.loads((out / f"trials/{n:04d}/tune.json").read_text())["number"] for n in (0, 1, 2)] == [0, 1, 2]

    # the best --set list, trained by 2 processes with kdgraph train, gives the trial's validation score again
    best = json.loads((out / "best.json").read_text())["best"]
    assert best["number"] == 0
    sets = [a for s in best["validation_set"] + best["set"] for a in ("--set", s)]
    r = _torchrun(tmp_path, "train", "spec.yaml", "--out", "again", "--device", "cpu", "--no-progress", *sets)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    again = json.loads((tmp_path / "again/results.json").read_text())
    assert again["world_size"] == 2 and again["student"]["top1"] == best["value"] == t0.value


def test_workers_with_torchrun_refused_exit_2(tmp_path: Path, monkeypatch) -> None:
    from kdgraph.cli import main

    spec, space = _files(tmp_path)
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():  # what torchrun sets
        monkeypatch.setenv(k, v)
    r = CliRunner().invoke(main, ["tune", str(spec), "--space", str(space), "--trials", "2", "--workers", "2",
                                  "--out", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    assert "--workers 2 cannot be combined with torchrun" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 6 and not (tmp_path / "o").exists()


def test_one_rank_failing_fails_the_trial_naming_it() -> None:
    from kdgraph.tune.trial import _merge

    ok = {"state": "COMPLETE", "value": 50.0, "error": None, "train_s": 1.0, "rank": 0}
    bad = {"state": "FAIL", "value": None, "error": "DataError: unreadable", "train_s": 0.5, "rank": 1}
    m = _merge([ok, bad])
    assert (m["state"], m["value"], m["error"], m["train_s"]) == ("FAIL", None, "rank 1: DataError: unreadable", 1.0)
    both = _merge([dict(bad, rank=0), bad])
    assert both["state"] == "FAIL" and both["error"] == "DataError: unreadable"  # told once, not per rank
    assert _merge([ok, dict(ok, rank=1, state="PRUNED")])["state"] == "FAIL"
    assert _merge([ok, dict(ok, rank=1, value=49.0)]) == ok  # rank 0's score (every rank evaluates the same)
