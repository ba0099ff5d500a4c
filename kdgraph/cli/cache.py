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
@click.option("--views", default=None, type=click.IntRange(1, 1024), metavar="R",
              help="augmentation draws stored per training image (each epoch replays one of them); required "
                   "for an image cache")
@click.option("--data", "data_root", default=None, metavar="ROOT", help="data folder (overrides data.root)")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="cache folder (default: the spec's runtime.teacher_cache, else runs/<spec name>-teacher-cache)")
@click.option("--topk", default=None, type=click.IntRange(1), metavar="K",
              help="store only the top-K logits (+ logsumexp) of each view; default: all logits (float16)")
@click.option("--temperature", default=None, type=click.FloatRange(min=0, min_open=True), metavar="T",
              help="token cache: the loss temperature of the stored log-probabilities (default: the losses' "
                   "args.temperature)")
@click.option("--sequences", default=None, type=click.Path(dir_okay=False, exists=True), metavar="FILE.npz",
              help="token cache: pre-tokenised sequences (input_ids, attention_mask, labels) instead of the "
                   "spec's training set")
@click.option("--tokenizer", default=None, type=click.Path(exists=True), metavar="PATH",
              help="token cache: the tokenizer file or folder, fingerprinted into the cache")
@click.option("--vocab-size", default=None, type=click.IntRange(1), metavar="V",
              help="token cache: the tokenizer's vocabulary size (default: the losses' args.vocab_size, else the "
                   "teacher's config)")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="change the spec (repeatable)")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(1),
              help="images per teacher forward (each with its R views)")
@click.option("--overwrite", is_flag=True, help="delete a cache of another spec/teacher/data in OUT and start over")
@click.option("--progress/--no-progress", default=True, help="progress bar on a terminal")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@consent_options
def cache_teacher_cmd(spec, views, data_root, out, topk, temperature, sequences, tokenizer, vocab_size, sets,
                      device, batch_size, overwrite, progress, as_json) -> None:
    """Run SPEC's teacher once over its training set (R random views per image) and store its logits.

    With runtime.teacher_cache_tap set to a causal LM's logits (e.g. teacher:lm_head) it stores, per kept
    token, the top-K ids, log-probabilities and tail mass instead (--topk K required, no --views).

    Resumable: run the same command again after a kill and it continues where it stopped. Train with the
    cache by setting runtime.teacher_cache: OUT in the spec (or kdgraph train SPEC --teacher-cache OUT).
    """
    from ..train.overrides import load_with_overrides
    from ..train.teacher_cache import cache_teacher

    s = load_with_overrides(spec, sets, data_root)
    folder = Path(out) if out else (Path(s.runtime.teacher_cache) if s.runtime.teacher_cache
                                    else Path("runs") / f"{s.name}-teacher-cache")
    say = (lambda m: None) if as_json else click.echo
    if s.runtime.teacher_cache_tap != "teacher:@output":
        from ..errors import SpecError
        from ..train.teacher_cache.tokens import cache_tokens

        if topk is None or views is not None:
            raise SpecError(f"kdgraph cache-teacher: runtime.teacher_cache_tap is {s.runtime.teacher_cache_tap}, so "
                            f"this is a per-token top-K cache: give --topk K (e.g. 128) and no --views")
        res = cache_tokens(s, folder, topk, temperature=temperature, sequences=sequences, tokenizer=tokenizer,
                           vocab_size=vocab_size, data=data_root, device=device, batch_size=batch_size,
                           overwrite=overwrite, say=say)
        if as_json and os.environ.get("RANK", "0") == "0":
            click.echo(json.dumps(res, indent=2))
        return
    if views is None or any(v is not None for v in (temperature, sequences, tokenizer, vocab_size)):
        from ..errors import SpecError

        raise SpecError("kdgraph cache-teacher: an image cache (runtime.teacher_cache_tap: teacher:@output) needs "
                        "--views R and takes none of --temperature, --sequences, --tokenizer, --vocab-size (those "
                        "are for a token cache: set runtime.teacher_cache_tap to the LM head, e.g. teacher:lm_head)")
    res = cache_teacher(s, views, folder, topk=topk, data=data_root, device=device, batch_size=batch_size,
                        overwrite=overwrite, progress=progress,
                        say=(lambda m: None) if as_json else click.echo)
    if as_json and os.environ.get("RANK", "0") == "0":
        click.echo(json.dumps(res, indent=2))
