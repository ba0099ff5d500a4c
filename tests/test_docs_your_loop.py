"""docs/your_loop.md: every python block runs, the excerpts match the examples verbatim, the console command works."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

DOC = (ROOT / "docs" / "your_loop.md").read_text()
BLOCK = re.compile(r"(?:<!-- excerpt: (?P<src>[\w/.]+) -->\n)?```(?P<lang>\w+)\n(?P<body>.*?)```", re.S)
BLOCKS = [(m["src"], m["lang"], m["body"]) for m in BLOCK.finditer(DOC)]
RUN = [body for src, lang, body in BLOCKS if lang == "python" and src is None]
EXCERPTS = [(src, body) for src, lang, body in BLOCKS if src is not None]


def test_the_page_has_the_four_ways_and_is_linked_from_the_readme():
    assert len(RUN) == 4 and len(EXCERPTS) == 3
    for title in ("## 1. Your own loop", "## 2. `kdgraph train`", "## 3. PyTorch Lightning",
                  "## 4. Hugging Face accelerate", "## Per-batch extras (CRD)", "## Overrides", "## Tap values"):
        assert title in DOC
    assert "docs/your_loop.md" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("i", range(len(RUN)))
def test_python_block_runs(i, monkeypatch):
    monkeypatch.chdir(ROOT)
    torch.set_num_threads(2)
    exec(compile(RUN[i], f"docs/your_loop.md block {i}", "exec"), {"__name__": "doc"})  # noqa: S102


@pytest.mark.parametrize("src, body", EXCERPTS, ids=[s for s, _ in EXCERPTS])
def test_excerpt_is_verbatim(src, body):
    assert body in (ROOT / src).read_text(), f"the block from {src} no longer matches the file"


def test_console_command_trains(tmp_path):
    lines = [line[2:] for _, lang, body in BLOCKS if lang == "console" for line in body.splitlines()
             if line.startswith("$ kdgraph train")]
    assert len(lines) == 1
    args = shlex.split(lines[0])[1:]
    args[args.index("--out") + 1] = str(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", "kdgraph", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "run" / "last.pt").exists()
