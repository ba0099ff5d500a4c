"""On-policy distillation of causal LMs (a stage's ``on_policy:``, GKD's lambda): completions generated before a step.

For each step a seeded draw (runtime.seed, stage, epoch, step: the same on every process and after a resume) picks
whether the batch is generated, with probability ``fraction``. A picked batch's rows keep their prompt (the tokens
before the first scored label, or the first ``prompt_tokens``) and the rest is replaced by a completion that the
student's original transformers module (the one the fused graph shares its parameters with) writes with
``generate``, outside the fused graph: under ``no_grad``, in eval mode, with the key-value cache, the global random
state untouched (``fork_rng``; the sampling seed is drawn from the same key and the rank). The batch keeps its shape:

* ``input_ids``: prompt, completion (cut after the first EOS, which is kept), then padding;
* ``attention_mask``: 1 on prompt and completion, 0 on the padding; ``position_ids`` (if the batch has them) 0..T-1;
* ``labels``: -100 on the prompt and the padding, the generated ids on the completion,

so the stage's token losses (``token_kl``, ``token_jsd``, ...) score only the generated tokens, which the teacher
sees through the fused graph as usual. ``generator: teacher`` lets the teacher write them (sequence-level KD).
``token_budget`` caps the tokens generated per process in the stage (a resumed run counts from the resume); every
generated batch is logged (``metrics.jsonl`` event ``on_policy``: tokens, tokens/s, the stage's total).

A custom loop uses it as the trainer does::

    op = OnPolicy(spec.stages[0].on_policy, distiller.student, seed=0)
    inputs, labels = op(inputs, labels, epoch, step)
    out = distiller(inputs, labels)
"""
from __future__ import annotations

import random
import time
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from ..distiller.data import Batch, unpack_batch
from ..errors import TrainingError

__all__ = ["OnPolicy", "on_policy_for_stage", "generated_batches"]

IGNORE_INDEX = -100
_KNOWN_INPUTS = ("input_ids", "attention_mask", "position_ids")


def on_policy_for_stage(stage: Any, task: nn.Module, rank: int, seed: int, index: int) -> Optional["OnPolicy"]:
    """The stage's :class:`OnPolicy` (None without ``on_policy:``); refuses what it cannot serve, before any step."""
    settings = getattr(stage, "on_policy", None)
    if settings is None:
        return None
    spec = getattr(task, "spec", None)
    where = f"stages[{index}].on_policy"
    if spec is not None and spec.runtime.distributed == "fsdp":
        raise TrainingError(f"{where}: generation runs on the original (unsharded) module, which runtime.distributed: "
                            f"fsdp shards; train on-policy stages with ddp or one process")
    cached = getattr(getattr(task, "report", None), "cached_taps", None)
    if cached:
        raise TrainingError(f"{where}: this stage reads the teacher's {', '.join(cached)} from runtime.teacher_cache, "
                            f"but generated completions are text the cache has never seen; the teacher must score "
                            f"them live: unset runtime.teacher_cache for on-policy stages")
    model = getattr(task, settings.generator, None)
    if not callable(getattr(model, "generate", None)):
        raise TrainingError(f"{where}: the {settings.generator} ({type(model).__name__}) has no generate method; "
                            f"on-policy distillation needs a causal LM (hf:AutoModelForCausalLM, ...)")
    if spec is not None and "input_ids" not in spec.input.named:
        raise TrainingError(f"{where}: the spec's input.named has no input_ids; on-policy distillation completes "
                            f"token sequences (input.named: {{input_ids, attention_mask}})")
    return OnPolicy(settings, model, seed=seed, stage=index, rank=rank)


def generated_batches(loader: Iterable[Any], on_policy: "OnPolicy", to_device: Callable[[Any], Any], epoch: int,
                      step: int, monitor: Any = None) -> Iterator[Batch]:
    """The loader's batches (from step ``step`` on) with the picked ones' completions generated, on the device.

    The trainer reads these before ``kdgraph.train.token_count.step_token_counts``, so the step's token count
    (``batch:num_tokens``, global token normalisation) is that of the generated labels, not of the data's."""
    for batch in loader:
        inputs, labels, extras = unpack_batch(batch)
        inputs, labels = on_policy(to_device(inputs), to_device(labels), epoch, step, monitor)
        yield Batch(inputs, labels, extras)
        step += 1


class OnPolicy:
    """Replaces a picked batch's completions by generated ones (see the module)."""

    def __init__(self, settings: Any, model: nn.Module, seed: int = 0, stage: int = 0, rank: int = 0):
        self.settings, self.model = settings, model
        self.seed, self.stage, self.rank = int(seed), int(stage), int(rank)
        self.generated = 0  # tokens this process generated in the stage
        self.batches = 0
        self.seconds = 0.0
        self.last: dict[str, Any] = {}

    # ------------------------------------------------------------------ which batches
    def picked(self, epoch: int, step: int) -> bool:
        """Whether step ``step`` of ``epoch`` is generated: a draw from (seed, stage, epoch, step), the same on every
        process; False once the token budget is spent."""
        f = float(self.settings.fraction)
        budget = self.settings.token_budget
        if f <= 0 or (budget is not None and self.generated >= budget):
            return False
        return f >= 1 or random.Random(f"on_policy:{self.seed}:{self.stage}:{epoch}:{step}").random() < f

    def _sampling_seed(self, epoch: int, step: int) -> int:
        return random.Random(f"on_policy_sample:{self.seed}:{self.stage}:{epoch}:{step}:{self.rank}").getrandbits(62)

    # ------------------------------------------------------------------ the batch
    def __call__(self, inputs: Any, labels: torch.Tensor, epoch: int, step: int,
                 monitor: Any = None) -> tuple[Any, torch.Tensor]:
        """``(inputs, labels)`` with generated completions when the step is picked, else as given."""
        if not self.picked(epoch, step):
            return inputs, labels
        if not isinstance(inputs, dict) or "input_ids" not in inputs:
            raise TrainingError("on_policy: batches must be dicts of named inputs with input_ids (a causal LM's)")
        unknown = [k for k in inputs if k not in _KNOWN_INPUTS]
        if unknown:
            raise TrainingError(f"on_policy: the batch has inputs {unknown} that generated sequences cannot carry "
                                f"(it rebuilds {', '.join(_KNOWN_INPUTS)}); packed documents are not completed")
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask", torch.ones_like(ids))
        if "position_ids" in inputs:
            pos = inputs["position_ids"]
            expected = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
            if not bool(((pos == expected) | (mask == 0)).all()):
                raise TrainingError("on_policy: the batch's position_ids restart inside a row (packed documents); "
                                    "a generated completion continues one document: train on-policy stages on "
                                    "unpacked rows (data.text.packing: false)")
        prompt = self._prompt_lengths(mask, labels)
        new = min(int(self.settings.max_new_tokens), ids.shape[1] - int(prompt.min()))
        if self.settings.token_budget is not None:
            new = min(new, (self.settings.token_budget - self.generated) // ids.shape[0])  # never past the budget
        if new <= 0:
            return inputs, labels
        t0 = time.perf_counter()
        completion = self._generate(ids, prompt, new, self._sampling_seed(epoch, step))
        out_ids, out_mask, out_labels, n = self._assemble(ids, prompt, completion)
        dt = time.perf_counter() - t0
        self.generated += n
        self.batches += 1
        self.seconds += dt
        self.last = {"epoch": epoch, "step": step, "generated_tokens": n, "seconds": round(dt, 4),
                     "tokens_per_s": round(n / dt, 1) if dt > 0 else None, "stage_generated_tokens": self.generated,
                     "generated_batches": self.batches, "by": self.settings.generator}
        if monitor is not None:
            if self.batches == 1:
                s = self.settings
                monitor.print(f"  on-policy: {s.fraction:g} of the batches completed by the {s.generator} (up to "
                              f"{s.max_new_tokens} new tokens, temperature {s.temperature:g}"
                              + (f", budget {s.token_budget} tokens" if s.token_budget else "") + f"); first batch: "
                              f"{n} tokens, {self.last['tokens_per_s']} tokens/s", soft_wrap=True)
            monitor.record("on_policy", **self.last)
        result = {"input_ids": out_ids, "attention_mask": out_mask}
        if "position_ids" in inputs:
            result["position_ids"] = torch.arange(ids.shape[1], device=ids.device).expand_as(ids).contiguous()
        return {k: result[k] for k in inputs}, out_labels

    def _prompt_lengths(self, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Tokens of each row's prompt: ``prompt_tokens``, else those before its first scored label; at least 1, at
        most its real (unpadded) tokens."""
        b, t = mask.shape
        if self.settings.prompt_tokens is not None:
            p = torch.full((b,), int(self.settings.prompt_tokens), device=mask.device)
        else:
            scored = labels != IGNORE_INDEX
            p = torch.where(scored.any(1), scored.int().argmax(1), torch.full((b,), t, device=mask.device))
        return torch.minimum(p, mask.sum(1)).clamp(1, t).long()

    def _special(self) -> tuple[Optional[int], int]:
        cfg = getattr(self.model, "generation_config", None) or self.model.config
        eos = getattr(cfg, "eos_token_id", None)
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        pad = getattr(cfg, "pad_token_id", None)
        pad = pad[0] if isinstance(pad, (list, tuple)) else pad
        return eos, int(pad if pad is not None else (eos if eos is not None else 0))

    @torch.no_grad()
    def _generate(self, ids: torch.Tensor, prompt: torch.Tensor, new: int, seed: int) -> torch.Tensor:
        """``B x new`` generated ids after each row's prompt (left-padded to a common length for ``generate``)."""
        from transformers import GenerationConfig

        eos, pad = self._special()
        width = int(prompt.max())
        left = torch.full((ids.shape[0], width), pad, dtype=ids.dtype, device=ids.device)
        left_mask = torch.zeros_like(left)
        for i, p in enumerate(prompt.tolist()):
            left[i, width - p:] = ids[i, :p]
            left_mask[i, width - p:] = 1
        s = self.settings
        sample = s.temperature > 0
        gen = GenerationConfig(max_new_tokens=new, min_new_tokens=0, do_sample=sample, use_cache=True,
                               pad_token_id=pad, eos_token_id=eos, num_beams=1,
                               **({"temperature": float(s.temperature), "top_k": int(s.top_k or 0), "top_p": 1.0}
                                  if sample else {}))
        was = self.model.training
        self.model.eval()
        devices = [ids.device] if ids.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                out = self.model.generate(input_ids=left, attention_mask=left_mask, generation_config=gen)
        finally:
            self.model.train(was)
        done = out[:, width:]
        if done.shape[1] < new:  # every row stopped at EOS early
            done = torch.cat([done, done.new_full((done.shape[0], new - done.shape[1]), pad)], 1)
        return done

    def _assemble(self, ids: torch.Tensor, prompt: torch.Tensor,
                  completion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Prompt + completion (through its first EOS) + padding, in the batch's shape; labels on the completion."""
        eos, pad = self._special()
        b, t = ids.shape
        out_ids = torch.full_like(ids, pad)
        out_mask = torch.zeros_like(ids)
        out_labels = torch.full_like(ids, IGNORE_INDEX)
        total = 0
        for i, p in enumerate(prompt.tolist()):
            g = completion[i, :t - p]
            if eos is not None and (g == eos).any():
                g = g[:int((g == eos).int().argmax()) + 1]
            n = g.numel()
            out_ids[i, :p] = ids[i, :p]
            out_ids[i, p:p + n] = g
            out_mask[i, :p + n] = 1
            out_labels[i, p:p + n] = g
            total += n
        return out_ids, out_mask, out_labels, total
