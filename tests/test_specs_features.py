"""The ImageNet specs of FitNet, FSP, DAB, VID and CCKD (ResNet-34 -> ResNet-18), compiled at 64 x 64: each stage's
terms equal torchdistill 1.1.5's losses on the tapped values, and real optimizer steps change what the stage
trains and nothing else (the teacher and frozen adapters stay bit-identical)."""
from __future__ import annotations

import pytest
import torch
import torchvision

from torchdistill.losses.mid_level import AltActTransferLoss as TdDAB
from torchdistill.losses.mid_level import CCKDLoss as TdCCKD
from torchdistill.losses.mid_level import FSPLoss as TdFSP
from torchdistill.losses.mid_level import KDLoss as TdKDLoss
from torchdistill.losses.mid_level import VIDLoss as TdVID

import kdgraph
from conftest import assert_rel, sgd_steps_change_only_trained, small_spec


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _steps_where_reached(d, x, y, untouched_prefixes, steps=2):
    """SGD steps in a stage whose losses reach only part of the student: the student's parameters under
    ``untouched_prefixes`` get no gradient and stay put, every other trained parameter moves, the teacher and
    every adapter the stage does not train stay bit-identical."""
    train = set(d.spec.stage(d.stage).train)
    before = {"teacher": _state(d.teacher), "student": _state(d.student),
              **{n: _state(a) for n, a in d.adapters.items()}}
    opt = torch.optim.SGD(d.trainable_parameters(), lr=1e-3, momentum=0.9)
    for _ in range(steps):
        out = d(x, y)
        assert torch.isfinite(out.loss) and all(torch.isfinite(v) for v in out.terms.values()), out.terms
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    for name, p in d.student.named_parameters():
        moved = not torch.equal(p, before["student"][name])
        assert moved != name.startswith(untouched_prefixes), f"student {name}: moved={moved}"
    assert all(torch.equal(v, before["teacher"][k]) for k, v in d.teacher.state_dict().items())
    for n, a in d.adapters.items():
        for k, v in a.state_dict().items():
            if n not in train:
                assert torch.equal(v, before[n][k]), f"adapter {n}: {k} changed"
            elif k.endswith("weight"):
                assert not torch.equal(v, before[n][k]), f"adapter {n}: {k} did not move"


def _io(taps: dict, prefix: str) -> dict:
    """torchdistill io dict (path -> {'output' | 'input': tensor}) of one side's taps."""
    io: dict = {}
    for key, v in taps.items():
        if key.startswith(prefix):
            path = key[len(prefix):]
            path, _, which = path.partition("@")
            io.setdefault(path, {})[which or "output"] = v
    return io


@pytest.fixture(scope="module")
def nets():
    """One random-init ResNet-34 / ResNet-18 pair for every spec here (building them is half a compile's time);
    each test records the states it checks right before its own steps."""
    torch.manual_seed(0)
    return torchvision.models.resnet34(), torchvision.models.resnet18()


def _compile(name: str, nets) -> kdgraph.Distiller:
    teacher, student = nets
    return kdgraph.compile(small_spec(name), teacher=teacher, student=student).train()


@pytest.fixture
def xy():
    g = torch.Generator().manual_seed(7)
    return torch.randn(2, 3, 64, 64, generator=g), torch.tensor([3, 998])


def test_fitnet_spec(xy, nets):
    x, y = xy
    d = _compile("fitnet_resnet18.yaml", nets)
    assert d.stages == ["hint", "main"]
    out = d(x, y, return_taps=True)
    s, t = out.taps["adapter:hint_regressor"], out.taps["teacher:layer1"]
    assert s.shape == t.shape == (2, 64, 16, 16)
    assert_rel(out.terms["hint"], torch.nn.functional.mse_loss(s, t, reduction="sum"), "hint MSE (sum)")
    # stage 1 reaches conv1, bn1 and layer1 only (torchdistill runs the student up to layer1 + ConvReg)
    _steps_where_reached(d, x, y, ("layer2", "layer3", "layer4", "fc"))
    d.enter_stage("main")
    out = d(x, y, return_taps=True)
    expected = TdKDLoss(".", "output", ".", "output", temperature=1.0, alpha=0.5)(
        {".": {"output": out.taps["student:@output"]}}, {".": {"output": out.taps["teacher:@output"]}}, y)
    assert_rel(out.loss, expected, "stage 2: torchdistill KDLoss (alpha 0.5, T 1)")
    sgd_steps_change_only_trained(d, x, y)


def test_fsp_spec(xy, nets):
    x, y = xy
    d = _compile("fsp_resnet18.yaml", nets)
    out = d(x, y, return_taps=True)
    pairs = {f"pair{i}": {f"{side}_first": {"io": "input", "path": "layer1" if i == 1 else f"layer{i}.1"}
                          for side in ("student", "teacher")}
             | {f"{side}_second": {"io": "output", "path": f"layer{i}"} for side in ("student", "teacher")}
             | {"weight": 1} for i in range(1, 5)}
    expected = TdFSP(pairs)(_io(out.taps, "student:"), _io(out.taps, "teacher:"))
    assert set(out.terms) == {f"fsp_layer{i}" for i in range(1, 5)}
    assert_rel(out.loss, expected, "four FSP terms vs torchdistill's FSPLoss")
    _steps_where_reached(d, x, y, ("fc",))  # the FSP terms reach every layer up to layer4
    d.enter_stage("main")
    assert set(d(x, y).terms) == {"ce"}


def test_dab_spec(xy, nets):
    x, y = xy
    d = _compile("dab_resnet18.yaml", nets)
    out = d(x, y, return_taps=True)
    pairs = {f"p{i}": {"student": {"io": "output", "path": f"adapter:connector{i}"},
                       "teacher": {"io": "output", "path": f"layer{i}"}, "weight": 1} for i in range(1, 5)}
    expected = TdDAB(pairs, margin=1.0, reduction="mean")(
        {k: {"output": v} for k, v in out.taps.items()}, _io(out.taps, "teacher:"))
    assert_rel(out.loss, expected, "four DAB terms vs torchdistill's AltActTransferLoss")
    _steps_where_reached(d, x, y, ("fc",))
    d.enter_stage("main")
    terms = sgd_steps_change_only_trained(d, x, y)
    assert set(terms) == {"ce"}


def test_vid_spec(xy, nets):
    x, y = xy
    d = _compile("vid_resnet18.yaml", nets)
    out = d(x, y, return_taps=True)
    pairs = {f"p{i}": {"student": {"io": "output", "path": f"r{i}"}, "teacher": {"io": "output", "path": f"layer{i}"},
                       "weight": 1} for i in range(1, 5)}
    s_io = {f"r{i}": {"output": (out.taps[f"adapter:regressor{i}.0"], out.taps[f"adapter:regressor{i}.1"])}
            for i in range(1, 5)}
    expected = TdVID(pairs)(s_io, _io(out.taps, "teacher:"))
    vid = sum(v for k, v in out.terms.items() if k.startswith("vid_"))
    assert_rel(vid, expected, "four VID terms vs torchdistill's VIDLoss")
    assert set(sgd_steps_change_only_trained(d, x, y)) == {"ce", *(f"vid_layer{i}" for i in range(1, 5))}


def test_cckd_spec(xy, nets):
    """The Gaussian kernel's powers of embedding dot products need a teacher of moderate feature size: a random
    ResNet-34's avgpool features have norms ~570 at 64 x 64 (a trained one's ~30) and the first SGD step overflows;
    a zero-initialised last BN per block (torchvision's zero_init_residual) keeps them small."""
    x, y = xy
    teacher = torchvision.models.resnet34(zero_init_residual=True)
    d = _compile("cckd_resnet18.yaml", (teacher, nets[1]))
    out = d(x, y, return_taps=True)
    td = TdCCKD("linear", "linear", {"type": "gaussian", "gamma": 0.4, "max_p": 2}, "batchmean")
    expected = 0.003 * td({"linear": {"output": out.taps["adapter:student_linear"]}},
                          {"linear": {"output": out.taps["adapter:teacher_linear"]}})
    assert_rel(out.terms["cckd"], expected, "cckd term (weight 0.003)")
    kd = TdKDLoss(".", "output", ".", "output", temperature=1.0, alpha=0)(
        {".": {"output": out.taps["student:@output"]}}, {".": {"output": out.taps["teacher:@output"]}}, y)
    assert_rel(out.terms["kd"], kd, "kd term: torchdistill's KDLoss with alpha 0 (no cross-entropy)")
    # the teacher's embedding trains, the teacher's backbone does not
    assert set(sgd_steps_change_only_trained(d, x, y)) == {"kd", "cckd"}
