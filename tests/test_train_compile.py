"""``runtime.compile: true``: the distiller's fused GraphModule runs through torch.compile (inductor, CPU) for a
few training steps; the losses are finite and match eager execution of the same steps."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from kdgraph.train import train

sys.path.insert(0, str(Path(__file__).parent))
from test_train import QUIET, tiny_spec  # noqa: E402


def losses(out: Path) -> list[float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["event"] == "train"]


def test_compile_runs_a_few_steps_like_eager(tmp_path):
    eager = train(tiny_spec(train_subset=64, val_subset=32), out=tmp_path / "eager", **QUIET)
    compiled = train(tiny_spec(train_subset=64, val_subset=32, runtime={"compile": True}), out=tmp_path / "compiled",
                     **QUIET)
    assert compiled["compile"] is True
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(b) == 2 and all(math.isfinite(x) for x in b)
    assert b == pytest.approx(a, rel=1e-4)
    assert compiled["student"]["top1"] == pytest.approx(eager["student"]["top1"], abs=100 / 32 + 1e-9)
