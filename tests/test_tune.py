"""kdgraph tune: the space's checks, the held-out validation split, pruning, reproducing the best trial, resume
after kill -9, workers sharing one study (embedded journal; PostgreSQL in test_tune_postgres.py), bench's
tuned entries, and the command's errors (exit 2, nothing written)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch

from kdgraph.bench.suite import load_suite
from kdgraph.bench.tuned import open_storage, spec_fingerprint
from kdgraph.errors import KDGraphError, SpecError
from kdgraph.spec import load_spec
from kdgraph.train.data import build_datasets
from kdgraph.train.data.holdout import holdout_indices
from kdgraph.train.loop import TrainOptions, train
from kdgraph.tune import fixed_overrides, tune
from kdgraph.tune.space import check_space, load_space

# Fashion-MNIST (Debian's dataset-fashion-mnist) at 12x12 on a tiny CNN: real data a trial learns in a second
SPEC = """
name: tiny_fm
input: {{channels: 1, size: [12, 12], num_classes: 10}}
teacher: {{model: "kdgraph.zoo:tiny_cnn", kwargs: {{in_channels: 1, num_classes: 10, width: 4}}}}
student: {{model: "kdgraph.zoo:tiny_cnn", kwargs: {{in_channels: 1, num_classes: 10, width: 4}}}}
stages:
  - name: main
    epochs: {epochs}
    batch_size: 32
    optimizer: {{type: sgd, lr: 0.05, momentum: 0.9}}
    losses:
      - {{name: ce, type: cross_entropy}}
      - {{name: kd, type: kd, weight: 0.5, inputs: {{student: 'student:@output', teacher: 'teacher:@output'}}}}
data: {{dataset: fashion_mnist, workers: 0, train_subset: {n}, val_subset: 64}}
runtime: {{eval_every: 100}}
"""
SPACE = """
validation: {{count: 96, seed: 3}}
sampler: {{type: random, seed: 0}}
pruner: {{type: median, startup_trials: 1}}
params:
  stages.main.optimizer.lr: {lr}
  stages.main.losses.kd.args.temperature: {{type: float, low: 1, high: 6}}
"""
LR_CHOICES = "{type: categorical, choices: [0.05, 1.0e-07]}"
LR_RANGE = "{type: float, low: 0.01, high: 0.1, log: true}"


def _files(tmp: Path, epochs: int = 2, n: int = 256, lr: str = LR_RANGE) -> tuple[Path, Path]:
    (tmp / "spec.yaml").write_text(SPEC.format(epochs=epochs, n=n))
    (tmp / "space.yaml").write_text(SPACE.format(lr=lr))
    return tmp / "spec.yaml", tmp / "space.yaml"


def _cli(*args, cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "kdgraph", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=env, **kw)


def _study(out: Path, name: str = "tiny_fm"):
    return optuna.load_study(study_name=name, storage=open_storage(str(out / "study.journal")))


# ---------------------------------------------------------------------------------------------- the space


@pytest.mark.parametrize("param, message", [
    ("stages.main.optimizer.lrr: {type: float, low: 0.1, high: 1}", "no 'lrr' here. Did you mean: lr"),
    ("stages.mian.epochs: {type: int, low: 1, high: 3}", "no item named 'mian'"),
    ("stages.main.losses.kd.args.temprature: {type: float, low: 1, high: 4}", "takes no argument 'temprature'"),
    ("stages.main.optimizer.lr: {type: float, low: 0.5, high: 0.1}", "the range is empty"),
    ("stages.main.optimizer.lr: {type: float, low: 0, high: 0.1, log: true}", "a log range must lie above 0"),
    ("stages.main.epochs: {type: int, low: 0, high: 3}", "refused by the spec"),
    ("stages.main.optimizer.type: {type: categorical, choices: []}", "non-empty list of choices"),
    ("stages.main.losses.kd.weight: {type: float, low: 0.1, high: 1, also: [stages.main.losses.ce.weigth]}",
     "(also: 'stages.main.losses.ce.weigth')"),
    ("stages.main.losses.kd.weight: {type: float, low: 0.1, high: 1, also: [stages.main.losses.kd.weight]}",
     "is searched twice"),
])
def test_space_errors_name_the_parameter(tmp_path: Path, param: str, message: str) -> None:
    spec, _ = _files(tmp_path)
    (tmp_path / "bad.yaml").write_text(f"params:\n  {param}\n")
    with pytest.raises(SpecError, match="bad.yaml") as e:
        space, origin = load_space(tmp_path / "bad.yaml")
        check_space(space, load_spec(spec), origin)
    assert message in str(e.value)


def test_cli_bad_input_exit_2_and_nothing_written(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from kdgraph.cli import main

    spec, space = _files(tmp_path)
    (tmp_path / "bad.yaml").write_text("params:\n  stages.main.optimizer.lr: {type: float, low: 1, high: 1}\n")
    r = CliRunner().invoke(main, ["tune", str(spec), "--space", str(tmp_path / "bad.yaml"), "--trials", "2",
                                  "--out", str(tmp_path / "o1")])
    assert r.exit_code == 2 and "the range is empty" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o1").exists()
    # a PostgreSQL server that is not there: one paragraph, exit 2, no folder, no study; no password shown
    r = CliRunner().invoke(main, ["tune", str(spec), "--space", str(space), "--trials", "2", "--out",
                                  str(tmp_path / "o2"), "--storage", "postgresql://kd:secret@127.0.0.1:9/nowhere"])
    assert r.exit_code == 2, r.output
    assert "cannot open this database" in r.stderr and "Traceback" not in r.stderr and "secret" not in r.stderr
    assert not (tmp_path / "o2").exists()


# ---------------------------------------------------------------------------------------------- validation split


def test_holdout_is_disjoint_from_training_images_and_evaluation_split(tmp_path: Path) -> None:
    spec_path, _ = _files(tmp_path)
    base = load_spec(spec_path)
    spec = load_spec(spec_path, overrides=["data.holdout={count: 96, seed: 3}", "data.val_subset=null"])
    b = build_datasets(spec)
    keep, held = holdout_indices(len(b.train_full), 96, None, 3)
    assert len(held) == 96 and not set(keep) & set(held) and len(keep) + len(held) == len(b.train_full)
    full = b.train_full.images
    # the held-out split is exactly those training images, read without augmentation
    assert torch.equal(b.val.images, full[held]) and not b.val.augment
    # the student learns from the first train_subset images of the rest: none of them held out
    assert torch.equal(b.train.images, full[keep[:256]]) and b.train.augment
    train_rows = {bytes(x.numpy()) for x in b.train.images}
    assert not train_rows & {bytes(x.numpy()) for x in b.val.images}
    # ... and the evaluation split (the test images the tables report) is another split altogether
    evaluation = build_datasets(base).val
    assert len(b.val) == 96 and not torch.equal(evaluation.images[:96], b.val.images)
    # a different seed holds out different images; the same seed the same ones
    assert holdout_indices(1000, None, 0.1, 3) == holdout_indices(1000, None, 0.1, 3)
    assert holdout_indices(1000, None, 0.1, 4)[1] != holdout_indices(1000, None, 0.1, 3)[1]


# ---------------------------------------------------------------------------------------------- pruning, best, bench


@pytest.fixture(scope="module")
def pruned_tune(tmp_path_factory) -> tuple[Path, Path, Path, dict]:
    """Two enqueued trials: lr 0.05 (learns) then lr 1e-7 (cannot): the second is pruned after epoch 1."""
    tmp = tmp_path_factory.mktemp("prune")
    spec, space = _files(tmp, epochs=3, lr=LR_CHOICES)
    out = tmp / "out"
    out.mkdir()
    st = open_storage(str(out / "study.journal"), create=True)
    study = optuna.create_study(study_name="tiny_fm", storage=st, direction="maximize")
    study.enqueue_trial({"stages.main.optimizer.lr": 0.05, "stages.main.losses.kd.args.temperature": 4.0})
    study.enqueue_trial({"stages.main.optimizer.lr": 1e-7, "stages.main.losses.kd.args.temperature": 4.0})
    res = tune(spec, space, trials=2, out=out, resume=True, device="cpu", sets=("stages.main.batch_size=16",))
    return spec, space, out, res


def test_pruning_stops_a_trial_worse_than_the_median(pruned_tune) -> None:
    _, _, out, res = pruned_tune
    t0, t1 = _study(out).trials
    assert t0.state.name == "COMPLETE" and len(t0.intermediate_values) == 3
    assert t1.state.name == "PRUNED" and len(t1.intermediate_values) < 3  # stopped before its last epoch
    last = max(t1.intermediate_values)
    assert t1.intermediate_values[last] < t0.intermediate_values[last]  # below the (one-trial) median there
    evals = [json.loads(x) for x in (out / "trials/0001/metrics.jsonl").read_text().splitlines()]
    assert sum(1 for e in evals if e.get("event") == "eval") == last + 1  # its training really stopped
    assert not (out / "trials/0001/results.json").exists()
    assert res.best["number"] == 0 and res.best["value"] == t0.value
    # --set: every trial's, recorded with the fixed overrides, not part of the best --set list
    assert json.loads((out / "trials/0000/spec.json").read_text())["stages"][0]["batch_size"] == 16
    assert res.best["validation_set"][0] == "stages.main.batch_size=16"
    assert not any("batch_size" in s for s in res.best["set"])
    for f in ("trials.tsv", "trials.md", "best.json", "best_set.txt", "tuned_suite.yaml", "history.png",
              "slice.png", "contour.png", "intermediate.png"):
        assert (out / f).stat().st_size > 0, f
    assert (out / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "pruned" in (out / "trials.md").read_text()


def test_pruner_from_stage_reports_that_stage_on_counted_from_its_first_epoch(tmp_path: Path) -> None:
    """A warm-up stage that trains on a random teacher's logits alone (its scores mean nothing) of 2 or 1 epochs,
    then 2 epochs of CE: only the main stage's epochs reach Optuna, as steps 0 and 1 whatever the warm-up's length,
    so the second trial (lr 1e-7 in the main stage) is pruned against the first's score at the same main epoch."""
    spec, _ = _files(tmp_path, epochs=2)
    text = spec.read_text().replace("stages:\n", """stages:
  - name: warm
    epochs: 2
    batch_size: 32
    optimizer: {type: sgd, lr: 0.05, momentum: 0.9}
    losses:
      - {name: mimic, type: kd, inputs: {student: 'student:@output', teacher: 'teacher:@output'}}
""")
    spec.write_text(text)
    space = tmp_path / "space.yaml"
    space.write_text("""
validation: {count: 96, seed: 3}
sampler: {type: random, seed: 0}
pruner: {type: median, startup_trials: 1, from_stage: main}
params:
  stages.warm.epochs: {type: int, low: 1, high: 2}
  stages.main.optimizer.lr: {type: categorical, choices: [0.05, 1.0e-07]}
""")
    out = tmp_path / "out"
    out.mkdir()
    study = optuna.create_study(study_name="tiny_fm", storage=open_storage(str(out / "study.journal"), create=True),
                                direction="maximize")
    study.enqueue_trial({"stages.warm.epochs": 2, "stages.main.optimizer.lr": 0.05})
    study.enqueue_trial({"stages.warm.epochs": 1, "stages.main.optimizer.lr": 1e-7})
    tune(spec, space, trials=2, out=out, resume=True, device="cpu")
    t0, t1 = _study(out).trials
    evals = [[json.loads(x) for x in (out / f"trials/000{i}/metrics.jsonl").read_text().splitlines()] for i in (0, 1)]
    evals = [[(e["stage"], e["epoch"]) for e in ev if e.get("event") == "eval"] for ev in evals]
    assert evals[0] == [("warm", 0), ("warm", 1), ("main", 0), ("main", 1)]
    assert t0.state.name == "COMPLETE" and sorted(t0.intermediate_values) == [0, 1]
    assert evals[1] == [("warm", 0), ("main", 0)]  # pruned at the main stage's first epoch, before its last
    assert t1.state.name == "PRUNED" and list(t1.intermediate_values) == [0]
    assert t1.intermediate_values[0] < t0.intermediate_values[0]
    # a stage the spec does not have is refused with the spec's stages named
    sp, origin = load_space({"pruner": {"from_stage": "mian"},
                             "params": {"stages.main.optimizer.lr": {"type": "float", "low": 0.01, "high": 0.1}}})
    with pytest.raises(SpecError, match="pruner.from_stage: the spec has no stage 'mian'; its stages are 'warm', 'main'"):
        check_space(sp, load_spec(spec), origin)


def test_best_set_reproduces_its_validation_score(pruned_tune, tmp_path: Path) -> None:
    spec, _, out, res = pruned_tune
    best = json.loads((out / "best.json").read_text())["best"]
    again = train(load_spec(spec, overrides=best["validation_set"] + best["set"]),
                  TrainOptions(out=tmp_path / "again", device="cpu", progress=False, tensorboard=False, plot=False))
    assert again["student"]["top1"] == best["value"]


def test_bench_entry_takes_the_tuned_study_and_checks_its_spec(pruned_tune, tmp_path: Path) -> None:
    spec, _, out, res = pruned_tune
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"title: t\nseeds: 1\nbaseline: ref\nentries:\n  - {{label: ref, spec: {spec}}}\n"
                     f"  - {{label: tuned, spec: {spec}, tuned: {{study: tiny_fm, storage: {out / 'study.journal'}}}}}\n")
    loaded = load_suite(suite)
    tuned = loaded.load_entry(loaded.suite.entries[1], seed=0)
    assert tuned.stages[0].optimizer.lr == 0.05 and tuned.stages[0].losses[1].args["temperature"] == 4.0
    assert tuned.data.holdout is None  # benched on the real evaluation split, the full training split
    # the generated suite runs the same overrides
    gen = load_suite(out / "tuned_suite.yaml")
    assert gen.load_entry(gen.suite.entries[1]).stages[0].optimizer.lr == 0.05
    other = tmp_path / "other.yaml"
    other.write_text(Path(spec).read_text().replace("width: 4}}", "width: 6}}", 1))
    suite.write_text(suite.read_text().replace(f"{{label: tuned, spec: {spec}", f"{{label: tuned, spec: {other}"))
    loaded = load_suite(suite)
    with pytest.raises(SpecError, match="was tuned on another spec"):
        loaded.load_entry(loaded.suite.entries[1], seed=0)


def test_resume_checks_the_study_was_made_for_this_spec_and_space(pruned_tune, tmp_path: Path) -> None:
    spec, space, out, _ = pruned_tune
    with pytest.raises(KDGraphError, match="already exists.*--resume"):
        tune(spec, space, trials=2, out=out)
    other = tmp_path / "space.yaml"
    other.write_text(Path(space).read_text().replace("high: 6", "high: 7"))
    with pytest.raises(KDGraphError, match="made for another tune: the search space differs"):
        tune(spec, other, trials=2, out=out, resume=True)
    assert len(_study(out).trials) == 2  # nothing added
    assert _study(out).user_attrs["kdgraph_spec_fingerprint"] == spec_fingerprint(load_spec(spec))


def test_resume_reads_a_study_recorded_before_a_space_field_existed(tmp_path: Path) -> None:
    """A study made before ``pruner.from_stage`` existed recorded no value for it: it resumes under today's schema
    (the default keeps its behaviour), while a space that sets it is another tune."""
    from kdgraph.tune.study import SPACE_ATTR, open_study

    st = open_storage(str(tmp_path / "study.journal"), create=True)
    params = {"stages.main.optimizer.lr": {"type": "float", "low": 0.01, "high": 0.1}}
    space, _ = load_space({"params": params})
    study = open_study(st, "s", "fp", space, [], False, "here")
    old = space.to_json()
    del old["pruner"]["from_stage"]
    study.set_user_attr(SPACE_ATTR, json.dumps(old, sort_keys=True))
    assert open_study(st, "s", "fp", space, [], True, "here").user_attrs[SPACE_ATTR] == json.dumps(old, sort_keys=True)
    staged, _ = load_space({"pruner": {"from_stage": "main"}, "params": params})
    with pytest.raises(KDGraphError, match="the search space differs"):
        open_study(st, "s", "fp", staged, [], True, "here")


# ---------------------------------------------------------------------------------------------- kill -9, workers


def test_resume_after_kill_9_never_counts_a_trial_twice(tmp_path: Path) -> None:
    spec, space = _files(tmp_path, epochs=3, n=512)
    p = subprocess.Popen([sys.executable, "-m", "kdgraph", "tune", str(spec), "--space", str(space), "--trials", "4",
                          "--out", "out"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    trials = tmp_path / "out" / "trials"
    deadline = time.monotonic() + 300
    while not ((trials / "0001" / "tune.json").exists() and (trials / "0002" / "metrics.jsonl").exists()):
        assert p.poll() is None and time.monotonic() < deadline, "the tune ended before it could be killed"
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)  # mid-way through trial 2
    p.wait()
    before = {t.number: (t.state.name, t.value, t.datetime_complete) for t in _study(tmp_path / "out").trials}
    assert before[2][0] == "RUNNING" and before[0][0] in ("COMPLETE", "PRUNED")
    r = _cli("tune", spec, "--space", space, "--trials", "4", "--out", "out", "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    after = _study(tmp_path / "out").trials
    states = [t.state.name for t in after]
    assert states[2] == "FAIL" and after[2].user_attrs["kdgraph_failed"]  # the killed trial: failed, not counted
    assert sum(s in ("COMPLETE", "PRUNED") for s in states) == 4 and "RUNNING" not in states
    for n in (0, 1):  # finished before the kill: kept as they were, not trained again
        assert (after[n].state.name, after[n].value, after[n].datetime_complete) == before[n]
    assert len(after) == 5 and [t.number for t in after] == list(range(5))
    assert "marked failed" in r.stdout


def test_two_workers_share_one_embedded_study(tmp_path: Path) -> None:
    spec, space = _files(tmp_path, epochs=1, n=128)
    r = _cli("tune", spec, "--space", space, "--trials", "4", "--out", "out", "--workers", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    trials = [t for t in _study(tmp_path / "out").trials if not t.user_attrs.get("kdgraph_surplus")]
    assert sorted(t.number for t in trials)[:4] == [t.number for t in trials][:4]
    assert len(trials) == 4 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # both processes trained trials
    runs = [json.loads((tmp_path / "out/trials" / f"{t.number:04d}" / "tune.json").read_text()) for t in trials]
    assert [r_["number"] for r_ in runs] == [t.number for t in trials]  # each trained once, in its own folder
    assert all(r_["overhead_s"] < 1.0 for r_ in runs)


def test_fixed_overrides_validation_default(tmp_path: Path) -> None:
    spec, _ = _files(tmp_path)
    space, _ = load_space({"params": {"stages.main.optimizer.lr": {"type": "float", "low": 0.01, "high": 0.1}}})
    assert fixed_overrides(load_spec(spec), space)[0] == 'data.holdout={"fraction": 0.1, "seed": 0}'


def test_tied_paths_take_the_drawn_value(tmp_path: Path) -> None:
    """``also``: one searched dimension sets several paths (AT's two layers share a weight)."""
    from kdgraph.tune.space import Param

    p = Param(type="float", low=0.1, high=1.0, also=["stages.main.losses.ce.weight"])
    trial = optuna.trial.FixedTrial({"stages.main.losses.kd.weight": 0.25})
    value = p.suggest(trial, "stages.main.losses.kd.weight")
    assert p.paths("stages.main.losses.kd.weight") == ["stages.main.losses.kd.weight", "stages.main.losses.ce.weight"]
    spec, _ = _files(tmp_path)
    space, _ = load_space({"params": {"stages.main.losses.kd.weight": p.model_dump()}})
    check_space(space, load_spec(spec))
    from kdgraph.spec.overrides import apply_overrides
    from kdgraph.tune.space import override_for

    tuned = apply_overrides(load_spec(spec), [override_for(q, value) for q in p.paths("stages.main.losses.kd.weight")])
    assert [ls.weight for ls in tuned.stages[0].losses] == [0.25, 0.25]


def test_shipped_spaces_fit_their_specs() -> None:
    root = Path(__file__).resolve().parents[1]
    spaces = sorted((root / "benchmarks" / "tune").glob("*.yaml"))
    assert spaces
    for path in spaces:
        spec = root / "specs" / "fashion_mnist" / (path.stem.split("fashion_mnist_", 1)[1] + ".yaml")
        space, origin = load_space(path)
        check_space(space, load_spec(spec), origin)


def test_a_weight_that_scales_a_whole_adam_stage_is_refused(tmp_path: Path) -> None:
    """Scaling every loss of a stage trained with Adam(W) changes nothing Adam sees: refused; under SGD, or one
    weight among several, it is a real search."""
    spec_path, _ = _files(tmp_path)
    tied = {"type": "float", "low": 0.1, "high": 10, "log": True, "also": ["stages.main.losses.kd.weight"]}
    for optimizer, param, refused in (("adamw", tied, True), ("adam", tied, True), ("sgd", tied, False),
                                      ("adamw", {k: v for k, v in tied.items() if k != "also"}, False)):
        spec = load_spec(spec_path).model_copy(deep=True)
        spec.stages[0].optimizer.type = optimizer
        space, origin = load_space({"params": {"stages.main.losses.ce.weight": param}})
        if refused:
            with pytest.raises(SpecError, match=f"scales every loss of stage 'main' at once .*trains with {optimizer},"):
                check_space(space, spec, origin)
        else:
            check_space(space, spec, origin)


def test_a_transforms_arguments_are_checked_against_its_args(tmp_path: Path) -> None:
    spec = load_spec(Path(__file__).resolve().parents[1] / "specs" / "fashion_mnist" / "mlkd.yaml")  # mlkd_views
    for param, message in (("cutuot: {type: float, low: 0, high: 0.5}", "takes no argument 'cutuot'"),
                           ("min_scale: {type: float, low: 0.5, high: 1.5}", "less than or equal to 1")):
        (tmp_path / "bad.yaml").write_text(f"params:\n  stages.main.transform.args.{param}\n")
        space, origin = load_space(tmp_path / "bad.yaml")
        with pytest.raises(SpecError, match="stage 'main''s transform") as e:
            check_space(space, spec, origin)
        assert message in str(e.value)


def test_space_pruner_and_sampler_settings_reach_optuna() -> None:
    from kdgraph.tune.study import pruner_for, sampler_for

    sh, _ = load_space({"pruner": {"type": "successive_halving", "min_epochs": 2, "reduction_factor": 3},
                        "sampler": {"type": "random", "seed": 5},
                        "params": {"stages.main.optimizer.lr": {"type": "float", "low": 0.01, "high": 0.1}}})
    p = pruner_for(sh)
    assert isinstance(p, optuna.pruners.SuccessiveHalvingPruner)
    assert (p._min_resource, p._reduction_factor) == (2, 3)
    assert isinstance(sampler_for(sh), optuna.samplers.RandomSampler)
    # the same seed and salt draw the same values; another salt (a second worker, a resumed run) others
    draw = [sampler_for(sh, salt)._rng.rng.random() for salt in (0, 0, 1)]
    assert draw[0] == draw[1] != draw[2]
    median, _ = load_space({"params": {"stages.main.optimizer.lr": {"type": "float", "low": 0.01, "high": 0.1}}})
    assert isinstance(pruner_for(median), optuna.pruners.MedianPruner)
    assert isinstance(sampler_for(median), optuna.samplers.TPESampler)
