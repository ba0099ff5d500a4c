"""timm models in a spec (``timm:NAME``): a ResNet pair and a DeiT-style ViT pair, random init, small inputs,
captured with timm's own fx leaf registry; taps resolve, the student trains, weights load from a local file."""
from __future__ import annotations

import pytest
import torch

import kdgraph
from kdgraph.errors import ModelError

import timm  # noqa: E402 - in the test extra: a missing timm fails here, it is not skipped

RESNETS = {
    "name": "timm_resnets", "input": {"channels": 3, "size": [32, 32], "num_classes": 10},
    "teacher": {"model": "timm:resnet34", "kwargs": {"num_classes": 10}},
    "student": {"model": "timm:resnet18", "kwargs": {"num_classes": 10}},
    "stages": [{"name": "main", "optimizer": {"lr": 0.05}, "losses": [
        {"type": "cross_entropy"},
        {"name": "kd", "type": "kd", "args": {"temperature": 4.0}},
        {"name": "at", "type": "at", "weight": 10.0, "inputs": {"student": "student:layer3", "teacher": "teacher:layer3"}},
    ]}],
}
VITS = {
    "name": "timm_vits", "input": {"channels": 3, "size": [32, 32], "num_classes": 10},
    "teacher": {"model": "timm:vit_small_patch16_224",
                "kwargs": {"num_classes": 10, "img_size": 32, "patch_size": 8, "depth": 3}},
    "student": {"model": "timm:vit_tiny_patch16_224",
                "kwargs": {"num_classes": 10, "img_size": 32, "patch_size": 8, "depth": 2}},
    "stages": [{"name": "main", "optimizer": {"lr": 0.01}, "losses": [
        {"type": "cross_entropy"},
        {"name": "kd", "type": "kd", "args": {"temperature": 2.0}},
    ]}],
}


def _steps(d, n=3):
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.05)
    torch.manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    t0 = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    s0 = {k: v.clone() for k, v in d.student.state_dict().items() if v.is_floating_point()}
    for _ in range(n):
        out = d(x, y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert all(torch.equal(v, d.teacher.state_dict()[k]) for k, v in t0.items()), "the teacher changed"
    changed = [k for k, v in s0.items() if not torch.equal(v, d.student.state_dict()[k])]
    assert changed, "the student did not train"
    return x, y


def test_timm_resnet_pair_compiles_taps_resolve_and_the_student_trains():
    torch.manual_seed(0)
    d = kdgraph.compile(RESNETS)  # timm: needs no consent (timm.create_model builds registered architectures)
    taps = {t.tap: t.shape for t in d.report.taps}
    assert taps["student:layer3"] == (2, 256, 2, 2) and taps["teacher:layer3"] == (2, 256, 2, 2)
    assert type(d.student).__module__.startswith("timm.")
    x, y = _steps(d)
    d.eval()
    with torch.no_grad():
        torch.testing.assert_close(d(x, y).logits, d.student(x), rtol=0, atol=1e-5)  # the eager student


def test_timm_vit_pair_compiles_with_timms_leaf_registry_and_trains():
    torch.manual_seed(0)
    d = kdgraph.compile(VITS)
    assert d.report.pass_result("prune_teacher") is not None
    names = d.traced["student"].all_names()
    assert "blocks.1" in names and "head" in names
    _steps(d)


def test_timm_weights_from_a_local_file(tmp_path):
    torch.manual_seed(0)
    trained = timm.create_model("resnet18", num_classes=10)
    path = tmp_path / "teacher.pt"
    torch.save(trained.state_dict(), path)
    spec = dict(RESNETS, teacher={"model": "timm:resnet18", "kwargs": {"num_classes": 10}, "weights": str(path)})
    d = kdgraph.compile(spec)
    assert d.load_weights()["teacher"] is True
    for k, v in trained.state_dict().items():
        assert torch.equal(d.teacher.state_dict()[k], v), k


@pytest.mark.parametrize("ref, message", [
    ({"model": "timm:resnet181"}, "timm has no model 'resnet181'. Did you mean"),
    ({"model": "timm:resnet18", "kwargs": {"pretrained": True}}, "pretrained not allowed for a timm model"),
    ({"model": "timm:resnet18", "kwargs": {"checkpoint_path": "/etc/passwd"}}, "checkpoint_path not allowed"),
    ({"model": "timm:resnet18", "kwargs": {"no_such_argument": 1}}, "student.kwargs: timm resnet18 rejected"),
])
def test_timm_errors_name_the_field(ref, message):
    with pytest.raises(ModelError, match=message):
        kdgraph.compile(dict(RESNETS, student=ref))


def test_a_timm_model_without_timm_installed_says_which_extra_to_install(tmp_path):
    """A fresh process where ``import timm`` fails (a meta-path finder refuses it): `kdgraph compile` exits 2
    with one paragraph naming the extra, no traceback."""
    import os
    import subprocess
    import sys

    import yaml

    spec = tmp_path / "timm.yaml"
    spec.write_text(yaml.safe_dump(RESNETS))
    block = tmp_path / "no_timm"
    block.mkdir()
    (block / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoTimm:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'timm' or name.startswith('timm.'):\n"
        "            raise ImportError('No module named timm (blocked by the test)')\n"
        "sys.meta_path.insert(0, _NoTimm())\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(block), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "kdgraph", "compile", str(spec)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'kdgraph[timm]'" in proc.stderr and "teacher.model" in proc.stderr
    assert "Traceback" not in proc.stderr
