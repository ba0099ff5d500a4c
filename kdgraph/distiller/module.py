"""The :class:`Distiller`: the ``nn.Module`` a user holds, trains and checkpoints.

    distiller = kdgraph.compile("specs/kd_resnet18.yaml")          # or teacher=..., student=...
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.1, momentum=0.9)
    out = distiller(images, targets)        # out.loss, out.terms["kd"], out.logits
    out = distiller(images, targets, return_taps=True)  # + out.taps["teacher:layer4"], ...
    out.loss.backward(); optimizer.step()

It owns the user's teacher and student (shared, not copied: ``distiller.student`` *is* the
module you passed), every adapter of every stage (so adapters persist across stages) and every
stage's losses (so loss state such as CRD's memory is in ``state_dict``). Each stage is one fused
``torch.fx.GraphModule`` (``distiller.graph_module``), built when the stage is entered.

Policy: the teacher is frozen (``requires_grad=False``) and in eval mode for good, whatever
``train()`` is called with; an adapter the current stage does not train is frozen and in eval mode.
"""
from __future__ import annotations

import time
from typing import Any, Mapping, NamedTuple, Optional

import torch
import torch.fx as fx
from torch import nn

from ..capture import TracedNetwork, capture_for_spec
from ..compiler import Prepared, StageReport, build_stage, with_tap_outputs
from ..compiler.vocabulary import check_vocabularies
from ..compiler.passes.teacher_dtype import autocast_state_kept
from ..errors import KDGraphError, ModelError
from ..models import build_model
from ..spec import Spec, load_spec
from ..models.trust import consent
from ..models.weights import load_weights, resolve


class DistillerOutput(NamedTuple):
    """What a forward returns: the weighted total, each weighted term by name, the student's logits,
    and (``return_taps=True`` only) every tap's value by its spec text."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    logits: Optional[torch.Tensor]
    taps: Optional[dict[str, Any]] = None


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


class Distiller(nn.Module):
    """Teacher + student + adapters + losses, run as one fused fx graph per stage."""

    def __init__(self, spec: Spec, teacher: nn.Module, student: nn.Module, stage: int | str = 0):
        super().__init__()
        if teacher is student:
            raise ModelError("teacher and student are the same module object; pass two instances "
                             "(Tf-KD's self-training uses a separate, pretrained copy as teacher)")
        shared = {id(p) for p in teacher.parameters()} & {id(p) for p in student.parameters()}
        if shared:
            raise ModelError(f"teacher and student share {len(shared)} parameter tensors; they must be separate "
                             f"modules (the teacher is frozen, the student trains)")
        self.spec = spec
        t0 = time.perf_counter()
        check_vocabularies(spec, teacher, student)  # token losses: one tokenizer (before the slow captures)
        tnet = capture_for_spec(spec, "teacher", teacher)
        snet = capture_for_spec(spec, "student", student)
        c, (h, w) = spec.input.channels, spec.input.size
        batch_shape = (2,) if spec.input.named else (2, c, h, w)
        prep = Prepared(spec, tnet, snet, batch_shape)
        self.teacher = teacher
        self.student = student
        self.adapters = prep.adapters.to(_device_of(student))
        self.losses = prep.losses.to(_device_of(student))
        self.transforms = prep.transforms
        self._prep = prep
        #: the stage's progress (epoch, step): scheduled loss weights and arguments read it; the trainer updates it
        self.progress = prep.progress
        self._graphs: dict[int, tuple[fx.GraphModule, StageReport]] = {}
        self._runner: Any = None
        self._taps_runner: Any = None
        self._compile_kwargs: Optional[dict] = None
        self._stage_index = 0
        self.teacher.requires_grad_(False)
        self.prepare_seconds = time.perf_counter() - t0
        self.enter_stage(stage)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_spec(cls, spec: Any, teacher: Optional[nn.Module] = None, student: Optional[nn.Module] = None,
                  stage: int | str = 0, allow_imports: Optional[list[str]] = None,
                  trust_code: bool = False) -> "Distiller":
        """Load the spec and build the networks it names (random init) unless given.

        ``allow_imports`` / ``trust_code``: consent to import your own code (:mod:`kdgraph.models.trust`)."""
        with consent(allow_imports, trust_code):
            spec = load_spec(spec)
            teacher = teacher if teacher is not None else build_model(spec.teacher, "teacher")
            student = student if student is not None else build_model(spec.student, "student")
            return cls(spec, teacher, student, stage)

    def load_weights(self) -> dict[str, bool]:
        """Load the weights the spec names for teacher and student (torchvision enum, local file, or a
        ``cache:NAME`` entry, which ``kdgraph train SPEC`` makes when the spec says how to pretrain it)."""
        for role in ("teacher", "student"):
            resolve(self.spec, role, require=True)
        return {"teacher": load_weights(self.teacher, self.spec.teacher, "teacher"),
                "student": load_weights(self.student, self.spec.student, "student")}

    # ------------------------------------------------------------------ stages
    @property
    def stages(self) -> list[str]:
        return [s.name for s in self.spec.stages]

    @property
    def stage(self) -> str:
        return self.spec.stages[self._stage_index].name

    @property
    def stage_index(self) -> int:
        return self._stage_index

    def _index(self, key: int | str) -> int:
        if isinstance(key, int):
            if not -len(self.stages) <= key < len(self.stages):
                raise KDGraphError(f"stage index {key} out of range; stages: {', '.join(self.stages)}")
            return key % len(self.stages)
        return self.stages.index(self.spec.stage(key).name)

    def build_stage(self, key: int | str) -> tuple[fx.GraphModule, StageReport]:
        """The fused GraphModule and the compiler's report for a stage (built once, then cached)."""
        i = self._index(key)
        if i not in self._graphs:
            gm, report = build_stage(self._prep, i, self.teacher, self.student)
            self._graphs[i] = (gm, report)
        return self._graphs[i]

    def enter_stage(self, key: int | str) -> "Distiller":
        """Make ``key`` the current stage: build its graph, set what trains, keep adapters' weights."""
        i = self._index(key)
        gm, report = self.build_stage(i)
        self._stage_index = i
        train = set(self.spec.stages[i].train)
        self.student.requires_grad_("student" in train)
        for name, adapter in self.adapters.items():
            adapter.requires_grad_(name in train)
        report.trainable_parameters = sum(p.numel() for p in self.trainable_parameters())
        self._runner = self._taps_runner = None
        self.train(self.training)
        return self

    @property
    def graph_module(self) -> fx.GraphModule:
        return self.build_stage(self._stage_index)[0]

    @property
    def report(self) -> StageReport:
        return self.build_stage(self._stage_index)[1]

    @property
    def batch_inputs(self) -> list[str]:
        """Per-batch inputs beyond images and targets that the current stage needs (e.g. CRD's indices)."""
        return list(self.report.batch_inputs)

    @property
    def optional_batch_inputs(self) -> list[str]:
        """Per-batch inputs the current stage reads when the batch carries them (``num_tokens``: the optimizer
        step's token count, which kdgraph's trainer supplies; without it each micro-batch normalises by its own)."""
        return list(self.report.optional_batch_inputs)

    def count_tokens(self, labels: torch.Tensor) -> Optional[torch.Tensor]:
        """How many tokens of a batch with ``labels`` the current stage's losses that read ``batch:num_tokens``
        score (None: no loss reads it). Sum it over an optimizer step's micro-batches (and ranks) to get the
        step's count; pass ``num_tokens = count / (micro_batches * ranks)`` with each micro-batch
        (docs/lm_losses.md)."""
        counts = {}
        for name, text_by_input in ((n, self._prep.loss_inputs[(self.stage, n)]) for n in self.losses[self.stage]):
            if "batch:num_tokens" in text_by_input.values():
                loss = self.losses[self.stage][name]
                if not hasattr(loss, "count_tokens"):
                    raise KDGraphError(f"stage {self.stage!r}: loss {name!r} ({type(loss).__name__}) reads "
                                       f"batch:num_tokens but has no count_tokens(labels) saying what it counts")
                counts[name] = loss.count_tokens(labels)
        if not counts:
            return None
        values = {k: int(v) for k, v in counts.items()}
        if len(set(values.values())) > 1:
            raise KDGraphError(f"stage {self.stage!r}: the losses reading batch:num_tokens count different tokens "
                               f"in the same batch ({', '.join(f'{k}: {v}' for k, v in values.items())}), e.g. one "
                               f"with args.shift true and one with false; one step count cannot normalise them all. "
                               f"Give them the same shift, or bind num_tokens of some to another batch key.")
        return next(iter(counts.values()))

    @property
    def graph(self):
        """A ``networkx.DiGraph`` view of the current stage's fused graph (see :mod:`kdgraph.distiller.graphview`)."""
        from .graphview import to_networkx

        return to_networkx(self)

    @property
    def traced(self) -> dict[str, TracedNetwork]:
        """The traced teacher and student (node names, shapes) the stages were built from."""
        return dict(self._prep.nets)

    # ------------------------------------------------------------------ training policy
    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        self.teacher.eval()
        train = set(self.spec.stages[self._stage_index].train)
        for name, adapter in self.adapters.items():
            if name not in train:
                adapter.eval()
        if "student" not in train:
            self.student.eval()
        return self

    def task_terms(self) -> list[str]:
        """Names of the current stage's task terms (losses whose class sets ``task_term``, e.g. cross_entropy);
        every other term distils. Term-wise optimizers (DOT) step the two kinds apart."""
        return [name for name, loss in self.losses[self.stage].items() if getattr(loss, "task_term", False)]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer needs: the student (if the stage trains it), its adapters, loss parameters."""
        train = set(self.spec.stages[self._stage_index].train)
        groups: list[nn.Module] = []
        if "student" in train:
            groups.append(self.student)
        groups += [a for n, a in self.adapters.items() if n in train]
        groups.append(self.losses[self.stage])
        seen: set[int] = set()
        out = []
        for g in groups:
            for p in g.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def use_torch_compile(self, enabled: bool = True, **kwargs: Any) -> "Distiller":
        """Run the fused graphs through ``torch.compile(**kwargs)`` (per stage, compiled on first use)."""
        self._compile_kwargs = kwargs if enabled else None
        self._runner = self._taps_runner = None
        return self

    # ------------------------------------------------------------------ forward
    def _named_call(self, images: Any, targets: Optional[torch.Tensor],
                    extras: dict[str, Any]) -> tuple[dict[str, torch.Tensor], Optional[torch.Tensor], dict]:
        """Split a dict batch (or keyword arguments) of a spec with ``input.named`` into the networks' inputs,
        the targets (``labels`` or ``targets``) and the stage's extras."""
        named = list(self.spec.input.named)
        batch = dict(images) if isinstance(images, Mapping) else {}
        if images is not None and not isinstance(images, Mapping):
            raise KDGraphError(f"spec {self.spec.name!r} declares named inputs ({', '.join(named)}): call the "
                               f"distiller with one dict batch, distiller({{{', '.join(repr(k) for k in named)}, "
                               f"'labels': ...}}), or with those keyword arguments")
        batch.update(extras)
        if targets is not None:
            batch["targets"] = targets
        if "labels" in batch and "targets" in batch:
            raise KDGraphError("the batch holds both 'labels' and 'targets'; give the labels once")
        targets = batch.pop("labels", batch.pop("targets", None))
        readable = [*self.report.batch_inputs, *self.report.optional_batch_inputs]
        accepted = [*named, "labels", *readable]
        unknown = [k for k in batch if k not in named and k not in readable]
        missing = [k for k in named if k not in batch]
        if unknown or missing:
            raise KDGraphError(
                f"stage {self.stage!r}: the batch " + (f"has unexpected keys {unknown}" if unknown else
                                                       f"lacks the named inputs {missing}")
                + f"; it takes {', '.join(accepted)} (or 'targets' for 'labels')")
        return ({k: batch.pop(k) for k in named}, targets, batch)

    def forward(self, images: Any = None, targets: Optional[torch.Tensor] = None, *, return_taps: bool = False,
                **extras: torch.Tensor) -> DistillerOutput:
        """Run the current stage. ``extras``: the per-batch inputs it reads (``batch_inputs``, e.g.
        CRD's ``index``; see :mod:`kdgraph.data`). ``return_taps=True`` also returns ``out.taps``, each
        tap's value keyed by its spec text (``"teacher:layer4"``, ``"adapter:translator"``), from a
        second graph built on first use; the default graph is never changed.

        A spec with named inputs (``input.named``, e.g. a BERT's ``input_ids``, ``attention_mask``) takes one
        dict batch instead: ``distiller({"input_ids": ..., "attention_mask": ..., "labels": ...})``."""
        named: dict[str, torch.Tensor] = {}
        if self.spec.input.named:
            named, targets, extras = self._named_call(images, targets, extras)
        elif images is None:
            raise KDGraphError("the distiller needs a batch of images: distiller(images, targets, **extras)")
        needed = self.report.batch_inputs
        missing = [k for k in needed if k not in extras]
        unknown = [k for k in extras if k not in needed and k not in self.report.optional_batch_inputs]
        if missing or unknown:
            raise KDGraphError(
                f"stage {self.stage!r} takes per-batch inputs {needed or 'none'} beyond images and targets; "
                + (f"missing: {missing}" if missing else f"unexpected: {unknown}")
                + (". Wrap the dataset with the spec's data wrapper (kdgraph.data.wrap) so batches carry them."
                   if missing else ""))
        runner = self._taps_runner if return_taps else self._runner
        if runner is None:
            gm = self.graph_module
            if return_taps:
                gm = with_tap_outputs(gm, self.report)
            runner = torch.compile(gm, **self._compile_kwargs) if self._compile_kwargs is not None else gm
            # a plain attribute, not a registered submodule: state_dict() must not grow "_runner.*" keys
            # after the first forward (a checkpoint must load into a freshly compiled distiller)
            object.__setattr__(self, "_taps_runner" if return_taps else "_runner", runner)
        device = next(iter(named.values())).device if named else images.device
        # the graph switches grad mode (and, with runtime.teacher_dtype, autocast) around the teacher; restore them
        # even if a module raises
        with torch.set_grad_enabled(torch.is_grad_enabled()), autocast_state_kept(device.type):
            out = runner(**named, targets=targets, **extras) if named else runner(images, targets, **extras)
        return DistillerOutput(out["loss"], out["terms"], out["logits"], out.get("taps"))

    def extra_repr(self) -> str:
        return f"spec={self.spec.name!r}, stage={self.stage!r} ({self._stage_index + 1}/{len(self.stages)})"
