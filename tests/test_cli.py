"""`kdgraph compile` / `kdgraph inspect` on the shipped specs, and errors a user can act on (exit 2)."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from kdgraph.cli import main
from conftest import ROOT, SPECS

CORE_SPECS = ["kd_resnet18.yaml", "at_resnet18.yaml", "l2_resnet18.yaml", "ft_resnet18.yaml"]


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.parametrize("name", CORE_SPECS)
def test_compile_summary_and_emitted_code(name, tmp_path):
    r = run("compile", str(SPECS / name), "--input-size", "64", "64", "--emit-code", str(tmp_path))
    assert r.exit_code == 0, r.output
    assert "trainable parameters" in r.output and "teacher nodes pruned" in r.output
    files = sorted(tmp_path.glob("*.py"))
    assert files and all("def forward(self, images, targets = None" in f.read_text() for f in files)
    for f in files:
        compile(f.read_text(), str(f), "exec")
    j = json.loads(run("compile", str(SPECS / name), "--input-size", "64", "64", "--json").output)
    for stage in j["stages"]:
        assert stage["taps"] and stage["losses"] and stage["trainable_parameters"] > 0
        assert all(re.fullmatch(r"B(×\d+)*", t["shape"]) for t in stage["taps"]), stage["taps"]


def test_compile_ft_reports_adapters_and_pruning():
    j = json.loads(run("compile", str(SPECS / "ft_resnet18.yaml"), "--json").output)  # full 224 input, offline
    para, main_ = j["stages"]
    assert {a["name"]: a["args"]["in_channels"] for a in para["adapters"]} == {
        "paraphraser_encoder": 512, "paraphraser_decoder": 256}
    assert para["adapters"][1]["args"]["out_channels"] == 512
    assert [t["shape"] for t in para["taps"] if t["tap"] == "teacher:layer4"] == ["B×512×7×7"]
    assert para["teacher_nodes_pruned"] == 3 and set(para["pruned"]) == {"avgpool", "/flatten", "fc"}
    assert para["trainable_parameters"] == sum(a["parameters"] for a in para["adapters"])
    tr = {a["name"]: a for a in main_["adapters"]}
    assert tr["translator"]["args"]["out_channels"] == 256 and tr["translator"]["trainable"]
    assert not tr["paraphraser_encoder"]["trainable"]
    assert main_["trainable_parameters"] == 11_689_512 + tr["translator"]["parameters"]


@pytest.mark.parametrize("target", [str(SPECS / "kd_resnet18.yaml"), "torchvision:resnet18"])
def test_inspect_lists_tappable_names_with_shapes(target):
    r = run("inspect", target, "--input-size", "64", "64", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    rows = data.get("student") or data["model"]
    names = {row["name"]: row["shape"] for row in rows}
    assert names["layer4"] == "B×512×2×2" and names["layer1.0/add"] == "B×64×16×16"
    assert names["layer1.0.relu#0"] == "B×64×16×16" and names["@output"] == "B×1000"
    if "teacher" in data:
        assert any(r["name"] == "layer3.5" for r in data["teacher"])  # resnet34 has 6 blocks in layer3
    text = run("inspect", target, "--input-size", "64", "64", "--grep", "layer4.1").output
    assert "layer4.1.conv2" in text and "layer1.0.conv1" not in text


def _write(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return str(p)


BASE = """
name: bad
input: {channels: 3, size: [64, 64]}
teacher: {model: "torchvision:resnet34"}
student: {model: "torchvision:resnet18"}
stages:
  - name: main
    optimizer: {lr: 0.1}
    losses:
"""


@pytest.mark.parametrize("losses,expected", [
    ('      - {type: mse, inputs: {student: "student:layer4", teacher: "teacher:layer44"}}',
     ["tap 'teacher:layer44'", "Did you mean: layer4", "kdgraph inspect"]),
    ('      - {type: mse, inputs: {student: "student:layer3", teacher: "teacher:layer4"}}',
     ["student:layer3", "[2, 256, 4, 4]", "teacher:layer4", "[2, 512, 2, 2]", "same shape"]),
    ('      - {type: mse, weigth: 2, inputs: {student: "student:fc", teacher: "teacher:fc"}}',
     ["stages[0].losses[0].weigth", "line 10", "unknown key 'weigth'", "Did you mean: weight"]),
    ('      - {type: msee, inputs: {student: "student:fc", teacher: "teacher:fc"}}',
     ["unknown loss 'msee'", "Did you mean: mse"]),
    ('      - {type: mse, inputs: {student: "student:fc", teacher: "adapter:nope"}}',
     ["names adapter 'nope'", "not declared"]),
    ('      - {type: mse, inputs: {student: "student:fc"}}',
     ["needs a tap for 'teacher'"]),
])
def test_spec_errors_exit_2_with_an_actionable_message(tmp_path, losses, expected):
    r = CliRunner().invoke(main, ["compile", _write(tmp_path, BASE + losses + "\n")])
    assert r.exit_code == 2, r.output
    for e in expected:
        assert e in r.output, (e, r.output)
    assert "Traceback" not in r.output


def test_bad_model_name_and_missing_file(tmp_path):
    r = CliRunner().invoke(main, ["compile", _write(tmp_path, BASE.replace("resnet34", "resnet43") +
                                                     '      - {type: cross_entropy}\n')])
    assert r.exit_code == 2 and "no classification model 'resnet43'" in r.output and "resnet34" in r.output
    r = CliRunner().invoke(main, ["compile", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and f"spec file '{tmp_path / 'missing.yaml'}' does not exist" in r.output


def test_real_process_prints_no_traceback(tmp_path):
    bad = _write(tmp_path, BASE + '      - {type: mse, inputs: {student: "student:layer4", teacher: "teacher:lyer4"}}\n')
    p = subprocess.run([sys.executable, "-m", "kdgraph", "compile", bad], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and "error:" in p.stderr and "Did you mean" in p.stderr
    assert p.stdout == ""


def test_yaml_never_executes_code(tmp_path):
    evil = _write(tmp_path, "!!python/object/apply:os.system ['echo pwned > %s/pwned']\n" % tmp_path)
    r = CliRunner().invoke(main, ["compile", evil])
    assert r.exit_code == 2 and not (tmp_path / "pwned").exists()


def test_every_command_is_registered_and_python_m_kdgraph_runs_the_same_group():
    assert set(main.commands) == {"compile", "inspect", "viz", "train", "eval", "export", "bench", "cache-teacher", "tune"}
    p = subprocess.run([sys.executable, "-m", "kdgraph", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0
    listed = re.findall(r"^  ([\w-]+)\s", p.stdout.split("Commands:")[1], re.M)
    assert sorted(listed) == sorted(main.commands)
