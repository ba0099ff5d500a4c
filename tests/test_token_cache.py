"""The per-token top-K teacher cache of a causal LM (issue 25 part 5): bit-packed ids at 17 and 18 bits; the sparse
forward KL against the live teacher's top-K support and, at K = V, against the dense token_kl; a cache written by
cache_tokens read back equal to the live teacher's top-K (bf16 values) and served to the fused graph in place of
teacher:lm_head (the teacher pruned); a kill -9 of `kdgraph cache-teacher` resumed to a byte-identical cache; stale
caches (other teacher weights, tokenizer or K) refused. Tiny random Llama pair (vocab 512, seq 16), CPU."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.nn import functional as F

import kdgraph
from kdgraph.errors import KDGraphError, TeacherCacheError
from kdgraph.methods.token_kl import TokenKL
from kdgraph.methods.token_sparse import sparse_from_logits, sparse_forward_kl
from kdgraph.models import build_model
from kdgraph.train.teacher_cache import open_for_training
from kdgraph.train.teacher_cache.bitpack import id_bits, pack_ids, packed_bytes, unpack_ids
from kdgraph.train.teacher_cache.token_data import TokenArrays
from kdgraph.train.teacher_cache.token_reader import open_token_cache
from kdgraph.train.teacher_cache.tokens import cache_tokens, describe_tokens

V, T, N = 512, 16, 24
BF16 = 2.0 ** -8  # bf16's relative rounding step: the tolerance of values read back from the cache


def _config(hidden, layers, inter):
    return {"model_type": "llama", "vocab_size": V, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": 2, "intermediate_size": inter, "max_position_embeddings": 64, "use_cache": False}


def make_spec(tmp: Path, cache: str | None = None, weights_seed: int = 0, write_weights: bool = True) -> Path:
    """A token_kl spec (tiny Llama 2 x 48 -> 2 x 32) whose teacher weights are a file, caching teacher:lm_head."""
    spec = {"name": "tok_cache",
            "input": {"named": {"input_ids": {"shape": [T], "dtype": "int64", "high": V},
                                "attention_mask": {"shape": [T], "dtype": "int64"}}},
            "teacher": {"model": "hf:AutoModelForCausalLM", "kwargs": {"config": _config(48, 2, 96)},
                        "weights": str(tmp / f"teacher{weights_seed}.pt")},
            "student": {"model": "hf:AutoModelForCausalLM", "kwargs": {"config": _config(32, 2, 64)}},
            "stages": [{"name": "main", "epochs": 1, "batch_size": 4, "optimizer": {"type": "adamw", "lr": 1e-3},
                        "train": ["student"],
                        "losses": [{"name": "kd", "type": "token_kl", "args": {"temperature": 2.0},
                                    "inputs": {"student": "student:lm_head", "teacher": "teacher:lm_head"}}]}],
            "data": {"dataset": "synthetic"},
            "runtime": {"teacher_cache_tap": "teacher:lm_head", **({"teacher_cache": cache} if cache else {})}}
    path = tmp / f"spec_{weights_seed}_{cache is not None}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    s = kdgraph.load_spec(path)
    if write_weights and not Path(s.teacher.weights).exists():
        torch.manual_seed(weights_seed)
        torch.save(build_model(s.teacher, "teacher").state_dict(), s.teacher.weights)
    return path


def make_sequences(path: Path, n: int = N) -> Path:
    g = np.random.default_rng(1)
    ids = g.integers(0, V, (n, T))
    mask = np.ones_like(ids)
    labels = ids.copy()
    labels[:, :3] = -100              # a prompt
    labels[1::5, 11:] = -100          # padding
    mask[1::5, 11:] = 0
    np.savez(path, input_ids=ids, attention_mask=mask, labels=labels)
    return path


def teacher_of(spec) -> torch.nn.Module:
    t = build_model(spec.teacher, "teacher")
    t.load_state_dict(torch.load(spec.teacher.weights))
    return t.eval()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A spec, its teacher, sequences, a tokenizer folder and a top-32 cache (T = 2) written in-process."""
    tmp = tmp_path_factory.mktemp("tokcache")
    spec = kdgraph.load_spec(make_spec(tmp))
    seqs = make_sequences(tmp / "seqs.npz")
    tok = tmp / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text(json.dumps({"vocab": {f"t{i}": i for i in range(V)}}))
    teacher = teacher_of(spec)
    summary = cache_tokens(spec, tmp / "cache", 32, sequences=str(seqs), tokenizer=str(tok), device="cpu",
                           batch_size=8, say=lambda m: None, teacher=teacher)
    return tmp, spec, TokenArrays(seqs), tok, teacher, summary


@pytest.mark.parametrize("bits", [17, 18])
def test_id_packing_round_trip_at_17_and_18_bits(bits):
    g = np.random.default_rng(bits)
    ids = g.integers(0, 1 << bits, (7, 128))
    ids[0, 0], ids[0, 1] = 0, (1 << bits) - 1          # both ends of the range
    packed = pack_ids(ids, bits)
    assert packed.shape == (7, packed_bytes(128, bits)) == (7, 16 * bits) and packed.dtype == np.uint8
    assert np.array_equal(unpack_ids(packed, 128, bits), ids)
    assert id_bits(49152) == 16 and id_bits(131072) == 17 and id_bits(151936) == 18 and id_bits(512) == 9
    with pytest.raises(ValueError, match="ids must lie"):
        pack_ids(ids, bits - 1)


def test_sparse_kl_is_the_restricted_live_kl_and_the_dense_kl_at_k_equal_v():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 9, 40, generator=g, requires_grad=True)
    t = torch.randn(2, 9, 40, generator=g) * 3
    labels = torch.randint(0, 40, (2, 9), generator=g)
    labels[0, :3] = -100
    kl = TokenKL(temperature=2.0)
    keep = kl.token_mask(labels)
    rows_t, rows_s = kl.align(t)[keep], kl.align(s)[keep]
    # K = V: equal to the dense token_kl (values and gradients, fp32)
    dense = kl(s, t, labels)
    full = kl(s, sparse_from_logits(rows_t, 40, 2.0), labels)
    torch.testing.assert_close(full, dense, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.autograd.grad(full, s)[0], torch.autograd.grad(dense, s)[0], rtol=1e-5,
                               atol=1e-7)
    # K < V: the K + 1-outcome KL written out by hand from the live teacher
    k = 6
    p_t = F.softmax(rows_t / 2.0, -1)
    top = p_t.topk(k, -1)
    p_s = F.softmax(rows_s / 2.0, -1)
    q_s = p_s.gather(-1, top.indices)
    m_t, m_s = 1 - top.values.sum(-1), 1 - q_s.sum(-1)
    by_hand = ((top.values * (top.values.log() - q_s.log())).sum(-1) + m_t * (m_t.log() - m_s.log())).mean()
    sparse = kl(s, sparse_from_logits(rows_t, k, 2.0), labels)
    torch.testing.assert_close(sparse, by_hand, rtol=1e-5, atol=1e-7)
    zero = TokenKL(temperature=2.0, sparse_tail="zero")(s, sparse_from_logits(rows_t, k, 2.0), labels)
    torch.testing.assert_close(zero, (top.values * (top.values.log() - q_s.log())).sum(-1).mean(), rtol=1e-5,
                               atol=1e-7)
    assert sparse < dense  # the K + 1-outcome KL is a lower bound (data processing inequality)
    with pytest.raises(KDGraphError, match="temperature 2 but the loss uses 1"):
        TokenKL()(s, sparse_from_logits(rows_t, k, 2.0), labels)
    with pytest.raises(KDGraphError, match=f"holds {len(rows_t) - 1} tokens but the labels keep {len(rows_t)}"):
        kl(s, sparse_from_logits(rows_t[:-1], k, 2.0), labels)


def test_cache_round_trip_and_fused_graph_read_it_as_the_live_teacher(written):
    tmp, spec, data, tok, teacher, summary = written
    assert summary["bytes_per_token"] == packed_bytes(32, 9) + 2 * 32 + 4 == 104
    files = sum(f.stat().st_size for f in (tmp / "cache").glob("rank000-of-001.[ilt]*.npy"))
    assert files - 3 * 128 <= summary["bytes_per_token"] * summary["kept_tokens"] <= files  # .npy headers only
    reader = open_token_cache(tmp / "cache", describe_tokens(spec, teacher, data, str(tok)), "runtime.teacher_cache")
    idx = [5, 0, 11]
    batch = data.get_batch(idx)
    with torch.no_grad():
        live = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    keep = batch["labels"][:, 1:] != -100
    ref = sparse_from_logits(live[:, :-1][keep], 32, 2.0)
    got = reader.sparse(idx)
    assert torch.equal(got.ids, ref.ids) and got.logp.dtype == torch.bfloat16
    torch.testing.assert_close(got.logp.float(), ref.logp, rtol=BF16, atol=0)
    torch.testing.assert_close(got.tail, ref.tail, rtol=1e-6, atol=1e-7)
    # the compiled spec reads teacher:lm_head from the batch: no teacher node left, the loss is the live one's
    cached = kdgraph.load_spec(make_spec(tmp, cache=str(tmp / "cache")))
    d = kdgraph.compile(cached)
    assert d.report.cached_taps == {"teacher:lm_head": "teacher_output"}
    assert [n.name for n in d.graph_module.graph.nodes if n.name.startswith("teacher")] == ["teacher_output"]
    out = d({**batch, "teacher_output": got})
    s_rows = d.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
    # equal to the live teacher's loss on the same support once its log-probs are rounded to bf16 as stored
    rounded = sparse_from_logits(live[:, :-1][keep], 32, 2.0)
    rounded.logp = rounded.logp.to(torch.bfloat16)
    torch.testing.assert_close(out.loss, sparse_forward_kl(s_rows, rounded, 2.0).mean(), rtol=1e-5, atol=1e-8)
    # and to the fp32 live loss within bf16's rounding: |dL| <= sum_k p_t,k |1 + log p_t,k - log p_s,k| |log p_t,k|
    # 2^-9 per token (first order in the rounding of each stored log-prob, relative error <= 2^-9)
    live_loss = sparse_forward_kl(s_rows, ref, 2.0).mean()
    log_ps = F.log_softmax(s_rows.detach() / 2.0, -1).gather(-1, ref.ids)
    bound = (ref.logp.exp() * (1 + ref.logp - log_ps).abs() * ref.logp.abs()).sum(-1).mean() * BF16 / 2
    assert abs(out.loss.item() - live_loss.item()) <= 1.5 * bound.item() and bound < 0.05
    (g_cache,) = torch.autograd.grad(out.loss, d.student.lm_head.weight)
    assert g_cache.abs().sum() > 0
    # split into micro-batches (rows 0:1 and 1:3), each with its rows' records: the token-weighted mean is the same
    n = keep.sum(1)
    parts = [d({k: v[a:b] for k, v in batch.items()} | {"teacher_output": got.rows(a, b)}).loss * n[a:b].sum()
             for a, b in ((0, 1), (1, 3))]
    torch.testing.assert_close(sum(parts) / n.sum(), out.loss, rtol=1e-5, atol=1e-8)
    # the same sequences in another order keep as many tokens in all, but not row by row: refused
    with pytest.raises(KDGraphError, match="batch row 0 keeps"):
        d({k: v.flip(0) for k, v in batch.items()} | {"teacher_output": got})


def test_stale_token_caches_are_refused(written):
    tmp, spec, data, tok, teacher, _ = written
    where = "runtime.teacher_cache"
    other = teacher_of(kdgraph.load_spec(make_spec(tmp, weights_seed=1)))
    with pytest.raises(TeacherCacheError, match=r"the teacher's weights \(sha256 of its state_dict\) differs"):
        open_token_cache(tmp / "cache", describe_tokens(spec, other, data, str(tok)), where)
    tok2 = tmp / "tok2"
    tok2.mkdir(exist_ok=True)
    (tok2 / "tokenizer.json").write_text(json.dumps({"vocab": {f"u{i}": i for i in range(V)}}))
    with pytest.raises(TeacherCacheError, match="the tokenizer differs"):
        open_token_cache(tmp / "cache", describe_tokens(spec, teacher, data, str(tok2)), where)
    # kdgraph train's check: the tokenizer is the training set's own record; sequences without one are refused
    cached = kdgraph.load_spec(make_spec(tmp, cache=str(tmp / "cache")))
    with pytest.raises(TeacherCacheError, match=r"the tokenizer differs \(cache: \{.*\}; this run: null\)"):
        open_for_training(cached, teacher, data, None)
    with pytest.raises(TeacherCacheError, match=r"K \(the top-K size\) differs \(cache: 32; this run: 64\)"):
        open_token_cache(tmp / "cache", describe_tokens(spec, teacher, data, str(tok)), where, topk=64)
    with pytest.raises(TeacherCacheError, match=r"--topk \(K\) differs"):  # continuing it with another K
        cache_tokens(spec, tmp / "cache", 64, sequences=str(tmp / "seqs.npz"), tokenizer=str(tok), device="cpu",
                     say=lambda m: None, teacher=teacher)


def _cli(args, cwd, **kw):
    env = {**os.environ, "PYTHONPATH": str(Path(kdgraph.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "kdgraph", "cache-teacher", *args], cwd=cwd, env=env, **kw)


def test_kill_9_during_cache_teacher_resumes_to_the_uninterrupted_cache(tmp_path):
    spec = make_spec(tmp_path)
    seqs = make_sequences(tmp_path / "seqs.npz", n=96)
    args = [str(spec), "--topk", "16", "--sequences", str(seqs), "--batch-size", "2", "--device", "cpu",
            "--no-progress"]
    progress = tmp_path / "killed" / "rank000-of-001.progress.json"
    proc = _cli([*args, "--out", str(tmp_path / "killed")], tmp_path, stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not progress.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "rank000-of-001.json").exists()  # it was stopped mid-way
    done = json.loads(progress.read_text())["done"]
    assert 2 <= done < 96
    s = kdgraph.load_spec(spec)  # resumed in-process (the same cache_tokens the command runs) to spare CI a start
    teacher = teacher_of(s)
    summary = cache_tokens(s, tmp_path / "killed", 16, sequences=str(seqs), device="cpu", batch_size=2,
                           say=lambda m: None, teacher=teacher)
    assert 0 < summary["computed_tokens"] < summary["kept_tokens"]  # only the sequences after the last commit
    cache_tokens(s, tmp_path / "whole", 16, sequences=str(seqs), device="cpu", batch_size=2, say=lambda m: None,
                 teacher=teacher)
    for name in ("ids", "logp", "tail", "offsets"):
        a = (tmp_path / "killed" / f"rank000-of-001.{name}.npy").read_bytes()
        assert a == (tmp_path / "whole" / f"rank000-of-001.{name}.npy").read_bytes(), name


def test_two_ranks_write_one_shard_each_and_read_as_one_cache(written):
    tmp, spec, data, tok, teacher, _ = written
    env = dict(os.environ, PYTHONPATH=str(Path(kdgraph.__file__).parents[1]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kdgraph",
           "cache-teacher", str(tmp / "spec_0_False.yaml"), "--topk", "32", "--sequences", str(tmp / "seqs.npz"),
           "--tokenizer", str(tok), "--batch-size", "5", "--device", "cpu", "--no-progress", "--json", "--out",
           str(tmp / "two")]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((tmp / "two" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and sum(manifest["shard_tokens"]) == manifest["kept_tokens"]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])  # rank 0's summary counts both ranks' tokens
    assert summary["computed_tokens"] == manifest["kept_tokens"] == summary["kept_tokens"]
    for r in (0, 1):  # rank r holds sequences r, r + 2, ...: its kept tokens only
        offsets = np.load(tmp / "two" / f"rank00{r}-of-002.offsets.npy")
        assert offsets[-1] == manifest["shard_tokens"][r] and len(offsets) == N // 2 + 1
    expected = describe_tokens(spec, teacher, data, str(tok))
    one = open_token_cache(tmp / "cache", expected, "one")
    two = open_token_cache(tmp / "two", expected, "two")
    idx = list(range(N))
    a, b = one.sparse(idx), two.sparse(idx)
    assert torch.equal(a.ids, b.ids)  # another batch composition: the fp32 teacher agrees to ~1e-7, bf16 to 1 step
    torch.testing.assert_close(a.logp.float(), b.logp.float(), rtol=BF16, atol=0)
    torch.testing.assert_close(a.tail, b.tail, rtol=1e-5, atol=1e-7)


def test_the_training_loader_batches_carry_the_sparse_teacher(written):
    from kdgraph.train.data import make_loader
    from kdgraph.train.teacher_cache.token_reader import TokenReplayView

    tmp, spec, data, tok, teacher, _ = written
    reader = open_token_cache(tmp / "cache", describe_tokens(spec, teacher, data, str(tok)), "runtime.teacher_cache")
    loader = make_loader(data, batch_size=4, train=True, workers=0, seed=0, view=TokenReplayView(data, reader))
    loader.sampler.set_epoch(0)
    batch = next(iter(loader))
    keep = batch["labels"][:, 1:] != -100
    assert len(batch["teacher_output"]) == int(keep.sum())  # the kept tokens of exactly these sequences
    idx = [int(np.flatnonzero((data.tensors["input_ids"] == row).all(1).numpy())[0]) for row in batch["input_ids"]]
    assert torch.equal(batch["teacher_output"].ids, reader.sparse(idx).ids)


def test_cache_teacher_asks_for_topk_not_views_on_a_token_spec(tmp_path):
    from click.testing import CliRunner

    from kdgraph.cli import main

    spec = make_spec(tmp_path, write_weights=False)
    res = CliRunner().invoke(main, ["cache-teacher", str(spec), "--views", "2", "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "give --topk K (e.g. 128) and no --views" in res.output, res.output
    assert not (tmp_path / "c").exists()


def test_sparse_tail_mass_by_complement_and_by_log_sum_exp_agree_with_float64():
    """m_s = 1 - sum_k p_s,k (float64) on most rows, a log-sum-exp outside the support where the student's support
    mass is above 0.95: both against an all-float64 log-sum-exp reference, values rtol 1e-5, gradients rtol 1e-4."""
    from kdgraph.methods.token_sparse import COMPLEMENT_FLOOR

    g = torch.Generator().manual_seed(7)
    top = sparse_from_logits(torch.randn(6, 300, generator=g) * 3, 8, 1.0)
    s = torch.randn(6, 300, generator=g)
    for row, boost in enumerate((6.0, 12.0, 25.0)):    # the student piled on the support: m_s ~1e-1 .. 1e-9
        s[row, top.ids[row]] += boost
    s.requires_grad_()
    z = s.double()
    log_z = torch.logsumexp(z, -1)
    log_ps = z.gather(-1, top.ids) - log_z[:, None]
    log_ms = torch.logsumexp(z.scatter(-1, top.ids, float("-inf")), -1) - log_z
    m_t, log_pt = top.tail.double(), top.logp.double()
    want = (log_pt.exp() * (log_pt - log_ps)).sum(-1) + m_t * (m_t.log() - log_ms)
    m_s = log_ms.exp()
    assert (m_s[1:3] < COMPLEMENT_FLOOR).all() and (m_s[3:] > COMPLEMENT_FLOOR).all()   # both branches run
    got = sparse_forward_kl(s, top, 1.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    (g_got,) = torch.autograd.grad(got.sum(), s)
    (g_want,) = torch.autograd.grad(want.sum(), s)
    torch.testing.assert_close(g_got.double(), g_want.double(), rtol=1e-4, atol=1e-7)
