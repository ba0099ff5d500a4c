"""DDP on CPU (gloo): two processes under torchrun end with the same parameters as one process on the same
global batch, and distributed evaluation counts every validation image exactly once.

BatchNorm: with per-process batches, training-mode BatchNorm normalises each half batch with its own
statistics, which a single process cannot reproduce; PyTorch's SyncBatchNorm (``runtime.sync_bn``) would fix
that but runs on CUDA only. So the student here normalises with GroupNorm (per-sample statistics, identical
either way); the teacher keeps BatchNorm, which is in eval mode (running statistics) and therefore identical.
Tolerance: the gradient all-reduce sums in another order than one process's batch mean, a ~1e-7 relative
difference per step; after 8 SGD steps with momentum the parameters agree to rtol 1e-4, atol 1e-6.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import kdgraph
from kdgraph.train import train
from kdgraph.train.checkpoint import Checkpoint
from kdgraph.train.distributed import ignored_names

sys.path.insert(0, str(Path(__file__).parent))
from test_train import tiny_spec, write_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_two_gloo_processes_match_one_process_on_the_global_batch(tmp_path):
    spec = tiny_spec(name="ddp", epochs=1, train_subset=256, val_subset=101, batch_size=32, student_norm="group",
                     runtime={"eval_teacher": True})
    path = write_spec(tmp_path / "ddp.yaml", spec)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kdgraph",
           "train", str(path), "--out", str(tmp_path / "two"), "--device", "cpu", "--no-progress",
           "--set", "stages.main.batch_size=16", "--set", "stages.main.reference_world_size=2"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("kdgraph train ddp") == 1  # rank 0 alone prints
    assert "x 2 processes (gloo)" in proc.stdout and "effective batch 32" in proc.stdout

    one = train(path, out=tmp_path / "one", device="cpu", progress=False, plot=False, tensorboard=False)
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    s1, s2 = one["stages"][0], two["stages"][0]
    assert (s2["world_size"], s2["batch_size"], s2["effective_batch"]) == (2, 16, 32)
    assert s1["effective_batch"] == 32 and s1["lr_used"] == s2["lr_used"] == 0.05  # 0.05 x 2 / 2
    assert two["teacher"]["images"] == 101 and s2["last"]["images"] == 101  # every val image exactly once
    assert two["teacher"]["top1"] == one["teacher"]["top1"]

    a, b = Checkpoint.load(tmp_path / "one" / "last.pt"), Checkpoint.load(tmp_path / "two" / "last.pt")
    assert a.global_step == b.global_step == 8
    assert not torch.equal(a.student["fc.weight"], kdgraph.models.zoo.tiny_cnn(width=4, norm="group").fc.weight)
    for k, v in a.student.items():
        torch.testing.assert_close(b.student[k], v, rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
    for k, v in a.distiller.items():
        if k.startswith("teacher."):
            assert torch.equal(b.distiller[k], v)  # frozen teacher untouched in both
    assert abs(s1["last"]["top1"] - s2["last"]["top1"]) <= 100 / 101 + 1e-9


def test_ddp_synchronises_only_what_trains():
    spec = kdgraph.load_spec(tiny_spec(
        adapters={"enc": {"type": "ft_encoder", "inputs": {"x": "teacher:layer3"}},
                  "tr": {"type": "ft_translator", "inputs": {"x": "student:layer3"}, "match": "adapter:enc"}},
        losses=[{"name": "ce", "type": "cross_entropy"},
                {"name": "ft", "type": "ft", "inputs": {"student": "adapter:tr", "teacher": "adapter:enc"}}]))
    spec.stages[0].train = ["student", "tr"]
    d = kdgraph.compile(spec)
    ignored = set(ignored_names(d))
    params = dict(d.named_parameters())
    assert {n for n in params if n.startswith(("teacher.", "adapters.enc."))} <= ignored
    assert not {n for n in params if n.startswith(("student.", "adapters.tr."))} & ignored
    buffers = dict(d.named_buffers())
    assert {n for n in buffers if n.startswith("teacher.")} <= ignored  # frozen BN statistics stay local
    assert {n for n in buffers if n.startswith("student.")}.isdisjoint(ignored)  # student BN broadcast from rank 0
