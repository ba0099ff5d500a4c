"""The Lightning (DDP, 2 CPU processes) and accelerate (bf16, gradient accumulation) recipes train and leave the
teacher untouched; each example runs as a user runs it, in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

import kdgraph
from conftest import ROOT


def run(script: str, *args: str, threads: str = "1") -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": threads}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout[-3000:]  # printed by rank 0 only
    return json.loads(lines[0][len("RESULT "):])


def test_lightning_ddp_two_cpu_processes_stages_and_checkpoint(tmp_path):
    res = run("lightning_loop.py", "--spec", "specs/ft_resnet18.yaml", "--size", "32", "--steps", "2",
              "--batch", "2", "--devices", "2", "--out", str(tmp_path))
    assert res["stages"] == ["paraphraser", "main"] and res["world_size"] == 2 and res["strategy"] == "DDPStrategy"
    assert res["steps_last_stage"] == 2
    assert res["teacher_unchanged"] and res["teacher_eval_in_every_step"] and res["student_changed"]
    assert res["restored_stage"] == "main" and res["restored_equal"]
    # independent check: the checkpoint's teacher is bit for bit the teacher the same seed builds
    ck = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    assert ck["kdgraph_stage"] == "main"
    torch.manual_seed(0)
    fresh = kdgraph.compile(kdgraph.load_spec(ROOT / "specs" / "ft_resnet18.yaml", overrides=["input.size=[32, 32]"]))
    teacher = {k[len("distiller.teacher."):]: v for k, v in ck["state_dict"].items() if k.startswith("distiller.teacher.")}
    assert teacher.keys() == fresh.teacher.state_dict().keys()
    assert all(torch.equal(teacher[k], v) for k, v in fresh.teacher.state_dict().items())
    student = {k[len("distiller.student."):]: v for k, v in ck["state_dict"].items() if k.startswith("distiller.student.")}
    assert any(not torch.equal(student[k], v) for k, v in fresh.student.state_dict().items() if v.is_floating_point())


def test_accelerate_bf16_gradient_accumulation():
    res = run("accelerate_loop.py", "--spec", "specs/kd_resnet18.yaml", "--size", "32", "--micro-steps", "4",
              "--accumulate", "2", "--batch", "4", "--mixed-precision", "bf16", threads="2")
    assert res["mixed_precision"] == "bf16" and res["student_conv_dtypes"] == ["torch.bfloat16"]
    assert res["micro_batches"] == 4 and res["optimizer_steps"] == 2  # one step per 2 micro-batches
    assert res["loss_dtypes"] == ["torch.float32"]
    assert res["teacher_unchanged"] and res["teacher_eval_in_every_step"] and not res["teacher_in_optimizer"]


def test_core_runs_without_the_frameworks():
    code = ("import sys; sys.modules['lightning'] = None; sys.modules['accelerate'] = None; import kdgraph, torch;"
            "d = kdgraph.compile(kdgraph.load_spec('specs/kd_resnet18.yaml', overrides=['input.size=[32, 32]']));"
            "print(type(d).__name__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and proc.stdout.strip() == "Distiller", proc.stderr[-2000:]
