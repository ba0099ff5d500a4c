"""Every script under examples/ runs as a user would run it (a subprocess, tiny inputs), and what it prints is
checked against values computed here independently: shapes from forward hooks on the same networks, the total
loss from its printed terms, parameter counts from torchvision, the claims about what trained by re-running the
example's steps in this process. Nothing below greps for a verdict the example printed about itself."""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
from types import ModuleType

import networkx as nx
import pytest
import torch
from torch.nn import functional as F

import kdgraph
from kdgraph.models.zoo import tiny_cnn
from conftest import ROOT

EXAMPLES = ROOT / "examples"
PRINTED = 5e-5  # the examples print losses with 4 decimals


def run_example(name: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def load_example(name: str) -> ModuleType:
    """The example as a module (its classes and SPEC), imported once per process (it may register names)."""
    mod_name = f"kdgraph_example_{name.removesuffix('.py')}"
    if mod_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(mod_name, EXAMPLES / name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
    return sys.modules[mod_name]


def steps(out: str) -> list[dict[str, float]]:
    """Each ``step k: loss=... name=value ...`` line as {"loss": ..., name: value}."""
    rows = []
    for line in out.splitlines():
        if re.search(r"step \d+: loss=", line):
            rows.append({k: float(v) for k, v in re.findall(r"([\w.]+)=(-?[0-9.]+(?:e-?\d+)?)", line)})
    return rows


def assert_loss_is_the_sum_of_its_terms(rows: list[dict[str, float]]) -> None:
    for r in rows:
        terms = {k: v for k, v in r.items() if k != "loss"}
        assert terms and abs(r["loss"] - sum(terms.values())) <= PRINTED * (len(terms) + 1) + 1e-9, r


def output_shapes(module: torch.nn.Module, names: list[str], x: torch.Tensor) -> dict[str, list[int]]:
    """Output shapes of ``module``'s submodules ``names`` (and ``@output``) on ``x``, by forward hooks."""
    shapes: dict[str, list[int]] = {}
    hooks = [module.get_submodule(n).register_forward_hook(
        lambda _m, _i, out, n=n: shapes.__setitem__(n, list(out.shape))) for n in names]
    try:
        with torch.no_grad():
            shapes["@output"] = list(module.eval()(x).shape)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def test_every_example_is_tested():
    # lightning_loop.py and accelerate_loop.py: tests/test_frameworks.py; every spec in custom_loop.py:
    # tests/test_custom_loop.py
    # equality, not a subset: an empty or moved folder fails, and a new example must be added here (and tested)
    assert {p.name for p in EXAMPLES.glob("*.py")} == {"custom_loop.py", "custom_model_pair.py", "custom_loss.py",
                                                       "lightning_loop.py", "accelerate_loop.py", "timm_pair.py"}


def test_custom_model_pair(tmp_path):
    page = tmp_path / "pair.html"
    out = run_example("custom_model_pair.py", "--steps", "6", "--batch", "8", "--draw", str(page))
    ex = load_example("custom_model_pair.py")

    # the tap shapes it prints are the networks' real shapes (traced at batch 2, 32x32 inputs)
    printed = {t: json.loads(s) for t, s in re.findall(r"^tap (\S+)\s+-> node \S+\s+shape (\[[\d, ]*\])", out, re.M)}
    x = torch.randn(2, 3, 32, 32)
    t_shapes = output_shapes(ex.TeacherNet(), ["stage2", "stage3"], x)
    s_shapes = output_shapes(ex.StudentNet(), ["stage2", "stage3"], x)
    assert printed == {"student:@output": s_shapes["@output"], "teacher:@output": t_shapes["@output"],
                       "batch:targets": [2], "student:stage2": s_shapes["stage2"], "teacher:stage2": t_shapes["stage2"],
                       "student:stage3": s_shapes["stage3"],
                       "teacher:stage3/add": t_shapes["stage3"]}  # the block's add, before its (shape-keeping) ReLU
    assert printed["teacher:@output"] == [2, 10] and printed["student:stage3"] == [2, 32, 8, 8]

    # the printed path is a path of the fused graph, from the tap's node to the total loss
    torch.manual_seed(0)
    teacher, student = ex.TeacherNet(), ex.StudentNet()
    d = kdgraph.compile(ex.SPEC, teacher=teacher, student=student)
    G = d.graph
    path = re.search(r"^path teacher:stage3/add -> loss: (.+)$", out, re.M).group(1).split(" -> ")
    assert path[0] == G.graph["taps"]["teacher:stage3/add"] and path[-1] == G.graph["loss_node"]
    assert all(G.has_edge(u, v) for u, v in zip(path, path[1:]))
    assert len(path) == nx.shortest_path_length(G, path[0], path[-1]) + 1

    # the losses: six steps, each total the sum of its printed terms, going down on the fixed batch
    rows = steps(out)
    assert len(rows) == 6 and all(set(r) == {"loss", "ce", "kd", "at_stage2", "at_stage3"} for r in rows)
    assert_loss_is_the_sum_of_its_terms(rows)
    assert rows[-1]["loss"] < rows[0]["loss"]

    # step 0 re-done here with the example's seed and batch: the same numbers, and ce computed directly
    images, targets = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    teacher_before = copy.deepcopy(teacher.state_dict())
    student_before = copy.deepcopy(student.state_dict())
    d.train()
    first = d(images, targets)
    assert abs(first.loss.item() - rows[0]["loss"]) < 1e-3
    ce = 0.5 * F.cross_entropy(student.train()(images), targets)
    assert abs(ce.item() - rows[0]["ce"]) < 1e-3
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for _ in range(2):
        out_ = d(images, targets)
        opt.zero_grad(set_to_none=True)
        out_.loss.backward()
        opt.step()
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())  # frozen, BN too
    assert any(not torch.equal(student_before[k], v) for k, v in student.state_dict().items())

    # the page draws every loss term as a box
    text = page.read_text()
    data = json.loads(re.search(r'<script id="kd-data" type="application/json">(.*?)</script>', text, re.S).group(1))
    drawn = {n["title"] for st in data["stages"] for n in st["nodes"] if n["kind"] == "loss"}
    assert drawn == {"ce", "kd", "at_stage2", "at_stage3"}


def test_timm_pair():
    import timm

    out = run_example("timm_pair.py", "--steps", "4", "--batch", "8")
    ex = load_example("timm_pair.py")
    kw = ex.SPEC["teacher"]["kwargs"], ex.SPEC["student"]["kwargs"]

    # the printed parameter counts and tap shapes are those of the timm models built here independently
    teacher = timm.create_model("vit_small_patch16_224", **kw[0])
    student = timm.create_model("vit_small_patch16_224", **kw[1])
    counts = re.findall(r"^(teacher|student) timm\.models\.vision_transformer\.VisionTransformer: (\d+) parameters, "
                        r"(\d+) blocks", out, re.M)
    assert counts == [("teacher", str(sum(p.numel() for p in teacher.parameters())), "4"),
                      ("student", str(sum(p.numel() for p in student.parameters())), "2")]
    printed = {t: json.loads(s) for t, s in re.findall(r"^tap (\S+)\s+-> node \S+\s+shape (\[[\d, ]*\])", out, re.M)}
    x = torch.randn(2, 3, 32, 32)
    t_shapes = output_shapes(teacher, ["blocks.3"], x)
    s_shapes = output_shapes(student, ["blocks.1"], x)
    assert printed == {"student:@output": s_shapes["@output"], "teacher:@output": t_shapes["@output"],
                       "batch:targets": [2], "student:blocks.1": s_shapes["blocks.1"],
                       "teacher:blocks.3": t_shapes["blocks.3"]}
    assert printed["teacher:blocks.3"] == [2, 17, 384]  # 16 patches of 8x8 + the class token, width 384

    rows = steps(out)
    assert len(rows) == 4 and all(set(r) == {"loss", "ce", "kd", "hidden"} for r in rows)
    assert_loss_is_the_sum_of_its_terms(rows)
    assert rows[-1]["loss"] < rows[0]["loss"]

    # step 0 re-done here: the same total, and the hidden-state term is the MSE of the two blocks' outputs
    torch.manual_seed(0)
    d = kdgraph.compile(ex.SPEC)
    images, targets = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    d.train()
    first = d(images, targets, return_taps=True)
    assert abs(first.loss.item() - rows[0]["loss"]) < 1e-3
    mse = F.mse_loss(first.taps["student:blocks.1"], first.taps["teacher:blocks.3"])
    assert abs(mse.item() - rows[0]["hidden"]) < 1e-3


def test_custom_loss():
    out = run_example("custom_loss.py", "--steps", "6", "--batch", "8")
    ex = load_example("custom_loss.py")

    # the connector's sizes, inferred from the traced shapes, equal the features computed here
    x = torch.randn(2, 3, 32, 32)
    student_features = output_shapes(tiny_cnn(3, width=8), ["avgpool"], x)["avgpool"]
    teacher_features = output_shapes(tiny_cnn(3, width=32), ["avgpool"], x)["avgpool"]
    s_feat, t_feat = student_features[1] * student_features[2] * student_features[3], teacher_features[1]
    m = re.search(r"^connector: (\d+) -> (\d+) features \(inferred\)$", out, re.M)
    assert (int(m.group(1)), int(m.group(2))) == (s_feat, t_feat) == (32, 128)
    assert re.search(rf"compile-time check: .*student:avgpool \({s_feat} features.*teacher:/flatten \({t_feat} "
                     rf"features", out)
    assert "'cosine': 'CosineEmbedding'" in out

    rows = steps(out)
    assert len(rows) == 6 and all(set(r) == {"loss", "ce", "cosine"} for r in rows)
    assert_loss_is_the_sum_of_its_terms(rows)
    assert rows[-1]["cosine"] < rows[0]["cosine"]

    # the registered loss computes 1 - cos; the connector is trained by a step (re-done here)
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    assert torch.allclose(ex.CosineEmbedding()(s, t), (1 - F.cosine_similarity(s, t, dim=1)).mean())
    torch.manual_seed(0)
    d = kdgraph.compile(ex.SPEC)
    connector = d.adapters["connector"]
    assert (connector.fc.in_features, connector.fc.out_features) == (s_feat, t_feat)
    before = connector.fc.weight.detach().clone()
    teacher_before = copy.deepcopy(d.teacher.state_dict())
    d.train()
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.05, momentum=0.9)
    loss = d(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    assert not torch.equal(connector.fc.weight, before)
    assert all(torch.equal(teacher_before[k], v) for k, v in d.teacher.state_dict().items())


def test_custom_loop():
    out = run_example("custom_loop.py", "--steps", "2", "--size", "32", "--batch", "4")
    spec = kdgraph.load_spec(ROOT / "specs" / "kd_resnet18.yaml")
    rows = steps(out)
    assert len(rows) == 2 * len(spec.stages)
    assert all(x == x and abs(x) < 1e6 for r in rows for x in r.values())  # finite
    assert all({ls.name for ls in spec.stages[0].losses} <= set(r) for r in rows)
    assert_loss_is_the_sum_of_its_terms(rows)
    tv = pytest.importorskip("torchvision")
    student = tv.models.resnet18(weights=None, num_classes=spec.input.num_classes)
    n = int(re.search(r"student parameters: (\d+)", out).group(1))
    assert n == sum(p.numel() for p in student.parameters())
