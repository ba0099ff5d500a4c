"""``runtime.distributed: fsdp`` with the rest of ``kdgraph train`` (real gloo processes under torchrun): AMP, the
teacher cache, two stages, ``--resume`` on another number of processes, and ``kdgraph bench``.

One spec serves the first test: a tiny CNN pair on 64 Fashion-MNIST images, ``runtime.amp: bf16`` (CPU autocast),
stage ``s1`` reads the teacher's logits from a teacher cache (written once here, one process) and stage ``s2`` reads a
teacher feature inside a sharded unit (``teacher:layer2``: the teacher runs online up to it, gathered unit by unit).
Runs: ddp and fsdp with 2 processes train ``s1`` only (``--stage s1``); then each run is resumed, which trains ``s2``,
with ONE process: the ddp run as a plain process, the fsdp run under ``torchrun --nproc_per_node=1`` (FSDP2 over a
group of one) from the sharded checkpoint written by 2 processes (DCP re-shards it).

Tolerance under bf16 autocast: ddp and fsdp compute the same per-rank forward and backward; only the gradient
reduction differs (DDP's all-reduce then divide, FSDP2's reduce-scatter average), which for 2 ranks is (a + b) / 2
either way, and a group of one reduces nothing. Measured: the students are bit-identical after s1 and after s2
(max |diff| 0.0). Asserted: rtol 1e-5, atol 1e-6 (as tests/test_fsdp_train.py), so that a reduction order another
torch build might pick still passes while any real difference (a lost step, a wrong shard) fails.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdgraph
from kdgraph.train import train
from kdgraph.train.teacher_cache import cache_teacher

sys.path.insert(0, str(Path(__file__).parent))
from test_train import tiny_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"device": "cpu", "progress": False, "plot": False, "tensorboard": False}


def _torchrun(cwd: Path, nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "kdgraph", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _student_of(out: Path) -> dict[str, torch.Tensor]:
    """The student's weights of a run folder: ``last.pt`` (ddp) or the gathered shards of ``last.sharded/``."""
    if (out / "last.sharded").is_dir():
        from kdgraph.train.sharded_checkpoint import read_student

        return read_student(out / "last.sharded")[0]
    return torch.load(out / "last.pt", weights_only=True)["student"]


def _close(a: dict, b: dict, rtol: float, atol: float) -> float:
    assert set(a) == set(b)
    worst = 0.0
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")
            worst = max(worst, (a[k] - b[k]).abs().max().item())
    return worst


def test_fsdp_amp_teacher_cache_two_stages_and_resume_on_one_process(tmp_path):
    torch.manual_seed(3)
    torch.save(kdgraph.zoo.tiny_cnn(width=8).state_dict(), tmp_path / "teacher.pt")
    spec = tiny_spec(name="amp_ddp", train_subset=64, val_subset=32, batch_size=16,
                     runtime={"amp": "bf16", "teacher_cache": "cache"})
    spec["teacher"]["weights"] = "./teacher.pt"
    kd = {"name": "kd", "type": "kd", "weight": 0.5, "args": {"temperature": 4.0}}
    spec["stages"] = [{**spec["stages"][0], "name": "s1"},
                      {**spec["stages"][0], "name": "s2", "scheduler": None,
                       "losses": [kd, {"name": "at", "type": "at", "weight": 50.0,
                                       "inputs": {"student": "student:layer2", "teacher": "teacher:layer2"}}]}]
    ddp_path = tmp_path / "ddp.yaml"
    ddp_path.write_text(json.dumps(spec))  # JSON is YAML (and has no anchors)
    spec["name"] = "amp_fsdp"
    spec["runtime"] = {**spec["runtime"], "distributed": "fsdp",
                       "fsdp": {"student_units": ["layer*"], "teacher_units": ["layer1", "layer2", "layer3"]}}
    fsdp_path = tmp_path / "fsdp.yaml"
    fsdp_path.write_text(json.dumps(spec))
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the cache folder and the teacher's weights are relative to it
    try:
        cache_teacher(kdgraph.load_spec(ddp_path), 2, tmp_path / "cache", device="cpu", batch_size=32,
                      progress=False, say=lambda m: None)
    finally:
        os.chdir(cwd)

    # both specs in one torchrun (several specs share one process group)
    proc = _torchrun(tmp_path, 2, "train", str(ddp_path), str(fsdp_path), "--out", "runs", "--stage", "s1",
                     "--device", "cpu", "--no-progress")
    assert proc.stdout.count("teacher cache: teacher:@output replayed") == 2
    assert proc.stdout.count("online teacher: none") == 2
    assert proc.stdout.count("amp bf16") == 2 and proc.stdout.count("x 2 processes (gloo)") == 2
    ddp_out, fsdp_out = tmp_path / "runs" / "amp_ddp", tmp_path / "runs" / "amp_fsdp"
    assert (fsdp_out / "last.sharded" / "manifest.json").is_file() and (ddp_out / "last.pt").is_file()
    after_s1 = _student_of(ddp_out)
    worst_s1 = _close(_student_of(fsdp_out), after_s1, rtol=1e-5, atol=1e-6)

    # s2 on one process: ddp's last.pt in a plain process, fsdp's 2-process shards under torchrun with 1 process
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        res = train(str(ddp_path), out=ddp_out, resume=True, **QUIET)
    finally:
        os.chdir(cwd)
    assert res["world_size"] == 1 and [s["name"] for s in res["stages"]] == ["s1", "s2"]
    proc = _torchrun(tmp_path, 1, "train", str(fsdp_path), "--out", str(fsdp_out), "--resume", "--device", "cpu",
                     "--no-progress")
    assert "resuming from" in proc.stdout and "end of stage s1" in proc.stdout, proc.stdout[-2000:]
    assert "stage s1: done in the checkpoint" in proc.stdout and "stage s2" in proc.stdout
    assert "online teacher: teacher:layer2" in proc.stdout  # s2 runs the sharded teacher up to its tap
    fsdp_res = json.loads((fsdp_out / "results.json").read_text())
    assert fsdp_res["world_size"] == 1 and fsdp_res["stages"][1]["world_size"] == 1
    manifest = json.loads((fsdp_out / "last.sharded" / "manifest.json").read_text())
    assert manifest["world_size"] == 1 and manifest["extra"]["describe"].startswith("end of stage s2")
    after_s2 = _student_of(ddp_out)
    assert any(not torch.equal(after_s2[k], after_s1[k]) for k in after_s1 if after_s1[k].is_floating_point())
    worst_s2 = _close(_student_of(fsdp_out), after_s2, rtol=1e-5, atol=1e-6)
    assert fsdp_res["stages"][1]["last"]["images"] == 32
    print(f"ddp vs fsdp, bf16 autocast: max |diff| after s1 {worst_s1:.2e}, after s2 (resumed on 1) {worst_s2:.2e}")


BENCH_SPEC = """
name: {name}
input: {{channels: 1, size: [12, 12], num_classes: 4}}
teacher: {{model: "kdgraph.zoo:tiny_cnn", kwargs: {{in_channels: 1, num_classes: 4, width: 4}}}}
student: {{model: "kdgraph.zoo:tiny_cnn", kwargs: {{in_channels: 1, num_classes: 4, width: 4}}}}
stages:
  - name: main
    epochs: 1
    batch_size: 8
    optimizer: {{type: sgd, lr: 0.05}}
    losses:
{losses}
data: {{dataset: synthetic, workers: 0, train_subset: 32, val_subset: 16}}
runtime: {{distributed: fsdp, fsdp: {{teacher_units: ["layer*"], student_units: ["layer*"]}}}}
"""


FT_ADAPTERS = """adapters:
  enc: {type: ft_encoder, inputs: {x: "teacher:layer3"}, args: {rate: 0.5, uses_bn: false}}
  dec: {type: ft_decoder, inputs: {x: "adapter:enc"}, match: "teacher:layer3", args: {uses_bn: false}}
  tr: {type: ft_translator, inputs: {x: "student:layer3"}, match: "adapter:enc", args: {uses_bn: false}}
"""
FT_STAGE = """  - name: paraphraser
    epochs: 1
    batch_size: 8
    optimizer: {type: sgd, lr: 0.05}
    train: [enc, dec]
    losses:
      - {name: rec, type: mse, inputs: {student: "adapter:dec", teacher: "teacher:layer3"}}
"""


def test_kdgraph_bench_under_torchrun_with_fsdp(tmp_path):
    """A 1-seed suite under torchrun (2 processes): a CE baseline and FT, whose first stage trains only adapters
    (the sharded student is not in its graph) and whose second stage trains the student and an adapter."""
    ce = "      - {name: ce, type: cross_entropy}"
    (tmp_path / "base.yaml").write_text(BENCH_SPEC.format(name="fsdp_base", losses=ce))
    ft = BENCH_SPEC.format(name="fsdp_ft", losses=ce + "\n      - {name: ft, type: ft, weight: 10, inputs: "
                                                       "{student: 'adapter:tr', teacher: 'adapter:enc'}}")
    ft = ft.replace("stages:\n", "stages:\n" + FT_STAGE)
    ft = ft.replace("    losses:\n      - {name: ce", "    train: [student, tr]\n    losses:\n      - {name: ce")
    (tmp_path / "ft.yaml").write_text(FT_ADAPTERS + ft)
    (tmp_path / "suite.yaml").write_text("title: fsdp\nseeds: 1\nbaseline: base\nentries:\n"
                                         "  - {label: base, spec: base.yaml}\n  - {label: FT, spec: ft.yaml}\n")
    proc = _torchrun(tmp_path, 2, "bench", "suite.yaml", "--out", "out", "--device", "cpu", "--no-progress")
    out = tmp_path / "out"
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["base", "FT"], proc.stdout[-2000:]
    assert "stage paraphraser (1/2)" in proc.stdout and "trains student, tr" in proc.stdout
    for label in ("base", "FT"):
        res = json.loads((out / label / "seed0" / "results.json").read_text())
        assert res["world_size"] == 2 and res["student"]["top1"] is not None
        assert (out / label / "seed0" / "last.sharded" / "manifest.json").is_file()
        assert not (out / label / "seed0" / "last.pt").exists()
        row = next(r for r in rows if r["label"] == label)
        assert row["runs"][0]["top1"] == pytest.approx(res["student"]["top1"])
    assert [s["name"] for s in res["stages"]] == ["paraphraser", "main"]


def test_fsdp_param_dtype_with_batchnorm_on_cpu_is_refused_before_anything_runs():
    from kdgraph.errors import KDGraphError
    from kdgraph.train import fsdp

    spec = tiny_spec(runtime={"distributed": "fsdp", "fsdp": {"student_units": ["layer*"], "param_dtype": "bf16"}})
    with pytest.raises(KDGraphError, match=r"param_dtype: bf16 .* BatchNorm \(teacher\.layer1\.1\)"):
        fsdp.shard(kdgraph.compile(spec))
    spec["runtime"]["fsdp"]["teacher"] = "replicated"  # the teacher is not sharded: the student's norm is named
    with pytest.raises(KDGraphError, match=r"BatchNorm \(student\.layer1\.1\)"):
        fsdp.shard(kdgraph.compile(spec))
    spec["student"]["kwargs"]["norm"] = "group"  # nothing sharded has BatchNorm: on to the next check
    with pytest.raises(KDGraphError, match="needs a process group"):
        fsdp.shard(kdgraph.compile(spec))


def test_gpu_fsdp_benchmark_dry_run_on_the_cpu(tmp_path):
    """benchmarks/gpu_fsdp.py (the GPU check's FSDP vs DDP rows) runs on the CPU: one row of each pair and both the
    DDP and the FSDP (bf16 parameters) paths, a group of one without torchrun."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OUT=str(tmp_path))
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_fsdp.py"), "--dry-run", "--modes", "ddp",
                           "fsdp_mp"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "gpu_fsdp.jsonl").read_text().splitlines()]
    assert [(r["pair"], r["mode"]) for r in rows] == [("resnet", "ddp"), ("bert", "ddp"), ("bert", "fsdp_mp")]
    assert rows[0]["images_per_s"] > 0 and rows[1]["sequences_per_s"] > 0 and rows[2]["sequences_per_s"] > 0
    # one process holds every shard: the same bytes as DDP's copy
    assert rows[2]["teacher_param_mib_per_rank"] == rows[1]["teacher_param_mib_per_rank"]
    assert "bert    fsdp_mp" in proc.stdout
