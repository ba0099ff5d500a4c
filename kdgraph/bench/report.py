"""The results table of a suite: per-row statistics and the files ``kdgraph bench`` writes.

``results.tsv`` / ``results.md`` have the reference table's shape (method, teacher, student, top-1
mean, std, seeds, delta vs the baseline, the published torchdistill and paper top-1, wall time,
images/s); ``results.json`` holds every number per seed; ``results.png`` / ``results.svg`` draw
top-1 with error bars and the baseline as a line. ``std`` is the sample standard deviation over
seeds (n - 1 in the denominator; 0 for one seed). A row "beats the baseline" when its mean minus
the baseline's mean is larger than the larger of the two stds (reported in the ``verdict`` column).
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import SpecError
from .runner import RunResult
from .suite import LoadedSuite, SuiteEntry


@dataclass
class Row:
    """One entry's statistics over its seeds."""

    label: str
    method: str
    teacher: str
    student: str
    n: int
    failed: int
    mean: Optional[float]
    std: Optional[float]
    delta: Optional[float]  # mean - baseline mean
    verdict: str  # "baseline" | "beats" | "within spread" | "below" | "failed"
    reference_torchdistill: Optional[float]
    reference_paper: Optional[float]
    wall_s: Optional[float]  # mean per run
    images_per_s: Optional[float]  # mean over runs of each run's median
    teacher_top1: Optional[float]
    errors: list[str] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class BenchResults:
    """What ``kdgraph bench`` (and :func:`kdgraph.bench.bench`) returns."""

    title: str
    baseline: str
    rows: list[Row]
    command: str
    machine: str
    total_wall_s: float
    seeds: list[int]
    metric: str = "top1"  # the suite's metric: top1 (%), or perplexity (lower is better)

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.failed]

    def row(self, label: str) -> Row:
        return next(r for r in self.rows if r.label == label)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _mean(xs: list[float]) -> Optional[float]:
    return statistics.fmean(xs) if xs else None


def _std(xs: list[float]) -> Optional[float]:
    if not xs:
        return None
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _model_name(ref: Any) -> str:
    kw = ref.kwargs or {}
    extra = ", ".join(f"{k}={kw[k]}" for k in ("width", "stem") if k in kw)
    return ref.model.split(":")[-1] + (f" ({extra})" if extra else "")


def machine_description() -> str:
    """CPU model and core count (and the GPU, when one is used), Python and torch versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        have = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "avx2") if f" {f}" in text]
        flags = f" [{', '.join(have)}]" if have else ""
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{cpu}{flags}, {os.cpu_count()} CPU core(s){gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, {platform.system()} {platform.release()}")


def summarize(loaded: LoadedSuite, results: list[RunResult], command: str, total_wall_s: float,
              seeds: list[int]) -> BenchResults:
    suite = loaded.suite
    by_label: dict[str, list[RunResult]] = {}
    for r in results:
        by_label.setdefault(r.label, []).append(r)
    metric = suite.metric  # top1, or perplexity (lower is better)
    base_runs = [getattr(r, metric) for r in by_label.get(suite.baseline, [])
                 if r.status == "done" and getattr(r, metric) is not None]
    base_mean, base_std = _mean(base_runs), _std(base_runs)
    rows = []
    for entry in suite.entries:
        runs = by_label.get(entry.label)
        if not runs:
            continue
        rows.append(_row(loaded, entry, runs, base_mean, base_std, entry.label == suite.baseline, metric))
    return BenchResults(suite.title, suite.baseline, rows, command, machine_description(), round(total_wall_s, 1),
                        seeds, metric)


def _row(loaded: LoadedSuite, entry: SuiteEntry, runs: list[RunResult], base_mean: Optional[float],
         base_std: Optional[float], is_baseline: bool, metric: str = "top1") -> Row:
    try:
        spec = loaded.load_entry(entry)
    except SpecError:
        spec = None
    ok = [r for r in runs if r.status == "done" and getattr(r, metric) is not None]
    tops = [getattr(r, metric) for r in ok]
    mean, std = _mean(tops), _std(tops)
    delta = None if (mean is None or base_mean is None or is_baseline) else mean - base_mean
    if not ok:
        verdict = "failed"
    elif is_baseline:
        verdict = "baseline"
    elif delta is None:
        verdict = "no baseline"
    else:
        spread = max(std or 0.0, base_std or 0.0)
        better = -delta if metric == "perplexity" else delta  # perplexity: lower is better
        verdict = "beats" if better > spread else ("below" if better < -spread else "within spread")
    walls = [r.wall_s for r in ok if r.wall_s is not None]
    ips = [r.images_per_s for r in ok if r.images_per_s is not None]
    teachers = [r.teacher_top1 for r in ok if r.teacher_top1 is not None]
    uses_teacher = spec is not None and (any(any(t.startswith("teacher:") for t in loss.inputs.values())
                                             for st in spec.stages for loss in st.losses) or bool(spec.adapters))
    return Row(entry.label, entry.method or (spec.description if spec else ""),
               _model_name(spec.teacher) if uses_teacher else "-", _model_name(spec.student) if spec else "?", len(ok), len(runs) - len(ok), mean, std, delta, verdict,
               entry.reference.torchdistill, entry.reference.paper, _mean(walls), _mean(ips),
               _mean(teachers) if uses_teacher else None,
               [f"seed {r.seed}: {r.error}" for r in runs if r.status == "failed"],
               [asdict(r) for r in runs])


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------

COLUMNS = ["method", "label", "teacher", "student", "top1_mean", "top1_std", "n_seeds", "delta_vs_baseline",
           "verdict", "reference_top1", "paper_top1", "wall_s_per_run", "images_per_s"]


def _f(v: Optional[float], digits: int = 2) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _cells(r: Row, rate_digits: int = 0) -> list[str]:
    return [r.method, r.label, r.teacher, r.student, _f(r.mean), _f(r.std), str(r.n),
            "" if r.delta is None else f"{r.delta:+.2f}", r.verdict + (f" ({r.failed} failed)" if r.failed and r.n else ""),
            _f(r.reference_torchdistill), _f(r.reference_paper), _f(r.wall_s, 0), _f(r.images_per_s, rate_digits)]


def write_tsv(res: BenchResults, path: Path) -> None:
    lm = res.metric == "perplexity"  # a language model: rows (sequences) per second, not images
    cols = [c.replace("top1_", "perplexity_").replace("images_", "rows_") for c in COLUMNS] if lm else COLUMNS
    lines = ["\t".join(cols)] + ["\t".join(c.replace("\t", " ") for c in _cells(r, 2 if lm else 0))
                                 for r in res.rows]
    _atomic_text(path, "\n".join(lines) + "\n")


def markdown(res: BenchResults) -> str:
    lm = res.metric == "perplexity"
    head = ["Method", "Label", "Teacher", "Student", f"{'Perplexity' if lm else 'Top-1'} mean", "Std", "Seeds",
            "Δ vs baseline", "Verdict", "torchdistill", "Paper", "Wall s / run", "Rows/s" if lm else "Images/s"]
    out = [f"# {res.title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res.rows:
        out.append("| " + " | ".join(c.replace("|", "\\|") or "" for c in _cells(r, 2 if lm else 0)) + " |")
    teachers = sorted({f"{r.teacher_top1:.2f}" for r in res.rows if r.teacher_top1 is not None})
    out += ["", (f"Validation perplexity (lower is better), mean and sample std over seeds {res.seeds}. 'beats' = Δ "
                 f"below minus the larger of the row's and the baseline's std." if res.metric == "perplexity" else
                 f"Top-1 in %, mean and sample std over seeds {res.seeds}. 'beats' = Δ larger than the larger of the "
                 f"row's and the baseline's std."),
            *([] if lm and not teachers else [f"Teacher top-1: {', '.join(teachers) or 'n/a'} %."]),
            "", f"Command: `{res.command}`", "", f"Machine: {res.machine}", "",
            f"Total wall time of this invocation: {res.total_wall_s:.0f} s (runs reused from earlier invocations "
            f"not counted)."]
    for r in res.rows:
        for e in r.errors:
            out.append(f"\n- {r.label} failed, {e}")
    return "\n".join(out) + "\n"


def write_chart(res: BenchResults, png: Path, svg: Path) -> bool:
    """Bar chart of top-1 (error bars: std), the baseline's mean as a dashed line. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in res.rows if r.mean is not None]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(rows) + 2), 4))
    x = list(range(len(rows)))
    colors = ["#888888" if r.label == res.baseline else "#3b75af" if r.verdict == "beats" else "#d08c38"
              for r in rows]
    ax.bar(x, [r.mean for r in rows], yerr=[r.std or 0 for r in rows], color=colors, capsize=4)
    base = next((r.mean for r in rows if r.label == res.baseline), None)
    if base is not None:
        ax.axhline(base, color="black", ls="--", lw=1, label=f"baseline {base:.2f}%")
        ax.legend(fontsize=8, loc="lower right")
    lo = min(r.mean - (r.std or 0) for r in rows)
    hi = max(r.mean + (r.std or 0) for r in rows)
    pad = max(0.5, (hi - lo) * 0.3)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xticks(x, [r.label for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("student validation perplexity" if res.metric == "perplexity" else "student top-1 (%)")
    _fit_title(fig, res.title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    for path in (png, svg):
        tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
        fig.savefig(tmp, dpi=110)
        tmp.replace(path)
    plt.close(fig)
    return True


def _fit_title(fig: Any, title: str, fontsize: float = 10.0) -> Any:
    """The figure's title, centred on the figure and wrapped onto as many lines as it needs to fit its width
    (measured as rendered); a word wider than the figure gets a smaller font (down to 7 pt), then is broken."""
    import textwrap

    renderer = fig.canvas.get_renderer()
    limit = fig.get_window_extent(renderer).width * 0.96
    text = fig.suptitle(title, fontsize=fontsize)

    def too_wide() -> bool:
        return text.get_window_extent(renderer).width > limit

    for breaking in (False, True):
        width = max(1, len(title))
        while too_wide() and width > 1:
            width = int(width * 0.9)
            text.set_text("\n".join(textwrap.wrap(title, width, break_long_words=breaking)))
        while not breaking and too_wide() and text.get_fontsize() > 7:
            text.set_fontsize(text.get_fontsize() - 0.5)
    return text


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_all(res: BenchResults, out: Path) -> list[Path]:
    """results.tsv, results.md, results.json, results.png, results.svg in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_tsv(res, out / "results.tsv")
    _atomic_text(out / "results.md", markdown(res))
    _atomic_text(out / "results.json", json.dumps(res.to_json(), indent=2, default=str))
    files = [out / "results.tsv", out / "results.md", out / "results.json"]
    if write_chart(res, out / "results.png", out / "results.svg"):
        files += [out / "results.png", out / "results.svg"]
    return files
