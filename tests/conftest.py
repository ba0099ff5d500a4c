"""Shared fixtures: small inputs, random-init torchvision models, specs at 64x64; under pytest-xdist, each worker's
torch threads (the cores shared out between the workers)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import kdgraph

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"


def pytest_configure(config):
    """Under ``pytest -n N`` (pytest-xdist), each of the N workers gets ``cores // N`` torch threads (at least 1)
    instead of every worker using every core; subprocesses inherit it through OMP_NUM_THREADS unless a test
    sets its own. Multi-process tests stay safe in parallel: torchrun runs ``--standalone`` (a free port of
    its own), Lightning picks a free port, and every run folder and cache is a test's own ``tmp_path``."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def small_spec(name: str, size: int = 64):
    """A shipped spec with its input shrunk to ``size`` x ``size`` (same graph, fast on CPU)."""
    spec = kdgraph.load_spec(SPECS / name)
    spec.input.size = (size, size)
    return spec


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 64, 64, generator=g), torch.randint(0, 1000, (4,), generator=g)


REL = 1e-5


def assert_rel(actual, expected, what, rel=REL):
    """``max|actual - expected| <= rel * max|expected|`` (the parity bound against torchdistill)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert scale > 0 and torch.isfinite(actual).all(), what
    assert err <= rel * scale, f"{what}: max abs error {err:.3e} > {rel:g} x {scale:.4e}"


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def sgd_steps_change_only_trained(d, images, targets, steps: int = 2, lr: float = 1e-4) -> dict[str, list[float]]:
    """A few real SGD steps in the current stage. Every parameter of what the stage trains moves;
    teacher, frozen adapters (parameters and BN buffers) stay bit-identical. Returns each term per step."""
    train = set(d.spec.stage(d.stage).train)
    owners = {"student": d.student, **{f"adapter {n}": a for n, a in d.adapters.items()}}
    trains = {k: (k == "student" and "student" in train) or (k.startswith("adapter ") and k[8:] in train)
              for k in owners}
    expected_params = {id(p) for k, m in owners.items() if trains[k] for p in m.parameters()}
    assert {id(p) for p in d.trainable_parameters()} == expected_params
    assert not any(p.requires_grad for p in d.teacher.parameters())
    before = {"teacher": _state(d.teacher), **{k: _state(m) for k, m in owners.items()}}
    opt = torch.optim.SGD(d.trainable_parameters(), lr=lr, momentum=0.9)
    terms: dict[str, list[float]] = {}
    for _ in range(steps):
        out = d(images, targets)
        assert torch.isfinite(out.loss), out.terms
        assert all(torch.isfinite(v) for v in out.terms.values()), out.terms
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        for k, v in out.terms.items():
            terms.setdefault(k, []).append(v.item())
    for k, m in {"teacher": d.teacher, **owners}.items():
        now = m.state_dict()
        if k != "teacher" and trains[k]:
            for name, _ in m.named_parameters():
                assert not torch.equal(now[name], before[k][name]), f"{k}: parameter {name} did not change"
        else:
            for name, v in now.items():
                assert torch.equal(v, before[k][name]), f"{k}: {name} changed in stage {d.stage!r}"
    return terms


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that changes torch's thread count gives it back: a later test in the same worker (an in-process run
    compared bit for bit with a subprocess run, say) must not inherit it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
