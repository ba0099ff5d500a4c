"""kdgraph train / eval / export on real (tiny) runs: Fashion-MNIST subsets, random-init networks, CPU."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner

import kdgraph
from kdgraph import DistillLoss, register_loss
from kdgraph.errors import CheckpointError, SpecError, TrainingError
from kdgraph.train import export_student, train
from kdgraph.train.checkpoint import Checkpoint
from kdgraph.train.networks import load_init_from
from kdgraph.models.zoo import tiny_cnn


def tiny_spec(name: str = "tiny_kd", epochs: int = 1, train_subset: int = 128, val_subset: int = 64,
              batch_size: int = 32, student_norm: str = "batch", losses=None, runtime=None, **extra) -> dict:
    """Teacher TinyCNN(8) -> student TinyCNN(4) on a Fashion-MNIST subset; KD + CE."""
    spec = {
        "name": name,
        "input": {"channels": 1, "size": [28, 28], "num_classes": 10},
        "teacher": {"model": "kdgraph.zoo:tiny_cnn", "kwargs": {"width": 8}},
        "student": {"model": "kdgraph.zoo:tiny_cnn", "kwargs": {"width": 4, "norm": student_norm}},
        "stages": [{
            "name": "main", "epochs": epochs, "batch_size": batch_size,
            "optimizer": {"type": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
            "scheduler": {"type": "multistep", "milestones": [1], "gamma": 0.1},
            "losses": losses or [{"name": "ce", "type": "cross_entropy", "weight": 0.5},
                                 {"name": "kd", "type": "kd", "weight": 0.5, "args": {"temperature": 4.0}}]}],
        "data": {"dataset": "fashion_mnist", "train_subset": train_subset, "val_subset": val_subset, "workers": 0},
        "runtime": {"seed": 0, **(runtime or {})},
    }
    spec.update(extra)
    return spec


def write_spec(path: Path, spec: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


QUIET = {"device": "cpu", "progress": False, "plot": False, "tensorboard": False}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_end_to_end_records_checkpoints_and_frozen_teacher(tmp_path):
    out = tmp_path / "run"
    res = train(tiny_spec(epochs=2, runtime={"eval_teacher": True}), out=out, device="cpu", progress=False)
    st = res["stages"][0]
    assert st["effective_batch"] == 32 and st["lr_used"] == pytest.approx(0.05) and st["world_size"] == 1
    assert res["teacher"]["images"] == 64 and res["student"]["top1"] == st["last"]["top1"]
    assert res["time_to_first_step_s"] > 0
    events = read_jsonl(out / "metrics.jsonl")
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and "stage" in kinds and kinds[-1] == "end" and kinds.count("eval") == 2
    train_recs = [e for e in events if e["event"] == "train"]
    assert len(train_recs) == 8 and set(train_recs[0]["terms"]) == {"ce", "kd"}  # 128 / 32 x 2 epochs
    assert all(math.isfinite(e["loss"]) and e["images_per_s"] > 0 for e in train_recs)
    assert all(e["lr"] == pytest.approx(0.005 if e["epoch"] == 1 else 0.05) for e in train_recs)  # milestone [1]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert json.loads((out / "results.json").read_text())["spec"] == "tiny_kd"
    ck = Checkpoint.load(out / "last.pt")
    assert ck.stage_done and ck.global_step == 8 and len(ck.history) == 2
    assert Checkpoint.load(out / "best.pt").best_top1 == max(h["top1"] for h in ck.history)
    assert ck.optimizer["state"] and ck.scheduler["last_epoch"] == 2
    # the teacher never changed (frozen, eval-mode BatchNorm); the student did
    torch.manual_seed(0)
    teacher0, student0 = tiny_cnn(width=8), tiny_cnn(width=4)
    for k, v in teacher0.state_dict().items():
        assert torch.equal(ck.distiller[f"teacher.{k}"], v), k
    assert not torch.equal(ck.student["fc.weight"], student0.state_dict()["fc.weight"])


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_and_channels_last_run_finite(tmp_path, amp):
    res = train(tiny_spec(train_subset=64, val_subset=32, runtime={"amp": amp, "channels_last": True}),
                out=tmp_path / amp, **QUIET)
    recs = [e for e in read_jsonl(tmp_path / amp / "metrics.jsonl") if e["event"] == "train"]
    assert len(recs) == 2 and all(math.isfinite(e["loss"]) and e["loss"] > 0 for e in recs)
    assert res["amp"] == amp and math.isfinite(res["student"]["top1"])
    ck = Checkpoint.load(tmp_path / amp / "last.pt")
    assert (ck.scaler is not None) == (amp == "fp16")
    assert all(torch.isfinite(v).all() for v in ck.student.values() if v.is_floating_point())


@register_loss("test_nan_after", override=True)
class NanAfter(DistillLoss):
    """0 for the first ``after`` training calls, then NaN (to test the non-finite-loss policy)."""

    inputs = ("logits",)
    default_inputs = {"logits": "student:@output"}

    def __init__(self, after: int = 5):
        super().__init__()
        self.after, self.calls = after, 0

    def forward(self, logits):
        self.calls += int(self.training)
        bad = self.calls > self.after
        return logits.sum() * 0.0 + (float("nan") if bad else 0.0)


def test_nan_loss_names_term_and_step_and_keeps_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    spec = tiny_spec(train_subset=256, losses=[{"name": "ce", "type": "cross_entropy"},
                                               {"name": "boom", "type": "test_nan_after", "args": {"after": 5}}])
    with pytest.raises(TrainingError) as e:
        train(spec, out=out, ckpt_every=2, **QUIET)
    msg = str(e.value)
    assert "'boom'" in msg and "step 6" in msg and "stage main, epoch 1, step 6 of 8" in msg
    assert "last good checkpoint" in msg and "step 4" in msg
    ck = Checkpoint.load(out / "last.pt")
    assert (ck.epoch, ck.step, ck.epoch_done) == (0, 4, False)
    assert all(torch.isfinite(v).all() for v in ck.student.values() if v.is_floating_point())
    assert not (out / "best.pt").exists() and not (out / "results.json").exists()


class NotWeights:  # pickling this is code, which weights_only loading refuses
    pass


def test_bad_checkpoints_are_clear_errors_and_nothing_is_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    garbage = b"this is not a torch file"
    (out / "last.pt").write_bytes(garbage)
    with pytest.raises(CheckpointError, match="cannot be read"):
        train(tiny_spec(), out=out, resume=True, **QUIET)
    assert (out / "last.pt").read_bytes() == garbage
    with pytest.raises(TrainingError, match="already holds a run"):
        train(tiny_spec(), out=out, **QUIET)
    assert (out / "last.pt").read_bytes() == garbage
    torch.save({"kdgraph_checkpoint": 1, "obj": NotWeights()}, out / "code.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        export_student(out / "code.pt", tmp_path / "x.pt")
    # a checkpoint of another spec is refused, not half-loaded
    other = tmp_path / "other"
    train(tiny_spec(name="other", train_subset=32, val_subset=16), out=other, **QUIET)
    before = (other / "last.pt").read_bytes()
    with pytest.raises(CheckpointError, match="belongs to spec 'other'"):
        train(tiny_spec(), out=other, resume=True, **QUIET)
    assert (other / "last.pt").read_bytes() == before
    assert not (tmp_path / "x.pt").exists()


def test_export_round_trip_into_torchvision_resnet18(tmp_path):
    from kdgraph.cli import main

    spec = {
        "name": "r18", "input": {"channels": 3, "size": [32, 32], "num_classes": 1000},
        "teacher": {"model": "kdgraph.zoo:tiny_cnn", "kwargs": {"in_channels": 3, "num_classes": 1000}},
        "student": {"model": "torchvision:resnet18"},
        "stages": [{"name": "main", "batch_size": 4, "optimizer": {"lr": 0.01},
                    "losses": [{"name": "ce", "type": "cross_entropy", "weight": 0.5},
                               {"name": "kd", "type": "kd", "weight": 0.5}]}],
        "data": {"dataset": "synthetic", "train_subset": 8, "val_subset": 4, "workers": 0}}
    path = write_spec(tmp_path / "r18.yaml", spec)
    runner = CliRunner()
    r = runner.invoke(main, ["train", str(path), "--out", str(tmp_path / "run"), "--device", "cpu", "--no-progress"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["export", str(tmp_path / "run" / "last.pt"), "-o", str(tmp_path / "student.pt")])
    assert r.exit_code == 0, r.output
    assert "checked against torchvision:resnet18 (strict)" in r.output
    sd = torch.load(tmp_path / "student.pt", weights_only=True)
    model = torchvision.models.resnet18()
    model.load_state_dict(sd, strict=True)
    ck = Checkpoint.load(tmp_path / "run" / "last.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(v, ck.distiller[f"student.{k}"]), k
    torch.manual_seed(0)
    init = torchvision.models.resnet18()
    assert not torch.equal(init.fc.weight, model.fc.weight)  # the trained student, not a fresh one
    r = runner.invoke(main, ["eval", str(path), "--ckpt", str(tmp_path / "student.pt"), "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    ev = json.loads(r.output)
    assert ev["images"] == 4 and ev["role"] == "student"


def test_cli_overrides_and_clear_errors(tmp_path):
    from kdgraph.cli import main

    path = write_spec(tmp_path / "s.yaml", tiny_spec(epochs=3))
    runner = CliRunner()
    r = runner.invoke(main, ["train", str(path), "--out", str(tmp_path / "run"), "--device", "cpu", "--no-progress",
                             "--set", "stages.main.epochs=1", "--set", "data.train_subset=32",
                             "--set", "stages.*.optimizer.lr=0.02", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("{\n"):])
    assert res["stages"][0]["epochs"] == 1 and res["stages"][0]["lr_used"] == pytest.approx(0.02)
    r = runner.invoke(main, ["train", str(path), "--set", "stages.mian.epochs=1"])
    assert r.exit_code == 2 and "no item named 'mian'" in r.output and "main" in r.output
    r = runner.invoke(main, ["train", str(path), "--set", "runtime.amp=fp8"])
    assert r.exit_code == 2 and "runtime.amp" in r.output
    r = runner.invoke(main, ["train", str(path), "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "r2")])
    assert r.exit_code == 2 and "apt-get install dataset-fashion-mnist" in r.output
    assert not (tmp_path / "r2" / "last.pt").exists()
    with pytest.raises(SpecError):
        kdgraph.train.apply_overrides(kdgraph.load_spec(path), ["nonsense"])


def test_teacher_pretrained_once_then_cached(tmp_path, monkeypatch, capsys):
    from kdgraph.train import pretrain

    monkeypatch.setenv("KDGRAPH_CACHE", str(tmp_path / "cache"))
    spec = tiny_spec(train_subset=64, val_subset=32, runtime={"eval_teacher": True})
    spec["teacher"].update(weights="cache:tiny_teacher",
                           pretrain={"epochs": 1, "batch_size": 32, "optimizer": {"lr": 0.05},
                                     "train_subset": 128})
    res1 = train(spec, out=tmp_path / "a", **QUIET)
    files = sorted((tmp_path / "cache").glob("tiny_teacher-*.pt"))
    assert len(files) == 1 and res1["teacher_weights"] == str(files[0])
    side = pretrain.info(files[0])
    assert side["eval"]["images"] == 32 and side["pretrain"]["train_subset"] == 128
    assert "training it once" in capsys.readouterr().out
    cached = torch.load(files[0], weights_only=True)
    ck = Checkpoint.load(tmp_path / "a" / "last.pt")
    assert all(torch.equal(ck.distiller[f"teacher.{k}"], v) for k, v in cached.items())
    assert res1["teacher"]["top1"] == pytest.approx(side["eval"]["top1"])  # the same network, evaluated again
    mtime = files[0].stat().st_mtime
    res2 = train(spec, out=tmp_path / "b", **QUIET)
    assert "training it once" not in capsys.readouterr().out and files[0].stat().st_mtime == mtime
    assert res2["teacher"]["top1"] == pytest.approx(res1["teacher"]["top1"])
    ev = kdgraph.train.evaluate_checkpoint(kdgraph.load_spec(spec), None, role="teacher", device="cpu")
    assert ev["weights"] == str(files[0]) and ev["top1"] == pytest.approx(res1["teacher"]["top1"])
    spec["teacher"]["pretrain"]["epochs"] = 2  # other settings -> another cache entry, not the stale one
    assert pretrain.weights_path(kdgraph.load_spec(spec).teacher, kdgraph.load_spec(spec), "teacher") != files[0]


def test_two_stages_with_adapters_then_init_from(tmp_path):
    spec = tiny_spec(
        name="tiny_ft", train_subset=64, val_subset=32,
        adapters={
            "para_enc": {"type": "ft_encoder", "inputs": {"x": "teacher:layer3"}, "args": {"rate": 0.5}},
            "para_dec": {"type": "ft_decoder", "inputs": {"x": "adapter:para_enc"}, "match": "teacher:layer3"},
            "translator": {"type": "ft_translator", "inputs": {"x": "student:layer3"}, "match": "adapter:para_enc"}})
    spec["stages"] = [
        {"name": "paraphraser", "batch_size": 32, "optimizer": {"lr": 0.01}, "train": ["para_enc", "para_dec"],
         "losses": [{"name": "rec", "type": "mse", "inputs": {"student": "adapter:para_dec",
                                                               "teacher": "teacher:layer3"}}]},
        {"name": "main", "batch_size": 32, "optimizer": {"lr": 0.05}, "train": ["student", "translator"],
         "losses": [{"name": "ce", "type": "cross_entropy"},
                    {"name": "ft", "type": "ft", "weight": 10.0,
                     "inputs": {"student": "adapter:translator", "teacher": "adapter:para_enc"}}]}]
    res = train(spec, out=tmp_path / "ft", **QUIET)
    assert [s["name"] for s in res["stages"]] == ["paraphraser", "main"]
    assert res["stages"][0]["last"] is None and res["stages"][1]["last"]["images"] == 32  # no eval in stage 1
    ck = Checkpoint.load(tmp_path / "ft" / "last.pt")
    assert ck.stage == "main" and ck.stage_done and ck.global_step == 4
    # init_from: student (strict) and the adapters of the same name come from the checkpoint
    d = kdgraph.compile(spec)
    loaded = load_init_from(d, str(tmp_path / "ft" / "last.pt"))
    assert loaded == ["student", "adapter para_enc", "adapter para_dec", "adapter translator"]
    for k, v in d.state_dict().items():
        if k.startswith(("student.", "adapters.")):
            assert torch.equal(v, ck.distiller[k]), k
    torch.save(d.student.state_dict(), tmp_path / "plain.pt")  # a plain state_dict works too
    res2 = train(dict(spec, init_from=str(tmp_path / "plain.pt")), out=tmp_path / "init", only_stages=["main"],
                 **QUIET)
    assert [s["name"] for s in res2["stages"]] == ["main"]


def test_crd_data_wrapper_extras_reach_the_loss_and_its_memory_is_checkpointed(tmp_path):
    spec = tiny_spec(
        name="tiny_crd", train_subset=96, val_subset=32,
        adapters={"s_head": {"type": "crd_head", "inputs": {"x": "student:avgpool"}, "args": {"feature_dim": 16}},
                  "t_head": {"type": "crd_head", "inputs": {"x": "teacher:avgpool"}, "args": {"feature_dim": 16}}},
        losses=[{"name": "ce", "type": "cross_entropy"},
                {"name": "crd", "type": "crd", "weight": 0.8,
                 "args": {"num_samples": 96, "feature_dim": 16},
                 "inputs": {"student": "adapter:s_head", "teacher": "adapter:t_head"}}])
    spec["stages"][0]["train"] = ["student", "s_head", "t_head"]
    spec["data"]["wrapper"] = {"type": "crd", "args": {"num_negative_samples": 16}}
    res = train(spec, out=tmp_path / "a", **QUIET)
    assert res["stages"][0]["last"]["images"] == 32
    a = Checkpoint.load(tmp_path / "a" / "last.pt").distiller
    mem = [k for k in a if k.startswith("losses.main.crd.")]
    assert mem and any(a[k].numel() >= 96 * 16 for k in mem)  # the memory banks are in the checkpoint
    d0 = kdgraph.compile(spec).state_dict()
    assert any(not torch.equal(a[k], d0[k]) for k in mem)  # and were updated by training
    train(spec, out=tmp_path / "b", **QUIET)  # negatives are drawn from per-sample seeds: a rerun is identical
    b = Checkpoint.load(tmp_path / "b" / "last.pt").distiller
    assert all(torch.equal(a[k], b[k]) for k in a)
    missing = dict(spec, data=dict(spec["data"], wrapper=None))
    with pytest.raises(kdgraph.errors.DataError, match="data.wrapper"):
        train(missing, out=tmp_path / "c", **QUIET)
