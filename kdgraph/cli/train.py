"""``kdgraph train``, ``kdgraph eval`` and ``kdgraph export``: train specs, score a checkpoint, write a plain
state_dict. Thin commands over :mod:`kdgraph.train`.

Multi-GPU / multi-node: ``torchrun --nproc_per_node=N [--nnodes ...] -m kdgraph train SPEC``.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click

from ..models.trust import consent_options
from .console import plain_console

__all__ = ["train_cmd", "eval_cmd", "export_cmd", "print_comparison"]

_T0 = time.perf_counter()  # import time of the CLI ~ command start (for time-to-first-step)


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


@click.command("train")
@click.argument("specs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--data", "data_root", default=None, metavar="ROOT",
              help="data folder (overrides data.root): ImageNet with train/ and val/, or Fashion-MNIST's files")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="run folder (default runs/<spec name>; with several specs, one sub-folder each)")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="change the spec, e.g. --set stages.main.epochs=2 --set runtime.amp=bf16 (repeatable)")
@click.option("--resume", is_flag=True, help="continue from OUT/last.pt (a fresh start if there is none)")
@click.option("--overwrite", is_flag=True, help="start over in a run folder that holds a run")
@click.option("--stage", "stages", multiple=True, metavar="NAME", help="run only this stage (repeatable)")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
@click.option("--ckpt-every", default=0, type=int, metavar="STEPS",
              help="also checkpoint every STEPS steps within an epoch (default: epoch ends only)")
@click.option("--ckpt-minutes", default=30.0, type=float, show_default=True,
              help="checkpoint at least this often within an epoch")
@click.option("--log-every", default=0, type=int, metavar="STEPS", help="steps per logged record (default: auto)")
@click.option("--progress/--no-progress", default=None, help="progress bar (default: when on a terminal)")
@click.option("--json", "as_json", is_flag=True, help="print the results as JSON at the end")
@click.option("--teacher-cache", default=None, type=click.Path(file_okay=False), metavar="DIR",
              help="replay the teacher's logits from DIR (written by kdgraph cache-teacher; sets runtime.teacher_cache)")
@click.option("--skip-bad-images", is_flag=True,
              help="ImageFolder: skip unreadable image files (counted in the log) instead of stopping at the first")
@consent_options
def train_cmd(specs, data_root, out, sets, resume, overwrite, stages, device, ckpt_every, ckpt_minutes, log_every,
              progress, as_json, teacher_cache, skip_bad_images) -> None:
    """Train SPEC(s): every stage in order, top-1/top-5 after each epoch, best and last checkpoints.

    Under torchrun, trains with DistributedDataParallel (NCCL on GPUs, gloo on CPU); the learning
    rate used is lr x world_size / reference_world_size. With several SPECs, they run one after
    the other and a table compares their results (e.g. a no-distillation baseline and KD).
    """
    from ..train.distributed import setup, teardown
    from ..train.loop import TrainOptions, train
    from ..train.overrides import load_with_overrides

    loaded = [load_with_overrides(s, sets, data_root) for s in specs]  # every spec checked before training
    for spec in loaded if teacher_cache else ():
        spec.runtime.teacher_cache = str(Path(teacher_cache).resolve())
    results = []
    # several specs under torchrun: one process group for all of them (gloo cannot re-join a destroyed group)
    env = setup(device, group=True) if len(loaded) > 1 and "WORLD_SIZE" in os.environ else None
    try:
        for spec in loaded:
            run_out = Path(out) / spec.name if (out and len(loaded) > 1) else (Path(out) if out else None)
            opts = TrainOptions(out=run_out, data=data_root, resume=resume, overwrite=overwrite, only_stages=stages,
                                device=device, ckpt_every=ckpt_every, ckpt_minutes=ckpt_minutes, log_every=log_every,
                                progress=progress, started=_T0 if not results else time.perf_counter(),
                                skip_bad_images=skip_bad_images)
            results.append(train(spec, opts))
    finally:
        if env is not None:
            teardown(env)
    if not _is_main():
        return
    if len(results) > 1:
        print_comparison(results)
    if as_json:
        click.echo(json.dumps(results if len(results) > 1 else results[0], indent=2, default=str))


def print_comparison(results: list[dict]) -> None:
    from rich import box
    from rich.table import Table

    t = Table("network", "spec", "top-1 %", "top-5 %", "best top-1 %", "wall s", box=box.SIMPLE, pad_edge=False,
              title="test accuracy", title_justify="left")
    seen_teachers = set()
    for r in results:
        te = r.get("teacher")
        if te and r.get("teacher_weights") not in seen_teachers:
            seen_teachers.add(r.get("teacher_weights"))
            t.add_row("teacher", r["spec"], f"{te['top1']:.2f}", f"{te['top5']:.2f}", "", "")
    for r in results:
        s = r.get("student") or {}
        t.add_row("student", r["spec"], f"{s.get('top1', float('nan')):.2f}", f"{s.get('top5', float('nan')):.2f}",
                  f"{s.get('best_top1') or float('nan'):.2f}", f"{r['wall_s']:.0f}")
    plain_console().print(t)


@click.command("eval")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--ckpt", default=None, type=click.Path(dir_okay=False),
              help="a kdgraph checkpoint or a plain state_dict (default: the weights the spec names)")
@click.option("--model", "role", type=click.Choice(["student", "teacher"]), default="student", show_default=True)
@click.option("--data", "data_root", default=None, metavar="ROOT", help="data folder (overrides data.root)")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="change the spec (repeatable)")
@click.option("--device", default=None, help="cpu, cuda or cuda:N")
@click.option("--batch-size", default=None, type=int)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@consent_options
def eval_cmd(spec, ckpt, role, data_root, sets, device, batch_size, as_json) -> None:
    """Top-1 / top-5 of SPEC's student (or teacher) on the validation split."""
    from ..train.evaluation import describe
    from ..train.export import evaluate_checkpoint
    from ..train.overrides import load_with_overrides

    s = load_with_overrides(spec, sets, data_root)
    res = evaluate_checkpoint(s, ckpt, role=role, data=data_root, device=device, batch_size=batch_size)
    if not _is_main():
        return
    if as_json:
        click.echo(json.dumps(res, indent=2, default=str))
        return
    what = "rows" if res.get("task") == "lm" else "images"
    click.echo(f"{role} {res['model']} ({res['weights']}): {describe(res)}  on {res['images']} {what} of "
               f"{res['data']} ({res['seconds']:.1f} s)")


@click.command("export")
@click.argument("ckpt", type=click.Path(dir_okay=True))
@click.option("-o", "--out", required=True, type=click.Path(), help="(CKPT: a checkpoint file or a sharded checkpoint folder) where to write the state_dict (.safetensors: as safetensors; else a torch file), or with --hf the folder")
@click.option("--no-verify", is_flag=True, help="skip loading it into a fresh student built from the checkpoint's spec")
@click.option("--hf", is_flag=True, help="hf: students: write a Hugging Face save_pretrained folder (config.json, model.safetensors; causal LMs also generation_config.json and the spec's tokenizer)")
@consent_options
def export_cmd(ckpt, out, no_verify, hf) -> None:
    """Write the student of CKPT as a plain state_dict (loads into e.g. torchvision.models.resnet18(), strict),
    or (--hf) as a folder AutoModelForSequenceClassification / AutoModelForCausalLM.from_pretrained(OUT) loads."""
    from ..train.export import export_student

    if not hf and Path(out).is_dir():
        raise click.BadParameter(f"{out!r} is a folder; give a file name (or --hf for a save_pretrained folder)",
                                 param_hint="--out")
    res = export_student(ckpt, out, verify=not no_verify, hf=hf)
    check = f", checked against {res['model']} (strict)" if res["verified"] else ""
    click.echo(f"wrote {res['out']}: {res['tensors']} tensors, {res['parameters']:,} parameters{check}")
    for note in res.get("notes", []):
        click.echo(f"  {note}")
