"""The teacher output cache: ``kdgraph cache-teacher`` stores, per training image, R augmentation draws and the
teacher's logits for each; ``kdgraph train`` with ``runtime.teacher_cache`` replays them, so no teacher runs for
the logit taps (FKD: Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition", ECCV 2022).

:mod:`.views` (draw seeds, which draw an epoch replays, the replaying dataset view), :mod:`.fingerprint` (what a
cache was made from), :mod:`.store` (files, manifest, checks), :mod:`.writer` (the caching run).
Causal LMs (a per-token top-K cache of ``teacher:lm_head``): :mod:`.tokens` (the caching run), :mod:`.token_layout`
(files, checked fields), :mod:`.token_data` (sequences, tokenizer), :mod:`.token_reader` (the sparse teacher),
:mod:`.bitpack` (17-18 bit ids).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ...spec import Spec
from .store import CacheReader, fill_topk, open_cache
from .views import ReplayView, view_of_epoch, view_seed
from .writer import cache_teacher, describe

__all__ = ["CacheReader", "ReplayView", "cache_teacher", "describe", "fill_topk", "open_cache", "open_for_training",
           "view_of_epoch", "view_seed"]


def open_for_training(spec: Spec, teacher: nn.Module, dataset: Any, root: Any) -> Any:
    """The spec's ``runtime.teacher_cache``, checked against this run's spec, loaded teacher and training split
    (a :class:`~kdgraph.errors.TeacherCacheError` before training starts if it does not match). A token cache
    (``runtime.teacher_cache_tap`` other than ``teacher:@output``) gives a :class:`TokenCacheReader`."""
    where = spec.where("runtime", "teacher_cache")
    if spec.runtime.teacher_cache_tap != "teacher:@output":
        from .token_reader import open_token_cache
        from .tokens import describe_tokens

        return open_token_cache(Path(spec.runtime.teacher_cache).expanduser(),
                                describe_tokens(spec, teacher, dataset), where)
    return open_cache(Path(spec.runtime.teacher_cache).expanduser(), describe(spec, teacher, dataset, root), where)
