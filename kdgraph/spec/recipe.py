"""The training recipe of a stage: optimizer (options, parameter groups), lr schedule (warm-up, floor, per step
or per epoch), gradient clipping, gradient accumulation and an EMA of the student.

Plain data with bounds and one described field each; :mod:`kdgraph.train.optim` and
:mod:`kdgraph.train.schedule` build the torch objects. :func:`describe_recipe` is the one-line text that
``kdgraph compile`` and ``kdgraph train`` print.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from .base import Float, Int, _Strict

__all__ = ["OPTIMIZER_TYPES", "OptimizerSpec", "ParamGroupSpec", "LayerDecaySpec", "SchedulerSpec", "ClipSpec",
           "EmaSpec", "KEYLESS_DEFAULTS", "check_stage_recipe", "describe_recipe"]

#: optimizer types a spec may name; each has a builder in kdgraph.train.optim.OPTIMIZERS (add both together)
OPTIMIZER_TYPES = ("sgd", "adam", "adamw", "rmsprop", "rmsprop_tf", "sgd_dot")
MAX_PATTERN = 200
Pattern = Annotated[str, Field(min_length=1, max_length=MAX_PATTERN)]


class ParamGroupSpec(_Strict):
    """Parameters whose name matches ``params`` get their own lr multiplier and/or weight decay."""

    params: Pattern = Field(description="a glob over the trainable parameters' names as the Distiller holds them "
                                        "('student.fc.*', 'adapters.*', '*.bias'): * any text, ? one character")
    lr_mult: Float = Field(1.0, gt=0, description="this group's lr = the stage's lr x lr_mult (> 0)")
    weight_decay: Optional[Float] = Field(None, ge=0, description="this group's weight decay (default: the "
                                                                  "optimizer's, 0 where no_decay applies)")


class LayerDecaySpec(_Strict):
    """Layer-wise lr decay (BEiT/ELECTRA): layer i of N gets lr x rate^(N + 1 - i); embeddings i = 0, the
    parameters after the last layer (pooler, head) i = N + 1 (the full lr)."""

    rate: Float = Field(gt=0, le=1, description="the per-layer lr factor, in (0, 1]")
    layers: Pattern = Field(description="a glob naming the layers' parameters, '#' standing for the layer number: "
                                        "'student.bert.encoder.layer.#.*'")
    embeddings: Optional[Pattern] = Field(None, description="a glob naming the embeddings' parameters (layer 0): "
                                                            "'student.bert.embeddings.*'")

    @field_validator("layers")
    @classmethod
    def _hash(cls, v: str) -> str:
        if v.count("#") != 1:
            raise ValueError(f"layers {v!r} must hold '#' exactly once (where the layer number is)")
        return v


class OptimizerSpec(_Strict):
    """The optimizer and its options; parameters may be split into groups (no_decay, param_groups, layer_decay)."""

    type: str = Field("sgd", description=f"one of {', '.join(OPTIMIZER_TYPES)} (rmsprop_tf: timm's RMSpropTF, "
                                         f"needs the [timm] extra)")
    lr: Float = Field(gt=0, description="the learning rate for reference_world_size processes")
    momentum: Float = Field(0.9, ge=0, le=1, description="sgd, rmsprop, rmsprop_tf: momentum")
    weight_decay: Float = Field(0.0, ge=0, description="L2 penalty (sgd, adam, rmsprop) or decoupled decay (adamw)")
    nesterov: bool = Field(False, description="sgd: Nesterov momentum")
    betas: Optional[tuple[Annotated[Float, Field(ge=0, lt=1)], Annotated[Float, Field(ge=0, lt=1)]]] = Field(
        None, description="adam, adamw: [beta1, beta2] (default torch's 0.9, 0.999)")
    eps: Optional[Float] = Field(None, gt=0, description="adam, adamw, rmsprop, rmsprop_tf: the denominator's "
                                                         "epsilon (default the optimizer's own)")
    alpha: Optional[Float] = Field(None, gt=0, lt=1, description="rmsprop, rmsprop_tf: the squared-gradient "
                                                                 "smoothing constant (default torch 0.99, timm 0.9)")
    no_decay: list[Literal["bias", "norm", "1d"]] = Field(
        default_factory=list, description="parameters without weight decay: bias (names ending in .bias), norm "
                                          "(BatchNorm/LayerNorm/GroupNorm/... parameters), 1d (every parameter "
                                          "with at most one dimension, timm's and DIST's filter)")
    param_groups: list[ParamGroupSpec] = Field(default_factory=list, description="lr multipliers / weight decay "
                                               "by parameter name pattern; the first matching group applies")
    layer_decay: Optional[LayerDecaySpec] = Field(None, description="layer-wise lr decay for transformers")
    delta: Optional[Float] = Field(None, ge=0, le=0.5, description="sgd_dot (DOT): the momentum gap, default 0.075; "
                                   "the task gradient uses momentum - delta, the distillation gradient momentum + delta")

    @field_validator("type")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in OPTIMIZER_TYPES:
            raise ValueError(f"unknown optimizer type {v!r}; allowed: {', '.join(OPTIMIZER_TYPES)}")
        return v

    @field_validator("no_decay")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"no_decay lists a value twice: {v}")
        return v

    @model_validator(mode="after")
    def _options_apply(self) -> "OptimizerSpec":
        uses = {"betas": ("adam", "adamw"), "alpha": ("rmsprop", "rmsprop_tf"),
                "eps": ("adam", "adamw", "rmsprop", "rmsprop_tf")}
        for name, types in uses.items():
            if getattr(self, name) is not None and self.type not in types:
                raise ValueError(f"{name} applies to optimizer type {' / '.join(types)}, not {self.type!r}")
        if self.nesterov and self.type != "sgd":
            raise ValueError(f"nesterov applies to optimizer type sgd, not {self.type!r}")
        if self.delta is not None and self.type != "sgd_dot":
            raise ValueError(f"delta applies to optimizer type sgd_dot (DOT), not {self.type!r}")
        if self.type == "sgd_dot":  # the two momenta momentum -/+ delta must lie in [0, 1]
            delta = 0.075 if self.delta is None else self.delta
            if delta > self.momentum or self.momentum + delta > 1:
                raise ValueError(f"sgd_dot (DOT) needs 0 <= delta <= momentum and momentum + delta <= 1 (the task "
                                 f"and distillation momenta momentum -/+ delta); got momentum {self.momentum:g}, "
                                 f"delta {delta:g}")
        grouped = [n for n in ("no_decay", "param_groups", "layer_decay") if getattr(self, n)]
        if self.type == "sgd_dot" and grouped:
            raise ValueError(f"sgd_dot (DOT) steps one parameter group; {', '.join(grouped)} would split the "
                             f"parameters into several: remove {'it' if len(grouped) == 1 else 'them'}")
        return self


SCHEDULES = ("multistep", "cosine", "constant", "linear", "polynomial", "step")


class SchedulerSpec(_Strict):
    """The lr schedule: a warm-up, then a decay, stepped after every optimizer step or every epoch.

    factor(t) = warmup_lr/lr + (1 - warmup_lr/lr) * t / W during the W warm-up steps, then
    floor + (1 - floor) * g(p), p = (t - W) / (T - W): linear g = 1 - p, cosine g = (1 + cos(pi p)) / 2,
    polynomial g = (1 - p)^power, constant g = 1; step: gamma^floor((t - W) / step_size) and multistep:
    gamma^(milestones passed), both at least floor = min_lr / lr.
    """

    type: Literal["multistep", "cosine", "constant", "linear", "polynomial", "step"] = Field(
        "multistep", description="the decay after the warm-up: multistep, cosine, constant, linear, polynomial, step")
    interval: Literal["epoch", "step"] = Field(
        "epoch", description="when the schedule advances: after every epoch, or after every optimizer step")
    milestones: list[Annotated[Int, Field(ge=1)]] = Field(
        default_factory=list, description="multistep: epochs (>= 1) after which the lr is multiplied by gamma")
    gamma: Float = Field(0.1, gt=0, description="multistep, step: the lr factor at each decay, > 0")
    step_size: Optional[Float] = Field(None, gt=0, description="step: epochs between two decays (may be a "
                                                               "fraction, e.g. 2.4, with interval step)")
    power: Float = Field(1.0, gt=0, description="polynomial: the exponent of (1 - progress)")
    warmup_epochs: Float = Field(0.0, ge=0, description="warm-up length in epochs (>= 0; a fraction with "
                                                        "interval step)")
    warmup_steps: Int = Field(0, ge=0, description="warm-up length in optimizer steps (>= 0; interval step only)")
    warmup_lr: Float = Field(0.0, ge=0, description="the lr the warm-up starts from (spec units, scaled with lr)")
    min_lr: Float = Field(0.0, ge=0, description="the floor the decay ends at (spec units, scaled with lr)")

    @model_validator(mode="after")
    def _consistent(self) -> "SchedulerSpec":
        if self.warmup_epochs and self.warmup_steps:
            raise ValueError("give the warm-up as warmup_epochs or warmup_steps, not both")
        if self.warmup_steps and self.interval != "step":
            raise ValueError("warmup_steps needs interval: step (with interval: epoch, give warmup_epochs)")
        if self.interval == "epoch" and self.warmup_epochs != int(self.warmup_epochs):
            raise ValueError(f"warmup_epochs {self.warmup_epochs:g} is a fraction; that needs interval: step")
        if self.type == "step" and self.step_size is None:
            raise ValueError("type step needs step_size (epochs between two decays)")
        if self.type != "step" and self.step_size is not None:
            raise ValueError(f"step_size applies to type step, not {self.type!r}")
        if self.type != "multistep" and self.milestones:
            raise ValueError(f"milestones apply to type multistep, not {self.type!r}")
        return self

    def is_plain(self) -> bool:
        """Today's per-epoch multistep / cosine / constant without warm-up or floor (torch's own schedulers)."""
        return (self.interval == "epoch" and self.type in ("multistep", "cosine", "constant") and not self.warmup_epochs
                and self.min_lr == 0)


class ClipSpec(_Strict):
    """Gradient clipping before each optimizer step (of the unscaled gradients under fp16)."""

    max_norm: Optional[Float] = Field(None, gt=0, description="clip the total gradient norm to this (> 0; "
                                                              "torch.nn.utils.clip_grad_norm_)")
    norm_type: Float = Field(2.0, gt=0, description="the norm of max_norm (2: Euclidean)")
    max_value: Optional[Float] = Field(None, gt=0, description="clip every gradient value to [-v, v] (> 0; "
                                                               "torch.nn.utils.clip_grad_value_)")

    @model_validator(mode="after")
    def _one(self) -> "ClipSpec":
        if (self.max_norm is None) == (self.max_value is None):
            raise ValueError("give exactly one of max_norm (clip by norm) or max_value (clip by value), > 0")
        return self


class EmaSpec(_Strict):
    """An exponential moving average of the student's weights and buffers, updated after optimizer steps."""

    decay: Float = Field(gt=0, lt=1, description="ema = decay * ema + (1 - decay) * student, in (0, 1)")
    every: Int = Field(1, ge=1, description="update after every N optimizer steps")
    report: bool = Field(True, description="true: the EMA is what training evaluates and what checkpoints hold as "
                                           "the student (kdgraph eval / export use it); false: it is kept beside "
                                           "the student under the checkpoint's 'ema' key")


#: fields added after pretraining keys were first computed, with their defaults (kdgraph.weights.pretrain_key
#: leaves them out at these values, so cached networks keep their names)
KEYLESS_DEFAULTS = {
    "optimizer": {"betas": None, "eps": None, "alpha": None, "delta": None, "no_decay": [], "param_groups": [], "layer_decay": None},
    "scheduler": {"interval": "epoch", "step_size": None, "power": 1.0, "warmup_epochs": 0.0, "warmup_steps": 0,
                  "warmup_lr": 0.0, "min_lr": 0.0},
}


def check_stage_recipe(stage: Any) -> None:
    """Checks that need the stage (raised as ValueError, so the error names the stage's field path)."""
    s = stage.scheduler
    if s is not None and s.warmup_epochs and s.warmup_epochs >= stage.epochs:
        raise ValueError(f"scheduler.warmup_epochs {s.warmup_epochs:g} is not shorter than the stage's {stage.epochs} "
                         f"epoch(s); the warm-up must end before the stage does")
    if stage.optimizer.type == "sgd_dot" and (stage.accumulate > 1 or stage.clip_grad is not None):
        raise ValueError("optimizer sgd_dot (DOT) back-propagates the task and distillation terms apart in every step; "
                         "it cannot be combined with accumulate > 1 or clip_grad: remove those, or use sgd")
    if stage.ema is not None and "student" not in stage.train:
        raise ValueError("ema averages the student's weights, but this stage does not train the student (train: "
                         f"{stage.train}); remove ema or add student to train")


def describe_recipe(stage: Any) -> str:
    """One line: optimizer and options, groups, schedule, clipping, accumulation, EMA."""
    o = stage.optimizer
    parts = [f"{o.type} lr {o.lr:g}"]
    opts = {"momentum": o.momentum if o.type in ("sgd", "rmsprop", "rmsprop_tf") else None,
            "nesterov": o.nesterov or None, "weight_decay": o.weight_decay or None, "betas": o.betas, "eps": o.eps,
            "alpha": o.alpha}
    parts += [f"{k} {list(v) if isinstance(v, tuple) else v}" for k, v in opts.items() if v is not None]
    if o.no_decay:
        parts.append(f"no decay on {'/'.join(o.no_decay)}")
    for g in o.param_groups:
        parts.append(f"group {g.params}: lr x {g.lr_mult:g}" + (f", wd {g.weight_decay:g}"
                                                                if g.weight_decay is not None else ""))
    if o.layer_decay is not None:
        parts.append(f"layer decay {o.layer_decay.rate:g} over {o.layer_decay.layers}")
    s = stage.scheduler
    if s is None or (s.type == "constant" and not (s.warmup_epochs or s.warmup_steps)):
        parts.append("constant lr")
    else:
        what = {"multistep": f"multistep {s.milestones} x {s.gamma:g}", "step": f"step every {s.step_size:g} epochs "
                f"x {s.gamma:g}" if s.step_size else "step", "polynomial": f"polynomial power {s.power:g}"}.get(
            s.type, s.type)
        warm = (f", warm-up {s.warmup_steps} steps" if s.warmup_steps else
                f", warm-up {s.warmup_epochs:g} epochs" if s.warmup_epochs else "")
        warm += f" from {s.warmup_lr:g}" if warm and s.warmup_lr else ""
        parts.append(f"{what} per {s.interval}{warm}" + (f", floor {s.min_lr:g}" if s.min_lr else ""))
    if stage.clip_grad is not None:
        c = stage.clip_grad
        parts.append(f"clip norm {c.max_norm:g}" if c.max_norm is not None else f"clip value {c.max_value:g}")
    if stage.accumulate > 1:
        parts.append(f"accumulate {stage.accumulate} micro-batches")
    if stage.ema is not None:
        parts.append(f"EMA {stage.ema.decay:g}" + (" (evaluated, exported)" if stage.ema.report else " (kept)"))
    return "; ".join(parts)
