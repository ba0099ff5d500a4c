"""The optimizer step's token count for the token losses (``batch:num_tokens``): global token normalisation.

A causal LM's loss is a sum over kept tokens divided by their number. With gradient accumulation and several
ranks, dividing each micro-batch by its own count weighs a token of a short micro-batch more than one of a long
one (TRL #4719). When a stage reads ``batch:num_tokens`` (the token losses do by default), the trainer reads each
accumulation window's micro-batches first, counts the tokens the stage's losses keep in all of them
(``Distiller.count_tokens``), sums the count over the ranks (one all_reduce per optimizer step) and hands every
micro-batch ``num_tokens = count / (micro_batches * world_size)``. The trainer's division by the micro-batches
and DDP's averaging over ranks then give exactly ``sum over the step's tokens / count``: the same loss and
gradients whatever the split. Nothing here knows a method: it follows the batch key.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from ..distiller.data import unpack_batch
from .distributed import DistEnv, all_reduce_sum

__all__ = ["KEY", "token_counter", "data_batch_inputs", "step_token_counts"]

#: the batch key the runtime fills
KEY = "num_tokens"

Counter = Callable[[torch.Tensor], Optional[torch.Tensor]]


def token_counter(task: Any) -> Optional[Counter]:
    """``task.count_tokens`` when the current stage reads ``batch:num_tokens``, else None."""
    reads = [*getattr(task, "batch_inputs", ()), *getattr(task, "optional_batch_inputs", ())]
    return task.count_tokens if KEY in reads and hasattr(task, "count_tokens") else None


def data_batch_inputs(task: Any) -> list[str]:
    """The per-batch inputs the data must carry: the stage's, less the one the runtime computes."""
    return [k for k in getattr(task, "batch_inputs", ()) if k != KEY or token_counter(task) is None]


def step_token_counts(batches: Iterable[Any], count: Optional[Counter], env: DistEnv, step: int,
                      steps_per_epoch: int, accumulate: int) -> Iterator[tuple[Any, Optional[torch.Tensor]]]:
    """``(batch, num_tokens)`` for each batch from step ``step`` on; ``num_tokens`` is None without ``count``.

    Windows follow the step loop's: ``accumulate`` micro-batches per optimizer step, the epoch's last window
    shorter (``min(k, steps_per_epoch - start_of_window)`` micro-batches)."""
    if count is None:
        yield from ((b, None) for b in batches)
        return
    it = iter(batches)
    k = max(1, accumulate)
    while True:
        group = max(1, min(k, steps_per_epoch - step // k * k))  # micro-batches in this optimizer step
        window = list(itertools.islice(it, max(1, group - step % k)))
        if not window:
            return
        local = sum(int(count(unpack_batch(b)[1]) or 0) for b in window)
        (total,) = all_reduce_sum(env, [float(local)])
        share = torch.tensor(total / (group * env.world_size), dtype=torch.float32)
        for b in window:
            yield b, share
        step += len(window)
