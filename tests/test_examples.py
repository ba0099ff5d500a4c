"""Every script under examples/ runs as a user would run it (a subprocess, tiny inputs) and does what it says."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT

EXAMPLES = ROOT / "examples"


def run_example(name: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _losses(out: str) -> list[float]:
    return [float(x) for x in re.findall(r"step \d+: loss=([0-9.]+)", out)]


def test_every_example_is_tested():
    # lightning_loop.py and accelerate_loop.py: tests/test_frameworks.py; every spec in custom_loop.py:
    # tests/test_custom_loop.py
    assert {p.name for p in EXAMPLES.glob("*.py")} <= {"custom_loop.py", "custom_model_pair.py", "custom_loss.py",
                                                       "lightning_loop.py", "accelerate_loop.py"}


def test_custom_model_pair(tmp_path):
    page = tmp_path / "pair.html"
    out = run_example("custom_model_pair.py", "--steps", "6", "--batch", "8", "--draw", str(page))
    losses = _losses(out)
    assert len(losses) == 6 and losses[-1] < losses[0]
    for term in ("ce", "kd", "at_stage2", "at_stage3"):
        assert re.search(rf"\b{term}=[0-9.]+", out)
    assert "tap teacher:stage3/add" in out and "path teacher:stage3/add -> loss:" in out
    assert "teacher unchanged: True" in out and "student updated: True" in out and "loss decreased: True" in out
    assert page.exists() and "at_stage3" in page.read_text()


def test_custom_loss():
    out = run_example("custom_loss.py", "--steps", "6", "--batch", "8")
    assert "connector: 32 -> 128 features (inferred)" in out
    assert "'cosine': 'CosineEmbedding'" in out
    assert "compile-time check:" in out and "student:avgpool (32 features" in out
    assert len(_losses(out)) == 6
    assert "cosine term decreased: True" in out and "connector trained: True" in out


def test_custom_loop():
    out = run_example("custom_loop.py", "--steps", "2", "--size", "32", "--batch", "4")
    losses = _losses(out)
    assert len(losses) == 2 and all(x == x and x < 1e6 for x in losses)  # finite
    assert re.search(r"kd=[0-9.]+", out) and "student parameters:" in out
