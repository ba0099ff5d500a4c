"""SSKD: rotations, head and the stage-1/stage-2 losses, against torchdistill 1.1.5."""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision.models import resnet18, resnet34
from torchvision.transforms.functional import to_tensor

from kdgraph.errors import ShapeError
from kdgraph.methods.ce import CrossEntropy
from kdgraph.methods.sskd import (AuxSSKDLoss, SSKDHead, SSKDKDLoss, SSKDRotations, SSKDSelfSupervisionLoss,
                                  SSKDTransformLoss, keep_ranked, split_views, view_similarities)
from kdgraph.methods.registry import ADAPTERS, LOSSES, TRANSFORMS

td_mid = pytest.importorskip("torchdistill.losses.mid_level")
td_wrap = pytest.importorskip("torchdistill.models.wrapper")

B, C = 8, 10  # 8 images -> 32 rows; 10 classes
WEIGHTS = (1.0, 0.9, 10.0, 2.7)


def rel_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    return bool(((a - b).abs() <= rtol * b.abs().clamp_min(1e-12)).all())


def to_torchdistill_rows(x: torch.Tensor) -> torch.Tensor:
    """kdgraph's rows (by rotation: r*B + i) -> torchdistill's rows (by image: 4i + r)."""
    b = x.shape[0] // 4
    perm = torch.tensor([r * b + i for i in range(b) for r in range(4)])
    return x[perm]


def td_ss_module(teacher: torch.nn.Module) -> torch.nn.Module:
    wrapper = td_wrap.SSWrapper4SSKD({"path": "model.avgpool", "io": "output"}, feat_dim=512,
                                     ss_module_ckpt="/nonexistent/ss_module.pt", device="cpu", device_ids=None,
                                     distributed=False, teacher_model=teacher)
    return wrapper.ss_module


def pooled(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    m = model
    h = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    return m.avgpool(m.layer4(m.layer3(m.layer2(m.layer1(h)))))


@pytest.fixture(scope="module")
def nets():
    """Random-init ResNet-34 teacher (eval) and ResNet-18 student (train), 10 classes, on the four
    views of 8 random 32x32 images: logits and avgpool features for every row."""
    torch.manual_seed(0)
    teacher, student = resnet34(num_classes=C).eval(), resnet18(num_classes=C).train()
    views = SSKDRotations()(torch.randn(B, 3, 32, 32))
    with torch.no_grad():
        t_feat = pooled(teacher, views)
        t_logits = teacher.fc(torch.flatten(t_feat, 1))
        s_feat = pooled(student, views)
        s_logits = student.fc(torch.flatten(s_feat, 1))
    targets = torch.randint(C, (B,), generator=torch.Generator().manual_seed(1))
    # let the teacher get some rotated views right so both branches of the selection run
    t_logits = t_logits.clone()
    t_logits[B:2 * B][torch.arange(B), targets] += 3.0
    return {"teacher": teacher, "t_feat": t_feat, "t_logits": t_logits, "s_feat": s_feat,
            "s_logits": s_logits, "targets": targets}


def test_registered():
    assert TRANSFORMS.get("sskd_rotations") is SSKDRotations
    assert ADAPTERS.get("sskd_head") is SSKDHead
    for name, cls in (("aux_sskd", AuxSSKDLoss), ("sskd_kd", SSKDKDLoss), ("sskd_ss", SSKDSelfSupervisionLoss),
                      ("sskd_tf", SSKDTransformLoss)):
        assert LOSSES.get(name) is cls


def test_rotations_match_pil_views_and_torchdistill_order():
    """torchdistill's SSKDDatasetWrapper builds [img, img.rotate(90), .rotate(180), .rotate(270)] (PIL,
    counter-clockwise) per image and views (B, 4, C, H, W) as 4B rows; ours are the same views,
    stacked by rotation, so row r*B + i of ours is row 4i + r of theirs."""
    g = torch.Generator().manual_seed(2)
    pils = [Image.fromarray(torch.randint(0, 256, (12, 12, 3), generator=g, dtype=torch.uint8).numpy())
            for _ in range(3)]
    batch = torch.stack([to_tensor(p) for p in pils])
    ours = SSKDRotations()(batch)
    assert ours.shape == (12, 3, 12, 12)
    theirs = torch.stack([torch.stack([to_tensor(p.rotate(90 * r, expand=True)) for r in range(4)])
                          for p in pils]).view(-1, 3, 12, 12)
    assert torch.equal(to_torchdistill_rows(ours), theirs)
    assert torch.equal(ours[:3], batch)
    with pytest.raises(ShapeError, match="square"):
        SSKDRotations()(torch.zeros(2, 3, 8, 12))


def test_split_views_layout():
    x = torch.arange(12).view(12, 1).float()  # B = 3: rows 0-2 normal, 3-5 rot90, 6-8 rot180, 9-11 rot270
    normal, rotated = split_views(x, "t")
    assert normal.flatten().tolist() == [0, 1, 2]
    assert rotated.flatten().tolist() == [3, 6, 9, 4, 7, 10, 5, 8, 11]
    with pytest.raises(ShapeError, match="sskd_rotations"):
        split_views(torch.zeros(10, 2), "sskd_ss")


def test_head_matches_torchdistill_ss_module(nets):
    args = SSKDHead.infer_args({}, {"x": (4 * B, 512, 1, 1)}, None)
    assert args == {"in_features": 512}
    head = SSKDHead(**args)
    ref = td_ss_module(nets["teacher"])
    ref.load_state_dict(head.state_dict())  # same keys: 0.weight, 0.bias, 2.weight, 2.bias
    out = head(nets["t_feat"])
    assert out.shape == (4 * B, 512)
    torch.testing.assert_close(out, ref(torch.flatten(nets["t_feat"], 1)))


def test_aux_loss_matches_torchdistill(nets):
    torch.manual_seed(3)
    head = SSKDHead(512)
    ref_head = td_ss_module(nets["teacher"])
    ref_head.load_state_dict(head.state_dict())
    loss = AuxSSKDLoss()(head(nets["t_feat"]))
    ref_out = ref_head(torch.flatten(to_torchdistill_rows(nets["t_feat"]), 1))
    expected = td_mid.AuxSSKDLoss()({}, {"ss_module": {"output": ref_out}})
    assert torch.isfinite(loss) and rel_close(loss.detach(), expected.detach()), (loss.item(), expected.item())
    loss.backward()
    expected.backward()
    for p, q in zip(head.parameters(), ref_head.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7)


def _terms(nets, s_head, t_head):
    s_emb, t_emb = s_head(nets["s_feat"]), t_head(nets["t_feat"])
    s_logits, t_logits, y = nets["s_logits"], nets["t_logits"], nets["targets"]
    return {
        "ce": CrossEntropy()(s_logits, y),
        "kd": SSKDKDLoss(temperature=4.0)(s_logits, t_logits),
        "ss": SSKDSelfSupervisionLoss(temperature=0.5, ratio=0.75)(s_emb, t_emb),
        "tf": SSKDTransformLoss(temperature=4.0, ratio=1.0)(s_logits, t_logits, y),
    }


def _reference(nets, s_head, t_head, weights):
    ref = td_mid.SSKDLoss("model.fc", "model.fc", "ss_module", "ss_module", kl_temp=4.0, ss_temp=0.5,
                          tf_temp=4.0, ss_ratio=0.75, tf_ratio=1.0, loss_weights=list(weights),
                          reduction="batchmean")
    s_io = {"model.fc": {"output": to_torchdistill_rows(nets["s_logits"])},
            "ss_module": {"output": s_head(torch.flatten(to_torchdistill_rows(nets["s_feat"]), 1))}}
    t_io = {"model.fc": {"output": to_torchdistill_rows(nets["t_logits"])},
            "ss_module": {"output": t_head(torch.flatten(to_torchdistill_rows(nets["t_feat"]), 1))}}
    return ref(s_io, t_io, nets["targets"])


def test_each_term_matches_torchdistill(nets):
    """torchdistill's SSKDLoss with one-hot loss_weights isolates each of its four terms."""
    torch.manual_seed(4)
    s_head, t_head = SSKDHead(512), SSKDHead(512)
    terms = _terms(nets, s_head, t_head)
    for i, name in enumerate(("ce", "kd", "ss", "tf")):
        onehot = [0.0] * 4
        onehot[i] = 1.0
        expected = _reference(nets, s_head, t_head, onehot)
        assert torch.isfinite(terms[name])
        assert rel_close(terms[name].detach(), expected.detach()), (name, terms[name].item(), expected.item())


def test_weighted_sum_and_gradients_match_torchdistill(nets):
    torch.manual_seed(5)
    s_head, t_head = SSKDHead(512), SSKDHead(512)
    ref_s, ref_t = SSKDHead(512), SSKDHead(512)
    ref_s.load_state_dict(s_head.state_dict())
    ref_t.load_state_dict(t_head.state_dict())
    s_logits = nets["s_logits"].clone().requires_grad_()
    ref_logits = nets["s_logits"].clone().requires_grad_()
    terms = _terms(dict(nets, s_logits=s_logits), s_head, t_head)
    total = sum(w * terms[n] for w, n in zip(WEIGHTS, ("ce", "kd", "ss", "tf")))
    expected = _reference(dict(nets, s_logits=ref_logits), ref_s, ref_t, WEIGHTS)
    assert rel_close(total.detach(), expected.detach()), (total.item(), expected.item())
    total.backward()
    expected.backward()
    torch.testing.assert_close(s_logits.grad, ref_logits.grad, rtol=1e-4, atol=1e-7)
    for p, q in zip(s_head.parameters(), ref_s.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in t_head.parameters()), "the teacher's similarities are detached"


def test_selection_drops_the_worst_ranked_wrong_views(nets):
    """ss keeps every view the teacher gets right plus int(0.75 * wrong) of the wrong ones, best ranks first."""
    t_head = SSKDHead(512)
    with torch.no_grad():
        cos_t = view_similarities(t_head(nets["t_feat"]), "t")
    source = torch.arange(B).repeat_interleave(3)
    keep = keep_ranked(cos_t, source, 0.75)
    rank = (cos_t > cos_t[torch.arange(3 * B), source].unsqueeze(1)).sum(1)
    wrong = int((rank > 0).sum())
    assert 0 < wrong < 3 * B
    assert keep.numel() == 3 * B - wrong + int(0.75 * wrong) < 3 * B
    assert torch.equal(keep, keep.sort()[0])
    dropped = sorted(set(range(3 * B)) - set(keep.tolist()))
    assert min(rank[dropped].tolist()) >= max(rank[keep].tolist())
    # a hand-made case: rows 0 and 2 right, row 1 ranks its label 3rd, row 3 2nd -> ratio 0.5 keeps row 3
    scores = torch.tensor([[9., 1, 2], [3, 2, 1], [1, 9, 2], [2, 3, 1]])
    assert keep_ranked(scores, torch.tensor([0, 2, 1, 0]), 0.5).tolist() == [0, 2, 3]


def test_losses_demand_four_views():
    with pytest.raises(ShapeError, match="4B rows"):
        SSKDKDLoss()(torch.zeros(6, C), torch.zeros(6, C))
    with pytest.raises(ShapeError, match="targets"):
        SSKDTransformLoss()(torch.zeros(8, C), torch.zeros(8, C), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        SSKDSelfSupervisionLoss(ratio=1.5)


# --------------------------------------------------------------------------------------------
# through the compiled distiller (specs/sskd_resnet18.yaml at 32x32)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def distiller():
    import kdgraph

    from conftest import small_spec

    return kdgraph.compile(small_spec("sskd_resnet18.yaml", size=32))


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}


def _sgd_steps(d, steps: int = 2):
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(11)
    outs = []
    d.train()
    for _ in range(steps):
        x, y = torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 1000, (2,), generator=g)
        out = d(x, y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        outs.append(out)
    return outs


def test_spec_compiles_with_reference_hyperparameters(distiller):
    d = distiller
    assert d.stages == ["teacher_ss", "distill"]
    s1, s2 = d.spec.stages
    assert (s1.epochs, s1.scheduler.milestones, s2.epochs, s2.scheduler.milestones) == (30, [10, 20], 100, [30, 60, 90])
    for s in (s1, s2):
        assert (s.batch_size, s.reference_world_size, s.optimizer.lr, s.optimizer.weight_decay) == (85, 3, 0.1, 5e-4)
        assert s.transform.type == "sskd_rotations"
    assert {ls.name: ls.weight for ls in s2.losses} == {"ce": 1.0, "kd": 0.9, "ss": 10.0, "tf": 2.7}
    assert d.spec.reference.top1 == 70.09
    assert d.batch_inputs == []
    assert isinstance(d.adapters["teacher_ss"], SSKDHead) and d.adapters["teacher_ss"][0].in_features == 512


def test_distiller_stage2_matches_torchdistill_end_to_end(distiller):
    """The fused graph (rotations -> both nets -> heads -> four terms) equals torchdistill's SSKDLoss
    on the same networks, fed its own row order (views stacked by image)."""
    d = distiller.enter_stage("distill").eval()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    with torch.no_grad():
        out = d(x, y)
        views = to_torchdistill_rows(SSKDRotations()(x))
        t_feat, s_feat = pooled(d.teacher, views), pooled(d.student, views)
        s_io = {"model.fc": {"output": d.student.fc(torch.flatten(s_feat, 1))},
                "ss_module": {"output": d.adapters["student_ss"](s_feat)}}
        t_io = {"model.fc": {"output": d.teacher.fc(torch.flatten(t_feat, 1))},
                "ss_module": {"output": d.adapters["teacher_ss"](t_feat)}}
        ref = td_mid.SSKDLoss("model.fc", "model.fc", "ss_module", "ss_module", kl_temp=4.0, ss_temp=0.5,
                              tf_temp=4.0, ss_ratio=0.75, tf_ratio=1.0, loss_weights=list(WEIGHTS))
        expected = ref(s_io, t_io, y)
    assert set(out.terms) == {"ce", "kd", "ss", "tf"}
    assert out.logits.shape == (8, 1000)
    assert rel_close(out.loss, expected), (out.loss.item(), expected.item())


@pytest.mark.parametrize("stage,trains", [("teacher_ss", {"teacher_ss"}), ("distill", {"student", "student_ss"})])
def test_sgd_steps_train_only_what_the_stage_names(distiller, stage, trains):
    d = distiller.enter_stage(stage)
    parts = {"teacher": d.teacher, "student": d.student, "teacher_ss": d.adapters["teacher_ss"],
             "student_ss": d.adapters["student_ss"]}
    before = {name: _snapshot(m) for name, m in parts.items()}
    expected_params = {id(p) for name in trains for p in parts[name].parameters()}
    assert {id(p) for p in d.trainable_parameters()} == expected_params
    outs = _sgd_steps(d)
    for out in outs:
        assert torch.isfinite(out.loss) and all(torch.isfinite(v) for v in out.terms.values())
    for name, module in parts.items():
        changed = _changed(before[name], module)
        params = {k for k, _ in module.named_parameters()}
        if name in trains:
            assert params <= changed, f"{stage}: {name} did not train: {sorted(params - changed)[:3]}"
        else:
            assert not (changed & params), f"{stage}: {name} changed: {sorted(changed)[:3]}"
    assert not _changed(before["teacher"], d.teacher), "teacher params and BN buffers must stay bit-identical"
    assert all(not p.requires_grad for p in d.teacher.parameters())
