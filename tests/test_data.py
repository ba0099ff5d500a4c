"""Data: Fashion-MNIST (Debian and torchvision layouts), ImageFolder checks, the ImageNet pipeline on
real JPEGs, and the reproducible sampling that DDP equivalence and exact resume rely on."""
from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import pytest
import torch

import kdgraph
import kdgraph.models
from kdgraph.errors import DataError
from kdgraph.train import data as D
from kdgraph.train.checkpoint import Checkpoint

FOOLBOX_DATA = Path(__import__("importlib.util").util.find_spec("foolbox").origin).parent / "data"


def write_idx(path: Path, array: torch.Tensor, magic: int, gz: bool = False) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    body = header + array.to(torch.uint8).numpy().tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(body)
    else:
        path.write_bytes(body)


def small_fashion_copy(root: Path, n_train: int = 200, n_val: int = 100, gz: bool = False) -> None:
    """The first images of the real Fashion-MNIST, in torchvision's layout ROOT/FashionMNIST/raw/."""
    raw = root / "FashionMNIST" / "raw"
    for split, n in (("train", n_train), ("val", n_val)):
        images, labels = D.load_fashion_mnist(None, split)
        stem_i, stem_l = D._FASHION_FILES[split]
        write_idx(raw / (stem_i + (".gz" if gz else "")), images[:n], 2051, gz)
        write_idx(raw / (stem_l + (".gz" if gz else "")), labels[:n], 2049, gz)


def fashion_spec(**data) -> kdgraph.Spec:
    return kdgraph.load_spec({
        "name": "fm", "input": {"channels": 1, "size": [28, 28], "num_classes": 10},
        "teacher": {"model": "kdgraph.zoo:tiny_cnn"}, "student": {"model": "kdgraph.zoo:tiny_cnn"},
        "stages": [{"name": "main", "batch_size": 8, "optimizer": {"lr": 0.1},
                    "losses": [{"type": "cross_entropy"}]}],
        "data": {"dataset": "fashion_mnist", **data}})


def test_fashion_mnist_from_debian_package():
    spec = fashion_spec()
    b = D.build_datasets(spec)
    assert len(b.train) == 60000 and len(b.val) == 10000
    assert "/usr/share/datasets/fashion-mnist" in b.description or "FashionMNIST" in b.description
    batch = b.val.get_batch(list(range(512)), None)
    assert batch.images.shape == (512, 1, 28, 28) and batch.targets.shape == (512,)
    assert set(batch.targets.tolist()) == set(range(10))
    assert abs(float(batch.images.mean())) < 0.15 and 0.8 < float(batch.images.std()) < 1.2  # normalised
    item, label = b.val[3]
    assert torch.equal(item, batch.images[3]) and label == int(batch.targets[3])


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_torchvision_layout(tmp_path, gz):
    small_fashion_copy(tmp_path, gz=gz)
    spec = fashion_spec(root=str(tmp_path))
    b = D.build_datasets(spec)
    assert len(b.train) == 200 and len(b.val) == 100
    real, _ = D.load_fashion_mnist(None, "val")
    assert torch.equal(b.val.images, real[:100])


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError) as e:
        D.check_data(fashion_spec(root=str(tmp_path / "nowhere")))
    assert "apt-get install dataset-fashion-mnist" in str(e.value)
    assert "FashionMNIST/raw" in str(e.value)


def test_fashion_mnist_malformed_files(tmp_path):
    small_fashion_copy(tmp_path)
    raw = tmp_path / "FashionMNIST" / "raw"
    f = raw / "t10k-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:5000])  # truncated
    with pytest.raises(DataError, match="truncated or malformed"):
        D.build_datasets(fashion_spec(root=str(tmp_path)))
    (raw / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="incomplete: missing train-labels-idx1-ubyte"):
        D.check_data(fashion_spec(root=str(tmp_path)))


def test_sampler_world_of_two_sees_the_global_batches_of_one():
    n, batch = 103, 8
    one = D.ResumableSampler(n, 1, 0, seed=5)
    two = [D.ResumableSampler(n, 2, r, seed=5) for r in range(2)]
    for s in (one, *two):
        s.set_epoch(3)
    single = [k[0] for k in one]
    ranks = [[k[0] for k in s] for s in two]
    assert len(set(single)) == len(single)
    for step in range(len(ranks[0]) // (batch // 2)):
        global_batch = set(single[step * batch:(step + 1) * batch])
        shards = set(ranks[0][step * 4:(step + 1) * 4]) | set(ranks[1][step * 4:(step + 1) * 4])
        assert shards == global_batch
    # resuming mid-epoch: the remaining keys are exactly the tail of the epoch's order
    s = D.ResumableSampler(n, 2, 1, seed=5)
    s.set_epoch(3, start=12)
    assert [k[0] for k in s] == ranks[1][12:] and len(s) == len(ranks[1]) - 12
    # another epoch, another order; the epoch travels with each key
    one.set_epoch(4)
    keys = list(one)
    assert [k[0] for k in keys] != single and {k[1] for k in keys} == {4}


def test_eval_shards_count_every_image_once():
    shards = [list(D.ShardSampler(101, 3, r)) for r in range(3)]
    assert sorted(k[0] for s in shards for k in s) == list(range(101))


def test_augmentation_is_seeded_per_sample_not_per_batch():
    spec = fashion_spec(train_subset=64, val_subset=16)
    b = D.build_datasets(spec)
    view = D.SeededView(b.train, seed=7, train=True)
    a = view.__getitems__([(5, 0), (9, 0), (11, 0)]).images
    c = view.__getitems__([(11, 0), (5, 0)]).images
    assert torch.equal(a[0], c[1]) and torch.equal(a[2], c[0])
    many = view.__getitems__([(i, e) for e in range(8) for i in (5,)]).images
    assert len({tuple(x.flatten().tolist()) for x in many}) > 1  # epochs draw different crops / flips
    single = view[(9, 0)]  # the per-item path (used under data wrappers) agrees on the image content size
    assert single[0].shape == a[1].shape


# --------------------------------------------------------------------------------------------
# ImageFolder (ImageNet layout)
# --------------------------------------------------------------------------------------------


def foolbox_image_folder(root: Path) -> int:
    """The 20 real ImageNet JPEGs foolbox ships, sorted into class folders in train/ and val/."""
    files = sorted(FOOLBOX_DATA.glob("imagenet_*.jpg"))
    assert len(files) == 20
    labels = set()
    for f in files:
        label = int(f.stem.split("_")[-1])
        labels.add(label)
        for split in ("train", "val"):
            d = root / split / f"n{label:08d}"
            d.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, d / f.name.replace(".jpg", ".JPEG"))
    return len(labels)


def imagenet_spec(root, num_classes: int, **data) -> kdgraph.Spec:
    return kdgraph.load_spec({
        "name": "inet", "input": {"channels": 3, "size": [64, 64], "num_classes": num_classes},
        "teacher": {"model": "kdgraph.zoo:tiny_cnn", "kwargs": {"in_channels": 3, "num_classes": num_classes}},
        "student": {"model": "torchvision:resnet18", "kwargs": {"num_classes": num_classes}},
        "stages": [{"name": "main", "batch_size": 4, "optimizer": {"lr": 0.01},
                    "losses": [{"name": "ce", "type": "cross_entropy", "weight": 0.5},
                               {"name": "kd", "type": "kd", "weight": 0.5}]}],
        "data": {"dataset": "imagenet", "root": str(root), "workers": 1, **data},
        "runtime": {"eval_teacher": True}})


def test_image_folder_layout_errors_come_before_any_model(tmp_path, monkeypatch):
    import kdgraph.models

    def no_models(*a, **k):
        raise AssertionError("a model was built before the data was checked")

    monkeypatch.setattr(kdgraph.models, "build_model", no_models)
    from kdgraph.train import train

    with pytest.raises(DataError, match="does not exist"):
        train(imagenet_spec(tmp_path / "missing", 19), out=tmp_path / "run", device="cpu")
    k = foolbox_image_folder(tmp_path / "inet")
    with pytest.raises(DataError, match="19 class folders but the spec's input.num_classes is 1000"):
        train(imagenet_spec(tmp_path / "inet", 1000), out=tmp_path / "run", device="cpu")
    shutil.rmtree(tmp_path / "inet" / "val" / "n00000022")
    with pytest.raises(DataError, match="different class folders"):
        D.check_image_folder(str(tmp_path / "inet"), k)
    (tmp_path / "inet" / "val" / "n00000022").mkdir()
    with pytest.raises(DataError, match="hold no images"):
        D.check_image_folder(str(tmp_path / "inet"), k)
    shutil.rmtree(tmp_path / "inet" / "val")
    with pytest.raises(DataError, match="has no val/ folder"):
        D.check_image_folder(str(tmp_path / "inet"), k)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_imagenet_pipeline_on_real_jpegs(tmp_path):
    from kdgraph.train import train

    k = foolbox_image_folder(tmp_path / "inet")
    spec = imagenet_spec(tmp_path / "inet", k)
    b = D.build_datasets(spec)
    x, y = b.train[0]
    assert x.shape == (3, 64, 64) and 0 <= y < k
    xv, _ = b.val[0]
    assert xv.shape == (3, 64, 64)
    res = train(spec, out=tmp_path / "run", device="cpu", progress=False, plot=False, tensorboard=False)
    assert res["teacher"]["images"] == 20 and res["stages"][0]["last"]["images"] == 20  # each image counted once
    ck = Checkpoint.load(tmp_path / "run" / "last.pt")
    assert ck.global_step == 5 and ck.stage_done  # 20 images / batch 4
    # the reported accuracies are those of the saved networks on these 20 images, evaluated independently
    val = D.build_datasets(spec).val
    student = kdgraph.models.build_model(spec.student, "student")
    student.load_state_dict(ck.student, strict=True)
    teacher = kdgraph.models.build_model(spec.teacher, "teacher")
    teacher.load_state_dict(ck.weights("teacher"), strict=True)
    assert res["student"]["top1"] == pytest.approx(top1_of(student, val))
    assert res["teacher"]["top1"] == pytest.approx(top1_of(teacher, val))


@torch.no_grad()
def top1_of(model: torch.nn.Module, dataset, batch: int = 4) -> float:
    """Top-1 (%) of ``model`` (eval mode) over ``dataset``, in plain batches, outside kdgraph's evaluation."""
    model.eval()
    hits = 0
    for start in range(0, len(dataset), batch):
        items = [dataset[i] for i in range(start, min(start + batch, len(dataset)))]
        logits = model(torch.stack([x for x, _ in items]))
        hits += int((logits.argmax(1) == torch.tensor([y for _, y in items])).sum())
    return 100.0 * hits / len(dataset)
