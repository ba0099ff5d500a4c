"""data.augment: per-image policies (RandAugment & co) and random erasing on seeded batches, MixUp / CutMix soft
targets reaching the label-reading losses, refusals (compile time, exit 2), drop_last, resume, and a CLI run."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch.nn import functional as F

import kdgraph
from kdgraph import DistillLoss, register_loss
from kdgraph.data import Batch
from kdgraph.errors import SpecError
from kdgraph.methods.registry import LOSSES
from kdgraph.spec.augment import AugmentSpec, RandomErasingSpec
from kdgraph.train import train
from kdgraph.train.checkpoint import Checkpoint
from kdgraph.train.data import SeededView, TensorImages, load_fashion_mnist, sample_seed
from kdgraph.train.data.augment import BatchMix, GroupedPolicy, ImageAugment, erase, folder_transforms

sys.path.insert(0, str(Path(__file__).parent))
from test_train import QUIET, tiny_spec, write_spec  # noqa: E402

MIX = {"mixup": {"alpha": 0.2}, "cutmix": {"alpha": 1.0}}


@pytest.fixture(scope="module")
def fashion():
    images, labels = load_fashion_mnist(None, "val")
    return images[:64], labels[:64]


def _seeds(n: int, epoch: int = 0) -> list[int]:
    return [sample_seed(0, epoch, i) for i in range(n)]


def _plain_batch(fashion, n: int = 16) -> Batch:
    ds = TensorImages(fashion[0][:n], fashion[1][:n], 0.286, 0.353, augment=False)
    return ds.get_batch(list(range(n)), None)


# ---------------------------------------------------------------- per-image policies
@pytest.mark.parametrize("policy", [{"randaugment": {"num_ops": 2, "magnitude": 9}}, {"trivialaugment": {}},
                                    {"autoaugment": {"policy": "imagenet"}}])
def test_policy_changes_seeded_batch_deterministically_and_equals_torchvision_per_image(fashion, policy):
    images, labels = fashion
    aug = AugmentSpec(**policy, random_erasing={"p": 0.5})
    plain = TensorImages(images, labels, 0.286, 0.353, augment=True)
    ds = TensorImages(images, labels, 0.286, 0.353, augment=True, extra=ImageAugment(aug))
    idx, seeds = list(range(64)), _seeds(64)
    a, b, p = ds.get_batch(idx, seeds), ds.get_batch(idx, seeds), plain.get_batch(idx, seeds)
    assert a.images.shape == p.images.shape == (64, 1, 28, 28) and a.images.dtype == torch.float32
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, labels)  # same seeds, same batch
    changed = (a.images != p.images).flatten(1).any(1).float().mean()
    assert changed > 0.5, f"only {changed:.0%} of the images changed"
    assert not torch.equal(ds.get_batch(idx, _seeds(64, epoch=1)).images, a.images)  # another epoch, other draws
    # the grouped application gives, image by image, what torchvision's op gives on that image alone
    g = GroupedPolicy(aug)
    x = images[:32].unsqueeze(1)
    s = torch.as_tensor(_seeds(32))
    out = g(x, s)
    draws = g.draws(s, 28, 28)
    for i in range(32):
        y = x[i:i + 1]
        for ops, mag in draws:
            if ops[i] >= 0:
                y = g.tv._apply_image_or_video_transform(y, g.ops[ops[i]], float(mag[i]), interpolation="bilinear",
                                                         fill=g.tv._fill)
        assert torch.equal(y, out[i:i + 1]), f"image {i}"


def test_random_erasing_rectangles_follow_p_scale_and_value():
    x = torch.randn(400, 3, 32, 32)
    s = torch.as_tensor(_seeds(400))
    spec = RandomErasingSpec(p=0.5, scale=(0.1, 0.2), value=7.0)
    e = erase(x, s, spec)
    hit = e == 7.0
    erased = hit.flatten(1).any(1)
    assert 0.4 < erased.float().mean() < 0.6
    frac = hit[erased].flatten(1).float().mean(1)
    assert frac.min() > 0.07 and frac.max() < 0.25  # area in [0.1, 0.2] of the image, up to rounding
    assert torch.equal(e[~erased], x[~erased]) and torch.equal(erase(x, s, spec), e)


def test_image_folder_transforms_policy_crop_and_eval_ratio():
    from PIL import Image

    img = Image.fromarray((torch.rand(80, 100, 3) * 255).byte().numpy())
    aug = AugmentSpec(randaugment={}, crop={"scale": [0.5, 1.0]}, eval_crop_ratio=0.5, interpolation="bicubic")
    tf = folder_transforms((32, 32), 3, True, aug, (0.5,) * 3, (0.25,) * 3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        a = tf(img)
        torch.manual_seed(3)
        b = tf(img)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32 and torch.equal(a, b)
    assert "RandAugment" in repr(tf) and "bicubic" in repr(tf).lower()
    ev = folder_transforms((32, 32), 3, False, aug, (0.5,) * 3, (0.25,) * 3)
    assert ev.transforms[0].size == [64] and ev(img).shape == (3, 32, 32)  # resized to 32 / 0.5, center crop 32


# ---------------------------------------------------------------- mixup / cutmix
@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixing_makes_soft_targets_that_match_the_images(fashion, kind):
    batch = _plain_batch(fashion)
    mix = BatchMix(AugmentSpec(**{kind: MIX[kind]}), num_classes=10, seed=0)
    out = mix(batch, (5, 0))
    assert torch.equal(out.images, mix(batch, (5, 0)).images)  # seeded by the batch's first key
    assert not torch.equal(out.targets, mix(batch, (6, 0)).targets)
    t = out.targets
    assert t.shape == (16, 10) and t.dtype == torch.float32 and torch.allclose(t.sum(1), torch.ones(16))
    onehot = F.one_hot(batch.targets, 10).float()
    same = batch.targets == batch.targets.roll(1)
    assert not bool(same.all())
    i = int((~same).nonzero()[0])
    lam = float(t[i, batch.targets[i]])
    assert torch.allclose(t, lam * onehot + (1 - lam) * onehot.roll(1, 0), atol=1e-6)
    x, xr = batch.images, batch.images.roll(1, 0)
    if kind == "mixup":
        assert torch.allclose(out.images, lam * x + (1 - lam) * xr, atol=1e-5)
    else:  # every pixel comes from the image or its neighbour; the neighbour's share is 1 - lam
        from_x = (out.images == x).all(1)
        assert bool(((out.images == x) | (out.images == xr)).all())
        differs = (x != xr).any(1)
        share = 1 - (from_x & differs).flatten(1).sum(1) / differs.flatten(1).sum(1).clamp_min(1)
        assert abs(float(share.median()) - (1 - lam)) < 0.1


def test_mixing_through_a_loader_of_single_items_gives_soft_batches(fashion):
    from kdgraph.train.data import make_loader

    class Items(torch.utils.data.Dataset):  # an image folder's shape: one (image, label) item at a time
        def __len__(self):
            return 40

        def __getitem__(self, i):
            return fashion[0][i].float()[None] / 255, int(fashion[1][i])

    view = SeededView(Items(), 0, True, mix=BatchMix(AugmentSpec(**MIX), 10, 0))
    loader = make_loader(Items(), batch_size=16, train=True, workers=0, seed=0, view=view, drop_last=False)
    batches = list(loader)
    assert [len(b.targets) for b in batches] == [16, 16, 8]
    assert all(b.targets.shape[1] == 10 and torch.allclose(b.targets.sum(1), torch.ones(len(b.targets)))
               for b in batches)


def test_cross_entropy_takes_soft_targets_as_torch_does(fashion):
    logits = torch.randn(8, 10, requires_grad=True)
    soft = torch.softmax(torch.randn(8, 10), 1)
    for ls in (0.0, 0.1):
        loss = LOSSES.get("cross_entropy")(label_smoothing=ls)
        got = loss(logits, soft)
        ref = F.cross_entropy(logits, soft, label_smoothing=ls)
        g1, = torch.autograd.grad(got, logits)
        g2, = torch.autograd.grad(ref, logits)
        assert torch.allclose(got, ref, rtol=1e-6) and torch.allclose(g1, g2, rtol=1e-6)


def _reads_targets(cls) -> bool:
    return "targets" in cls.inputs and dict(cls.default_inputs).get("targets") == "batch:targets"


def test_every_label_reading_loss_accepts_one_hot_as_its_labels_or_is_refused():
    """A loss whose targets input is soft-capable gives, on one-hot targets, what it gives on the class indices."""
    readers = [name for name in LOSSES.names() if _reads_targets(LOSSES.get(name))]
    assert "cross_entropy" in readers and "sskd_tf" in readers
    soft = [name for name in readers if "targets" in LOSSES.get(name).soft_target_inputs]
    assert "cross_entropy" in soft  # the others are refused at compile time (test_mixing_refuses_...)
    ce = LOSSES.get("cross_entropy")(label_smoothing=0.1)
    logits, y = torch.randn(6, 10), torch.randint(0, 10, (6,))
    assert torch.allclose(ce(logits, y), ce(logits, F.one_hot(y, 10).float()), rtol=1e-6)
    assert "targets" not in LOSSES.get("sskd_tf").soft_target_inputs
    assert "targets" not in LOSSES.get("regression_mse").soft_target_inputs


def test_compiled_distiller_scores_soft_targets_with_cross_entropy(fashion):
    spec = tiny_spec(data={"dataset": "fashion_mnist", "workers": 0, "augment": MIX})
    d = kdgraph.compile(spec)
    batch = BatchMix(AugmentSpec(**MIX), 10, 0)(_plain_batch(fashion), (0, 0))
    out = d(batch.images, batch.targets)
    assert torch.allclose(out.terms["ce"], 0.5 * F.cross_entropy(out.logits, batch.targets), rtol=1e-5)
    out.loss.backward()


@register_loss("test_hard_label_only")
class _HardLabelOnly(DistillLoss):
    inputs = ("logits", "targets")
    default_inputs = {"logits": "student:@output", "targets": "batch:targets"}
    batch_only_inputs = ("targets",)

    def forward(self, logits, targets):
        return F.nll_loss(logits.log_softmax(1), targets)


def test_mixing_refuses_a_loss_that_takes_only_class_indices(tmp_path):
    spec = tiny_spec(losses=[{"name": "ce", "type": "cross_entropy"}, {"name": "hard", "type": "test_hard_label_only"}],
                     data={"dataset": "fashion_mnist", "workers": 0, "augment": {"cutmix": {"alpha": 1.0}}})
    with pytest.raises(SpecError) as e:
        kdgraph.compile(spec)
    msg = str(e.value)
    assert "'hard'" in msg and "test_hard_label_only" in msg and "data.augment.cutmix" in msg
    spec["data"]["augment"] = {"randaugment": {}}  # per-image augmentation keeps hard labels: fine
    kdgraph.compile(spec)


@pytest.mark.parametrize("data,runtime,needle", [
    ({"augment": {"mixup": {"alpha": 0}}}, {}, "alpha > 0"),
    ({"augment": {"mixup": {"alpha": -1.0}}}, {}, "alpha > 0"),
    ({"augment": {"randaugment": {"magnitude": 31}}}, {}, "magnitude 31 is out of range"),
    ({"augment": {"randaugment": {}, "autoaugment": {}}}, {}, "each image takes one policy"),
    ({"augment": {"random_erasing": {"p": 0}}}, {}, "random_erasing.p"),
    ({"augment": {"crop": {"scale": [0.5, 0.1]}}, "dataset": "imagenet"}, {}, "scale [0.5, 0.1]"),
    ({"augment": {"crop": {}}}, {}, "crop settings apply to image folders"),
    ({"augment": MIX}, {"teacher_cache": "cache"}, "cannot be used with runtime.teacher_cache"),
    ({"augment": {"randaugment": {}}, "dataset": "synthetic"}, {}, "synthetic data are random values"),
    ({"augment": {"autoaugment": {}, "interpolation": "bicubic"}}, {}, "nearest or bilinear only"),
])
def test_bad_augmentation_is_one_clear_error_exit_2(tmp_path, data, runtime, needle):
    from kdgraph.cli import main

    spec = tiny_spec(data={"dataset": "fashion_mnist", "workers": 0, **data}, runtime=runtime)
    r = CliRunner().invoke(main, ["compile", str(write_spec(tmp_path / "s.yaml", spec))])
    assert r.exit_code == 2 and needle in " ".join(r.output.split()) and "Traceback" not in r.output, r.output


def test_augmentation_on_named_inputs_is_refused():
    spec = tiny_spec(input={"named": {"input_ids": {"shape": [8], "dtype": "int64", "high": 50}}, "num_classes": 2},
                     data={"dataset": "synthetic", "augment": {"mixup": {"alpha": 0.2}}})
    with pytest.raises(SpecError, match="named inputs"):
        kdgraph.load_spec(spec)


# ---------------------------------------------------------------- training
def test_cli_train_with_mixup_cutmix_randaugment_keeps_last_partial_batch(tmp_path, monkeypatch):
    from kdgraph.cli import main

    monkeypatch.setattr("kdgraph.train.monitor.Monitor.plot", lambda self: None)  # matplotlib: seconds, not tested here
    aug = {"randaugment": {"num_ops": 2, "magnitude": 9}, "random_erasing": {"p": 0.25}, **MIX}
    spec = tiny_spec(train_subset=72, val_subset=32, batch_size=32,
                     data={"dataset": "fashion_mnist", "train_subset": 72, "val_subset": 32, "workers": 0,
                           "augment": aug, "drop_last": False})
    path = write_spec(tmp_path / "aug.yaml", spec)
    r = CliRunner().invoke(main, ["compile", str(path)])
    assert r.exit_code == 0 and "randaugment(num_ops=2" in r.output and "last partial batch kept" in r.output
    r = CliRunner().invoke(main, ["train", str(path), "--out", str(tmp_path / "run"), "--device", "cpu",
                                  "--no-progress"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in rows if x["event"] == "train"]
    assert [x["step"] for x in steps] == [1, 2, 3]  # 72 images, batch 32, last partial batch of 8 kept
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in steps)
    recorded = json.loads((tmp_path / "run" / "spec.json").read_text())["data"]
    assert recorded["augment"]["mixup"] == {"alpha": 0.2} and recorded["drop_last"] is False


class _Crash(Exception):
    pass


def test_resume_mid_epoch_is_bit_exact_with_augmentation(tmp_path, monkeypatch):
    from kdgraph.train import steps as steps_mod

    aug = {"trivialaugment": {}, "random_erasing": {"p": 0.5}, **MIX}
    spec = tiny_spec(name="aug_resume", train_subset=192, val_subset=32, batch_size=32,
                     data={"dataset": "fashion_mnist", "train_subset": 192, "val_subset": 32, "workers": 0,
                           "augment": aug})
    path = write_spec(tmp_path / "r.yaml", spec)
    original = steps_mod.StepLoop.checkpoint

    def crash_after_step_2(self, run, where, save, best=False):
        original(self, run, where, save, best)
        if where.step == 2 and not where.epoch_done:
            raise _Crash()

    monkeypatch.setattr(steps_mod.StepLoop, "checkpoint", crash_after_step_2)
    with pytest.raises(_Crash):
        train(path, out=tmp_path / "a", ckpt_every=2, **QUIET)
    monkeypatch.setattr(steps_mod.StepLoop, "checkpoint", original)
    assert Checkpoint.load(tmp_path / "a" / "last.pt").step == 2
    train(path, out=tmp_path / "a", resume=True, **QUIET)
    train(path, out=tmp_path / "b", **QUIET)
    a, b = Checkpoint.load(tmp_path / "a" / "last.pt"), Checkpoint.load(tmp_path / "b" / "last.pt")
    assert a.global_step == b.global_step == 6
    for k, v in b.distiller.items():
        assert torch.equal(a.distiller[k], v), k


def test_teacher_cache_fingerprint_records_the_augmentation(fashion):
    from kdgraph.train.teacher_cache.fingerprint import transform_identity, view_params

    images, labels = fashion
    plain = TensorImages(images, labels, 0.286, 0.353, augment=True)
    aug = TensorImages(images, labels, 0.286, 0.353, augment=True,
                       extra=ImageAugment(AugmentSpec(randaugment={}, hflip=1.0)))
    a, b = transform_identity(plain), transform_identity(aug)
    assert "data_augment" not in a and b["data_augment"]["randaugment"]["magnitude"] == 9 and b["hflip"] == 1.0
    assert bool((view_params(aug, list(range(8)), _seeds(8))[:, 2] == 1).all())  # recorded flips follow hflip


def test_image_folder_training_with_policy_erasing_and_cutmix_in_a_worker(tmp_path):
    from test_data import foolbox_image_folder

    k = foolbox_image_folder(tmp_path / "inet")
    net = {"model": "kdgraph.zoo:tiny_cnn", "kwargs": {"in_channels": 3, "num_classes": k, "width": 4}}
    spec = {"name": "inet_aug", "input": {"channels": 3, "size": [32, 32], "num_classes": k},
            "teacher": net, "student": net,
            "stages": [{"name": "main", "batch_size": 4, "optimizer": {"lr": 0.01},
                        "losses": [{"name": "ce", "type": "cross_entropy", "args": {"label_smoothing": 0.1}}]}],
            "data": {"dataset": "imagenet", "root": str(tmp_path / "inet"), "workers": 1, "train_subset": 10,
                     "drop_last": False,
                     "augment": {"trivialaugment": {}, "random_erasing": {"p": 0.5}, "cutmix": {"alpha": 1.0},
                                 "crop": {"scale": [0.25, 1.0]}, "eval_crop_ratio": 0.8, "interpolation": "bicubic"}}}
    res = train(spec, out=tmp_path / "run", **QUIET)
    assert Checkpoint.load(tmp_path / "run" / "last.pt").global_step == 3  # 10 images, batch 4, last 2 kept
    assert res["stages"][0]["last"]["images"] == 20


@pytest.mark.parametrize("name,refused", [("crd", None), ("dist", None), ("sskd", "loss 'tf' (sskd_tf)")])
def test_suite_specs_with_mixing_compile_or_name_their_label_only_loss(name, refused):
    import yaml

    spec = yaml.safe_load((Path(__file__).parents[1] / "specs" / "fashion_mnist" / f"{name}.yaml").read_text())
    spec["data"]["augment"] = MIX
    if refused is None:
        d = kdgraph.compile(spec)  # CRD (its wrapper's extras) and DIST read no labels: nothing to refuse
        assert "targets" not in d.batch_inputs
    else:
        with pytest.raises(SpecError, match=refused.replace("(", r"\(").replace(")", r"\)")):
            kdgraph.compile(spec)
