"""examples/custom_loop.py trains every shipped spec, all stages, on random tensors (32x32, batch 4, 2 steps a stage)."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from conftest import ROOT, SPECS

# specs/glue/ takes named token inputs and BERT-Large / BERT-Base, not 32x32 images: tests/test_glue.py covers it;
# specs/lm/ (causal LMs on token sequences): tests/test_lm_runtime.py, tests/test_text_data.py
ALL_SPECS = sorted(p.relative_to(SPECS).as_posix() for p in SPECS.rglob("*.yaml")
                   if p.parent.name not in ("glue", "lm"))


def _example():
    spec = importlib.util.spec_from_file_location("custom_loop_example", ROOT / "examples" / "custom_loop.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


EXAMPLE = _example()


def test_every_shipped_spec_is_covered():
    assert len(ALL_SPECS) >= 23 and "crd_resnet18.yaml" in ALL_SPECS and "sskd_resnet18.yaml" in ALL_SPECS
    assert "fashion_mnist/crd.yaml" in ALL_SPECS and "fashion_mnist/sskd.yaml" in ALL_SPECS


@pytest.mark.parametrize("name", ALL_SPECS)
def test_custom_loop_trains_every_stage(name, capsys):
    import kdgraph

    stages = [s.name for s in kdgraph.load_spec(SPECS / name).stages]
    torch.set_num_threads(2)
    losses = EXAMPLE.train_spec(SPECS / name, steps=2, size=32, batch=4, samples=16)
    assert list(losses) == stages
    assert all(len(v) == 2 and all(math.isfinite(x) for x in v) for v in losses.values()), losses
    out = capsys.readouterr().out
    assert f"stages trained: {', '.join(stages)}" in out
