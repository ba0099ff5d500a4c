"""FSDP2 in the fused graph (``runtime.distributed: fsdp``): two gloo ranks under torchrun against one process on the
same global batch, taps inside sharded units, units called out of their definition order, and the errors.

One torchrun launch of ``tests/fsdp_worker.py`` (2 ranks) and one in-process run of the same worker (no process
group: the graph's gather nodes pass values through) serve the first three tests. Tolerance: each rank's gradients
are averaged by FSDP2's reduce-scatter in another order than one process's batch mean (~1e-7 relative per step);
after 3 SGD steps with momentum, losses agree to rtol 1e-5 and the student's parameters to rtol 1e-5, atol 1e-6
(measured: at most 2.1e-7 absolute).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import kdgraph
from kdgraph.cli import main
from kdgraph.errors import KDGraphError, SpecError

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_worker  # noqa: E402
from test_train import tiny_spec, write_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "fsdp_worker.py"), str(out)]
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "WORLD_SIZE" not in os.environ
    fsdp_worker.main(str(out))
    return torch.load(out / "one.pt"), torch.load(out / "fsdp.pt")


@pytest.mark.parametrize("pair", ["resnet", "shuffled", "bert"])
def test_two_fsdp_ranks_match_one_process_on_the_global_batch(runs, pair):
    one, two = runs[0][pair], runs[1][pair]
    torch.testing.assert_close(torch.tensor(two["loss"]), torch.tensor(one["loss"]), rtol=1e-5, atol=0)
    assert one["loss"][0] != one["loss"][-1]  # it trained
    torch.manual_seed(0)
    ref = fsdp_worker.PAIRS[pair][0]()[1]  # the student as initialised (same seed)
    assert any(not torch.equal(v, one["student"][k]) for k, v in ref.state_dict().items() if k in one["student"])
    assert one["student"].keys() == two["student"].keys()
    for k, v in one["student"].items():
        assert not hasattr(two["student"][k], "placements")  # gathered to a plain tensor
        torch.testing.assert_close(two["student"][k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_taps_inside_sharded_units_equal_the_unsharded_ones(runs):
    one, two = runs[0]["resnet"]["taps"], runs[1]["resnet"]["taps"]
    # layer2.0.conv2 / layer2.1.conv1 are leaves inside the BasicBlock units layer2.0 / layer2.1
    for tap in ("student:layer2.0.conv2", "teacher:layer2.1.conv1", "teacher:@output", "student:@output"):
        assert two[tap].shape == one[tap].shape and two[tap].shape[0] == fsdp_worker.BATCH
        torch.testing.assert_close(two[tap], one[tap], rtol=1e-6, atol=1e-7, msg=lambda m: f"{tap}: {m}")


def test_units_called_out_of_definition_order_are_gathered_before_use(runs):
    two = runs[1]["shuffled"]
    assert two["order"] == ["<root>", "b2", "b3", "b1"]  # graph order, not b1, b2, b3
    # one real gather and one free per unit and step for the frozen teacher (no backward), in the graph's order;
    # two for the student: forward, then FSDP2's backward re-gather from the hooks the exit nodes registered
    assert list(two["unshard"]) == ["teacher", "teacher.b2", "teacher.b3", "teacher.b1",
                                    "student", "student.b2", "student.b3", "student.b1"]
    assert {k: v for k, v in two["unshard"].items() if k.startswith("teacher")} == dict.fromkeys(
        ["teacher", "teacher.b2", "teacher.b3", "teacher.b1"], 1)
    assert {k: v for k, v in two["unshard"].items() if k.startswith("student")} == dict.fromkeys(
        ["student", "student.b2", "student.b3", "student.b1"], 2)
    assert two["reshard"] == two["unshard"]  # everything gathered was freed again
    resnet = runs[1]["resnet"]["unshard"]
    assert resnet["teacher.layer3.5"] == 1 and resnet["student.layer4.1"] == 2 and len(resnet) == 16 + 1 + 8 + 1


def test_the_pass_brackets_each_unit_and_is_listed(tmp_path):
    sp = tiny_spec(runtime={"distributed": "fsdp", "fsdp": {"teacher_units": ["layer*"],
                                                            "student_units": ["type:Sequential"]}})
    d = kdgraph.compile(sp)
    result = d.report.pass_result("fsdp_schedule")
    assert result.changed
    assert result.details["teacher"]["order"] == result.details["student"]["order"] == ["<root>", "layer1", "layer2",
                                                                                       "layer3"]
    code = d.graph_module.code
    assert code.index("fsdp_student_layer2_enter") < code.index("student_layer2_0") < code.index(
        "fsdp_student_layer2_exit") < code.index("fsdp_student_layer3_enter")
    plain = kdgraph.compile(tiny_spec())
    assert not plain.report.pass_result("fsdp_schedule").changed
    x, y = torch.randn(2, 1, 28, 28), torch.tensor([1, 2])
    torch.manual_seed(0)
    plain.load_state_dict(d.state_dict())
    assert torch.equal(d(x, y).loss, plain(x, y).loss)  # unsharded: the gather nodes pass values through
    r = CliRunner().invoke(main, ["compile", str(write_spec(tmp_path / "s.yaml", sp))], catch_exceptions=False)
    assert r.exit_code == 0 and "fsdp_schedule" in r.output


def _exit2(tmp_path, args, *expected):
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 2, r.output
    for e in expected:
        assert e in r.output, (e, r.output)
    assert "Traceback" not in r.output


def test_bad_fsdp_input_is_one_paragraph_and_exit_2(tmp_path):
    fs = {"distributed": "fsdp", "fsdp": {"student_units": ["layer9"]}}
    _exit2(tmp_path, ["compile", str(write_spec(tmp_path / "a.yaml", tiny_spec(runtime=fs)))],
           "runtime.fsdp.student_units[0]", "'layer9' matches no module", "Did you mean", "layer1")
    fs = {"distributed": "fsdp", "fsdp": {"teacher_units": ["type:Bottleneck"]}}
    _exit2(tmp_path, ["compile", str(write_spec(tmp_path / "b.yaml", tiny_spec(runtime=fs)))],
           "runtime.fsdp.teacher_units[0]", "'type:Bottleneck' matches no module")
    mk = {"distributed": "fsdp", "teacher_mkldnn": True}
    _exit2(tmp_path, ["compile", str(write_spec(tmp_path / "c.yaml", tiny_spec(runtime=mk)))],
           "runtime", "fsdp cannot be combined with teacher_mkldnn", "fsdp.teacher: replicated")
    kdgraph.load_spec(tiny_spec(runtime={**mk, "fsdp": {"teacher": "replicated"}}))  # a whole teacher may
    one = write_spec(tmp_path / "d.yaml", tiny_spec(runtime={"distributed": "fsdp"}))
    _exit2(tmp_path, ["train", str(one), "--out", str(tmp_path / "run"), "--device", "cpu", "--no-progress"],
           "runtime.distributed: fsdp needs a process group", "torchrun")
    assert not (tmp_path / "run" / "last.pt").exists()
    with pytest.raises(KDGraphError, match="needs a process group"):
        from kdgraph.train import fsdp

        fsdp.shard(kdgraph.compile(tiny_spec(runtime={"distributed": "fsdp"})))
    with pytest.raises(SpecError, match="runtime.fsdp.student_units"):
        kdgraph.compile(tiny_spec(runtime={"distributed": "fsdp", "fsdp": {"student_units": ["nope.*"]}}))


# ------------------------------------------------------------------------------------------- sharded checkpoints
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    import fsdp_ckpt_worker

    out = tmp_path_factory.mktemp("fsdp_ckpt")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "fsdp_ckpt_worker.py"), str(out)]
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fsdp_ckpt_worker.main(str(out))  # one process, no process group
    return out, torch.load(out / "ckpt_two.pt"), torch.load(out / "ckpt_one.pt")


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_on_two_and_on_one_process_continues_bit_identically(ckpts):
    out, two, one = ckpts
    manifest = json.loads((out / "ck" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(manifest["files"])
    assert not list(out.glob(".ck*"))  # no temporary folder left behind
    assert two["B_extra"] == {"step": 2}
    # 2 processes: saved after step 2, a fresh sharded distiller + optimizer resumed: steps 3, 4 bit for bit
    assert all(_equal(a, b) for a, b in zip(two["A"][2:], two["B"]))
    assert not _equal(two["A"][1], two["A"][3])
    # 1 process from the 2-process checkpoint: exactly the saved parameters, then steps 3, 4 identical to a run
    # that saved (1 process) after step 3 and resumed; and close to the 2-process run (reduction order)
    assert _equal(one["loaded"], two["B_before"][1])
    assert all(_equal(c, d) for c, d in zip(one["C"], one["D"]))
    for k, v in two["A"][3].items():
        torch.testing.assert_close(one["C"][1][k], v, rtol=1e-5, atol=1e-6)


def test_a_missing_or_truncated_shard_is_refused_naming_it(ckpts, tmp_path):
    from kdgraph.errors import CheckpointError
    from kdgraph.train import sharded_checkpoint
    import fsdp_ckpt_worker

    out = ckpts[0]
    d, opt = fsdp_ckpt_worker.fresh(False)
    bad = tmp_path / "missing"
    shutil.copytree(out / "ck", bad)
    (bad / "__1_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=r"shard file __1_0\.distcp is missing \(written by 2 process"):
        sharded_checkpoint.load(bad, d, opt)
    cut = tmp_path / "cut"
    shutil.copytree(out / "ck", cut)
    data = (cut / "__0_0.distcp").read_bytes()
    (cut / "__0_0.distcp").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp differs .*truncated"):
        sharded_checkpoint.load(cut, d, opt)
    (cut / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        sharded_checkpoint.verify(cut)


def test_export_gathers_a_plain_student_from_the_shards(ckpts, tmp_path):
    import safetensors.torch

    import fsdp_ckpt_worker  # noqa: F401 - the Shuffled student's module

    out, two, _ = ckpts
    r = CliRunner().invoke(main, ["export", str(out / "ck"), "-o", str(tmp_path / "s.safetensors")],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    sd = safetensors.torch.load_file(tmp_path / "s.safetensors")
    student = fsdp_worker.Shuffled(4)
    student.load_state_dict(sd, strict=True)  # plain tensors, no prefixes, every key
    assert _equal(student.state_dict(), two["B_before"][1])
    r = CliRunner().invoke(main, ["export", str(out / "nope"), "-o", str(tmp_path / "x.pt")])
    assert r.exit_code == 2 and "Traceback" not in r.output
