"""The ``data:`` section of a spec: where the training data is, how it is read, augmented and held out."""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from .augment import AugmentSpec
from .base import Float, Int, _Strict
from .text_section import TextSpec


class DataWrapperSpec(_Strict):
    type: str
    args: dict[str, Any] = Field(default_factory=dict)


class HoldoutSpec(_Strict):
    """A validation split carved from the training data (``kdgraph tune`` scores trials on it): a seeded random
    choice of training images, removed from training and evaluated instead of the data set's own evaluation split."""

    count: Optional[Int] = Field(None, ge=1, description="number of training images held out (or give fraction)")
    fraction: Optional[Float] = Field(None, gt=0, lt=1, description="share of the training images held out, in (0, 1)")
    seed: Int = Field(0, ge=0, description="seed of the random choice of held-out images (independent of runtime.seed)")

    @model_validator(mode="after")
    def _one(self) -> "HoldoutSpec":
        if (self.count is None) == (self.fraction is None):
            raise ValueError("give exactly one of count (images) or fraction (of the training split)")
        return self


class DataSpec(_Strict):
    """Where the training data is. ``dataset`` picks the loader; ``root`` may be overridden by --data."""

    dataset: Literal["imagenet", "fashion_mnist", "synthetic", "glue", "text"] = "imagenet"
    root: Optional[str] = None
    task: Optional[Literal["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]] = Field(
        None, description="dataset glue: the GLUE task (its local copy is under root, see kdgraph.train.data.glue)")
    tokenizer: Optional[str] = Field(None, description=(
        "dataset glue / text: a local tokenizer folder (save_pretrained; text also: a .gguf file, or "
        "pkg:PACKAGE/FILE.gguf in an installed package); './DIR' is relative to the spec file"))
    max_length: Int = Field(128, ge=8, le=4096, description="dataset glue: tokens per example at most (truncated); "
                                                            "text: tokens per row")
    padding: Literal["longest", "max_length"] = Field(
        "longest", description="dataset glue: pad each batch to its longest example, or always to max_length")
    pad_to_multiple_of: Optional[Int] = Field(
        None, ge=1, le=128, description="dataset glue: round each batch's padded length up to a multiple of this "
                                        "(DataCollatorWithPadding's pad_to_multiple_of; 8 for fp16 tensor cores)")
    workers: Int = Field(8, ge=0, le=256)
    wrapper: Optional[DataWrapperSpec] = None
    train_subset: Optional[Int] = Field(None, ge=1, description="use only the first N training images")
    val_subset: Optional[Int] = Field(None, ge=1, description="use only the first N validation images")
    drop_last: bool = Field(True, description="drop each epoch's last partial training batch (false: keep it, "
                                              "a smaller step at the epoch's end)")
    augment: Optional[AugmentSpec] = Field(None, description="training augmentation of image data: RandAugment / "
                                           "TrivialAugment / AutoAugment, random erasing, mixup / cutmix (soft "
                                           "targets), crop and interpolation (kdgraph.spec.augment)")
    holdout: Optional[HoldoutSpec] = Field(None, description="validate on training images held out (count or "
                                                             "fraction, seed) instead of the evaluation split")
    text: Optional[TextSpec] = Field(None, description="dataset text: the sources, packing and held-out documents "
                                                       "(kdgraph.spec.text_section)")

    @model_validator(mode="after")
    def _glue_task(self) -> "DataSpec":
        if (self.dataset == "glue") != (self.task is not None):
            raise ValueError("task is given with dataset glue, and only then (cola, sst2, mrpc, stsb, qqp, mnli, "
                             "qnli, rte, wnli)")
        return self

    @model_validator(mode="after")
    def _text(self) -> "DataSpec":
        if (self.dataset == "text") != (self.text is not None):
            raise ValueError("the text section is given with dataset text, and only then (sources, packing, "
                             "validation)")
        if self.dataset == "text" and self.holdout is not None:
            raise ValueError("dataset text holds out whole documents with text.validation; holdout is for images")
        if self.dataset == "text" and not self.tokenizer:
            raise ValueError("dataset text needs tokenizer: a local save_pretrained folder or a .gguf file")
        return self
