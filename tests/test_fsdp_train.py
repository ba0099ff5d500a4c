"""``kdgraph train`` under torchrun with ``runtime.distributed: fsdp`` (2 gloo processes, tiny Fashion-MNIST subset).

A 2-process fsdp run ends with the same student as a 2-process ddp run of the same spec (FSDP2's reduce-scatter
averages the gradients as DDP's all-reduce does; BatchNorm statistics are per process in both and rank 0's are
what is saved and evaluated), rtol 1e-5 / atol 1e-6. 51 validation images over 2 processes and batch 16: rank 0
has 2 batches, rank 1 one batch plus one padding pass, and the evaluation counts 51 images. ``--resume`` continues
from a sharded end-of-epoch checkpoint (one more epoch) to the same student as the ddp run resumed from its
``last.pt`` of that point (so the optimizer's momentum came back), and ``kdgraph export`` of the sharded folder gives
a student state_dict loading strictly.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from click.testing import CliRunner

from kdgraph.cli import main
from kdgraph.models import build_model
from kdgraph.spec import load_spec

sys.path.insert(0, str(Path(__file__).parent))
from test_train import tiny_spec, write_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kdgraph",
           "train", *args, "--device", "cpu", "--no-progress"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_fsdp_train_matches_ddp_counts_every_image_resumes_and_exports(tmp_path):
    spec = tiny_spec(name="fsdp_train", epochs=1, train_subset=64, val_subset=51, batch_size=16,
                      runtime={"eval_teacher": True})
    ddp = write_spec(tmp_path / "ddp.yaml", spec)
    spec["runtime"] = {"seed": 0, "eval_teacher": True, "distributed": "fsdp",
                       "fsdp": {"student_units": ["layer*"], "teacher_units": ["layer2", "layer3"]}}
    fsdp = write_spec(tmp_path / "fsdp.yaml", spec)
    _torchrun(tmp_path, str(ddp), "--out", str(tmp_path / "ddp"))
    _torchrun(tmp_path, str(fsdp), "--out", str(tmp_path / "fsdp"))
    out = tmp_path / "fsdp"
    assert (out / "last.sharded" / "manifest.json").is_file() and not (out / "last.pt").exists()
    res = json.loads((out / "results.json").read_text())
    assert res["stages"][0]["last"]["images"] == 51  # every validation image once, the padding pass not counted
    ddp_res = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert res["teacher"]["images"] == 51 and res["teacher"]["top1"] == ddp_res["teacher"]["top1"]  # sharded teacher

    exported = tmp_path / "student.pt"
    r = CliRunner().invoke(main, ["export", str(out / "last.sharded"), "-o", str(exported)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    sd = torch.load(exported, weights_only=True)
    build_model(load_spec(str(fsdp)).student, "student").load_state_dict(sd, strict=True)
    want = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)["student"]
    assert set(sd) == set(want)
    for k in want:
        torch.testing.assert_close(sd[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    ddp_top1 = json.loads((tmp_path / "ddp" / "results.json").read_text())["stages"][0]["last"]
    assert abs(ddp_top1["top1"] - res["stages"][0]["last"]["top1"]) < 1e-9 and ddp_top1["images"] == 51

    # best.sharded / best.pt are the end-of-epoch-1 checkpoints (stage not done): resume both with a second epoch
    import shutil

    shutil.rmtree(out / "last.sharded")
    shutil.copytree(out / "best.sharded", out / "last.sharded")
    shutil.copy(tmp_path / "ddp" / "best.pt", tmp_path / "ddp" / "last.pt")
    _torchrun(tmp_path, str(ddp), "--out", str(tmp_path / "ddp"), "--resume", "--set", "stages.main.epochs=2")
    proc = _torchrun(tmp_path, str(fsdp), "--out", str(out), "--resume", "--set", "stages.main.epochs=2")
    assert "resuming from" in proc.stdout and "end of epoch 1" in proc.stdout, proc.stdout[-2000:]
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in log if e["event"] == "eval"]
    assert len(evals) == 2 and evals[1]["epoch"] > evals[0]["epoch"] and evals[1]["images"] == 51
    manifest = json.loads((out / "last.sharded" / "manifest.json").read_text())
    assert manifest["extra"]["describe"].startswith("end of stage") and manifest["world_size"] == 2
    r = CliRunner().invoke(main, ["export", str(out / "last.sharded"), "-o", str(exported)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    after = torch.load(exported, weights_only=True)
    assert any(not torch.equal(after[k], sd[k]) for k in sd if after[k].is_floating_point())  # it trained on
    want = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)["student"]  # the optimizer state came back
    for k in want:
        torch.testing.assert_close(after[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_fsdp_train_refuses_what_it_does_not_support():
    import pytest

    from kdgraph.errors import KDGraphError
    from kdgraph.train.fsdp import require_processes

    spec = tiny_spec(runtime={"distributed": "fsdp"})
    with pytest.raises(KDGraphError, match="needs a process group"):  # no torchrun: nothing to shard over
        require_processes(load_spec(spec), 1)
    require_processes(load_spec(spec), 2)  # under torchrun: trained sharded
    spec["stages"][0]["ema"] = {"decay": 0.9}
    with pytest.raises(KDGraphError, match=r"stages\.main\.ema"):
        require_processes(load_spec(spec), 2)
