"""The step loop's two error messages: a stage's per-batch inputs missing from the data, a non-finite loss."""
from __future__ import annotations

from typing import Any

import torch

from ..errors import DataError

__all__ = ["check_batch_inputs", "nan_message"]


def check_batch_inputs(run: Any, extras: dict[str, Any]) -> None:
    """A DataError when the stage needs per-batch inputs (CRD's indices) the batch lacks."""
    missing = [k for k in run.batch_inputs if k not in extras]
    if missing:
        raise DataError(f"stage {run.name!r} needs per-batch inputs {missing} that the data does not provide (it "
                        f"gives {sorted(extras) or 'only images and targets'}); set the spec's data.wrapper (e.g. "
                        f"{{type: crd}}) so dataset items carry them")


def nan_message(vals: torch.Tensor, finite: torch.Tensor, names: list[str], pending: list, stage: str, epoch: int,
                 steps_per_epoch: int, global_step: int) -> str:
    """One line naming the non-finite term(s), the step, and every term's value at it."""
    r = int((~finite).nonzero()[0])
    row = vals[r]
    culprits = [n for j, n in enumerate(names) if not torch.isfinite(row[j + 1])]
    shown = ", ".join(f"{n} = {float(row[j + 1]):.4g}" for j, n in enumerate(names))
    gstep = global_step - (len(pending) - 1 - r)
    what = (f"loss term{'s' if len(culprits) > 1 else ''} {', '.join(repr(c) for c in culprits)}"
            if culprits else f"the total loss ({float(row[0])})")
    return (f"non-finite {what} at step {gstep} (stage {stage}, epoch {epoch + 1}, step {pending[r][0]} of "
            f"{steps_per_epoch}) [{shown}]")
