"""``kdgraph cache-teacher SPEC --views R``: store the teacher's logits for R augmentation draws of every training
image, for ``kdgraph train`` to replay (``runtime.teacher_cache``). A thin command over
:func:`kdgraph.train.teacher_cache.cache_teacher`; under ``torchrun`` each process writes its own shard.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import click

from ..models.trust import consent_options

__all__ = ["cache_teacher_cmd"]


@click.command("cache-teacher")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--views", required=True, type=click.IntRange(1, 1024), metavar="R",
              help="augmentation draws stored per training image (each epoch replays one of them)")
@click.option("--data", "data_root", default=None, metavar="ROOT", help="data folder (overrides data.root)")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="cache folder (default: the spec's runtime.teacher_cache, else runs/<spec name>-teacher-cache)")
@click.option("--topk", default=None, type=click.IntRange(1), metavar="K",
              help="store only the top-K logits (+ logsumexp) of each view; default: all logits (float16)")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="change the spec (repeatable)")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(1),
              help="images per teacher forward (each with its R views)")
@click.option("--overwrite", is_flag=True, help="delete a cache of another spec/teacher/data in OUT and start over")
@click.option("--progress/--no-progress", default=True, help="progress bar on a terminal")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@consent_options
def cache_teacher_cmd(spec, views, data_root, out, topk, sets, device, batch_size, overwrite, progress,
                      as_json) -> None:
    """Run SPEC's teacher once over its training set (R random views per image) and store its logits.

    Resumable: run the same command again after a kill and it continues where it stopped. Train with the
    cache by setting runtime.teacher_cache: OUT in the spec (or kdgraph train SPEC --teacher-cache OUT).
    """
    from ..train.overrides import load_with_overrides
    from ..train.teacher_cache import cache_teacher

    s = load_with_overrides(spec, sets, data_root)
    folder = Path(out) if out else (Path(s.runtime.teacher_cache) if s.runtime.teacher_cache
                                    else Path("runs") / f"{s.name}-teacher-cache")
    res = cache_teacher(s, views, folder, topk=topk, data=data_root, device=device, batch_size=batch_size,
                        overwrite=overwrite, progress=progress,
                        say=(lambda m: None) if as_json else click.echo)
    if as_json and os.environ.get("RANK", "0") == "0":
        click.echo(json.dumps(res, indent=2))
