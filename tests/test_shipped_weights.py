"""Trained networks shipped in ``kdgraph/models/pretrained/``: a pretrain target missing from the cache resolves to the
shipped file (the same recipe key only), its whole-file sha256 checked against SHA256SUMS, a changed byte refused,
``KDGRAPH_SHIPPED_WEIGHTS=0`` ignoring them; and the real shipped Fashion-MNIST teacher loads into its network."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

import kdgraph
import kdgraph.models
import kdgraph.zoo
from kdgraph import weights
from kdgraph.errors import ModelError
from kdgraph.weightio import save_safetensors
from kdgraph.models.weights import resolve, shipped_dir, weights_path

ROOT = Path(__file__).resolve().parents[1]

SPEC = {
    "name": "ship", "input": {"channels": 1, "size": [16, 16], "num_classes": 10},
    "teacher": {"model": "kdgraph.zoo:tiny_cnn", "kwargs": {"width": 8}, "weights": "cache:ship_teacher",
                "pretrain": {"epochs": 1, "optimizer": {"lr": 0.1}}},
    "student": {"model": "kdgraph.zoo:tiny_cnn", "kwargs": {"width": 4}},
    "stages": [{"name": "main", "epochs": 1, "batch_size": 4, "optimizer": {"lr": 0.1},
                "losses": [{"name": "kd", "type": "kd", "args": {"temperature": 4.0}}]}],
    "data": {"dataset": "synthetic"},
}


@pytest.fixture
def shipped_folder(tmp_path, monkeypatch):
    """An empty cache and a shipped folder holding SPEC's teacher (a trained-looking random network)."""
    monkeypatch.setenv("KDGRAPH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(weights.SHIPPED_ENV, raising=False)
    folder = tmp_path / "pretrained"
    folder.mkdir()
    monkeypatch.setattr(weights, "shipped_dir", lambda: folder)
    spec = kdgraph.load_spec(SPEC)
    name = weights_path(spec.teacher, spec, "teacher").stem
    net = kdgraph.zoo.tiny_cnn(width=8)
    save_safetensors(net.state_dict(), folder / f"{name}.safetensors")
    digest = hashlib.sha256((folder / f"{name}.safetensors").read_bytes()).hexdigest()
    (folder / "SHA256SUMS").write_text(f"{digest}  {name}.safetensors\n")
    return folder / f"{name}.safetensors", net


def test_a_missing_pretrain_target_loads_the_shipped_file(shipped_folder):
    file, net = shipped_folder
    d = kdgraph.compile(SPEC)
    assert d.load_weights() == {"teacher": True, "student": False}
    assert d.spec.teacher.weights == str(file)
    assert all(torch.equal(a, b) for a, b in zip(d.teacher.state_dict().values(), net.state_dict().values()))
    spec = kdgraph.load_spec(SPEC)
    assert resolve(spec, "teacher", require=False) is None  # nothing to pretrain


def test_another_recipe_or_the_switch_off_trains_instead(shipped_folder, monkeypatch):
    other = dict(SPEC, teacher=dict(SPEC["teacher"], pretrain={"epochs": 2, "optimizer": {"lr": 0.1}}))
    spec = kdgraph.load_spec(other)
    assert resolve(spec, "teacher", require=False) == weights_path(kdgraph.load_spec(other).teacher, spec, "teacher")
    monkeypatch.setenv(weights.SHIPPED_ENV, "0")
    spec = kdgraph.load_spec(SPEC)
    target = resolve(spec, "teacher", require=False)
    assert target is not None and target.suffix == ".pt" and "cache" in str(target)


def test_a_changed_byte_or_a_missing_sum_is_refused(shipped_folder):
    file, _ = shipped_folder
    data = bytearray(file.read_bytes())
    data[-1] ^= 1
    file.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"does not match its sha256 in .*SHA256SUMS.*KDGRAPH_SHIPPED_WEIGHTS=0") as e:
        kdgraph.compile(SPEC).load_weights()
    assert "\n" not in str(e.value)
    (file.parent / "SHA256SUMS").write_text("")
    with pytest.raises(ModelError, match="expected an entry"):
        kdgraph.compile(SPEC).load_weights()



def test_the_shipped_fashion_mnist_teacher_matches_its_sum_and_its_network(tmp_path, monkeypatch):
    monkeypatch.setenv("KDGRAPH_CACHE", str(tmp_path))  # an empty cache: only the shipped file can serve
    monkeypatch.delenv(weights.SHIPPED_ENV, raising=False)
    sums = (shipped_dir() / "SHA256SUMS").read_text().split()
    assert "fashion_mnist_resnet34_w16-33e6381e.safetensors" in sums
    spec = kdgraph.load_spec(ROOT / "specs/fashion_mnist/kd.yaml")
    assert resolve(spec, "teacher", require=False) is None
    assert Path(spec.teacher.weights).parent == shipped_dir()
    teacher = kdgraph.models.build_model(spec.teacher, "teacher")
    assert kdgraph.models.weights.load_weights(teacher, spec.teacher, "teacher")
    assert sum(p.numel() for p in teacher.parameters()) > 1_000_000
