"""The package's imports go one way (pyproject.toml's import-linter contracts): cli -> bench -> train | viz ->
distiller -> compiler -> methods | capture -> models -> spec -> core; no two modules of a package import each other
(lazily or not); the methods' registry imports no method. A lower layer importing a higher one, or one of issue 19's
import circles coming back, fails here and in .ci/run's `lint-imports`."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("importlinter", reason="pip install import-linter (the test extra)")

LINT = "from importlinter.cli import lint_imports; raise SystemExit(lint_imports(no_cache=True, no_logo=True))"


def _lint(cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LINT], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_imports_keep_the_layers():
    proc = _lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "3 kept, 0 broken" in proc.stdout


def _append(path, text: str) -> None:
    path.write_text(path.read_text() + text)


def test_the_contracts_catch_an_upward_import_and_each_old_circle(tmp_path):
    """The contracts are not vacuous: in a copy of the package where the core imports the CLI, the registry loads
    the methods itself and the zoo registers its leaf class with the capture (issue 19's circles, as function-level
    imports), each contract reports its import."""
    import shutil

    shutil.copytree(ROOT / "kdgraph", tmp_path / "kdgraph", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    pkg = tmp_path / "kdgraph"
    _append(pkg / "formatting.py", "\n\ndef _upward():\n    from .cli import main  # against the flow\n")
    _append(pkg / "methods" / "registry.py", "\n\ndef _load():\n    from . import builtin_methods  # circle\n")
    _append(pkg / "models" / "zoo.py", "\n\ndef _leaf():\n    from ..capture import register_leaf_module  # circle\n")
    proc = _lint(tmp_path)
    assert proc.returncode == 1, proc.stdout[-4000:]
    out = proc.stdout
    assert "0 kept, 3 broken" in out, out[-4000:]
    assert "kdgraph.formatting -> kdgraph.cli" in out  # layers
    assert "kdgraph.models.zoo -> kdgraph.capture" in out  # layers: models sit below the capture
    assert "kdgraph.methods.registry -> kdgraph.methods" in out  # forbidden: the registry imports no method
    cycles = out.split("No cycles are allowed in kdgraph.")[1]  # acyclic siblings: models <-> capture
    assert re.search(r"\.models -> \.capture|\.capture -> \.models", cycles), cycles
