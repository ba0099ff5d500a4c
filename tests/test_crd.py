"""CRD: head, loss (with its memory banks) and data wrapper, against torchdistill 1.1.5."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.models import resnet18, resnet34

from kdgraph.errors import DataError, ShapeError
from kdgraph.methods.crd import ContrastiveDataset, CRDHead, CRDLoss, crd_wrapper, dataset_targets
from kdgraph.methods.registry import ADAPTERS, DATA_WRAPPERS, LOSSES

td_mid = pytest.importorskip("torchdistill.losses.mid_level")
td_wrap = pytest.importorskip("torchdistill.models.wrapper")

N, K, B, D = 64, 16, 4, 128


def rel_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    return bool(((a - b).abs() <= rtol * b.abs().clamp_min(1e-12)).all())


@pytest.fixture(scope="module")
def features():
    """avgpool features of a random-init ResNet-18 (student) and ResNet-34 (teacher) on 32x32 images."""
    torch.manual_seed(0)
    student, teacher = resnet18().eval(), resnet34().eval()
    images = [torch.randn(B, 3, 32, 32) for _ in range(2)]
    with torch.no_grad():
        out = []
        for x in images:
            fs = torch.flatten(student.avgpool(_trunk(student, x)), 1)
            ft = torch.flatten(teacher.avgpool(_trunk(teacher, x)), 1)
            out.append((fs, ft))
    return out


def _trunk(m, x):
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    return m.layer4(m.layer3(m.layer2(m.layer1(x))))


def test_registered():
    assert LOSSES.get("crd") is CRDLoss
    assert ADAPTERS.get("crd_head") is CRDHead
    assert DATA_WRAPPERS.get("crd") is crd_wrapper


def test_head_matches_torchdistill_normalizer():
    torch.manual_seed(1)
    x = torch.randn(B, 512, 1, 1)
    args = CRDHead.infer_args({"feature_dim": D}, {"x": (B, 512, 1, 1)}, None)
    assert args == {"feature_dim": D, "in_features": 512}
    head = CRDHead(**args)
    ref = td_wrap.Normalizer4CRD(torch.nn.Linear(512, D), power=2)
    ref.load_state_dict(head.state_dict())  # same keys: linear.weight, linear.bias
    y = head(x)
    assert y.shape == (B, D)
    torch.testing.assert_close(y, ref(torch.flatten(x, 1)), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(B))


def _contrast(index: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    neg = torch.randint(N, (len(index), K), generator=gen)
    return torch.cat([index.unsqueeze(1), neg], 1)


def test_loss_and_memory_match_torchdistill(features):
    """Two consecutive training steps: same memory + same heads + same indices -> same loss, same
    gradients on both heads, same banks after the in-place update, same Z (set on step 1 only)."""
    torch.manual_seed(2)
    ref = td_mid.CRDLoss("normalizer", "empty", "normalizer", input_size=D, output_size=N,
                         num_negative_samples=K, num_samples=N, temperature=0.07, momentum=0.5, eps=1e-7)
    ours = CRDLoss(num_samples=N, feature_dim=D, temperature=0.07, momentum=0.5, eps=1e-7).train()
    with torch.no_grad():  # identical memory state
        ours.memory_student.copy_(ref.memory_v1)
        ours.memory_teacher.copy_(ref.memory_v2)
    s_head, t_head = CRDHead(512, D), CRDHead(512, D)
    s_ref = td_wrap.Normalizer4CRD(torch.nn.Linear(512, D))
    t_ref = td_wrap.Normalizer4CRD(torch.nn.Linear(512, D))
    s_ref.load_state_dict(s_head.state_dict())
    t_ref.load_state_dict(t_head.state_dict())

    gen = torch.Generator().manual_seed(3)
    perm = torch.randperm(N, generator=gen)
    for step, (fs, ft) in enumerate(features):
        index = perm[step * B:(step + 1) * B]
        contrast = _contrast(index, gen)
        bank_ptr = (ours.memory_student.data_ptr(), ours.memory_teacher.data_ptr())

        loss = ours(s_head(fs), t_head(ft), index, contrast)
        student_io = {"normalizer": {"output": s_ref(fs)},
                      "empty": {"input": {"pos_idx": index.clone(), "contrast_idx": contrast.clone()}}}
        teacher_io = {"normalizer": {"output": t_ref(ft)}}
        expected = ref(student_io, teacher_io)

        assert loss.dim() == 0 and torch.isfinite(loss)
        assert rel_close(loss.detach(), expected.detach()), (step, loss.item(), expected.item())
        torch.testing.assert_close(ours.z, ref.params[2:4], rtol=1e-5, atol=0)
        torch.testing.assert_close(ours.memory_student, ref.memory_v1, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ours.memory_teacher, ref.memory_v2, rtol=1e-5, atol=1e-7)
        # updated in place: same storage, the rows of `index` are unit vectors now
        assert (ours.memory_student.data_ptr(), ours.memory_teacher.data_ptr()) == bank_ptr
        torch.testing.assert_close(ours.memory_student[index].norm(dim=1), torch.ones(B))

        loss.backward()
        expected.backward()
        for mine, theirs in ((s_head, s_ref), (t_head, t_ref)):
            g, g_ref = mine.linear.weight.grad, theirs.linear.weight.grad
            assert g is not None and g.abs().sum() > 0
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)
            mine.zero_grad()
            theirs.zero_grad()
        if step == 0:
            z0 = ours.z.clone()
    assert torch.equal(ours.z, z0), "Z must be fixed by the first batch"


def test_memory_is_buffer_state_and_z_survives_a_checkpoint(features):
    torch.manual_seed(4)
    loss = CRDLoss(num_samples=N, feature_dim=D).train()
    state = loss.state_dict()
    assert set(state) == {"memory_student", "memory_teacher", "z"}
    assert loss.memory_student.shape == (N, D) and loss.memory_student.is_contiguous()
    head_s, head_t = CRDHead(512, D), CRDHead(512, D)
    fs, ft = features[0]
    index = torch.arange(B)
    contrast = _contrast(index, torch.Generator().manual_seed(5))
    with torch.no_grad():
        loss(head_s(fs), head_t(ft), index, contrast)
    assert (loss.z > 0).all()

    restored = CRDLoss(num_samples=N, feature_dim=D).train()
    restored.load_state_dict(copy.deepcopy(loss.state_dict()))
    fs, ft = features[1]
    with torch.no_grad():
        a = loss(head_s(fs), head_t(ft), index + B, contrast)
        b = restored(head_s(fs), head_t(ft), index + B, contrast)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(loss.z, restored.z)


def test_eval_mode_leaves_memory_alone(features):
    loss = CRDLoss(num_samples=N, feature_dim=D).eval()
    before = loss.memory_student.clone(), loss.memory_teacher.clone()
    fs, ft = features[0]
    index = torch.arange(B)
    head = CRDHead(512, D)
    with torch.no_grad():
        value = loss(head(fs), head(ft), index, _contrast(index, torch.Generator().manual_seed(6)))
    assert torch.isfinite(value)
    assert torch.equal(loss.memory_student, before[0]) and torch.equal(loss.memory_teacher, before[1])
    assert (loss.z < 0).all(), "an eval batch must not fix Z"


def test_shape_errors_are_clear():
    loss = CRDLoss(num_samples=N, feature_dim=D)
    e = torch.nn.functional.normalize(torch.randn(B, D), dim=1)
    with pytest.raises(ShapeError, match="contrast_index"):
        loss(e, e, torch.arange(B), torch.arange(B))
    with pytest.raises(ShapeError, match="feature_dim"):
        loss(e[:, :64], e[:, :64], torch.arange(B), torch.zeros(B, K + 1, dtype=torch.long))
    with pytest.raises(ShapeError, match="student:avgpool"):
        CRDLoss.check_shapes({"student": (B, 512, 1, 1), "teacher": (B, 512, 1, 1)},
                             {"student": "student:avgpool", "teacher": "teacher:avgpool"}, "stages[0].losses[1]")
    with pytest.raises(ValueError):
        CRDLoss(num_samples=N, temperature=0)


# --------------------------------------------------------------------------------------------
# data wrapper
# --------------------------------------------------------------------------------------------


class Labelled(Dataset):
    """Tiny map-style dataset of (image, label); ``with_targets`` exposes ``.targets`` like ImageFolder."""

    def __init__(self, labels, with_targets=True):
        self._labels = list(labels)
        if with_targets:
            self.targets = list(self._labels)
        self.classes = sorted(set(self._labels))

    def __len__(self):
        return len(self._labels)

    def __getitem__(self, i):
        return torch.full((3, 8, 8), float(i)), self._labels[i]


LABELS = [i % 4 for i in range(N)]  # 4 classes x 16 samples: 48 negatives per sample


def test_wrapper_draws_negatives_from_other_classes_only():
    torch.manual_seed(7)
    ds = crd_wrapper(Labelled(LABELS), None, num_negative_samples=K, mode="exact")
    assert len(ds) == N and ds.classes == [0, 1, 2, 3]
    seen = set()
    for i in range(N):
        item = ds[i]
        assert set(item) == {"images", "targets", "index", "contrast_index"}
        c = item["contrast_index"]
        assert c.dtype == torch.long and c.shape == (K + 1,)
        assert item["index"] == i and int(c[0]) == i and item["targets"] == LABELS[i]
        neg = c[1:].tolist()
        assert all(LABELS[j] != LABELS[i] for j in neg)
        assert len(set(neg)) == K, "no repeats while the pool (48) holds K (16)"
        seen.update((LABELS[i], j) for j in neg)
    # every other-class sample gets drawn for every class: 4 classes x 48 negatives
    assert len(seen) == 4 * 48


def test_wrapper_relax_mode_and_replacement_when_pool_is_small():
    torch.manual_seed(8)
    ds = ContrastiveDataset(Labelled(LABELS), num_negative_samples=100, mode="relax")
    item = ds[5]
    c = item["contrast_index"]
    assert c.shape == (101,) and item["index"] == 5
    assert LABELS[int(c[0])] == LABELS[5]
    assert all(LABELS[j] != LABELS[5] for j in c[1:].tolist())


def test_wrapper_targets_sources_and_batches():
    labels = [3, 1, 1, 0, 2, 3, 0, 2] * 2
    no_attr = Labelled(labels, with_targets=False)
    assert dataset_targets(no_attr).tolist() == labels  # one pass over the data
    sub = Subset(Labelled(labels), [0, 3, 4, 9])
    assert dataset_targets(sub).tolist() == [3, 0, 2, 1]
    ds = ContrastiveDataset(no_attr, num_negative_samples=5)
    batch = next(iter(DataLoader(ds, batch_size=4, shuffle=False)))
    assert batch["images"].shape == (4, 3, 8, 8)
    assert batch["index"].tolist() == [0, 1, 2, 3] and batch["index"].dtype == torch.long
    assert batch["contrast_index"].shape == (4, 6)
    assert batch["targets"].tolist() == labels[:4]


def test_wrapper_builds_whole_batches_from_the_in_memory_data_set():
    """The trainer's batched path: the wrapped data set's own get_batch (its batched augmentation), every
    draw a function of the sample's seed, negatives from the other classes only, no repeats."""
    from kdgraph.distiller.data import batch_kwargs
    from kdgraph.train.data import TensorImages

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(N) % 4
    images = torch.randint(0, 256, (N, 12, 12), dtype=torch.uint8, generator=g)
    inner = TensorImages(images, labels, 0.5, 0.25, [str(c) for c in range(4)], (12, 12), 1, True, 2)
    ds = ContrastiveDataset(inner, num_negative_samples=K)
    idx, seeds = [5, 0, 33, 12], [101, 7, 55, 9]
    batch = ds.get_batch(idx, seeds)
    kw = batch_kwargs(batch)
    assert set(kw) == {"images", "targets", "index", "contrast_index"}
    expect = inner.get_batch(idx, seeds)
    assert torch.equal(kw["images"], expect.images) and torch.equal(kw["targets"], expect.targets)
    assert kw["index"].tolist() == idx and kw["contrast_index"].shape == (4, K + 1)
    for row, i in zip(kw["contrast_index"].tolist(), idx):
        assert row[0] == i and len(set(row[1:])) == K
        assert all(int(labels[j]) != int(labels[i]) for j in row[1:])
    again = ds.get_batch(idx, seeds)
    assert torch.equal(again.extras["contrast_index"], batch.extras["contrast_index"])
    other = ds.get_batch(idx, [s + 1 for s in seeds])
    assert not torch.equal(other.extras["contrast_index"], batch.extras["contrast_index"])
    # a data set without get_batch is read item by item, each under its own seed
    plain = ContrastiveDataset(Labelled(LABELS), num_negative_samples=K).get_batch([1, 2], [3, 4])
    assert plain.images.shape == (2, 3, 8, 8) and plain.extras["contrast_index"].shape == (2, K + 1)


def test_wrapper_errors():
    with pytest.raises(DataError, match="one class"):
        ContrastiveDataset(Labelled([0] * 8), num_negative_samples=2)
    with pytest.raises(DataError, match="mode"):
        ContrastiveDataset(Labelled(LABELS), num_negative_samples=2, mode="approx")

    class FakeSpec:
        class _Stage:
            class _Loss:
                type = "crd"
                args = {"num_samples": 1281167}
            losses = [_Loss]
        stages = [_Stage]

    with pytest.raises(DataError, match="num_samples"):
        crd_wrapper(Labelled(LABELS), FakeSpec, num_negative_samples=K)
    FakeSpec._Stage._Loss.args = {"num_samples": N}
    assert len(crd_wrapper(Labelled(LABELS), FakeSpec, num_negative_samples=K)) == N


# --------------------------------------------------------------------------------------------
# through the compiled distiller (specs/crd_resnet18.yaml at 32x32, N = 64, K = 16)
# --------------------------------------------------------------------------------------------


class Images(Labelled):
    """64 random 32x32 images, 4 classes: the whole pipeline (wrapper -> DataLoader -> distiller)."""

    def __init__(self):
        super().__init__(LABELS)
        self.images = torch.randn(N, 3, 32, 32, generator=torch.Generator().manual_seed(12))

    def __getitem__(self, i):
        return self.images[i], self._labels[i]


@pytest.fixture(scope="module")
def crd_distiller():
    import kdgraph

    from conftest import small_spec

    spec = small_spec("crd_resnet18.yaml", size=32)
    (crd,) = [ls for ls in spec.stages[0].losses if ls.type == "crd"]
    crd.args["num_samples"] = N
    return kdgraph.compile(spec)


def test_spec_compiles_with_reference_hyperparameters(crd_distiller):
    d = crd_distiller
    stage = d.spec.stages[0]
    assert (stage.epochs, stage.batch_size, stage.reference_world_size) == (100, 85, 3)
    assert (stage.optimizer.lr, stage.optimizer.weight_decay, stage.scheduler.milestones) == (0.1, 1e-4, [30, 60, 90])
    assert {ls.name: ls.weight for ls in stage.losses} == {"ce": 1.0, "crd": 0.8}
    assert d.spec.data.wrapper.type == "crd" and d.spec.data.wrapper.args["num_negative_samples"] == 16384
    assert d.spec.reference.top1 == 70.93
    assert sorted(d.batch_inputs) == ["contrast_index", "index"]
    assert d.adapters["teacher_head"].linear.in_features == 512
    loss = d.losses["main"]["crd"]
    assert loss.memory_student.shape == (N, D)
    state = d.state_dict()
    assert {"losses.main.crd.memory_student", "losses.main.crd.memory_teacher", "losses.main.crd.z"} <= set(state)


def test_sgd_steps_through_the_distiller(crd_distiller):
    d = crd_distiller.train()
    loader = DataLoader(crd_wrapper(Images(), d.spec, num_negative_samples=K), batch_size=4, shuffle=True,
                        generator=torch.Generator().manual_seed(13))
    trains = {"student": d.student, "student_head": d.adapters["student_head"],
              "teacher_head": d.adapters["teacher_head"]}
    assert {id(p) for p in d.trainable_parameters()} == {id(p) for m in trains.values() for p in m.parameters()}
    teacher_before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    before = {name: [p.detach().clone() for p in m.parameters()] for name, m in trains.items()}
    loss_module = d.losses["main"]["crd"]
    memory_before = loss_module.memory_student.clone(), loss_module.memory_teacher.clone()
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    seen = []
    ref = td_mid.CRDLoss("normalizer", "empty", "normalizer", input_size=D, output_size=N,
                         num_negative_samples=K, num_samples=N)
    with torch.no_grad():
        ref.memory_v1.copy_(loss_module.memory_student)
        ref.memory_v2.copy_(loss_module.memory_teacher)
    for step, batch in zip(range(3), loader):
        out = d(batch["images"], batch["targets"], index=batch["index"], contrast_index=batch["contrast_index"])
        if step == 0:  # end to end: the fused graph's term is torchdistill's CRDLoss on the same nets
            with torch.no_grad():
                x = batch["images"]
                s = d.adapters["student_head"](d.student.avgpool(_trunk(d.student, x)))
                t = d.adapters["teacher_head"](d.teacher.avgpool(_trunk(d.teacher, x)))
                expected = ref({"normalizer": {"output": s}, "empty": {"input": {
                    "pos_idx": batch["index"], "contrast_idx": batch["contrast_index"]}}},
                    {"normalizer": {"output": t}})
            assert rel_close(out.terms["crd"].detach(), 0.8 * expected), (out.terms["crd"].item(), expected.item())
            torch.testing.assert_close(loss_module.memory_student, ref.memory_v1, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(loss_module.memory_teacher, ref.memory_v2, rtol=1e-5, atol=1e-6)
        assert torch.isfinite(out.loss) and set(out.terms) == {"ce", "crd"}
        assert torch.isfinite(out.terms["crd"]) and out.terms["crd"] > 0
        opt.zero_grad()
        out.loss.backward()
        assert d.adapters["teacher_head"].linear.weight.grad.abs().sum() > 0
        opt.step()
        seen += batch["index"].tolist()
        if step == 0:
            z = loss_module.z.clone()
            assert (z > 0).all()
    assert torch.equal(loss_module.z, z)
    for name, m in trains.items():
        assert all(not torch.equal(p, q) for p, q in zip(m.parameters(), before[name])), f"{name} did not train"
    after = d.teacher.state_dict()
    assert all(torch.equal(after[k], v) for k, v in teacher_before.items()), "teacher must stay bit-identical"
    # the banks changed exactly at the rows of the samples seen
    rows = torch.zeros(N, dtype=torch.bool)
    rows[seen] = True
    for bank, old in zip((loss_module.memory_student, loss_module.memory_teacher), memory_before):
        diff = (bank != old).any(1)
        assert torch.equal(diff, rows)
