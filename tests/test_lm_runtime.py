"""Global token normalisation in kdgraph's step loop (batch:num_tokens): one optimizer step over 8 sequences of
different lengths gives the same update split 1 x 8, 2 x 4 or 8 x 1 (micro-batches x sequences) and over 2 gloo
processes, as the whole batch does; a custom loop gets the same with Distiller.count_tokens. Causal LMs capture
without ``use_cache: false``. The model: a tiny random Llama pair (tests/lm_step.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdgraph
from kdgraph.errors import KDGraphError

sys.path.insert(0, str(Path(__file__).parent))
import lm_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    d = kdgraph.compile(kdgraph.load_spec(lm_step.spec_dict()))
    init = {k: v.clone() for k, v in d.student.state_dict().items()}
    return d, init


def _reference(d, init):
    """One step on the whole batch, the loss normalised by its own count (no num_tokens): the definition."""
    d.student.load_state_dict(init)
    d.train()
    out = d(lm_step.Sequences().batch())
    grads = torch.autograd.grad(out.loss, [p for p in d.student.parameters()])
    names = [n for n, _ in d.student.named_parameters()]
    return out.loss.detach(), {n: init[n] - g for n, g in zip(names, grads)}


def test_use_cache_is_left_on_after_capture(lm):
    d, _ = lm
    assert d.student.config.use_cache is True and d.teacher.config.use_cache is True  # generate() still caches
    assert d.optional_batch_inputs == ["num_tokens"] and d.batch_inputs == []


@pytest.mark.parametrize("batch,accumulate", [(8, 1), (4, 2), (1, 8)])
def test_step_loop_split_gives_the_whole_batch_update(lm, batch, accumulate):
    d, init = lm
    _, expected = _reference(d, init)
    d.student.load_state_dict(init)
    state = lm_step.one_step(d, batch, accumulate)
    for name, want in expected.items():
        torch.testing.assert_close(state[name], want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_per_micro_batch_normalisation_would_differ(lm):
    """Without the step count (each micro-batch divided by its own tokens) 8 x 1 is another update: the check
    above can fail."""
    d, init = lm
    _, expected = _reference(d, init)
    d.student.load_state_dict(init)
    data = lm_step.Sequences()
    params = list(d.student.parameters())
    total = [torch.zeros_like(p) for p in params]
    for i in range(8):
        out = d({k: v[i:i + 1] for k, v in data.batch().items()})
        for t, g in zip(total, torch.autograd.grad(out.loss / 8, params)):
            t += g
    name = next(iter(d.student.named_parameters()))[0]
    assert not torch.allclose(init[name] - total[0], expected[name], rtol=1e-3, atol=1e-5)


def test_custom_loop_with_count_tokens(lm):
    """The documented custom loop: count the step's tokens, pass num_tokens = count / micro_batches."""
    d, init = lm
    loss_ref, expected = _reference(d, init)
    d.student.load_state_dict(init)
    data = lm_step.Sequences().batch()
    micro = [{k: v[i:i + 2] for k, v in data.items()} for i in range(0, 8, 2)]
    count = sum(int(d.count_tokens(m["labels"])) for m in micro)
    assert count == sum(n - 1 for n in lm_step.LENGTHS)  # the causal shift drops each sequence's first label
    params = list(d.student.parameters())
    total, loss = [torch.zeros_like(p) for p in params], 0.0
    for m in micro:
        out = d({**m, "num_tokens": torch.tensor(count / len(micro))})
        loss += out.loss.detach() / len(micro)
        for t, g in zip(total, torch.autograd.grad(out.loss / len(micro), params)):
            t += g
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for (name, _), g in zip(d.student.named_parameters(), total):
        torch.testing.assert_close(init[name] - g, expected[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(KDGraphError, match="unexpected keys"):
        d({**micro[0], "num_token": torch.tensor(3.0)})


def test_two_gloo_processes_give_the_whole_batch_update(lm, tmp_path):
    """2 ranks x 2 micro-batches x 2 sequences through DDP and the step loop's all_reduced count."""
    d, init = lm
    _, expected = _reference(d, init)
    out = tmp_path / "state.pt"
    torch.save(init, str(out) + ".init.pt")
    torch.save(d.teacher.state_dict(), str(out) + ".teacher.pt")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "lm_step.py"), str(out), "2", "2"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = torch.load(out)
    for name, want in expected.items():
        torch.testing.assert_close(state[name], want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
