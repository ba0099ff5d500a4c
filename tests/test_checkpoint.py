"""The Checkpoint dataclass on real files (round trip, hash check, files of the old dict format), the one
state_dict helper, and the core's side of ``cache:NAME`` (no runtime import, a clear error when missing)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdgraph
from kdgraph.errors import CheckpointError, ModelError
from kdgraph.train.checkpoint import HASH_KEY, Checkpoint, atomic_save, load_checkpoint
from kdgraph.models.weights import state_dict_of

ROOT = Path(__file__).resolve().parents[1]

SPEC = {
    "name": "ck", "input": {"channels": 1, "size": [16, 16], "num_classes": 10},
    "teacher": {"model": "kdgraph.zoo:tiny_cnn", "kwargs": {"width": 8}},
    "student": {"model": "kdgraph.zoo:tiny_cnn", "kwargs": {"width": 4}},
    "stages": [{"name": "warm", "epochs": 1, "batch_size": 4, "optimizer": {"lr": 0.1}, "losses": [{"type": "cross_entropy"}]},
               {"name": "main", "epochs": 3, "batch_size": 4, "optimizer": {"lr": 0.1},
                "losses": [{"name": "kd", "type": "kd", "args": {"temperature": 4.0}}]}],
    "data": {"dataset": "synthetic"},
}


def trained_state() -> tuple[kdgraph.Distiller, torch.optim.Optimizer]:
    """A distiller after one real SGD step (momentum buffers in the optimizer's state)."""
    d = kdgraph.compile(SPEC, stage="main")
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.1, momentum=0.9)
    out = d(torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,)))
    out.loss.backward()
    opt.step()
    return d, opt


def old_format_dict(d: kdgraph.Distiller, opt: torch.optim.Optimizer) -> dict:
    """A checkpoint exactly as kdgraph wrote it before the Checkpoint dataclass (the loop built this dict)."""
    return {
        "kdgraph_checkpoint": 1, "spec_name": "ck", "spec": kdgraph.load_spec(SPEC).model_dump(mode="json"),
        "stage_names": ["warm", "main"], "distiller": d.state_dict(),
        "student": {k: v.detach().clone() for k, v in d.student.state_dict().items()},
        "optimizer": opt.state_dict(), "scheduler": None, "scaler": None, "rng": [{"torch": torch.get_rng_state()}],
        "stage": "main", "stage_index": 1, "epoch": 1, "step": 3, "epoch_done": False, "stage_done": False,
        "global_step": 7, "world_size": 1, "samples_done": 12, "best_top1": 41.5,
        "last_eval": {"top1": 41.5, "top5": 90.0}, "history": [{"stage": "main", "epoch": 0, "top1": 41.5}],
        "teacher_eval": None, "stage_results": {"warm": {"name": "warm", "best_top1": 30.0}},
    }


def test_round_trip_through_a_real_file(tmp_path):
    d, opt = trained_state()
    ck = Checkpoint.from_dict(old_format_dict(d, opt))
    path = tmp_path / "last.pt"
    ck.save(path)
    raw = torch.load(path, weights_only=True)
    assert len(raw[HASH_KEY]) == 64 and raw["kdgraph_checkpoint"] == 1  # the on-disk format is unchanged
    back = Checkpoint.load(path)
    assert (back.stage, back.stage_index, back.epoch, back.step, back.global_step) == ("main", 1, 1, 3, 7)
    assert back.history == ck.history and back.stage_results == ck.stage_results and back.best_top1 == 41.5
    assert set(back.distiller) == set(d.state_dict())
    for k, v in d.state_dict().items():
        assert torch.equal(back.distiller[k], v), k
    momentum = [s["momentum_buffer"] for s in back.optimizer["state"].values()]
    assert momentum and all(m.abs().sum() > 0 for m in momentum)
    assert back.describe() == "stage main, epoch 2, step 3" and back.resume_point() == (1, 3)
    assert back.is_done(0) and not back.is_done(1) and back.rng_of(0, 1) is not None and back.rng_of(0, 2) is None
    fresh = kdgraph.compile(SPEC, stage="main")
    fresh.load_state_dict(back.distiller, strict=True)  # what resume does
    fresh.student.load_state_dict(back.weights("student"), strict=True)
    fresh.teacher.load_state_dict(back.weights("teacher"), strict=True)


def test_a_tampered_file_is_refused_naming_it(tmp_path):
    d, opt = trained_state()
    path = tmp_path / "last.pt"
    Checkpoint.from_dict(old_format_dict(d, opt)).save(path)
    raw = torch.load(path, weights_only=True)
    raw["student"]["fc.weight"][0, 0] += 1.0  # changed bytes, the stored hash left as it was
    torch.save(raw, tmp_path / "tampered.pt")
    with pytest.raises(CheckpointError, match="is corrupt") as e:
        Checkpoint.load(tmp_path / "tampered.pt")
    assert str(tmp_path / "tampered.pt") in str(e.value) and "\n" not in str(e.value)
    raw["epoch"] = 2  # a non-tensor entry counts as well
    raw["student"]["fc.weight"][0, 0] -= 1.0
    torch.save(raw, tmp_path / "tampered2.pt")
    with pytest.raises(CheckpointError, match="is corrupt"):
        Checkpoint.load(tmp_path / "tampered2.pt")


def test_old_dict_format_files_still_load(tmp_path):
    d, opt = trained_state()
    old = old_format_dict(d, opt)
    torch.save(old, tmp_path / "unhashed.pt")  # written before the hash check existed
    atomic_save(old, tmp_path / "hashed.pt")  # written by the dict-based trainer (hash inside)
    for name in ("unhashed.pt", "hashed.pt"):
        ck = Checkpoint.load(tmp_path / name)
        assert ck.spec_name == "ck" and ck.samples_done == 12 and ck.last_eval == {"top1": 41.5, "top5": 90.0}
        assert torch.equal(ck.student["fc.weight"], d.student.fc.weight)
        as_dict = load_checkpoint(tmp_path / name)  # the public dict view keeps the old keys (+ ema, None here)
        assert set(as_dict) == set(old) | {"ema"} and as_dict["ema"] is None and as_dict["global_step"] == 7
    no_student = {k: v for k, v in old.items() if k not in ("student", "teacher_eval", "stage_results")}
    torch.save(no_student, tmp_path / "older.pt")  # fewer keys: the student comes from the distiller's state
    ck = Checkpoint.load(tmp_path / "older.pt")
    assert torch.equal(ck.student["fc.weight"], d.student.fc.weight) and ck.stage_results == {}


def test_what_is_not_a_checkpoint_is_refused(tmp_path):
    d, opt = trained_state()
    torch.save(d.student.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a kdgraph checkpoint"):
        Checkpoint.load(tmp_path / "plain.pt")
    torch.save(dict(old_format_dict(d, opt), kdgraph_checkpoint=2), tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match="newer kdgraph"):
        Checkpoint.load(tmp_path / "newer.pt")
    partial = {k: v for k, v in old_format_dict(d, opt).items() if k != "distiller"}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="incomplete.*missing distiller"):
        Checkpoint.load(tmp_path / "partial.pt")


def test_state_dict_of_unwraps_compile_prefixes_and_the_distiller():
    d, _ = trained_state()
    compiled = torch.compile(d.student)  # an OptimizedModule, not compiled until called
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    sd = state_dict_of(compiled)
    assert set(sd) == set(d.student.state_dict()) and all(not v.requires_grad for v in sd.values())
    assert all(torch.equal(sd[k], v) for k, v in d.student.state_dict().items())
    assert set(state_dict_of(d, "teacher")) == set(d.teacher.state_dict())
    assert set(state_dict_of(d, "student")) == set(d.student.state_dict())
    ddp_file = {f"module.{k}": v for k, v in d.student.state_dict().items()}  # saved from a DDP-wrapped module
    assert set(state_dict_of({"state_dict": ddp_file})) == set(d.student.state_dict())
    with pytest.raises(CheckpointError, match="holds no state_dict"):
        state_dict_of({"epoch": 3}, what="x.pt")


def test_core_never_imports_the_runtime_and_a_missing_cache_entry_says_how_to_make_it(tmp_path):
    code = (
        "import sys, kdgraph, kdgraph.distiller, kdgraph.models.weights, kdgraph.models\n"
        "from kdgraph.errors import ModelError\n"
        f"spec = {dict(SPEC, teacher=dict(SPEC['teacher'], weights='cache:ck_teacher', pretrain={'epochs': 1, 'optimizer': {'lr': 0.1}}))!r}\n"
        "d = kdgraph.compile(spec)\n"
        "try:\n    d.load_weights()\nexcept ModelError as e:\n    print('ERROR', e)\n"
        "print('RUNTIME', sorted(m for m in sys.modules if m.startswith(('kdgraph.train', 'kdgraph.bench', "
        "'kdgraph.viz', 'kdgraph.cli'))))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), KDGRAPH_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "RUNTIME []" in r.stdout
    error = r.stdout.split("ERROR ", 1)[1].split("\nRUNTIME")[0]
    assert "'cache:ck_teacher' has not been trained yet" in error and "kdgraph train SPEC" in error
    assert str(tmp_path / "cache") in error and "\n" not in error


def test_a_plain_cache_entry_loads_verified_through_the_core(tmp_path, monkeypatch):
    monkeypatch.setenv("KDGRAPH_CACHE", str(tmp_path))
    teacher = kdgraph.models.zoo.tiny_cnn(width=8)
    atomic_save(teacher.state_dict(), tmp_path / "my_teacher.pt")  # hash in my_teacher.pt.sha256
    spec = dict(SPEC, teacher=dict(SPEC["teacher"], weights="cache:my_teacher"))
    d = kdgraph.compile(spec)
    assert d.load_weights() == {"teacher": True, "student": False}
    assert torch.equal(d.teacher.fc.weight, teacher.fc.weight)
    sd = teacher.state_dict()
    sd["fc.weight"] = sd["fc.weight"] + 1
    torch.save(sd, tmp_path / "my_teacher.pt")  # changed behind kdgraph's back; the sidecar still holds the old hash
    with pytest.raises(CheckpointError, match="is corrupt"):
        kdgraph.compile(spec).load_weights()
    with pytest.raises(ModelError, match="is not in kdgraph's cache"):
        kdgraph.compile(dict(SPEC, teacher=dict(SPEC["teacher"], weights="cache:absent"))).load_weights()
