"""Injected faults end as clear errors with nothing half-written: rotted checkpoints, a diverging run,
two runs in one folder, a file where the run folder should be, no permission, a full disk, a broken JPEG.

Tiny models on synthetic data (real training runs, real files, real processes), seconds each.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import kdgraph
from kdgraph.errors import CheckpointError, DataError, TrainingError
from kdgraph.train import train
from kdgraph.train.checkpoint import Checkpoint, load_file
from kdgraph.train.runlock import LOCK_NAME

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from test_data import foolbox_image_folder  # noqa: E402

QUIET = {"device": "cpu", "progress": False, "plot": False, "tensorboard": False}


def tiny(name: str = "fault", stages=None, **data) -> dict:
    return {
        "name": name, "input": {"channels": 1, "size": [16, 16], "num_classes": 10},
        "teacher": {"model": "kdgraph.zoo:tiny_cnn", "kwargs": {"width": 4}},
        "student": {"model": "kdgraph.zoo:tiny_cnn", "kwargs": {"width": 4}},
        "stages": stages or [{"name": "main", "epochs": 1, "batch_size": 16, "optimizer": {"lr": 0.01},
                              "losses": [{"type": "cross_entropy"}]}],
        "data": {"dataset": "synthetic", "train_subset": 32, "val_subset": 16, "workers": 0, **data},
    }


def flip_tensor_bit(src: Path, dst: Path) -> None:
    """Copy ``src`` with one bit flipped in the middle of its largest tensor's bytes (zip headers intact)."""
    with zipfile.ZipFile(src) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(src.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    raw[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0x10
    dst.write_bytes(bytes(raw))


def _cli(args, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "kdgraph", *args], env=env, capture_output=True, text=True,
                          timeout=300, **kw)


def _invoke(args):
    from click.testing import CliRunner

    from kdgraph.cli import main

    r = CliRunner().invoke(main, args)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r


def test_bit_flipped_checkpoint_is_refused_by_resume_eval_and_export(tmp_path):
    from kdgraph.train.export import evaluate_checkpoint, export_student

    spec = tiny()
    train(spec, out=tmp_path / "run", **QUIET)
    good = tmp_path / "run" / "last.pt"
    bad = tmp_path / "flipped.pt"
    flip_tensor_bit(good, bad)
    torch.load(bad, weights_only=True)  # torch itself does not notice (no CRC check): the hash must
    before = bad.read_bytes()

    run2 = tmp_path / "run2"
    run2.mkdir()
    shutil.copy(bad, run2 / "last.pt")
    with pytest.raises(CheckpointError, match="is corrupt") as e:
        train(spec, out=run2, resume=True, **QUIET)
    assert str(run2 / "last.pt") in str(e.value)
    assert (run2 / "last.pt").read_bytes() == before and sorted(p.name for p in run2.iterdir()) == ["last.pt"]

    with pytest.raises(CheckpointError, match="is corrupt"):
        evaluate_checkpoint(kdgraph.load_spec(spec), str(bad), device="cpu")

    out = tmp_path / "student.pt"
    out.write_bytes(b"the previous export")
    with pytest.raises(CheckpointError, match=f"{bad}.*is corrupt"):
        export_student(bad, out)
    assert out.read_bytes() == b"the previous export" and bad.read_bytes() == before
    r = _invoke(["export", str(bad), "-o", str(out)])
    assert r.exit_code == 2 and "is corrupt" in r.output and "Traceback" not in r.output

    # the good checkpoint exports; a .pt export carries its hash in a sidecar, and is verified on load
    export_student(good, out)
    assert (tmp_path / "student.pt.sha256").is_file()
    assert set(load_file(out)) == set(torch.load(out, weights_only=True))
    flip_tensor_bit(out, tmp_path / "student_flipped.pt")
    shutil.copy(tmp_path / "student.pt.sha256", tmp_path / "student_flipped.pt.sha256")
    with pytest.raises(CheckpointError, match="student_flipped.pt.*is corrupt"):
        load_file(tmp_path / "student_flipped.pt")


def test_safetensors_export_loads_strictly_into_the_student(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file as st_load

    train(tiny(), out=tmp_path / "run", **QUIET)
    r = _invoke(["export", str(tmp_path / "run" / "last.pt"), "-o", str(tmp_path / "student.safetensors")])
    assert r.exit_code == 0, r.output
    student = kdgraph.models.zoo.tiny_cnn(width=4)
    student.load_state_dict(st_load(str(tmp_path / "student.safetensors")), strict=True)
    ck = Checkpoint.load(tmp_path / "run" / "last.pt")
    for k, v in student.state_dict().items():
        assert torch.equal(v, ck.student[k]), k
    with safe_open(str(tmp_path / "student.safetensors"), framework="pt") as f:
        assert len(f.metadata()["kdgraph_sha256"]) == 64
    assert set(load_file(tmp_path / "student.safetensors")) == set(student.state_dict())  # verified read


def test_nan_stop_leaves_a_finite_checkpoint_whose_next_forward_is_finite(tmp_path):
    stages = [{"name": "warm", "epochs": 1, "batch_size": 16, "optimizer": {"lr": 0.01},
               "losses": [{"type": "cross_entropy"}]},
              {"name": "boom", "epochs": 3, "batch_size": 16, "optimizer": {"lr": 1e10, "momentum": 0.9},
               "losses": [{"type": "cross_entropy"}]}]
    spec = tiny("nan", stages)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="Training stopped") as e:
        train(spec, out=out, **QUIET)
    assert f"last good checkpoint is {out / 'last.pt'} (end of stage warm)" in str(e.value)
    ck = Checkpoint.load(out / "last.pt")
    assert ck.stage == "warm" and ck.stage_done
    assert all(torch.isfinite(v).all() for v in ck.distiller.values() if v.is_floating_point())
    d = kdgraph.compile(spec, stage="boom")
    d.load_state_dict(ck.distiller, strict=True)
    d.train()
    images, targets = torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,))
    res = d(images, targets)
    assert torch.isfinite(res.loss) and torch.isfinite(res.logits).all()


LOCK_HOLDER = ("import sys, time; from pathlib import Path; from kdgraph.train.runlock import RunLock; "
               "RunLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(300)")


def test_a_second_run_into_a_locked_folder_is_refused_and_a_dead_owners_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TrainingError, match="in use by another kdgraph train") as e:
            train(tiny(), out=out, **QUIET)
        assert f"PID {holder.pid} on host {socket.gethostname()}" in str(e.value)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # the second run wrote nothing
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid  # stale: its owner is dead
    res = train(tiny(), out=out, **QUIET)
    assert res["student"] is not None and (out / "last.pt").exists() and not (out / LOCK_NAME).exists()


def test_two_real_trainings_into_one_folder(tmp_path):
    """Two `kdgraph train` processes started together into one empty folder: exactly one runs."""
    spec = tmp_path / "s.yaml"
    import yaml

    spec.write_text(yaml.safe_dump(tiny(stages=[{"name": "main", "epochs": 3, "batch_size": 16,
                                                 "optimizer": {"lr": 0.01}, "losses": [{"type": "cross_entropy"}]}],
                                        train_subset=256)))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    args = [sys.executable, "-m", "kdgraph", "train", str(spec), "--out", str(tmp_path / "run"), "--device", "cpu",
            "--no-progress"]
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[0] == 2)
    assert "in use by another kdgraph train (PID" in " ".join(loser[2].split()) and "Traceback" not in loser[2]
    assert Checkpoint.load(tmp_path / "run" / "last.pt").stage_done


def test_out_under_a_regular_file_and_without_permission_are_clear_errors(tmp_path):
    (tmp_path / "afile").write_text("x")
    spec = tmp_path / "s.yaml"
    import yaml

    spec.write_text(yaml.safe_dump(tiny()))
    for out, reason in ((tmp_path / "afile" / "run", "a file is in the way"),
                        (Path("/sys/kdgraph_fault_test_run"), "cannot create the run folder")):
        r = _invoke(["train", str(spec), "--out", str(out), "--device", "cpu", "--no-progress"])
        assert r.exit_code == 2 and reason in " ".join(r.output.split()) and "Traceback" not in r.output, r.output
        assert str(out) in r.output
    assert (tmp_path / "afile").read_text() == "x"


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # spec.json and the log fit, a checkpoint does not
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing


def test_disk_full_during_a_checkpoint_write(tmp_path):
    spec = tmp_path / "s.yaml"
    import yaml

    spec.write_text(yaml.safe_dump(tiny()))
    out = tmp_path / "run"
    r = _cli(["train", str(spec), "--out", str(out), "--device", "cpu", "--no-progress"], cwd=tmp_path,
             preexec_fn=_limit_file_size)
    text = " ".join(r.stderr.split())
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout, r.stderr
    assert f"cannot write '{out / 'last.pt'}'" in text and "File too large" in text, text
    assert not (out / "last.pt").exists() and not list(out.glob(".*.tmp"))  # nothing half-written


def test_unreadable_jpeg_is_a_clear_error_or_skipped_and_counted(tmp_path):
    k = foolbox_image_folder(tmp_path / "inet")
    bad = next((tmp_path / "inet" / "train").iterdir()) / "broken.JPEG"
    bad.write_bytes(b"this is not a JPEG")
    spec = {"name": "inet", "input": {"channels": 3, "size": [32, 32], "num_classes": k},
            "teacher": {"model": "kdgraph.zoo:tiny_cnn", "kwargs": {"in_channels": 3, "num_classes": k, "width": 4}},
            "student": {"model": "kdgraph.zoo:tiny_cnn", "kwargs": {"in_channels": 3, "num_classes": k, "width": 4}},
            "stages": [{"name": "main", "batch_size": 3, "optimizer": {"lr": 0.01},
                        "losses": [{"type": "cross_entropy"}]}],
            "data": {"dataset": "imagenet", "root": str(tmp_path / "inet"), "workers": 1}}
    with pytest.raises(DataError) as e:  # read in a DataLoader worker process
        train(spec, out=tmp_path / "run", **QUIET)
    msg = str(e.value)
    assert msg.startswith(f"{bad} is not a readable image") and "--skip-bad-images" in msg
    assert "Traceback" not in msg and "\n" not in msg
    assert not (tmp_path / "run" / "last.pt").exists()

    res = train(spec, out=tmp_path / "run2", skip_bad_images=True, **QUIET)
    assert res["skipped_images"] == 1  # 21 training files, batches of 3: each read once in the one epoch
    events = [json.loads(line) for line in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    assert [ev["total"] for ev in events if ev["event"] == "skipped_images"] == [1]


def test_a_transforms_own_error_is_not_called_an_unreadable_image(tmp_path):
    from kdgraph.train.data.image_folder import CheckedImageFolder

    foolbox_image_folder(tmp_path / "inet")

    def broken(_img):
        raise ValueError("a transform's own bug")

    ds = CheckedImageFolder(str(tmp_path / "inet" / "train"), transform=broken, skip_bad=True)
    with pytest.raises(ValueError, match="a transform's own bug"):   # raised as it is, never skipped as a bad file
        ds[0]
    image, target = CheckedImageFolder(str(tmp_path / "inet" / "train"), transform=lambda im: im.size)[0]
    assert target == 0 and len(image) == 2 and min(image) > 0       # the transform's result, the label
