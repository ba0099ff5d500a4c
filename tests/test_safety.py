"""A spec is data, never code: import paths need the user's consent, given outside the spec.

Every hostile reference below would run a command, delete a folder or open a file if it were called; a
canary proves that nothing ran, through the API, the CLI and the spec stored inside a checkpoint.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import kdgraph
from kdgraph.errors import ModelError
from kdgraph.models import REGISTERED_MODELS
from kdgraph.train.checkpoint import HASH_KEY, atomic_save, content_hash, load_checkpoint
from kdgraph.models.trust import ENV_VAR, ConsentError

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def spec_with(teacher: dict, name: str = "hostile", **extra) -> dict:
    spec = {
        "name": name, "input": {"channels": 1, "size": [16, 16], "num_classes": 10},
        "teacher": teacher,
        "student": {"model": "kdgraph.zoo:tiny_cnn", "kwargs": {"width": 4}},
        "stages": [{"name": "main", "epochs": 1, "batch_size": 8, "optimizer": {"lr": 0.01},
                    "losses": [{"type": "cross_entropy"}]}],
        "data": {"dataset": "synthetic", "train_subset": 16, "val_subset": 8, "workers": 0},
    }
    spec.update(extra)
    return spec


def hostile_refs(canary: Path, victim: Path) -> dict[str, dict]:
    return {
        "os:system": {"model": "os:system", "kwargs": {"command": f"touch {canary}"}},
        "subprocess:run": {"model": "subprocess:run", "kwargs": {"args": ["touch", str(canary)]}},
        "shutil:rmtree": {"model": "shutil:rmtree", "kwargs": {"path": str(victim)}},
        "builtins:open": {"model": "builtins:open", "kwargs": {"file": str(canary), "mode": "w"}},
    }


def _cli(args: list[str], cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """A real ``python -m kdgraph`` process (slow to start: used once per test at most)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS)]))
    env.pop(ENV_VAR, None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "kdgraph", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _invoke(args: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI in this process (click's runner), as a CompletedProcess."""
    from click.testing import CliRunner

    from kdgraph.cli import main

    env = {ENV_VAR: None, **(env_extra or {})}
    r = CliRunner().invoke(main, args, env=env)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)


def assert_one_paragraph(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    text = r.stderr.strip()
    assert text.startswith("error:") and "\n\n" not in text, text
    for n in needles:
        assert n in " ".join(text.split()), text


@pytest.fixture
def victim(tmp_path):
    v = tmp_path / "victim"
    v.mkdir()
    (v / "keep.txt").write_text("precious")
    return v


@pytest.mark.parametrize("ref", ["os:system", "subprocess:run", "shutil:rmtree", "builtins:open"])
def test_hostile_model_refs_are_refused_before_anything_runs(tmp_path, victim, ref, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    canary = tmp_path / "CANARY"
    spec = spec_with(hostile_refs(canary, victim)[ref])
    with pytest.raises(ConsentError) as e:
        kdgraph.compile(spec)
    msg = str(e.value)
    assert msg.startswith("teacher.model:") and ref in msg and "Nothing was imported or called" in msg
    assert "--allow-import" in msg and "allow_imports=" in msg and ENV_VAR in msg
    assert not canary.exists() and (victim / "keep.txt").exists()


def test_with_consent_a_non_model_callable_is_still_not_called(tmp_path, victim):
    canary = tmp_path / "CANARY"
    refs = hostile_refs(canary, victim)
    for ref in ("os:system", "builtins:open"):  # builtins: neither an nn.Module class nor a Python function
        with pytest.raises(ModelError, match="not called"):
            kdgraph.compile(spec_with(refs[ref]), trust_code=True)
    assert not canary.exists() and (victim / "keep.txt").exists()


def test_hostile_leaf_module_is_refused_without_import(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    sys.modules.pop("user_models", None)
    spec = spec_with({"model": "kdgraph.zoo:tiny_cnn"},
                     leaf_modules=[{"module": "user_models:DataDependentGate", "reason": "branches on x.mean()"}])
    with pytest.raises(ConsentError, match=r"leaf_modules\[0\]\.module"):
        kdgraph.compile(spec)
    assert "user_models" not in sys.modules  # refused before importing (importing runs code)
    # known classes need no consent: a torch class, and one registered with register_leaf_module
    ok = spec_with({"model": "kdgraph.zoo:tiny_cnn"}, leaf_modules=[
        {"module": "torch.nn:Sequential", "reason": "kept as one node"},
        {"module": "kdgraph.zoo:CenterTapConv2d", "reason": "registered by kdgraph.zoo"}])
    kdgraph.compile(ok)


def test_consent_by_argument_env_var_and_cli_flag(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    spec = spec_with({"model": "user_models:tiny", "kwargs": {"width": 8}},
                     input={"channels": 3, "size": [16, 16], "num_classes": 10})
    spec["student"] = {"model": "user_models:tiny"}
    spec["leaf_modules"] = [{"module": "user_models:DataDependentGate", "reason": "branches on x.mean()"}]
    with pytest.raises(ConsentError):
        kdgraph.compile(spec)
    d = kdgraph.compile(spec, allow_imports=["user_models"])  # API argument
    assert type(d.student).__name__ == "TinyNet"
    with pytest.raises(ConsentError):
        kdgraph.compile(spec, allow_imports=["user_model"])  # a prefix is a whole module name, not a string prefix
    monkeypatch.setenv(ENV_VAR, "numpy, user_models")  # environment
    kdgraph.compile(spec)
    monkeypatch.setenv(ENV_VAR, "*")
    kdgraph.compile(spec)
    monkeypatch.delenv(ENV_VAR)
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert_one_paragraph(_invoke(["compile", str(path)]), "user_models:tiny", "--allow-import user_models")
    for flags in (["--allow-import", "user_models"], ["--trust-code"]):
        r = _invoke(["compile", str(path), *flags])
        assert r.returncode == 0, r.stderr
    r = _invoke(["compile", str(path)], {ENV_VAR: "user_models"})
    assert r.returncode == 0, r.stderr


def test_registered_models_need_no_consent(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)

    @kdgraph.register_model("safety_test_net")
    def safety_test_net(width: int = 4) -> nn.Module:
        return kdgraph.models.zoo.tiny_cnn(width=width)

    try:
        d = kdgraph.compile(spec_with({"model": "registered:safety_test_net", "kwargs": {"width": 8}}))
        assert sum(p.numel() for p in d.teacher.parameters()) > sum(p.numel() for p in d.student.parameters())
        with pytest.raises(ModelError, match="no model registered as 'nope'"):
            kdgraph.compile(spec_with({"model": "registered:nope"}))
        with pytest.raises(ModelError, match="kdgraph.zoo has no model"):
            kdgraph.compile(spec_with({"model": "kdgraph.zoo:use_center_tap"}))  # public, but not a factory
        with pytest.raises(ModelError, match="neither an nn.Module subclass"):
            kdgraph.register_model("bad")(42)
    finally:
        REGISTERED_MODELS.pop("safety_test_net", None)


def test_cli_refuses_hostile_specs_in_every_command(tmp_path, victim):
    canary = tmp_path / "CANARY"
    path = tmp_path / "evil.yaml"
    path.write_text(yaml.safe_dump(spec_with(hostile_refs(canary, victim)["os:system"])))
    for args in (["inspect", str(path)], ["train", str(path), "--out", str(tmp_path / "r")],
                 ["eval", str(path), "--model", "teacher"], ["viz", str(path), "-o", str(tmp_path / "g.html")],
                 ["inspect", "os:system"]):
        assert_one_paragraph(_invoke(args), "os:system", "--allow-import os")
    assert_one_paragraph(_cli(["compile", str(path)], tmp_path), "os:system", "--allow-import os")  # a real process
    assert not canary.exists()


def _edited_checkpoint(tmp_path: Path, student: dict, rehash: bool) -> Path:
    """A real checkpoint (one tiny training run) whose stored spec names ``student``; re-hashed as an
    attacker would (the hash is an integrity check, not a signature) or not."""
    from kdgraph.train import train

    out = tmp_path / "run"
    train(spec_with({"model": "kdgraph.zoo:tiny_cnn", "kwargs": {"width": 4}}), out=out, device="cpu",
          progress=False, plot=False, tensorboard=False)
    ck = load_checkpoint(out / "last.pt")
    ck["spec"]["student"] = student
    if rehash:
        atomic_save(ck, out / "edited.pt")
    else:
        torch.save(dict(ck, **{HASH_KEY: content_hash(load_checkpoint(out / "last.pt"))}), out / "edited.pt")
    return out / "edited.pt"


def test_export_refuses_a_hostile_spec_stored_in_a_checkpoint(tmp_path, victim):
    canary = tmp_path / "CANARY"
    ckpt = _edited_checkpoint(tmp_path, hostile_refs(canary, victim)["os:system"], rehash=True)
    out = tmp_path / "student.pt"
    r = _cli(["export", str(ckpt), "-o", str(out)], tmp_path)
    assert_one_paragraph(r, "its stored spec", "os:system", "--allow-import os", "--no-verify")
    assert not canary.exists() and not out.exists()
    r = _invoke(["export", str(ckpt), "-o", str(out), "--no-verify"])  # weights only: nothing is built
    assert r.returncode == 0, r.stderr
    assert not canary.exists() and out.exists()
    # edited without re-hashing: refused as corrupt before the spec is even looked at
    bad = _edited_checkpoint(tmp_path / "b", hostile_refs(canary, victim)["os:system"], rehash=False)
    assert_one_paragraph(_invoke(["export", str(bad), "-o", str(tmp_path / "s2.pt")]), "is corrupt",
                         str(bad))
    assert not canary.exists() and not (tmp_path / "s2.pt").exists()
