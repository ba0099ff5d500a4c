"""The teacher output cache: kdgraph cache-teacher writes R views per image with the teacher's logits, training
replays them (no teacher node runs), stale or incomplete caches are refused, a killed cache-teacher resumes, a
resumed training replays the same draws, and --topk changes the KD loss by a bounded amount. Tiny Fashion-MNIST
subsets, TinyCNN teacher (width 8) -> student (width 4), random init, CPU; and an ImageNet-layout folder of real
JPEGs, whose replayed views are the recorded crop boxes and flips applied to the decoded image.
Multi-process (torchrun) caches: tests/test_teacher_cache_ranks.py."""
from __future__ import annotations

import json
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
from kdgraph.train.data import ResumableSampler, build_datasets
from kdgraph.train.teacher_cache import ReplayView, cache_teacher, fill_topk, open_for_training, view_of_epoch
from kdgraph.models.zoo import tiny_cnn

sys.path.insert(0, str(Path(__file__).parent))
from test_data import foolbox_image_folder  # noqa: E402

N = 96


def make_spec(tmp: Path, cache: str | None = "cache", losses=None, **data) -> Path:
    """A KD spec over N Fashion-MNIST images whose teacher weights are a file in ``tmp``."""
    if not (tmp / "teacher.pt").exists():
        torch.manual_seed(3)
        torch.save(tiny_cnn(width=8).state_dict(), tmp / "teacher.pt")
    spec = {"name": "tc_kd", "input": {"channels": 1, "size": [28, 28], "num_classes": 10},
            "teacher": {"model": "kdgraph.zoo:tiny_cnn", "kwargs": {"width": 8}, "weights": "./teacher.pt"},
            "student": {"model": "kdgraph.zoo:tiny_cnn", "kwargs": {"width": 4}},
            "stages": [{"name": "main", "epochs": 2, "batch_size": 32,
                        "optimizer": {"type": "sgd", "lr": 0.05, "momentum": 0.9},
                        "losses": losses or [{"name": "ce", "type": "cross_entropy", "weight": 0.5},
                                             {"name": "kd", "type": "kd", "weight": 0.5,
                                              "args": {"temperature": 4.0}}]}],
            "data": {"dataset": "fashion_mnist", "train_subset": N, "val_subset": 32, "workers": 0, **data},
            "runtime": {"seed": 0, **({"teacher_cache": cache} if cache else {})}}
    path = tmp / f"spec_{cache or 'online'}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def write_cache(spec_path: Path, views: int = 3, **kw) -> dict:
    spec = kdgraph.load_spec(spec_path)
    return cache_teacher(spec, views, Path(spec.runtime.teacher_cache), device="cpu", batch_size=20,
                         progress=False, say=lambda m: None, **kw)


def replay_batch(spec, epoch: int, keys: list[int]):
    """The cache's replayed batch of images ``keys`` in ``epoch``, and the cache."""
    bundle = build_datasets(spec)
    d = kdgraph.compile(spec)
    d.load_weights()
    cache = open_for_training(spec, d.teacher, bundle.train, None)
    return ReplayView(bundle.train, spec.runtime.seed, cache).__getitems__([(i, epoch) for i in keys]), cache, d


def test_round_trip_replayed_view_gives_the_online_teacher_loss(tmp_path):
    spec_path = make_spec(tmp_path)
    summary = write_cache(spec_path)
    assert summary["computed_images"] == N and summary["images"] == N
    spec = kdgraph.load_spec(spec_path)
    batch, cache, cached = replay_batch(spec, epoch=1, keys=list(range(0, 64, 2)))
    assert cached.report.cached_taps == {"teacher:@output": "teacher_output"}
    assert cached.batch_inputs == ["teacher_output"] and not cached.report.uses_teacher
    assert not any(n.name.startswith("teacher_") and n.op != "placeholder" for n in cached.graph_module.graph.nodes)
    online = kdgraph.compile(make_spec(tmp_path, cache=None))
    online.load_weights()
    online.student.load_state_dict(cached.student.state_dict())
    online.eval(), cached.eval()
    with torch.no_grad():
        teacher_logits = online.teacher(batch.images)
        stored = batch.extras["teacher_output"]
        # the student sees exactly the view the teacher saw: the teacher on the replayed images gives the stored logits
        assert (stored - teacher_logits).abs().max() <= 2e-3 * teacher_logits.abs().max()
        a = online(batch.images, batch.targets)
        b = cached(batch.images, batch.targets, teacher_output=stored)
    assert torch.allclose(a.terms["ce"], b.terms["ce"])
    rel = (a.terms["kd"] - b.terms["kd"]).abs() / a.terms["kd"].abs()
    assert rel < 1e-3, f"KD with cached fp16 logits differs by {rel.item():.2e} (relative)"
    # the views differ between epochs for some images, and the view index follows the documented rule
    views = [view_of_epoch(0, e, 4, cache.views) for e in range(8)]
    assert len(set(views)) > 1


def test_training_with_the_cache_runs_and_cli_refuses_stale_caches(tmp_path):
    spec_path = make_spec(tmp_path)
    write_cache(spec_path)
    run = CliRunner().invoke(main, ["train", str(spec_path), "--out", str(tmp_path / "run"), "--device", "cpu",
                                    "--no-progress"])
    assert run.exit_code == 0, run.output
    assert "teacher cache: teacher:@output replayed" in run.output and "online teacher: none" in run.output
    summary = CliRunner().invoke(main, ["compile", str(spec_path), "--json"])
    assert json.loads(summary.output)["stages"][0]["cached_taps"] == {"teacher:@output": "teacher_output"}

    def refused(*extra: str, spec: Path = spec_path) -> str:
        r = CliRunner().invoke(main, ["train", str(spec), "--out", str(tmp_path / "r"), "--device", "cpu",
                                      "--no-progress", "--overwrite", *extra])
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        return " ".join(r.output.split())

    assert "data.train_subset differs" in refused("--set", "data.train_subset=64")
    assert "runtime.seed differs" in refused("--set", "runtime.seed=1")
    torch.save(tiny_cnn(width=8).state_dict(), tmp_path / "other.pt")
    assert "the teacher's weights (sha256 of its state_dict) differs" in refused("--set", f"teacher.weights={tmp_path / 'other.pt'}")
    cache = tmp_path / "cache"
    logits = cache / "rank000-of-001.logits.npy"
    data = logits.read_bytes()
    logits.write_bytes(data[: len(data) - 100])
    assert "damaged: rank000-of-001.logits.npy has" in refused() and "truncated" in refused()
    logits.write_bytes(data)
    (cache / "rank000-of-001.json").rename(tmp_path / "entry.json")
    assert "incomplete: shard rank000-of-001" in refused()
    assert "does not exist" in refused("--teacher-cache", str(tmp_path / "nowhere"))


def interrupt_at(teacher: torch.nn.Module, stop_at: int | None) -> dict:
    """Stop the teacher (as a kill would) at its ``stop_at``-th forward; count the images it runs on."""
    seen = {"calls": 0, "images": 0}

    def hook(module, args):
        seen["calls"] += 1
        if stop_at is not None and seen["calls"] == stop_at:
            raise KeyboardInterrupt
        seen["images"] += args[0].shape[0]

    teacher._forward_pre_hooks.clear()
    teacher.register_forward_pre_hook(hook)
    return seen


def test_killed_cache_teacher_resumes_where_it_stopped(tmp_path):
    spec_path = make_spec(tmp_path)
    spec = kdgraph.load_spec(spec_path)
    teacher = tiny_cnn(width=8)
    teacher.load_state_dict(torch.load(tmp_path / "teacher.pt"))
    interrupt_at(teacher, stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        write_cache(spec_path, teacher=teacher)
    cache = Path(spec.runtime.teacher_cache)
    assert (cache / "rank000-of-001.progress.json").is_file() and not (cache / "rank000-of-001.json").exists()
    assert not (cache / "rank000-of-001.logits.npy").exists()  # only *.partial: never taken for complete
    with pytest.raises(TeacherCacheError, match="incomplete.*still being written or was stopped"):
        replay_batch(spec, 0, [0])
    second = interrupt_at(teacher, stop_at=None)
    summary = write_cache(spec_path, teacher=teacher)
    assert summary["computed_images"] == N - 40 and second["images"] == (N - 40) * 3  # 2 blocks of 20 were kept
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "teacher.pt").write_bytes((tmp_path / "teacher.pt").read_bytes())
    write_cache(make_spec(tmp_path / "fresh"))
    for name in ("logits", "seeds", "params"):
        a = np.load(cache / f"rank000-of-001.{name}.npy")
        b = np.load(tmp_path / "fresh" / "cache" / f"rank000-of-001.{name}.npy")
        assert np.array_equal(a, b), name
    with pytest.raises(TeacherCacheError, match="--views differs"):
        write_cache(spec_path, views=2)


def test_resume_mid_epoch_replays_the_same_draws(tmp_path):
    spec_path = make_spec(tmp_path)
    write_cache(spec_path)
    spec = kdgraph.load_spec(spec_path)
    bundle = build_datasets(spec)
    d = kdgraph.compile(spec)
    d.load_weights()

    def epoch_batches(start_step: int, cache_obj) -> list:
        sampler = ResumableSampler(N, shuffle=True, seed=0)
        sampler.set_epoch(1, start=start_step * 32)
        view = ReplayView(bundle.train, 0, cache_obj)
        keys = list(sampler)
        return [view.__getitems__(keys[j: j + 32]) for j in range(0, len(keys) - 31, 32)]

    full = epoch_batches(0, open_for_training(spec, d.teacher, bundle.train, None))
    resumed = epoch_batches(1, open_for_training(spec, d.teacher, bundle.train, None))  # a fresh process's reader
    assert len(resumed) == len(full) - 1
    for a, b in zip(full[1:], resumed):
        assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
        assert torch.equal(a.extras["teacher_output"], b.extras["teacher_output"])


def test_topk_cache_fill_and_kd_difference_bounded(tmp_path):
    full_spec = make_spec(tmp_path)
    write_cache(full_spec)
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "teacher.pt").write_bytes((tmp_path / "teacher.pt").read_bytes())
    topk_spec = make_spec(tmp_path / "k")
    write_cache(topk_spec, topk=3)
    keys = list(range(32))
    full, _, d = replay_batch(kdgraph.load_spec(full_spec), 0, keys)
    top, cache, _ = replay_batch(kdgraph.load_spec(topk_spec), 0, keys)
    assert cache.topk == 3 and torch.equal(full.images, top.images)
    z, zk = full.extras["teacher_output"], top.extras["teacher_output"]
    p, pk = z.softmax(1), zk.softmax(1)
    idx = z.topk(3, dim=1).indices
    assert torch.allclose(p.gather(1, idx), pk.gather(1, idx), atol=2e-3)  # exact top-3 probabilities
    d.eval()
    with torch.no_grad():
        a = d(full.images, full.targets, teacher_output=z).terms["kd"]
        b = d(top.images, top.targets, teacher_output=zk).terms["kd"]
    rel = ((a - b).abs() / a.abs()).item()
    assert 0 < rel < 0.5, f"top-3 KD differs from full-logit KD by {rel:.3f} (relative)"
    # fill_topk with K' = K - 1 leaves one class: its logit is recovered from the logsumexp
    lg = torch.randn(4, 10)
    v, i = lg.topk(9, dim=1)
    assert torch.allclose(fill_topk(v, i, torch.logsumexp(lg, 1), 10), lg, atol=1e-5)


def test_stage_batch_inputs_lists_the_cached_logits_as_the_compiled_stage_does(tmp_path):
    """What a custom loop asks without compiling (kdgraph.data.stage_batch_inputs) is what the compiled stage
    takes: the cached teacher logits are a batch input; with an online teacher there is none."""
    from kdgraph.distiller.data import stage_batch_inputs

    for cache, expected in (("cache", ["teacher_output"]), (None, [])):
        spec = kdgraph.load_spec(make_spec(tmp_path, cache))
        assert stage_batch_inputs(spec, 0) == expected
        assert kdgraph.compile(spec).batch_inputs == expected


def test_image_folder_replay_is_the_recorded_crop_and_flip_of_the_decoded_jpeg(tmp_path):
    """ImageFolder (data.dataset: imagenet, the 20 real JPEGs foolbox ships, one of them 1024 x 683) with the
    ImageNet training transform at 64 x 64 (RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize):
    every replayed view is exactly (torch.equal) the recorded box (top, left, height, width) and flip applied by
    hand to the decoded JPEG with torchvision's functional ops, the R views of an image have different boxes,
    and the replayed logits are the teacher's on the replayed view (fp16: rtol 2**-11, half an ulp; atol 1e-5
    for the float32 teacher recomputed on another batch). A fresh random crop (the transform without the stored
    seed) is not the recorded view: the equality check is what would catch a replay that drew its own."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    from kdgraph.train.data.image_folder import IMAGENET_MEAN, IMAGENET_STD

    views, size = 4, [64, 64]
    k = foolbox_image_folder(tmp_path / "inet")
    torch.manual_seed(3)
    torch.save(tiny_cnn(in_channels=3, num_classes=k, width=8).state_dict(), tmp_path / "teacher.pt")
    spec = kdgraph.load_spec({
        "name": "tc_inet", "input": {"channels": 3, "size": size, "num_classes": k},
        "teacher": {"model": "kdgraph.zoo:tiny_cnn", "kwargs": {"in_channels": 3, "num_classes": k, "width": 8},
                    "weights": str(tmp_path / "teacher.pt")},
        "student": {"model": "kdgraph.zoo:tiny_cnn", "kwargs": {"in_channels": 3, "num_classes": k, "width": 4}},
        "stages": [{"name": "main", "batch_size": 4, "optimizer": {"lr": 0.01},
                    "losses": [{"name": "ce", "type": "cross_entropy", "weight": 0.5},
                               {"name": "kd", "type": "kd", "weight": 0.5}]}],
        "data": {"dataset": "imagenet", "root": str(tmp_path / "inet"), "workers": 0},
        "runtime": {"seed": 0, "teacher_cache": str(tmp_path / "cache")}})
    cache_teacher(spec, views, tmp_path / "cache", device="cpu", batch_size=8, progress=False, say=lambda m: None)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["data"]["kind"] == "image folder" and manifest["data"]["images"] == 20
    assert manifest["transform"]["params"] == ["top", "left", "height", "width", "flip"]

    bundle = build_datasets(spec)
    d = kdgraph.compile(spec)
    d.load_weights()
    cache = open_for_training(spec, d.teacher, bundle.train, None)
    replay = ReplayView(bundle.train, spec.runtime.seed, cache)
    samples = bundle.train.samples
    wide = next(i for i, (path, _) in enumerate(samples) if Image.open(path).size == (1024, 683))
    params = np.load(tmp_path / "cache" / "rank000-of-001.params.npy")  # 20 x R x (top, left, h, w, flip)
    assert params.shape == (20, views, 5)

    def by_hand(index: int, view: int) -> torch.Tensor:
        top, left, h, w, flip = (int(p) for p in params[index, view])
        with Image.open(samples[index][0]) as im:
            x = F.resized_crop(im.convert("RGB"), top, left, h, w, size, InterpolationMode.BILINEAR, antialias=True)
        x = F.hflip(x) if flip else x
        return F.normalize(F.to_tensor(x), IMAGENET_MEAN, IMAGENET_STD)

    keys = [(i, e) for i in (0, 7, wide, 19) for e in range(3)]
    batch = replay.__getitems__(keys)
    _, chosen = replay._views(keys)
    assert len(set(chosen)) > 1  # the epochs replay different views
    flips = set()
    for b, ((i, _), v) in enumerate(zip(keys, chosen)):
        assert torch.equal(batch.images[b], by_hand(i, v)), f"image {i}, view {v}"
        flips.add(int(params[i, v, 4]))
    assert flips == {0, 1}  # both the flipped and the unflipped path are checked
    for i in (0, wide):
        boxes = {tuple(int(p) for p in params[i, v, :4]) for v in range(views)}
        assert len(boxes) == views, f"image {i}: the {views} views share a crop box"
        _, height, width = F.get_dimensions(Image.open(samples[i][0]))
        assert all(t + h <= height and l + w <= width for t, l, h, w in boxes)
    assert all(not torch.equal(by_hand(wide, 0), by_hand(wide, v)) for v in range(1, views))
    torch.manual_seed(12345)
    assert not torch.equal(bundle.train[wide][0], by_hand(wide, chosen[keys.index((wide, 0))]))  # a fresh crop

    d.teacher.eval()
    with torch.no_grad():
        now = d.teacher(batch.images)
    torch.testing.assert_close(batch.extras["teacher_output"], now, rtol=2.0 ** -11, atol=1e-5)
    other = cache.outputs([i for i, _ in keys], [(v + 1) % views for v in chosen])["teacher_output"]
    assert not torch.allclose(other, now, rtol=2.0 ** -11, atol=1e-5)  # another view's logits would fail
