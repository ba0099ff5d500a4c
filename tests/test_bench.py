"""kdgraph bench: suites run through the training runtime, tables computed from the runs' own results."""
from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import kdgraph
from kdgraph.bench import bench, load_suite
from kdgraph.errors import SpecError

TINY = """
name: {name}
input: {{channels: 1, size: [12, 12], num_classes: 4}}
teacher: {{model: "kdgraph.zoo:tiny_cnn", kwargs: {{in_channels: 1, num_classes: 4, width: 4}}}}
student: {{model: "kdgraph.zoo:tiny_cnn", kwargs: {{in_channels: 1, num_classes: 4, width: 4}}}}
stages:
  - name: main
    epochs: 1
    batch_size: 16
    optimizer: {{type: sgd, lr: 0.05}}
    losses:
{losses}
data: {{dataset: synthetic, workers: 0, train_subset: 64, val_subset: 32}}
"""
CE = "      - {name: ce, type: cross_entropy}"
KD = CE + "\n      - {name: kd, type: kd, weight: 0.5, inputs: {student: 'student:@output', teacher: 'teacher:@output'}}"


def _write_suite(tmp: Path, entries: str, extra: str = "") -> Path:
    (tmp / "base.yaml").write_text(TINY.format(name="tiny_base", losses=CE))
    (tmp / "kd.yaml").write_text(TINY.format(name="tiny_kd", losses=KD))
    suite = tmp / "suite.yaml"
    suite.write_text(f"title: tiny\nseeds: 2\nbaseline: base\n{extra}entries:\n{entries}")
    return suite


ENTRIES = ("  - {label: base, spec: base.yaml}\n"
           "  - {label: KD, spec: kd.yaml, reference: {torchdistill: 71.37}}\n")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdgraph", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_suite_runs_every_entry_and_seed_and_table_matches_runs(tmp_path: Path) -> None:
    suite = _write_suite(tmp_path, ENTRIES)
    out = tmp_path / "out"
    res = bench(suite, out=out, device="cpu", progress=False)
    folders = sorted(p.parent.relative_to(out).as_posix() for p in out.glob("*/seed*/results.json"))
    assert folders == ["KD/seed0", "KD/seed1", "base/seed0", "base/seed1"]
    for f in ("results.tsv", "results.md", "results.json", "results.png", "results.svg"):
        assert (out / f).stat().st_size > 0, f
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {r["label"]: r for r in csv.DictReader((out / "results.tsv").open(), delimiter="\t")}
    assert set(rows) == {"base", "KD"}
    means = {}
    for label in ("base", "KD"):
        tops = [json.loads((out / label / f"seed{s}" / "results.json").read_text())["student"]["top1"] for s in (0, 1)]
        means[label] = statistics.fmean(tops)
        assert float(rows[label]["top1_mean"]) == pytest.approx(means[label], abs=0.006)
        assert float(rows[label]["top1_std"]) == pytest.approx(statistics.stdev(tops), abs=0.006)
        assert rows[label]["n_seeds"] == "2"
        assert res.row(label).mean == pytest.approx(means[label])
    assert float(rows["KD"]["delta_vs_baseline"]) == pytest.approx(means["KD"] - means["base"], abs=0.006)
    assert rows["KD"]["reference_top1"] == "71.37"
    assert rows["base"]["verdict"] == "baseline"
    data = json.loads((out / "results.json").read_text())
    assert len(data["rows"][0]["runs"]) == 2 and data["seeds"] == [0, 1]
    # seeds differ: the two runs of a row are not the same run twice
    s0 = json.loads((out / "KD/seed0/spec.json").read_text())["runtime"]["seed"]
    s1 = json.loads((out / "KD/seed1/spec.json").read_text())["runtime"]["seed"]
    assert (s0, s1) == (0, 1)

    # a rerun trains nothing: every checkpoint stays as it was, every run is reused
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/last.pt")}
    assert len(stamps) == 4
    again = kdgraph.bench(suite, out=out, device="cpu", progress=False)  # the package-level entry point
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/last.pt")} == stamps
    assert all(r["reused"] for row in again.rows for r in row.runs)
    assert again.row("KD").mean == pytest.approx(res.row("KD").mean)


def test_changed_spec_is_run_again(tmp_path: Path) -> None:
    suite = _write_suite(tmp_path, "  - {label: base, spec: base.yaml}\n")
    out = tmp_path / "out"
    bench(suite, out=out, seeds=1, device="cpu", progress=False)
    suite.write_text(suite.read_text().replace("spec: base.yaml}", "spec: base.yaml, set: ['stages.main.epochs=2']}"))
    res = bench(suite, out=out, seeds=1, device="cpu", progress=False)
    assert not res.row("base").runs[0]["reused"]
    assert json.loads((out / "base/seed0/spec.json").read_text())["stages"][0]["epochs"] == 2


def test_a_run_saved_before_a_schema_field_existed_is_reused(tmp_path: Path) -> None:
    """A spec.json written before the schema gained a defaulted field still names this spec; another value does not."""
    suite = _write_suite(tmp_path, "  - {label: base, spec: base.yaml}\n")
    out = tmp_path / "out"
    bench(suite, out=out, seeds=1, device="cpu", progress=False)
    saved_path = out / "base/seed0/spec.json"
    saved = json.loads(saved_path.read_text())
    del saved["data"]["drop_last"], saved["runtime"]["distributed"]  # as written before those fields existed
    saved_path.write_text(json.dumps(saved))
    assert bench(suite, out=out, seeds=1, device="cpu", progress=False).row("base").runs[0]["reused"]
    saved["stages"][0]["epochs"] += 1
    saved_path.write_text(json.dumps(saved))
    assert not bench(suite, out=out, seeds=1, device="cpu", progress=False).row("base").runs[0]["reused"]


def test_broken_entry_is_reported_and_the_rest_runs(tmp_path: Path) -> None:
    entries = ENTRIES + ("  - {label: diverges, spec: kd.yaml, set: ['stages.main.optimizer.lr=1.0e+30']}\n"
                         "  - {label: badspec, spec: kd.yaml, set: ['stages.main.losses.kd.inputs.student=student:nope']}\n")
    suite = _write_suite(tmp_path, entries)
    p = _cli("bench", str(suite), "--out", str(tmp_path / "out"), "--seeds", "1", "--device", "cpu",
             "--no-progress", cwd=tmp_path)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    rows = {r["label"]: r for r in csv.DictReader((tmp_path / "out/results.tsv").open(), delimiter="\t")}
    assert rows["base"]["n_seeds"] == "1" and rows["KD"]["n_seeds"] == "1"
    assert rows["diverges"]["verdict"] == "failed" and rows["badspec"]["verdict"] == "failed"
    md = (tmp_path / "out/results.md").read_text()
    assert "non-finite" in md.lower() or "nan" in md.lower()
    assert "nope" in md  # the tap error names the bad tap
    failed = json.loads((tmp_path / "out/diverges/seed0/failed.json").read_text())
    assert failed["error"]


@pytest.mark.parametrize("text, expected", [
    ("title: t\nbaseline: a\nentries:\n  - {label: a, spec: base.yaml}\ncolour: red\n", "unknown key 'colour'"),
    ("title: t\nbaseline: a\nentries:\n  - {label: a, spec: missing.yaml}\n", "does not exist"),
    ("title: t\nbaseline: a\nentries:\n  - {label: a, spec: base.yaml}\n  - {label: a, spec: base.yaml}\n",
     "labels must be distinct"),
    ("title: t\nbaseline: zzz\nentries:\n  - {label: a, spec: base.yaml}\n", "'zzz' is not the label of an entry"),
    ("title: t\nseeds: true\nbaseline: a\nentries:\n  - {label: a, spec: base.yaml}\n", "not a boolean"),
])
def test_suite_validation_errors(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / "base.yaml").write_text(TINY.format(name="tiny_base", losses=CE))
    suite = tmp_path / "suite.yaml"
    suite.write_text(text)
    with pytest.raises(SpecError, match=expected.replace("(", r"\(")):
        load_suite(suite)


def test_suite_error_on_the_command_line(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(TINY.format(name="tiny_base", losses=CE))
    suite = tmp_path / "suite.yaml"
    suite.write_text("title: t\nbaseline: a\nentries:\n  - {label: a, spec: base.yaml}\ncolour: red\n")
    p = _cli("bench", str(suite), "--dry-run", cwd=tmp_path)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "unknown key 'colour'" in p.stderr and "line 5" in p.stderr and "Traceback" not in p.stderr
    assert len([line for line in p.stderr.splitlines() if line.strip()]) <= 4  # one short paragraph


def test_shipped_fashion_suite_dry_run_compiles_specs(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    p = _cli("bench", str(repo / "benchmarks/suites/fashion_mnist.yaml"), "--dry-run", "--out", str(tmp_path),
             "--only", "SSKD", "--only", "FT", cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert "6 run(s)" in out and "every spec compiled" in out
    assert "SSKD" in out and "FT" in out and "KR" not in out
    assert "x4" in out  # SSKD's rotations counted as 4 views in the cost estimate
    assert not any(tmp_path.iterdir())  # a dry run trains and writes nothing


def test_every_shipped_suite_validates_and_names_existing_specs() -> None:
    repo = Path(__file__).resolve().parents[1]
    suites = sorted((repo / "benchmarks/suites").glob("*.yaml"))
    assert len(suites) >= 2
    for path in suites:
        loaded = load_suite(path)
        for entry in loaded.suite.entries:
            loaded.load_entry(entry, seed=0)  # overrides apply, the spec validates


def test_the_chart_title_wraps_or_shrinks_to_fit_the_figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kdgraph.bench.report import _fit_title

    long = "Fashion-MNIST, ResNet-34-shaped teacher -> ResNet-18-shaped student (width 16), 5,000 labelled images"
    for title, wrapped in ((long, True), ("x" * 200, True), ("KD", False)):
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.bar([0, 1], [1, 2])
        text = _fit_title(fig, title)
        fig.tight_layout()
        fig.canvas.draw()
        box, page = text.get_window_extent(), fig.get_window_extent()
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and box.y1 <= page.y1, (title[:20], box, page)
        assert ("\n" in text.get_text()) == wrapped and "".join(text.get_text().split()) == "".join(title.split())
        assert (text.get_fontsize() < 10) == (title == "x" * 200)
        plt.close(fig)


def test_a_perplexity_suite_compares_lower_as_better(tmp_path: Path) -> None:
    from kdgraph.bench.report import markdown, summarize, write_tsv
    from kdgraph.bench.runner import RunResult

    suite = _write_suite(tmp_path, ENTRIES, extra="metric: perplexity\n")
    loaded = load_suite(suite)
    runs = [RunResult("base", s, "", "done", top1=10.0, perplexity=p) for s, p in ((0, 40.0), (1, 42.0))] + \
           [RunResult("KD", s, "", "done", top1=9.0, perplexity=p) for s, p in ((0, 30.0), (1, 31.0))]
    res = summarize(loaded, runs, "kdgraph bench suite.yaml", 1.0, [0, 1])
    kd = res.row("KD")
    assert (kd.mean, kd.delta, kd.verdict) == (30.5, -10.5, "beats")  # lower perplexity beats; top-1 is not read
    assert "Perplexity mean" in markdown(res) and "lower is better" in markdown(res)
    write_tsv(res, tmp_path / "r.tsv")
    assert (tmp_path / "r.tsv").read_text().startswith("method\tlabel\tteacher\tstudent\tperplexity_mean")
    assert "\trows_per_s" in (tmp_path / "r.tsv").read_text() and "Rows/s" in markdown(res)
    assert "Teacher top-1" not in markdown(res)   # no teacher accuracy for a language model
    worse = summarize(loaded, runs[:2] + [RunResult("KD", s, "", "done", perplexity=50.0 + s) for s in (0, 1)],
                      "", 1.0, [0, 1])
    assert worse.row("KD").verdict == "below"


def test_dry_run_cost_of_a_causal_lm_reads_the_named_inputs() -> None:
    import transformers

    from kdgraph.bench.cost import forward_flops
    from kdgraph.spec.schema import NamedInput

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=32)
    lm = transformers.AutoModelForCausalLM.from_config(cfg)
    named = {"input_ids": NamedInput(shape=[8], dtype="int64", high=64),
             "position_ids": NamedInput(shape=[8], dtype="int64")}
    flops = forward_flops(lm, 3, (1, 1), named)
    head = 2 * 8 * 16 * 64  # the lm_head alone: 8 tokens x hidden 16 x vocabulary 64, a multiply-add as 2
    assert head < flops < 10 * head and forward_flops(lm, 3, (1, 1), {**named, "input_ids": NamedInput(
        shape=[16], dtype="int64")} | {"position_ids": NamedInput(shape=[16], dtype="int64")}) > flops
