"""Exact resume: a run killed with SIGKILL in the middle of an epoch, then resumed with --resume, ends with
the same parameters, optimizer state and accuracy as a run that was never interrupted.

Deterministic CPU settings: same seed, same thread count, in-memory data whose per-sample augmentation
is seeded by (seed, epoch, index), so the resumed epoch sees exactly the batches it would have seen.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from kdgraph.train import train
from kdgraph.train.checkpoint import Checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from test_train import read_jsonl, tiny_spec, write_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    # 60 steps per epoch: long enough that a loaded machine still sees a mid-epoch checkpoint before the run ends
    spec = tiny_spec(name="resume", epochs=2, train_subset=1920, val_subset=64)
    # the recipe whose state lives between steps: a per-step schedule (warm-up, cosine to a floor), clipping, EMA
    spec["stages"][0].update(scheduler={"type": "cosine", "interval": "step", "warmup_steps": 10, "warmup_lr": 0.001,
                                        "min_lr": 0.001}, clip_grad={"max_norm": 1.0}, ema={"decay": 0.9})
    path = write_spec(tmp_path / "resume.yaml", spec)
    # the killed run (a subprocess) and the two in-process runs must use the same number of threads to agree bit for bit
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(torch.get_num_threads()))
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "kdgraph", "train", str(path), "--out", str(out), "--device", "cpu",
                             "--ckpt-every", "3", "--no-progress"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    killed_at = None
    last_mtime = 0.0
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            ck_path = out / "last.pt"
            if ck_path.exists() and ck_path.stat().st_mtime != last_mtime:
                last_mtime = ck_path.stat().st_mtime
                ck = Checkpoint.load(ck_path)
                if ck.global_step >= 6 and not ck.epoch_done:  # mid-epoch
                    proc.send_signal(signal.SIGKILL)
                    killed_at = (ck.epoch, ck.step)
                    break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        log = proc.communicate(timeout=60)[0].decode(errors="replace")
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, log
    ck = Checkpoint.load(out / "last.pt")  # whatever it holds now is a complete, readable checkpoint
    assert not ck.stage_done and ck.global_step < 120

    resumed = train(path, out=out, resume=True, device="cpu", progress=False, plot=False, tensorboard=False)
    reference = train(path, out=tmp_path / "straight", device="cpu", progress=False, plot=False, tensorboard=False)

    a, b = Checkpoint.load(out / "last.pt"), Checkpoint.load(tmp_path / "straight" / "last.pt")
    assert a.global_step == b.global_step == 120
    for k, v in b.distiller.items():
        assert torch.equal(a.distiller[k], v), f"{k} differs after resume (killed at epoch/step {killed_at})"
    for pid, state in b.optimizer["state"].items():
        assert torch.equal(a.optimizer["state"][pid]["momentum_buffer"], state["momentum_buffer"])
    assert a.scheduler["last_epoch"] == b.scheduler["last_epoch"] == 120  # stepped after every step
    assert a.ema["steps"] == b.ema["steps"] == 120
    for k, v in b.ema["model"].items():
        assert torch.equal(a.ema["model"][k], v), f"EMA {k} differs after resume"
    assert all(torch.equal(a.student[k], v) for k, v in b.student.items())  # the EMA, reported and exported
    # the lr of every step, across the epoch boundary and the kill: the same trace as the uninterrupted run
    lrs = [{r["global_step"]: r["lr"] for r in read_jsonl(folder / "metrics.jsonl") if r["event"] == "train"}
           for folder in (out, tmp_path / "straight")]
    assert sorted(lrs[0]) == sorted(lrs[1]) == list(range(1, 121)) and lrs[0] == lrs[1]
    assert lrs[1][1] == 0.001 and max(lrs[1].values()) == 0.05 and lrs[1][120] < 0.0011
    assert resumed["student"]["top1"] == reference["student"]["top1"]
    assert [h["top1"] for h in a.history] == [h["top1"] for h in b.history]
    assert not list(out.glob(".*.tmp"))  # no temporary file left behind by the resumed run
