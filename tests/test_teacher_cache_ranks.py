"""The teacher cache under torchrun: ``kdgraph cache-teacher`` in two real processes (gloo on the CPU, world size
2) writes one shard per rank, rank ``r`` holding images ``r, r + 2, r + 4, ...``; a run with another number of
processes (one, or two) reads both shards; a cache with a shard missing or truncated is refused with one
TeacherCacheError paragraph naming that shard.

Launch: ``python -m torch.distributed.run --standalone --nproc_per_node=2 -m kdgraph ...``, as tests/test_ddp.py.
The two-rank cache is written once per module (``two_rank_cache``); tests that damage it work on a copy.

Tolerance of stored logits: they are float16, rounded to nearest, so each differs from the float32 logit by at
most half an fp16 ulp, ``2**-11`` relative (10 mantissa bits); ``atol=1e-5`` covers fp16 subnormals and the float32
teacher recomputed now on another batch composition (~1e-6 on these logits of magnitude ~0.1-1).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

import kdgraph
from kdgraph.cli import main
from kdgraph.errors import TeacherCacheError
from kdgraph.train import train
from kdgraph.train.checkpoint import Checkpoint
from kdgraph.train.data import build_datasets
from kdgraph.train.teacher_cache import ReplayView, open_for_training, view_seed

sys.path.insert(0, str(Path(__file__).parent))
from test_teacher_cache import make_spec, write_cache  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N, VIEWS = 24, 3  # 12 images per rank
FP16 = {"rtol": 2.0 ** -11, "atol": 1e-5}  # the float16 storage bound (module docstring)


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``kdgraph ARGS`` in two gloo processes on the CPU; fails the test with the output if it fails."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kdgraph", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def two_rank_cache(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A folder with the spec (``spec_cache.yaml``, N Fashion-MNIST images, its cache in ``cache/``), the teacher
    weights, and the cache written by two processes; and the torchrun's output."""
    folder = tmp_path_factory.mktemp("two_ranks")
    spec_path = make_spec(folder, train_subset=N)
    proc = torchrun("cache-teacher", str(spec_path), "--views", str(VIEWS), "--device", "cpu", "--no-progress",
                    "--batch-size", "5", cwd=folder)
    return folder, proc


def copy_of(two_rank_cache, tmp_path: Path) -> Path:
    """A private copy of the two-rank cache's folder (spec, weights, cache), to damage or extend."""
    shutil.copytree(two_rank_cache[0], tmp_path / "c")
    return tmp_path / "c"


def test_two_ranks_write_one_shard_each_and_one_process_replays_both(two_rank_cache, tmp_path):
    """Rank r's shard holds the rows of images r, r + 2, ...: the seeds there are those of image r + 2j, and the
    two shards interleaved are the cache one process writes (seeds and crop parameters equal, logits within
    fp16). A single process then opens the 2-rank cache, and the logits it replays for images of both shards
    are the teacher's on the replayed view; another stored view's logits are not (the check can fail)."""
    folder, proc = two_rank_cache
    cache = folder / "cache"
    assert proc.stdout.count("cache-teacher tc_kd: complete") == 1 and ", 2 processes" in proc.stdout
    assert proc.stdout.count(f"{N // 2}/{N // 2} images") == 1  # rank 0 alone reports progress
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["views"] == VIEWS and manifest["data"]["images"] == N
    names = sorted(p.name for p in cache.iterdir())
    assert names == ["manifest.json"] + [f"rank{r:03d}-of-002.{x}" for r in (0, 1)
                                         for x in ("json", "logits.npy", "params.npy", "seeds.npy")]
    shards = [{x: np.load(cache / f"rank{r:03d}-of-002.{x}.npy") for x in ("logits", "seeds", "params")}
              for r in (0, 1)]
    for r, shard in enumerate(shards):
        assert json.loads((cache / f"rank{r:03d}-of-002.json").read_text())["rows"] == N // 2
        assert shard["logits"].shape == (N // 2, VIEWS, 10) and shard["logits"].dtype == np.float16
        assert shard["seeds"].tolist() == [[view_seed(0, i, v) for v in range(VIEWS)] for i in range(r, N, 2)]

    # the same cache written by one process: rows of image i are row i // 2 of shard i % 2
    (tmp_path / "one").mkdir()
    shutil.copy(folder / "teacher.pt", tmp_path / "one" / "teacher.pt")
    write_cache(make_spec(tmp_path / "one", train_subset=N), views=VIEWS)
    one = {x: np.load(tmp_path / "one" / "cache" / f"rank000-of-001.{x}.npy") for x in ("logits", "seeds", "params")}
    for x in ("seeds", "params"):
        assert np.array_equal(np.stack([shards[i % 2][x][i // 2] for i in range(N)]), one[x]), x
    interleaved = torch.from_numpy(np.stack([shards[i % 2]["logits"][i // 2] for i in range(N)])).float()
    torch.testing.assert_close(interleaved, torch.from_numpy(one["logits"]).float(), **FP16)

    # one process replays the 2-rank cache: images of both shards, epochs 0 and 1
    spec = kdgraph.load_spec(folder / "spec_cache.yaml")
    bundle = build_datasets(spec)
    d = kdgraph.compile(spec)
    d.load_weights()
    reader = open_for_training(spec, d.teacher, bundle.train, None)
    assert reader.world == 2
    keys = [(i, e) for e in (0, 1) for i in (0, 1, 6, 7, 22, 23)]
    batch = ReplayView(bundle.train, spec.runtime.seed, reader).__getitems__(keys)
    d.teacher.eval()
    with torch.no_grad():
        now = d.teacher(batch.images)
    stored = batch.extras["teacher_output"]
    torch.testing.assert_close(stored, now, **FP16)
    assert (stored - now).abs().max() > 0  # the fp16 rounding is there, so the tolerance is not vacuous
    idx, views = ReplayView(bundle.train, spec.runtime.seed, reader)._views(keys)
    other = reader.outputs(idx, [(v + 1) % VIEWS for v in views])["teacher_output"]
    assert not torch.allclose(other, now, **FP16)  # another view's logits would fail the check


def test_a_two_rank_cache_missing_or_truncating_a_shard_is_refused_naming_it(two_rank_cache, tmp_path):
    """A 2-rank cache whose rank-1 shard has no entry (a rank still writing, or killed), has lost an array, or
    has a truncated one, is refused when training opens it, with one TeacherCacheError paragraph that names
    the shard or file (no traceback from the CLI). Completing it with another number of processes is refused
    too: the rows of a rank depend on the world size."""
    folder = copy_of(two_rank_cache, tmp_path)
    cache = folder / "cache"
    spec = kdgraph.load_spec(folder / "spec_cache.yaml")
    bundle = build_datasets(spec)
    d = kdgraph.compile(spec)
    d.load_weights()

    def refused() -> str:
        with pytest.raises(TeacherCacheError) as e:
            open_for_training(spec, d.teacher, bundle.train, None)
        assert "\n" not in str(e.value)
        return str(e.value)

    open_for_training(spec, d.teacher, bundle.train, None)  # intact: opens
    entry = cache / "rank001-of-002.json"
    entry.rename(tmp_path / "entry.json")
    assert "is incomplete: shard rank001-of-002 (rank 1 of 2) is missing" in refused()
    r = CliRunner().invoke(main, ["train", str(folder / "spec_cache.yaml"), "--out", str(tmp_path / "run"),
                                  "--device", "cpu", "--no-progress"])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "shard rank001-of-002 (rank 1 of 2) is missing" in " ".join(r.output.split())
    (tmp_path / "entry.json").rename(entry)

    logits = cache / "rank001-of-002.logits.npy"
    data = logits.read_bytes()
    logits.write_bytes(data[:-64])
    assert "is damaged: rank001-of-002.logits.npy has" in refused() and "(truncated or overwritten)" in refused()
    logits.write_bytes(data)
    seeds = cache / "rank001-of-002.seeds.npy"
    seeds.rename(tmp_path / "seeds.npy")
    assert "is damaged: rank001-of-002.seeds.npy is missing" in refused()
    (tmp_path / "seeds.npy").rename(seeds)
    open_for_training(spec, d.teacher, bundle.train, None)  # restored: opens again

    with pytest.raises(TeacherCacheError, match=r"the number of processes differs \(cache: 2; this run: 1\)"):
        write_cache(folder / "spec_cache.yaml", views=VIEWS)


def test_two_processes_train_from_the_two_rank_cache_like_one_process(two_rank_cache, tmp_path):
    """Training replays the 2-rank cache in two gloo processes (each reading both shards) and ends with the
    parameters one process reaches from the same cache on the same global batch (8 = 2 x 4), as
    tests/test_ddp.py checks for online teachers. The student normalises with GroupNorm (per-process BatchNorm
    statistics cannot match one process); the cache stays valid, since it depends on the teacher side only.
    Tolerance rtol 1e-4, atol 1e-6: the gradient all-reduce sums in another order (tests/test_ddp.py)."""
    folder = copy_of(two_rank_cache, tmp_path)
    spec_path = folder / "spec_cache.yaml"
    raw = yaml.safe_load(spec_path.read_text())
    raw["student"]["kwargs"]["norm"] = "group"
    raw["stages"][0].update(epochs=1, batch_size=8)
    spec_path.write_text(yaml.safe_dump(raw, sort_keys=False))

    proc = torchrun("train", str(spec_path), "--out", str(tmp_path / "two"), "--device", "cpu", "--no-progress",
                    "--set", "stages.main.batch_size=4", "--set", "stages.main.reference_world_size=2", cwd=folder)
    assert "x 2 processes (gloo)" in proc.stdout and "teacher cache: teacher:@output replayed" in proc.stdout
    one = train(spec_path, out=tmp_path / "one", device="cpu", progress=False, plot=False, tensorboard=False)
    assert one["stages"][0]["effective_batch"] == 8
    a, b = Checkpoint.load(tmp_path / "one" / "last.pt"), Checkpoint.load(tmp_path / "two" / "last.pt")
    assert a.global_step == b.global_step == N // 8
    assert not torch.equal(a.student["fc.weight"], kdgraph.models.zoo.tiny_cnn(width=4, norm="group").fc.weight)
    for k, v in a.student.items():
        torch.testing.assert_close(b.student[k], v, rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
