"""kdgraph.load_spec(overrides=...) and kdgraph.data: the pieces a user's own loop needs, without kdgraph.train."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import kdgraph
from conftest import ROOT
from kdgraph.errors import DataError, SpecError

CRD = ROOT / "specs" / "crd_resnet18.yaml"


def test_overrides_select_list_items_by_name_and_leave_the_file_spec_alone():
    spec = kdgraph.load_spec(CRD, overrides=["stages.main.losses.crd.args.num_samples=50", "input.size=[32, 32]",
                                             "stages.*.batch_size=4"])
    assert spec.stage("main").losses[1].name == "crd" and spec.stage("main").losses[1].args["num_samples"] == 50
    assert tuple(spec.input.size) == (32, 32) and spec.stages[0].batch_size == 4
    base = kdgraph.load_spec(CRD)
    assert base.stages[0].losses[1].args["num_samples"] == 1281167
    again = kdgraph.apply_overrides(base, ["stages.0.losses.1.args.num_samples=7"])
    assert again.stages[0].losses[1].args["num_samples"] == 7 and base.stages[0].losses[1].args["num_samples"] != 7


@pytest.mark.parametrize("override, expect", [
    ("stages.main.losses.crdd.args.num_samples=5", "no item named 'crdd'. Did you mean: crd?"),
    ("stages.3.epochs=1", "index 3 out of range (the list has 1 items)"),
    ("runtime.amp=fp8", "runtime.amp"),
    ("nonsense", "write KEY=VALUE"),
])
def test_override_errors_are_spec_errors_naming_the_assignment(override, expect):
    with pytest.raises(SpecError) as e:
        kdgraph.load_spec(CRD, overrides=[override])
    assert expect in str(e.value) and "override" in str(e.value)


def test_one_string_is_not_a_list_of_overrides():
    with pytest.raises(SpecError, match="list of KEY=VALUE"):
        kdgraph.load_spec(CRD, overrides="input.size=[32, 32]")


def test_core_does_not_import_the_trainer_or_frameworks():
    code = ("import sys, kdgraph, kdgraph.data; kdgraph.load_spec('specs/crd_resnet18.yaml', overrides=['input.size=[8, 8]']);"
            "bad = [m for m in sys.modules if m.startswith(('kdgraph.train', 'lightning', 'accelerate'))]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _images(n=12, classes=3):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % classes)


def test_wrap_crd_batches_drive_the_distiller():
    ds = _images()
    spec = kdgraph.load_spec(CRD, overrides=[f"stages.main.losses.crd.args.num_samples={len(ds)}",
                                             "data.wrapper.args.num_negative_samples=5", "input.size=[32, 32]",
                                             "input.num_classes=3", "student.kwargs.num_classes=3",
                                             "teacher.kwargs.num_classes=3"])
    wrapped = kdgraph.data.wrap(ds, spec, stage="main")
    item = wrapped[4]
    assert sorted(item) == ["contrast_index", "images", "index", "targets"]
    assert item["index"] == 4 and item["contrast_index"].shape == (6,) and int(item["contrast_index"][0]) == 4
    negatives = item["contrast_index"][1:]
    assert all(int(ds[int(j)][1]) != int(ds[4][1]) for j in negatives)  # negatives come from other classes
    distiller = kdgraph.compile(spec).train()
    batch = next(iter(DataLoader(wrapped, batch_size=4, shuffle=True)))
    kwargs = kdgraph.data.batch_kwargs(batch)
    assert sorted(kwargs) == ["contrast_index", "images", "index", "targets"] == sorted(
        ["images", "targets", *distiller.batch_inputs])
    out = distiller(**kwargs)
    assert torch.isfinite(out.loss) and set(out.terms) == {"ce", "crd"}


def test_wrap_without_a_wrapper_and_stage_checks():
    ds = _images()
    kd = kdgraph.load_spec(ROOT / "specs" / "kd_resnet18.yaml")
    assert kdgraph.data.wrap(ds, kd) is ds and kdgraph.data.wrap(ds, kd, stage=0) is ds
    kw = kdgraph.data.batch_kwargs(next(iter(DataLoader(ds, batch_size=4))))
    assert sorted(kw) == ["images", "targets"] and kw["images"].shape == (4, 3, 32, 32)
    no_wrapper = kdgraph.load_spec(CRD, overrides=["data.wrapper=null"])
    with pytest.raises(DataError, match=r"reads the per-batch inputs \['contrast_index', 'index'\].*no data.wrapper"):
        kdgraph.data.wrap(ds, no_wrapper, stage="main")
    with pytest.raises(SpecError):
        kdgraph.data.wrap(ds, no_wrapper, stage="nope")
    with pytest.raises(DataError, match="a batch dict needs 'images' and 'targets'"):
        kdgraph.data.batch_kwargs({"x": torch.zeros(1)})


def test_crd_wrapper_checks_num_samples_against_the_dataset():
    spec = kdgraph.load_spec(CRD, overrides=["stages.main.losses.crd.args.num_samples=50"])
    with pytest.raises(DataError, match="num_samples is 50 but the training set has 12 samples"):
        kdgraph.data.wrap(_images(), spec)
