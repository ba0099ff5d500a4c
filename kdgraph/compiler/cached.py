"""Which teacher taps a stage reads from a teacher output cache instead of the online teacher.

With ``runtime.teacher_cache`` set (a folder written by ``kdgraph cache-teacher``), the teacher's logits,
``teacher:@output``, are a per-batch input of every stage that has no input transform (a transform such as
SSKD's rotations changes what the teacher sees, so its outputs were never stored): the fuser reads the batch key
:data:`TEACHER_OUTPUT_KEY` in its place, and the ``prune_teacher`` pass then removes the teacher nodes that only
fed it (all of them for the logit methods: KD, Tf-KD, DIST). Every other teacher tap (features) stays online.
``runtime.teacher_cache_tap`` names another teacher tap for a causal LM's per-token top-K cache (e.g.
``teacher:lm_head``): that tap is then read from the same batch key, whose value is a sparse teacher distribution
(:class:`~kdgraph.methods.token_sparse.SparseTeacher`) the token losses accept in place of logits.
Only the stage's spec is read here; the files are checked by :mod:`kdgraph.train.teacher_cache`.
"""
from __future__ import annotations

from ..spec import Spec, StageSpec

__all__ = ["CACHEABLE_TAPS", "TEACHER_OUTPUT_KEY", "cached_taps"]

TEACHER_OUTPUT_KEY = "teacher_output"
#: tap text -> the batch key that carries its cached value
CACHEABLE_TAPS = {"teacher:@output": TEACHER_OUTPUT_KEY}


def cached_taps(spec: Spec, stage: StageSpec) -> dict[str, str]:
    """Tap text -> batch key, for the taps of ``stage`` served from the spec's teacher cache ({} without one)."""
    if not spec.runtime.teacher_cache or stage.transform is not None:
        return {}
    return {spec.runtime.teacher_cache_tap: TEACHER_OUTPUT_KEY}
