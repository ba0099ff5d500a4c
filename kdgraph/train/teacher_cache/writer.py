"""``kdgraph cache-teacher``: run the teacher once over the training set, R augmentation draws per image, and
store its logits (:mod:`.store`), so that training replays them instead of running the teacher (FKD: Shen & Xing,
"A Fast Knowledge Distillation Framework for Visual Recognition", ECCV 2022).

Each process of a ``torchrun`` writes its own shard (images ``rank, rank + W, ...``); the teacher runs in float32,
eval mode, without gradients, on the spec's random training transform drawn with :func:`.views.view_seed`.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from ...compiler.cached import CACHEABLE_TAPS
from ...errors import TeacherCacheError
from ...models import build_model
from ...spec import Spec
from ...models.weights import load_weights, resolve
from ..data import build_datasets, check_data
from ..distributed import DistEnv, barrier, setup, teardown
from .fingerprint import canonical_hash, data_identity, spec_identity, teacher_weights_sha256, transform_identity
from .fingerprint import view_params
from .store import FORMAT, MANIFEST, VERSION, ShardWriter, check_manifest, read_manifest, write_json
from .views import as_batch, read_views, view_seed

__all__ = ["describe", "cache_teacher", "build_teacher"]


def describe(spec: Spec, teacher: nn.Module, dataset: Any, root: Any) -> dict[str, Any]:
    """The manifest fields a run checks a cache against (what the stored outputs depend on)."""
    dump = spec.model_dump(mode="json")
    return {"format": FORMAT, "version": VERSION, "tap": next(iter(CACHEABLE_TAPS)), "dtype": "float16",
            "teacher_precision": "float32, eval mode", "identity": spec_identity(spec),
            "spec_name": spec.name, "spec": dump, "spec_sha256": canonical_hash(dump),
            "teacher_weights_sha256": teacher_weights_sha256(teacher), "data": data_identity(dataset, root),
            "transform": transform_identity(dataset), "num_classes": spec.input.num_classes}


def build_teacher(spec: Spec, device: torch.device) -> nn.Module:
    """The spec's teacher with its weights (which must exist: a cache of random weights is refused)."""
    if not spec.teacher.weights:
        raise TeacherCacheError("teacher.weights: the spec names no teacher weights, so its teacher is a random "
                                "network; caching its outputs is refused. Name trained weights (a local file or "
                                "cache:NAME) in teacher.weights.")
    resolve(spec, "teacher", require=True)
    torch.manual_seed(spec.runtime.seed)
    teacher = build_model(spec.teacher, "teacher")
    load_weights(teacher, spec.teacher, "teacher")
    return teacher.to(device).eval().requires_grad_(False)


def _clear(folder: Path) -> None:
    for p in list(folder.glob("rank*-of-*")) + [folder / MANIFEST]:
        if p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)


class _Progress:
    """A rich progress bar on a terminal, else a line every ~10%."""

    def __init__(self, enabled: bool, total: int, done: int, title: str, say: Callable[[str], None]):
        self.total, self.say, self.bar = total, say, None
        self.next = done + max(1, total // 10)
        self.t0, self.done0 = time.perf_counter(), done
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn(f"[bold]{title}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                                TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self.bar.start()
            self.task = self.bar.add_task(title, total=total, completed=done, info="")

    def update(self, done: int) -> None:
        rate = (done - self.done0) / max(time.perf_counter() - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.update(self.task, completed=done, info=f"{rate:.0f} img/s")
        elif done >= self.next or done == self.total:
            self.say(f"  {done}/{self.total} images ({rate:.0f} img/s)")
            self.next = done + max(1, self.total // 10)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@torch.no_grad()
def cache_teacher(spec: Spec, views: int, out: Path, topk: Optional[int] = None, data: Optional[str] = None,
                  device: Optional[str] = None, batch_size: int = 256, overwrite: bool = False,
                  progress: bool = True, say: Callable[[str], None] = print,
                  teacher: Optional[nn.Module] = None) -> dict[str, Any]:
    """Write (or complete) the teacher cache of ``spec`` in ``out``; returns a summary (images, seconds, rate).

    ``batch_size``: images per teacher forward (each contributes its R views). ``teacher``: use this module
    instead of building the spec's (tests)."""
    if not 1 <= views <= 1024:
        raise TeacherCacheError(f"--views: {views} draws per image; allowed: 1 to 1024")
    k = spec.input.num_classes
    if topk is not None and not 1 <= topk < k:
        raise TeacherCacheError(f"--topk: {topk}; allowed: 1 to {k - 1} (input.num_classes - 1), or leave it out "
                                f"to store the full logits")
    env = setup(device)
    try:
        return _run(spec, views, Path(out), topk, data, env, max(1, batch_size), overwrite, progress, say, teacher)
    finally:
        teardown(env)


def _run(spec: Spec, views: int, folder: Path, topk: Optional[int], data: Optional[str], env: DistEnv,
         batch_size: int, overwrite: bool, progress: bool, say: Callable[[str], None],
         teacher: Optional[nn.Module]) -> dict[str, Any]:
    t0 = time.perf_counter()
    root = data if data is not None else spec.data.root
    check_data(spec, root)
    train = build_datasets(spec, root).train
    teacher = build_teacher(spec, env.device) if teacher is None else teacher.to(env.device).eval()
    manifest = {**describe(spec, teacher, train, root), "views": views, "topk": topk, "world_size": env.world_size}
    manifest["manifest_sha256"] = canonical_hash({k: v for k, v in manifest.items() if k != "spec"})
    folder.mkdir(parents=True, exist_ok=True)
    if env.is_main and overwrite:
        _clear(folder)
    barrier(env)
    found = read_manifest(folder)
    if found is not None:
        check_manifest(found, manifest, f"--out {folder}", folder, run_fields=True)
    else:
        write_json(folder / MANIFEST, manifest)  # every rank writes the same content, each atomically
    writer = ShardWriter(folder, manifest, env.rank, env.world_size)
    done = writer.open()
    indices = list(range(env.rank, manifest["data"]["images"], env.world_size))
    if env.is_main:
        say(f"cache-teacher {spec.name}: {len(train)} images x {views} views of {spec.teacher.model} -> {folder}"
            + (f" (top-{topk})" if topk else " (full fp16 logits)")
            + (f", resuming at image {done * env.world_size}" if 0 < done < len(indices) else "")
            + (f", {env.world_size} processes" if env.distributed else ""))
    bar = _Progress(progress and env.is_main, len(indices), done, f"cache-teacher {spec.name}",
                    say if env.is_main else (lambda m: None))  # rank 0 alone reports, as kdgraph train
    seed, computed = spec.runtime.seed, 0
    t_run = time.perf_counter()
    try:
        for start in range(done, len(indices), batch_size):
            block = indices[start: start + batch_size]
            flat_idx = [i for i in block for _ in range(views)]
            flat_seeds = [view_seed(seed, i, r) for i in block for r in range(views)]
            images = as_batch(read_views(train, flat_idx, flat_seeds)).images.to(env.device)
            logits = teacher(images)
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] != manifest["num_classes"]:
                shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise TeacherCacheError(f"teacher:@output: the teacher returns {shape}, not logits of shape "
                                        f"[batch, {manifest['num_classes']}] (input.num_classes); only logits are "
                                        f"cached, feature taps keep the online teacher")
            writer.write(start, _records(logits.float().cpu(), topk, len(block), views, flat_seeds,
                                         view_params(train, flat_idx, flat_seeds)))
            computed += len(block)
            writer.commit(start + len(block))
            bar.update(start + len(block))
        if not writer.entry_path.is_file():
            writer.finish()
    finally:
        bar.close()
    barrier(env)
    run_s = time.perf_counter() - t_run
    summary = {"out": str(folder), "images": len(train), "views": views, "topk": topk,
               "computed_images": computed * env.world_size, "seconds": round(time.perf_counter() - t0, 2),
               "teacher_seconds": round(run_s, 2),
               "images_per_s": round(computed * env.world_size / run_s, 1) if computed and run_s > 0 else None}
    if env.is_main:
        say(f"cache-teacher {spec.name}: complete in {folder} ({computed * env.world_size} images computed now, "
            f"{summary['images_per_s'] or '-'} images/s)")
    return summary


def _records(logits: torch.Tensor, topk: Optional[int], b: int, views: int, seeds: list[int],
             params: torch.Tensor) -> dict[str, np.ndarray]:
    """One block's arrays: fp16 logits (or top-K' values, indices and logsumexp), seeds and parameters."""
    out: dict[str, np.ndarray] = {"seeds": np.asarray(seeds, dtype=np.int64).reshape(b, views),
                                  "params": params.numpy().reshape(b, views, -1)}
    if topk:
        vals, inds = logits.topk(topk, dim=1)
        out.update(top_values=vals.half().numpy().reshape(b, views, topk),
                   top_indices=inds.int().numpy().reshape(b, views, topk),
                   logsumexp=torch.logsumexp(logits, dim=1).numpy().reshape(b, views))
        stored = out["top_values"]
    else:
        out["logits"] = logits.half().numpy().reshape(b, views, -1)
        stored = out["logits"]
    if not np.isfinite(stored).all():
        raise TeacherCacheError(f"teacher:@output: the teacher's logits do not fit float16 (largest magnitude "
                                f"{float(logits.abs().max()):.4g} > 65504) or are not finite; they cannot be cached")
    return out
