"""``kdgraph tune SPEC --space SPACE.yaml --trials N``: search a spec's hyper-parameters on held-out training
images (:func:`kdgraph.tune.tune`), print the trials and the best ``--set`` list."""
from __future__ import annotations

import json
import os
import shlex

import click
from rich.markup import escape

from ..trust import allowed_prefixes, consent_options
from .console import plain_console

__all__ = ["tune_cmd"]


@click.command("tune")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--space", required=True, type=click.Path(dir_okay=False), metavar="SPACE.yaml",
              help="the search space: override paths and their ranges (see docs/tune.md)")
@click.option("--trials", required=True, type=click.IntRange(1, 100000), help="trials in the study, in all")
@click.option("--storage", default=None, metavar="URL",
              help="an RDB URL shared by many hosts (postgresql://user@host/db, sqlite:///file.db); default: "
                   "OUT/study.journal")
@click.option("--study", default=None, metavar="NAME", help="the study's name (default: the spec's name)")
@click.option("--workers", default=1, type=click.IntRange(1, 64), show_default=True,
              help="trials trained at once on this machine, each process with cores/workers threads (not under "
                   "torchrun, where every trial is trained by all its processes)")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="trial folders, the table, best.json and pictures (default runs/tune_<study>)")
@click.option("--resume", is_flag=True, help="continue (or, on another host, join) the study that exists")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="change the spec for every trial, e.g. --set stages.main.epochs=2 (a shorter budget per trial; "
                   "not part of the best --set list)")
@click.option("--data", "data_root", default=None, metavar="ROOT", help="data folder (as kdgraph train --data)")
@click.option("--device", default=None, help="cpu, cuda or cuda:N")
@click.option("--json", "as_json", is_flag=True, help="print every number as JSON at the end")
@consent_options
def tune_cmd(spec, space, trials, storage, study, workers, out, resume, sets, data_root, device, as_json) -> None:
    """Search SPEC's hyper-parameters with Optuna: every trial trains SPEC with drawn overrides and is scored on
    training images held out for validation (pruned early when its epochs score below the others').
    Under ``torchrun --nproc_per_node=N -m kdgraph tune ...`` every trial is trained by the N processes (DDP).

    Writes OUT/trials.{tsv,md}, best.json, best_set.txt, tuned_suite.yaml (reference vs tuned, for kdgraph
    bench) and the pictures history.png, importance.png, slice.png, contour.png, intermediate.png.
    """
    from ..tune import tune

    con = plain_console()
    res = tune(spec, space, trials=trials, out=out, storage=storage, study=study, workers=workers, resume=resume,
               data=data_root, device=device, allow_imports=allowed_prefixes(), sets=tuple(sets),
               say=lambda text: con.print(text, soft_wrap=True))
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 alone speaks
        return
    if as_json:
        click.echo(json.dumps(dict(res), indent=2, default=str))
        return
    counts = {}
    for t in res.trials:
        counts[t["state"].lower()] = counts.get(t["state"].lower(), 0) + 1
    con.print(f"{len(res.trials)} trial(s): " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
              + f"; median overhead per trial beyond training {res.get('overhead_s_median') or 0:.3f} s")
    best = res.best
    if best is None:
        con.print("[bold red]no trial finished[/]: see the trials table", soft_wrap=True)
        raise SystemExit(1)
    out_dir = res["trials"][0]["out"].rsplit("/trials/", 1)[0] if res.trials and res.trials[0]["out"] else out
    con.print(f"best: trial {best['number']}, validation score {best['value']:.2f}", soft_wrap=True)
    con.print(escape(" ".join(f"--set {shlex.quote(s)}" for s in best["set"])), soft_wrap=True)
    con.print(f"files: {out_dir}/trials.md, best.json, tuned_suite.yaml (kdgraph bench it), *.png", soft_wrap=True)
