"""Drawing the fused graph: every shipped spec renders with Graphviz and shows every tap, adapter and loss;
the self-contained HTML page renders in headless Chromium; .dot and .html need no Graphviz."""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import kdgraph
from kdgraph import viz
from kdgraph.cli import main
from kdgraph.models import build_model
from conftest import ROOT, SPECS, small_spec

SPEC_FILES = sorted(p.name for p in SPECS.glob("*.yaml"))
_MODELS: dict[tuple, torch.nn.Module] = {}


def _model(ref):
    """Random-init networks are built once per reference and copied (building dominates compile time)."""
    key = (ref.model, repr(sorted(ref.kwargs.items())))
    if key not in _MODELS:
        _MODELS[key] = build_model(ref)
    return copy.deepcopy(_MODELS[key])


def compile_small(name: str):
    spec = small_spec(name)
    return kdgraph.compile(spec, teacher=_model(spec.teacher), student=_model(spec.student))


@pytest.fixture(scope="module")
def kr():
    return compile_small("kr_resnet18.yaml")


@pytest.fixture(scope="module")
def ft():
    return compile_small("ft_resnet18.yaml")


SVG = "{http://www.w3.org/2000/svg}"


def _svg_parts(svg: str) -> tuple[str, dict[str, str], set[str]]:
    """(all text, node title -> its text, edge titles) of a Graphviz SVG."""
    root = ET.fromstring(svg)  # well-formed XML
    texts = "\n".join("".join(el.itertext()) for el in root.iter(f"{SVG}text"))
    nodes, edges = {}, set()
    for g in root.iter(f"{SVG}g"):
        title = g.find(f"{SVG}title")
        if title is None:
            continue
        if g.get("class") == "node":
            nodes[title.text] = " ".join("".join(t.itertext()) for t in g.iter(f"{SVG}text"))
        elif g.get("class") == "edge":
            edges.add(title.text)
    return texts, nodes, edges


def test_shipped_specs_exist():
    assert len(SPEC_FILES) >= 9 and "kr_resnet18.yaml" in SPEC_FILES and "ft_resnet18.yaml" in SPEC_FILES


@pytest.mark.parametrize("name", SPEC_FILES)
def test_svg_of_every_shipped_spec_names_every_tap_adapter_and_loss(name, tmp_path):
    d = compile_small(name)
    out = tmp_path / f"{name}.svg"
    drawn = viz.render(d, out)  # every stage
    assert [v.stage for v in drawn] == d.stages
    svg = out.read_text()
    texts, svg_nodes, svg_edges = _svg_parts(svg)
    for i, stage in enumerate(d.stages):
        report = d.build_stage(i)[1]
        for t in report.taps:
            if not t.tap.startswith("batch:") or t.tap == "batch:targets" or t.used_by:
                assert t.tap in texts, f"{name}/{stage}: tap {t.tap} not drawn"
        for a in report.adapters:
            assert a.name in texts, f"{name}/{stage}: adapter {a.name} not drawn"
        for lo in report.losses:
            assert lo.name in texts, f"{name}/{stage}: loss {lo.name} not drawn"
        assert f"{stage}" in texts
        # the clusters of the networks the stage runs
        if report.uses_teacher:
            assert f"teacher: {d.spec.teacher.model}" in texts
        if report.uses_student:
            assert f"student: {d.spec.student.model}" in texts
    # every tap is a tag on the edges from the tapped value to the adapters / losses reading it
    # (Graphviz titles nodes by id and edges "a->b")
    for v in drawn:
        nodes, edges = v.drawing()
        p = f"s{v.index}_"
        for e in v.edges:
            for tap, shape in e.taps:
                tid = next(k for k, n in nodes.items() if n.kind == "tap" and n.title == tap
                           and n.details["reads"] == e.src)
                assert tap in svg_nodes[p + tid] and shape in svg_nodes[p + tid]
                assert f"{p}{e.src}->{p}{tid}" in svg_edges and f"{p}{tid}->{p}{e.dst}" in svg_edges
                assert v.nodes[e.dst].kind in ("adapter", "loss", "total")
        assert {f"{p}{e.src}->{p}{e.dst}" for e in edges} <= svg_edges
        assert {p + k for k in nodes} <= set(svg_nodes)
        factor = v.graph.graph["batch_factor"]  # SSKD's rotations make 4 rows of each image
        lead = "B×" if factor == 1 else f"{int(factor)}B×"
        for n in v.nodes.values():
            if n.kind in ("teacher", "student") and not n.pruned:
                assert any(ln.startswith(lead) for ln in n.lines), (name, n.title, n.lines)


def test_kr_picture_collapses_blocks_marks_pruned_and_trainable(kr, tmp_path):
    (v,) = viz.views(kr, "main", depth=1)
    teacher = {n.title for n in v.nodes.values() if n.kind == "teacher"}
    assert {"conv1", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"} <= teacher
    assert not any("." in t for t in teacher)  # blocks collapsed at depth 1
    assert sum(n.kind == "adapter" for n in v.nodes.values()) == 5
    assert sum(n.kind == "loss" for n in v.nodes.values()) == 6
    assert sum(n.kind == "total" for n in v.nodes.values()) == 1
    pruned = {n.title for n in v.nodes.values() if n.pruned}
    assert pruned == {"fc", "/flatten"}  # the teacher's head: no loss reads the teacher's logits
    assert all(n.kind == "teacher" for n in v.nodes.values() if n.pruned)
    assert all(n.trainable for n in v.nodes.values() if n.kind in ("student", "adapter"))
    assert not any(n.trainable for n in v.nodes.values() if n.kind == "teacher")
    layer4 = v.nodes["student:layer4"]
    assert "B×512×2×2" in layer4.lines and "2× BasicBlock" in layer4.lines
    dot = viz.to_dot([v])
    fill = viz.PRUNED[0]
    assert re.search(rf'"s0_teacher:fc" \[.*fillcolor="{fill}".*dashed', dot) or \
        re.search(rf'"s0_teacher:fc" \[.*dashed.*fillcolor="{fill}"', dot)
    assert 'label="teacher: torchvision:resnet34  (frozen)"' in dot
    assert 'label="student: torchvision:resnet18  (trains)"' in dot
    assert "rankdir=LR" in dot
    # a tap edge carries its tap name and shape
    edge = next(e for e in v.edges if "student:layer4.-1" in dict(e.taps))
    assert (edge.src, edge.dst) == ("student:layer4", "adapter:abf_layer4")
    assert dict(edge.taps)["student:layer4.-1"] == "B×512×2×2"
    png = tmp_path / "kr.png"
    viz.render(kr, png, depth=1)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 50_000


def test_depth_expands_blocks(kr):
    G = kr.graph
    net_nodes = {n for n, a in G.nodes(data=True) if a["role"] in ("teacher", "student")}
    (d0,) = viz.views(kr, None, depth=0)
    assert sorted(n.title for n in d0.nodes.values() if n.kind in ("teacher", "student")) == \
        sorted([kr.spec.teacher.model, kr.spec.student.model])
    (d2,) = viz.views(kr, None, depth=2)
    titles = {n.title for n in d2.nodes.values() if n.kind == "student"}
    assert {"layer1.0", "layer1.1", "layer4.1"} <= titles and "layer1" not in titles
    (full,) = viz.views(kr, None, depth=99)  # every fx node its own box, edges = the graph's edges
    boxes = [n for n in full.nodes.values() if n.kind in ("teacher", "student")]
    assert len(boxes) == len(net_nodes) and all(len(n.members) == 1 for n in boxes)
    member = {n.members[0]: n.id for n in boxes}
    net_edges = {(u, v) for u, v in G.edges if u in net_nodes and v in net_nodes}
    assert {(member[u], member[v]) for u, v in net_edges} == \
        {(e.src, e.dst) for e in full.edges if e.src in member.values() and e.dst in member.values()}


def test_two_stage_ft_shows_frozen_and_trainable_adapters(ft, tmp_path):
    para, main_ = viz.views(ft, "all", depth=1)
    assert para.nodes["adapter:paraphraser_encoder"].trainable
    assert "trainable" in para.nodes["adapter:paraphraser_encoder"].lines
    enc = main_.nodes["adapter:paraphraser_encoder"]
    assert not enc.trainable and "frozen" in enc.lines
    assert main_.nodes["adapter:translator"].trainable
    assert "adapter:paraphraser_decoder" not in main_.nodes  # stage 2 runs only the encoder
    assert not any(n.kind == "student" for n in para.nodes.values())  # stage 1 never runs the student
    dot = viz.to_dot([para, main_])
    assert dot.count("subgraph \"cluster_s") == 5  # 2 stages, teacher in both, student in the second
    enc_line = next(ln for ln in dot.splitlines() if ln.strip().startswith('"s1_adapter:paraphraser_encoder" ['))
    assert "dashed" in enc_line and "penwidth=1.0" in enc_line
    tr_line = next(ln for ln in dot.splitlines() if ln.strip().startswith('"s1_adapter:translator" ['))
    assert "dashed" not in tr_line and "penwidth=2.2" in tr_line


def test_dot_and_html_need_no_graphviz(ft, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert shutil.which("dot") is None
    viz.render(ft, tmp_path / "g.dot")
    viz.render(ft, tmp_path / "g.html")
    assert (tmp_path / "g.dot").read_text().startswith("digraph kdgraph {")
    with pytest.raises(viz.GraphvizMissing, match="apt-get install graphviz"):
        viz.render(ft, tmp_path / "g.svg")
    with pytest.raises(kdgraph.KDGraphError, match="unknown format"):
        viz.render(ft, tmp_path / "g.jpeg")


def _chromium(*args: str, tmp: Path) -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert exe, "headless Chromium is needed for this test: apt-get install chromium (.ci/run installs it)"
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp / 'chromium-profile'}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_html_renders_in_headless_chromium(kr, ft, tmp_path):
    for d, name in ((kr, "kr"), (ft, "ft")):
        page = tmp_path / f"{name}.html"
        drawn = viz.render(d, page, depth=1)
        text = page.read_text()
        # self-contained: nothing is fetched (the only URL is the SVG namespace)
        assert not re.search(r"""(src|href)\s*=\s*["'](https?:)?//""", text)
        assert set(re.findall(r"https?://[^\s\"'<>]+", text)) <= {"http://www.w3.org/2000/svg"}
        dom = _chromium("--virtual-time-budget=5000", "--dump-dom", page.as_uri(), tmp=tmp_path)
        expected = sum(len(v.nodes) for v in drawn)
        taps = sum(1 for v in drawn for n in v.drawing()[0].values() if n.kind == "tap")
        assert taps == sum(len({(e.src, t) for e in v.edges for t, _ in e.taps}) for v in drawn)
        assert f'data-rendered-nodes="{expected}"' in dom and f'data-rendered-taps="{taps}"' in dom
        assert len(re.findall(r'<g class="node" data-id=', dom)) == expected
        assert len(re.findall(r'<g class="tap" data-id=', dom)) == taps
        assert len(re.findall(r'<g class="edge"', dom)) == sum(len(v.drawing()[1]) for v in drawn)
        assert f"rendered {expected} nodes and {taps} taps in {len(drawn)} stage(s)" in dom
    shot = tmp_path / "kr.png"
    _chromium("--window-size=1400,800", f"--screenshot={shot}", (tmp_path / "kr.html").as_uri(), tmp=tmp_path)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    """Two (x, y, w, h) rectangles share some area."""
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def test_overlap_helper():
    assert _overlap((0, 0, 10, 10), (5, 5, 10, 10)) and not _overlap((0, 0, 10, 10), (10, 0, 5, 5))


def test_html_layout_keeps_boxes_and_clusters_apart(kr, ft):
    for v in viz.views(kr, None, depth=1) + viz.views(ft, "all", depth=1):
        lay = viz.layout(v)
        assert len(lay["nodes"]) == len(v.drawing()[0]) and len(lay["edges"]) == len(v.drawing()[1])
        boxes = {n["id"]: (n["x"], n["y"], n["w"], n["h"]) for n in lay["nodes"]}
        ids = list(boxes)
        for i, a in enumerate(ids):  # no two boxes (or tap tags) overlap
            for b in ids[i + 1:]:
                assert not _overlap(boxes[a], boxes[b]), (a, b)
        for n in lay["nodes"]:  # everything inside the drawing
            assert n["x"] >= 0 and n["y"] >= 0
            assert n["x"] + n["w"] <= lay["width"] and n["y"] + n["h"] <= lay["height"]
        clusters = {c["role"]: c for c in lay["clusters"]}
        if "teacher" in clusters and "student" in clusters:
            t, s = clusters["teacher"], clusters["student"]
            assert t["y"] + t["h"] < s["y"]  # teacher band above the student band
        for n in lay["nodes"]:
            for role, c in clusters.items():
                rect = (c["x"], c["y"], c["w"], c["h"])
                if n["kind"] == role:  # a network's boxes inside its cluster, nothing else there
                    assert c["x"] <= n["x"] and n["x"] + n["w"] <= c["x"] + c["w"]
                    assert c["y"] <= n["y"] and n["y"] + n["h"] <= c["y"] + c["h"]
                else:
                    assert not _overlap(boxes[n["id"]], rect), (n["id"], role)


def test_cli_viz(tmp_path):
    out = tmp_path / "ft.dot"
    r = CliRunner().invoke(main, ["viz", str(SPECS / "ft_resnet18.yaml"), "-o", str(out), "--stage", "main",
                                  "--depth", "2", "--input-size", "64", "64"])
    assert r.exit_code == 0, r.output
    assert "stage main:" in r.output and f"wrote {out}" in r.output
    dot = out.read_text()
    assert "s1_student:layer1.0" in dot and "paraphraser_decoder" not in dot
    r = CliRunner().invoke(main, ["viz", str(SPECS / "ft_resnet18.yaml"), "-o", str(tmp_path / "x.pdf")])
    assert r.exit_code == 2 and "--format" in r.output
    r = CliRunner().invoke(main, ["viz", str(SPECS / "ft_resnet18.yaml"), "-o", str(tmp_path / "x.svg"),
                                  "--stage", "mian"])
    assert r.exit_code == 2 and "no stage 'mian'" in r.output and "Did you mean: main?" in r.output
    assert not (tmp_path / "x.svg").exists()


def test_sskd_picture_and_compile_summary_print_the_same_tap_shapes():
    """The rotations make 4 rows of every image: both the picture and `kdgraph compile` say 4B, tap by tap."""
    d = compile_small("sskd_resnet18.yaml")
    r = CliRunner().invoke(main, ["compile", str(SPECS / "sskd_resnet18.yaml"), "--input-size", "64", "64", "--json"])
    assert r.exit_code == 0, r.output
    summary = {s["stage"]: {t["tap"]: t["shape"] for t in s["taps"]} for s in json.loads(r.output)["stages"]}
    checked = 0
    for v in viz.views(d, "all"):
        for e in v.edges:
            for tap, shape in e.taps:
                assert summary[v.stage][tap] == shape, (v.stage, tap)
                checked += 1
    assert checked >= 8
    # independently of either: SSKD stacks 4 rotations of each image, resnet's avgpool keeps 512 channels
    assert summary["distill"]["teacher:avgpool"] == "4B×512×1×1"
    assert summary["distill"]["student:@output"] == "4B×1000"
    assert summary["distill"]["batch:targets"] == "B"  # the labels are not rotated
    adapters = {a["name"]: a["output_shape"] for s in json.loads(r.output)["stages"] for a in s["adapters"]}
    assert adapters == {"teacher_ss": "4B×512", "student_ss": "4B×512"}


def test_html_page_comes_from_the_package_data_files(ft, tmp_path):
    from importlib import resources

    page = resources.files("kdgraph.viz").joinpath("page")
    css, js, skeleton = (page.joinpath(n).read_text(encoding="utf-8") for n in ("page.css", "page.js", "page.html"))
    text = viz.to_html(viz.views(ft, "all"))
    assert css.strip() and css in text and js.strip() and js in text
    assert all(slot in skeleton for slot in ("__TITLE__", "__STYLE__", "__DATA__", "__SCRIPT__"))
    assert not re.search(r"__(TITLE|STYLE|DATA|SCRIPT)__", text)  # every slot filled
    head, tail = skeleton.split("__STYLE__")[0], skeleton.split("__SCRIPT__")[1]
    assert text.startswith(head.replace("__TITLE__", "kdgraph · ft_resnet18")) and text.endswith(tail)


def test_html_slots_are_filled_once(ft, monkeypatch):
    """Text put into one slot is never searched for another (a spec named like a slot stays as it is)."""
    vs = viz.views(ft, "main")
    for v in vs:
        monkeypatch.setattr(v, "spec", "__DATA__ & <b>")
    text = viz.to_html(vs)
    assert "<title>kdgraph · __DATA__ &amp; &lt;b&gt;</title>" in text
    data = re.search(r'<script id="kd-data" type="application/json">(.*?)</script>', text, re.S).group(1)
    assert "<" not in data and json.loads(data)["spec"] == "__DATA__ & <b>"


def test_page_files_are_declared_package_data():
    """A wheel (not only an editable install) carries the page: pyproject.toml names every file under page/."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = conf["tool"]["setuptools"]["package-data"]["kdgraph.viz"]
    files = [p.relative_to(ROOT / "kdgraph" / "viz").as_posix() for p in (ROOT / "kdgraph" / "viz" / "page").iterdir()]
    assert sorted(files) == ["page/page.css", "page/page.html", "page/page.js"]
    assert all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in files), (files, patterns)
