"""Your data, the spec's per-batch extras: wrap any map-style dataset, unpack batches for the distiller.

Some methods need more per batch than images and targets: CRD needs each sample's ``index`` and
``contrast_index`` (a positive and K negatives of other classes), which the spec's data wrapper
(``data.wrapper: {type: crd, ...}``, any :func:`kdgraph.register_data_wrapper`) adds to every item::

    spec = kdgraph.load_spec("specs/crd_resnet18.yaml", overrides=[
        f"stages.main.losses.crd.args.num_samples={len(my_dataset)}",    # one memory row per sample
        "data.wrapper.args.num_negative_samples=64"])
    distiller = kdgraph.compile(spec)
    loader = DataLoader(kdgraph.data.wrap(my_dataset, spec), batch_size=64, shuffle=True, drop_last=True)
    for batch in loader:                      # {"images", "targets", "index", "contrast_index"}
        out = distiller(**kdgraph.data.batch_kwargs(batch))

``my_dataset`` returns ``(image, target)`` pairs (or dicts with ``images`` and ``targets``). A
spec without a data wrapper leaves the dataset as it is, and :func:`batch_kwargs` reads plain
``(images, targets)`` batches too, so the same loop serves every spec. SSKD's rotated views are no
data wrapper: they are an input transform inside the compiled graph.

It sits above the compiler (a stage's extras come from its losses' inputs); kdgraph's own trainer
(:mod:`kdgraph.train.data`) uses it as well.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch.utils.data import Dataset

from ..compiler import bind_inputs
from ..compiler.cached import TEACHER_OUTPUT_KEY, cached_taps
from ..errors import DataError, SpecError
from ..methods.base import Batch  # what a data wrapper's dataset builds (CRD's), re-exported here
from ..methods.registry import ADAPTERS, DATA_WRAPPERS, LOSSES
from ..spec import Spec, load_spec, parse_tap


def unpack_batch(batch: Any) -> tuple[Any, torch.Tensor, dict[str, Any]]:
    """``(images, targets, extras)`` from a collated batch: a :class:`Batch`, a pair, or a dict. A dict of named
    inputs with ``labels`` (or ``targets``) and no ``images`` gives ``(inputs, labels, extras)``, the inputs a dict
    that ``distiller(inputs, labels)`` and ``model(**inputs)`` take, extras a cached sparse teacher if any."""
    if isinstance(batch, Batch):
        return batch.images, batch.targets, dict(batch.extras)
    if isinstance(batch, Mapping) and "images" not in batch and ("labels" in batch or "targets" in batch):
        # a batch of named inputs (a tokenizer's input_ids, attention_mask, ...: spec input.named) and its labels
        # a top-K token cache's sparse teacher (TokenReplayView) rides along as a per-batch extra, not an input
        label = "labels" if "labels" in batch else "targets"
        extras = {k: batch[k] for k in (TEACHER_OUTPUT_KEY,) if k in batch}
        return {k: v for k, v in batch.items() if k != label and k not in extras}, batch[label], extras
    if isinstance(batch, Mapping):
        if "images" not in batch or "targets" not in batch:
            raise DataError(f"a batch dict needs 'images' and 'targets' keys, got {sorted(batch)}; a data wrapper "
                            f"returns items as {{'images': x, 'targets': y, '<extra>': ...}}")
        extras = {k: v for k, v in batch.items() if k not in ("images", "targets")}
        return batch["images"], batch["targets"], extras
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1], {}
    raise DataError(f"cannot read a batch of type {type(batch).__name__}: expected (images, targets) or a dict")


def batch_kwargs(batch: Any, device: Optional[torch.device | str] = None) -> dict[str, Any]:
    """The keyword arguments of ``distiller(...)`` from a collated batch: ``images``, ``targets`` and
    every per-batch extra (``index``, ``contrast_index``, ...), optionally moved to ``device``."""
    images, targets, extras = unpack_batch(batch)
    out = {"images": images, "targets": targets, **extras}
    if device is not None:
        out = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in out.items()}
    return out


def stage_batch_inputs(spec: Spec, stage: int | str) -> list[str]:
    """The per-batch extras (beyond images and targets) a stage's losses and adapters read, sorted.

    The same answer as ``distiller.batch_inputs`` once that stage is entered, without compiling."""
    if isinstance(stage, int):
        if not -len(spec.stages) <= stage < len(spec.stages):
            raise SpecError(f"stage index {stage} out of range; stages: {', '.join(s.name for s in spec.stages)}")
        st = spec.stages[stage]
    else:
        st = spec.stage(stage)
    found: set[str] = set()
    seen: set[str] = set()

    cached = cached_taps(spec, st)  # runtime.teacher_cache: the teacher's logits come with the batch

    def visit(text: str) -> None:
        tap = parse_tap(text)
        if text in cached:
            found.add(cached[text])
        elif tap.source == "batch" and tap.path not in ("images", "targets", *spec.input.named):
            found.add(tap.path)
        elif tap.source == "adapter" and tap.path in spec.adapters and tap.path not in seen:
            seen.add(tap.path)
            ad = spec.adapters[tap.path]
            cls = ADAPTERS.get(ad.type, where=f"adapters.{tap.path}.type")
            for t in bind_inputs(cls, dict(ad.inputs), f"adapters.{tap.path}").values():
                visit(t)

    for i, ls in enumerate(st.losses):
        cls = LOSSES.get(ls.type, where=f"stages.{st.name}.losses[{i}].type")
        for k, t in bind_inputs(cls, dict(ls.inputs), f"stages.{st.name}.losses[{i}] ({ls.name})").items():
            if k not in getattr(cls, "optional_batch_inputs", ()):  # read when given (the trainer's num_tokens)
                visit(t)
    return sorted(found)


class StageItems(Dataset):
    """A wrapped dataset's items with only the extras one stage reads (the distiller rejects others)."""

    def __init__(self, dataset: Dataset, keys: list[str]):
        self.dataset, self.keys = dataset, ["images", "targets", *keys]

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        if not isinstance(item, Mapping):
            return {"images": item[0], "targets": item[1]}
        missing = [k for k in self.keys if k not in item]
        if missing:
            raise DataError(f"the data wrapper's items have no {missing} (keys: {sorted(item)}), which this stage "
                            f"reads; the wrapper named in data.wrapper must provide them")
        return {k: item[k] for k in self.keys}

    def __getattr__(self, name: str) -> Any:  # classes, targets, ... of the wrapped dataset
        if name.startswith("__") or name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def wrap(dataset: Dataset, spec: Any, stage: Optional[int | str] = None) -> Dataset:
    """``dataset`` wrapped with the spec's data wrapper (``data.wrapper``), so its items carry the
    per-batch extras the spec's losses read (CRD: ``index`` and ``contrast_index``).

    ``dataset`` is map-style and returns ``(image, target)`` (or a dict with ``images`` and
    ``targets``); ``spec`` is a :class:`~kdgraph.Spec` or anything :func:`kdgraph.load_spec` reads.
    Without a wrapper the dataset is returned as is. With ``stage`` (name or index), the items keep
    only the extras that stage reads, and a stage that reads an extra no wrapper provides is a
    :class:`~kdgraph.errors.DataError` here rather than at the first forward.
    """
    spec = load_spec(spec)
    w = spec.data.wrapper
    needed = stage_batch_inputs(spec, stage) if stage is not None else None
    if w is None:
        if needed:
            raise DataError(f"stage {stage!r} reads the per-batch inputs {needed} but the spec has no data.wrapper "
                            f"to provide them; set data.wrapper (e.g. {{type: crd}}) or change the losses' inputs")
        return dataset
    fn = DATA_WRAPPERS.get(w.type, "data.wrapper.type")
    wrapped = fn(dataset, spec, **w.args)
    if needed is None:
        return wrapped
    return StageItems(wrapped, needed)


__all__ = ["Batch", "unpack_batch", "batch_kwargs", "stage_batch_inputs", "wrap", "StageItems"]
