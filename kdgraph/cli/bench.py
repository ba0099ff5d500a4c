"""``kdgraph bench SUITE``: run a suite (:func:`kdgraph.bench.bench`) and print its results table, or with
``--dry-run`` list the runs, compile every spec and estimate the cost."""
from __future__ import annotations

import json
from pathlib import Path

import click
from rich.markup import escape

from ..models.trust import consent_options
from .console import plain_console

__all__ = ["bench_cmd", "print_table", "dry_run_report"]


def print_table(res) -> None:
    from rich import box
    from rich.table import Table

    from ..bench.report import _cells

    t = Table("method", "label", "teacher", "student", "top-1", "std", "n", "Δ base", "verdict", "torchdistill",
              "paper", "s/run", "img/s", box=box.SIMPLE, pad_edge=False, title=res.title, title_justify="left")
    for r in res.rows:
        cells = _cells(r)
        style = {"beats": "green", "below": "red", "failed": "bold red"}.get(r.verdict, "")
        t.add_row(*[f"[{style}]{c}[/]" if style and i == 8 else c for i, c in enumerate(cells)])
    plain_console().print(t)
    for r in res.rows:
        for e in r.errors:
            plain_console().print(f"[bold red]{escape(r.label)}[/] {escape(str(e))}", soft_wrap=True)


def dry_run_report(suite_path: str, data, out, seeds, only) -> None:
    """List the runs, compile every spec, check the data folder, print the estimated cost."""
    from rich import box
    from rich.table import Table

    from .. import compile as kd_compile
    from ..models import build_model
    from ..train.data import check_data
    from ..bench import _seeds, default_out
    from ..bench.cost import estimate, forward_flops, train_images
    from ..bench.runner import plan_runs
    from ..bench.suite import load_suite

    loaded = load_suite(suite_path)
    seed_list = _seeds(loaded, seeds)
    out_dir = Path(out) if out else default_out(loaded)
    data = data if data is not None else loaded.suite.data
    runs = plan_runs(loaded, out_dir, seed_list, only)
    t = Table("label", "spec", "stages (epochs)", "train images", "teacher used", "TFLOP / run", "runs",
              box=box.SIMPLE, pad_edge=False, title=f"{loaded.suite.title}: {len(runs)} run(s) -> {out_dir}",
              title_justify="left")
    total = 0.0
    seen = []
    for run in runs:
        if run.entry.label in seen:
            continue
        seen.append(run.entry.label)
        spec = run.spec
        if spec is None:
            from ..errors import SpecError

            raise SpecError(run.error or f"entry {run.entry.label!r}: invalid spec")
        if data is not None:
            check_data(spec, data)
        teacher, student = build_model(spec.teacher, "teacher"), build_model(spec.student, "student")
        d = kd_compile(spec, teacher=teacher, student=student)
        size = tuple(spec.input.size)
        named = dict(spec.input.named) or None  # named inputs (a causal LM's tokens): one example of each
        est = estimate(spec, d, train_images(spec), forward_flops(teacher, spec.input.channels, size, named),
                       forward_flops(student, spec.input.channels, size, named))
        n = sum(1 for r in runs if r.entry.label == run.entry.label)
        total += est["pflop"] * n
        t.add_row(run.entry.label, run.entry.spec,
                  ", ".join(f"{s['name']} ({s['epochs']}{' x' + str(s['views']) + ' views' if s['views'] > 1 else ''})"
                            for s in est["stages"]),
                  f"{train_images(spec):,}", "yes" if any(s["uses_teacher"] for s in est["stages"]) else "no",
                  f"{est['pflop'] * 1000:.3g}", str(n))
    con = plain_console()
    con.print(t)
    con.print(f"every spec compiled{'; data folder ' + str(data) + ' checked' if data else ''}. Estimated training "
              f"compute: {total * 1000:.3g} TFLOP in all (teacher forward + 3x student forward per image and view; a lower "
              f"bound: adapters, losses and evaluation left out). Nothing was trained.", soft_wrap=True)


@click.command("bench")
@click.argument("suite", type=click.Path(dir_okay=True))
@click.option("--data", "data_root", default=None, metavar="ROOT", help="data folder for every run (as kdgraph train)")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="where the run folders and results.* go (default runs/bench_<suite name>)")
@click.option("--seeds", default=None, type=click.IntRange(1, 100), help="seeds 0..N-1 (default: the suite's)")
@click.option("--only", multiple=True, metavar="LABEL", help="run only these entries (repeatable)")
@click.option("--resume/--fresh", default=True, show_default=True,
              help="reuse finished runs and continue unfinished ones (default), or train every run again")
@click.option("--dry-run", is_flag=True, help="list the runs, compile every spec, check --data, estimate the cost")
@click.option("--device", default=None, help="cpu, cuda or cuda:N")
@click.option("--jobs", default=1, type=click.IntRange(1, 64), show_default=True,
              help="CPU: runs trained at once, each in its own process with cores/jobs threads")
@click.option("--progress/--no-progress", default=None, help="progress bars (default: when on a terminal)")
@click.option("--json", "as_json", is_flag=True, help="print every number as JSON at the end")
@consent_options
def bench_cmd(suite, data_root, out, seeds, only, resume, dry_run, device, jobs, progress, as_json) -> None:
    """Run every entry of SUITE for every seed (as `kdgraph train`) and write the results table.

    Writes OUT/results.tsv, results.md, results.json, results.png and results.svg; one run folder per
    entry and seed under OUT/<label>/seed<k>/. Finished runs are never trained twice. A failed run is
    reported in the table and the suite goes on; the exit code is then 1.
    """
    if dry_run:
        dry_run_report(suite, data_root, out, seeds, list(only))
        return
    from ..bench import bench

    con = plain_console()
    res = bench(suite, data=data_root, out=out, seeds=seeds, only=list(only) or None, fresh=not resume,
                device=device, progress=progress, jobs=jobs, say=lambda text: con.print(text, soft_wrap=True))
    import os

    if os.environ.get("RANK", "0") != "0":
        return
    print_table(res)
    out_dir = Path(res.rows[0].runs[0]["out"]).parent.parent if res.rows and res.rows[0].runs else out
    con.print(f"results: {out_dir}/results.{{tsv,md,json,png,svg}}; total {res.total_wall_s:.0f} s")
    if as_json:
        click.echo(json.dumps(res.to_json(), indent=2, default=str))
    if res.failed:
        raise SystemExit(1)
