"""The package's imports go one way (pyproject.toml's import-linter contract): cli -> bench -> train | viz -> core.
A lower layer importing a higher one (the core importing the trainer, the trainer the CLI) fails here and in
.ci/run's `lint-imports`."""
from __future__ import annotations

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
    assert "1 kept, 0 broken" in proc.stdout


def test_the_contract_catches_an_upward_import(tmp_path):
    """The contract is not vacuous: a copy of the package where the core imports the CLI breaks it."""
    import shutil

    shutil.copytree(ROOT / "kdgraph", tmp_path / "kdgraph", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    fmt = tmp_path / "kdgraph" / "formatting.py"
    fmt.write_text(fmt.read_text() + "\n\ndef _upward():\n    from .cli import main  # against the flow\n")
    proc = _lint(tmp_path)
    assert proc.returncode == 1, proc.stdout[-4000:]
    assert "kdgraph.formatting -> kdgraph.cli" in proc.stdout
