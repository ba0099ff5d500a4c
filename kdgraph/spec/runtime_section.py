"""The ``runtime:`` section of a spec: precision, layout, the teacher passes, the teacher cache, DDP or FSDP."""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from .base import Int, _Strict
from .fsdp_schema import FSDPSpec


class ChunkedVocabSpec(_Strict):
    """``runtime.chunked_vocab``: the chunked vocabulary loss pass (docs/causal_lm.md, "Chunked vocabulary loss")."""

    chunk_tokens: Int = Field(256, ge=1, le=1 << 24, description="kept tokens per chunk: the largest logits "
                                                                  "block alive at once is chunk_tokens x vocabulary")


class RuntimeSpec(_Strict):
    amp: Literal["off", "bf16", "fp16"] = "off"
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    seed: Int = Field(0, ge=0, le=2 ** 63 - 1)
    deterministic: bool = False
    eval_every: int = Field(1, ge=1, description="kdgraph train: evaluate every N epochs of a stage (and always "
                                                 "after its last epoch)")
    eval_teacher: bool = Field(False, description="kdgraph train: evaluate the teacher on the validation split "
                                                  "once before training and record its top-1/top-5")
    fold_teacher_bn: bool = Field(False, description="compiler pass: fold the frozen teacher's BatchNorm into the "
                                                     "convolution before it (exact in eval mode up to float rounding, "
                                                     "~1e-6 relative on the teacher's logits; the teacher module and "
                                                     "its state_dict stay as they are)")
    teacher_channels_last: bool = Field(False, description="compiler pass: run the frozen teacher in channels_last "
                                                           "memory whatever the student's layout (its input converted "
                                                           "once, tapped values given back contiguous; the teacher's "
                                                           "parameters and state_dict unchanged; ~1e-6 relative)")
    teacher_dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="compiler pass: the precision the frozen teacher's nodes run in, under autocast (bf16 or "
                            "fp16; fp32: unchanged, the step's own precision); tapped values go to the losses in fp32; "
                            "not exact (docs/training.md, Teacher passes)")
    teacher_mkldnn: bool = Field(False, description="compiler pass, CPU: run the frozen teacher as one subgraph in "
                                                    "oneDNN's blocked layout with its BatchNorm folded (torch.fx's "
                                                    "optimize_for_inference; a derived copy of its weights, rebuilt "
                                                    "when they change; ~1e-6 relative). Not with fold_teacher_bn, "
                                                    "teacher_channels_last or teacher_dtype, which it replaces")
    teacher_cache: Optional[str] = Field(
        None, min_length=1, max_length=4096,
        description="kdgraph train: a folder written by `kdgraph cache-teacher` (relative to the spec file, or "
                    "absolute). Every stage without an input transform then reads teacher:@output from it (batch "
                    "input 'teacher_output', one stored augmentation draw per image and epoch) and the teacher "
                    "nodes only it needed are pruned; other teacher taps stay online")
    teacher_cache_tap: str = Field(
        "teacher:@output", min_length=1, max_length=512,
        description="the teacher tap runtime.teacher_cache serves: 'teacher:@output' (an image classifier's "
                    "logits, kdgraph cache-teacher --views R) or a causal LM's logits such as 'teacher:lm_head' "
                    "(a per-token top-K cache, kdgraph cache-teacher --topk K; token losses then read a sparse "
                    "teacher, docs/causal_lm.md)")

    distributed: Literal["ddp", "fsdp"] = Field("ddp", description="kdgraph train under torchrun: 'ddp' (every "
                                                "process holds both networks) or 'fsdp' (FSDP2: parameters sharded "
                                                "per unit, see runtime.fsdp and docs/training.md)")
    fsdp: FSDPSpec = Field(default_factory=FSDPSpec, description="sharding units, mixed precision and teacher "
                                                                 "placement of runtime.distributed: fsdp")

    chunked_vocab: Optional[ChunkedVocabSpec] = Field(
        None, description="compiler pass: a token loss (token_kl, ...) that reads the output of a network's Linear "
                          "head (lm_head) computes it from the head's input and weight in checkpointed chunks of "
                          "kept tokens, never building the B x T x V logits (out.logits is then None); unset: off")

    @field_validator("teacher_cache_tap")
    @classmethod
    def _teacher_tap(cls, v: str) -> str:
        from .taps import parse_tap

        tap = parse_tap(v)
        if tap.source != "teacher" or tap.io != "output":
            raise ValueError(f"{v!r} is not a teacher output tap; allowed: 'teacher:@output' or a teacher module's "
                             f"output such as 'teacher:lm_head'")
        return tap.text

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        # YAML 1.1 reads an unquoted `off` as False
        return "off" if v is False else v

    @model_validator(mode="after")
    def _teacher_mkldnn_alone(self) -> "RuntimeSpec":
        if self.teacher_mkldnn:
            mixed = [name for name, on in [("fold_teacher_bn", self.fold_teacher_bn),
                                           ("teacher_channels_last", self.teacher_channels_last),
                                           ("teacher_dtype", self.teacher_dtype != "fp32")] if on]
            if mixed:
                raise ValueError(f"teacher_mkldnn folds the teacher's BatchNorm and chooses its layout itself, in "
                                 f"fp32; it cannot be combined with {', '.join(mixed)}: switch "
                                 f"{'that' if len(mixed) == 1 else 'those'} off, or teacher_mkldnn")
        return self

    @model_validator(mode="after")
    def _fsdp_compatible(self) -> "RuntimeSpec":
        if self.distributed != "fsdp":
            return self
        bad = [name for name, on in [("compile", self.compile), ("sync_bn", self.sync_bn),
                                     ("chunked_vocab", self.chunked_vocab is not None)] if on]
        if self.fsdp.teacher == "sharded":
            bad += [name for name, on in [("teacher_mkldnn", self.teacher_mkldnn),
                                          ("fold_teacher_bn", self.fold_teacher_bn)] if on]
        if bad:
            raise ValueError(f"distributed: fsdp cannot be combined with {', '.join(bad)}: a sharded network's "
                             f"parameters exist whole only between the gathers the fsdp_schedule pass inserts "
                             f"(teacher_mkldnn and fold_teacher_bn derive copies of the teacher's weights when "
                             f"compiling, compile and sync_bn wrap the modules themselves). Switch "
                             f"{'it' if len(bad) == 1 else 'them'} off, use distributed: ddp, or (for the teacher "
                             f"passes) fsdp.teacher: replicated; chunked_vocab reads the head's weight outside the "
                             f"gathers")
        return self

    @model_validator(mode="after")
    def _chunked_vocab_alone(self) -> "RuntimeSpec":
        if self.chunked_vocab is not None and self.teacher_mkldnn:
            raise ValueError("chunked_vocab reads the teacher's final hidden states, which teacher_mkldnn hides "
                             "inside its one oneDNN call; switch one of them off (teacher_mkldnn is for CNNs)")
        return self
