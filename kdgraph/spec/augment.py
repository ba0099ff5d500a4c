"""The spec's training augmentation (``data.augment``): per-image policies (RandAugment, TrivialAugmentWide,
AutoAugment), random erasing, flip, crop / resize / interpolation settings, and the per-batch MixUp / CutMix that
turn the labels into soft targets.

Schema only (pydantic v2, ``extra="forbid"``); :mod:`kdgraph.train.data.augment` builds the transforms.
:func:`check_augment` holds the checks that need the rest of the spec (named inputs, data set, teacher cache).
Example::

    data:
      dataset: imagenet
      drop_last: false                    # keep the last partial batch
      augment:
        randaugment: {num_ops: 2, magnitude: 9}
        random_erasing: {p: 0.25}
        mixup: {alpha: 0.2}
        cutmix: {alpha: 1.0}              # with both, each batch takes one of the two (probability 1/2)
        crop: {scale: [0.08, 1.0], ratio: [0.75, 1.3333]}
        eval_crop_ratio: 0.875            # validation: resize to size / 0.875, then center-crop size
        interpolation: bicubic
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

__all__ = ["RandAugmentSpec", "TrivialAugmentSpec", "AutoAugmentSpec", "RandomErasingSpec", "MixSpec", "CropSpec",
           "AugmentSpec", "check_augment", "POLICIES"]


def _no_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got the boolean {str(v).lower()}")
    return v


_Int = Annotated[int, BeforeValidator(_no_bool)]
_Float = Annotated[float, BeforeValidator(_no_bool)]
_Pair = tuple[Annotated[_Float, Field(gt=0)], Annotated[_Float, Field(gt=0)]]

#: the per-image policies, at most one of which a spec may name
POLICIES = ("randaugment", "trivialaugment", "autoaugment")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class RandAugmentSpec(_Strict):
    """torchvision.transforms.v2.RandAugment (Cubuk et al., 2020): ``num_ops`` random ops at one magnitude."""

    num_ops: _Int = Field(2, ge=1, le=16, description="ops applied in sequence to each image, 1 to 16")
    magnitude: _Int = Field(9, ge=0, le=99, description="the magnitude bin of every op, 0 to num_magnitude_bins - 1")
    num_magnitude_bins: _Int = Field(31, ge=2, le=100, description="bins the ops' ranges are divided into, 2 to 100")

    @model_validator(mode="after")
    def _magnitude_in_bins(self) -> "RandAugmentSpec":
        if self.magnitude >= self.num_magnitude_bins:
            raise ValueError(f"magnitude {self.magnitude} is out of range: it is a bin index, 0 to "
                             f"num_magnitude_bins - 1 = {self.num_magnitude_bins - 1}")
        return self


class TrivialAugmentSpec(_Strict):
    """torchvision.transforms.v2.TrivialAugmentWide (Müller & Hutter, 2021): one op at a random magnitude."""

    num_magnitude_bins: _Int = Field(31, ge=2, le=100, description="bins the magnitudes are drawn from, 2 to 100")


class AutoAugmentSpec(_Strict):
    """torchvision.transforms.v2.AutoAugment (Cubuk et al., 2019): one of a learned policy's sub-policies."""

    policy: Literal["imagenet", "cifar10", "svhn"] = Field("imagenet", description="the learned policy: imagenet, "
                                                                                   "cifar10 or svhn")


class RandomErasingSpec(_Strict):
    """torchvision.transforms.v2.RandomErasing (Zhong et al., 2020), on the normalised image."""

    p: _Float = Field(0.25, gt=0, le=1, description="probability that an image gets an erased rectangle, (0, 1]")
    scale: _Pair = Field((0.02, 0.33), description="[min, max] of the erased area as a fraction of the image")
    ratio: _Pair = Field((0.3, 3.3), description="[min, max] aspect ratio of the erased rectangle")
    value: _Float = Field(0.0, description="the value written into the rectangle (normalised: 0 is the mean)")

    @model_validator(mode="after")
    def _ranges(self) -> "RandomErasingSpec":
        if not self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale {list(self.scale)} must be [min, max] with 0 < min <= max <= 1")
        if self.ratio[0] > self.ratio[1]:
            raise ValueError(f"ratio {list(self.ratio)} must be [min, max] with min <= max")
        return self


class MixSpec(_Strict):
    """MixUp or CutMix (torchvision.transforms.v2): lambda ~ Beta(alpha, alpha) per batch."""

    alpha: _Float = Field(description="the Beta distribution's parameter, > 0 (mixup 0.2 / 0.8, cutmix 1.0 in "
                                      "the common recipes)")

    @model_validator(mode="before")
    @classmethod
    def _alpha_positive(cls, v: Any) -> Any:
        a = v.get("alpha") if isinstance(v, dict) else None
        if isinstance(a, (int, float)) and not isinstance(a, bool) and a <= 0:
            raise ValueError(f"alpha {a} is out of range: lambda is drawn from Beta(alpha, alpha), which needs "
                             f"alpha > 0; to switch mixing off, leave the block out")
        return v


class CropSpec(_Strict):
    """The training crop of image folders: RandomResizedCrop(size, scale, ratio)."""

    scale: _Pair = Field((0.08, 1.0), description="[min, max] area of the crop as a fraction of the image")
    ratio: _Pair = Field((3 / 4, 4 / 3), description="[min, max] aspect ratio of the crop")

    @model_validator(mode="after")
    def _ranges(self) -> "CropSpec":
        if not self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale {list(self.scale)} must be [min, max] with 0 < min <= max <= 1")
        if self.ratio[0] > self.ratio[1]:
            raise ValueError(f"ratio {list(self.ratio)} must be [min, max] with min <= max")
        return self


class AugmentSpec(_Strict):
    """Training augmentation of image data (``data.augment``); left out: each data set's default pipeline."""

    randaugment: Optional[RandAugmentSpec] = Field(None, description="RandAugment on every training image")
    trivialaugment: Optional[TrivialAugmentSpec] = Field(None, description="TrivialAugmentWide on every training "
                                                                           "image")
    autoaugment: Optional[AutoAugmentSpec] = Field(None, description="AutoAugment with a learned policy")
    random_erasing: Optional[RandomErasingSpec] = Field(None, description="erase a random rectangle of the "
                                                                          "normalised image")
    hflip: _Float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip, [0, 1]")
    mixup: Optional[MixSpec] = Field(None, description="MixUp per batch: images and one-hot labels mixed with "
                                                       "the batch rolled by one; the targets become soft")
    cutmix: Optional[MixSpec] = Field(None, description="CutMix per batch: a box of the rolled batch pasted in, "
                                                        "labels mixed by its area; the targets become soft")
    crop: Optional[CropSpec] = Field(None, description="image folders: the training RandomResizedCrop's scale and "
                                                       "ratio (default [0.08, 1] and [3/4, 4/3])")
    eval_crop_ratio: _Float = Field(0.875, gt=0, le=1, description=(
        "image folders: validation images are resized to size / eval_crop_ratio (shorter side), then "
        "center-cropped to size (0.875 = 224/256)"))
    interpolation: Literal["bilinear", "bicubic", "nearest"] = Field(
        "bilinear", description="resizing and the policies' geometric ops: bilinear, bicubic or nearest")

    @model_validator(mode="after")
    def _one_policy(self) -> "AugmentSpec":
        named = [p for p in POLICIES if getattr(self, p) is not None]
        if len(named) > 1:
            raise ValueError(f"{' and '.join(named)} are both given; each image takes one policy: keep one of "
                             f"{', '.join(POLICIES)}")
        return self

    @property
    def policy(self) -> Optional[str]:
        """The per-image policy named (randaugment, trivialaugment, autoaugment) or None."""
        return next((p for p in POLICIES if getattr(self, p) is not None), None)

    def describe(self) -> str:
        """One line for people: what this augmentation does."""
        parts = []
        if self.policy:
            args = getattr(self, self.policy).model_dump()
            parts.append(f"{self.policy}({', '.join(f'{k}={v}' for k, v in args.items())})")
        if self.random_erasing is not None:
            parts.append(f"random_erasing(p={self.random_erasing.p})")
        parts += [f"{m}(alpha={getattr(self, m).alpha})" for m in self.mixes]
        if self.crop is not None:
            parts.append(f"crop(scale={list(self.crop.scale)}, ratio={[round(r, 4) for r in self.crop.ratio]})")
        parts.append(f"hflip {self.hflip}, {self.interpolation}")
        return ", ".join(parts)

    @property
    def mixes(self) -> list[str]:
        """'mixup' and/or 'cutmix', when given: the targets become soft B x num_classes probabilities."""
        return [m for m in ("mixup", "cutmix") if getattr(self, m) is not None]


def check_augment(spec: Any) -> None:
    """The checks of ``data.augment`` that need the rest of the spec; raises ValueError (one paragraph)."""
    aug: Optional[AugmentSpec] = spec.data.augment
    if aug is None:
        return
    if spec.input.named or spec.data.dataset == "glue":
        raise ValueError("data.augment: augmentation is for image data, but this spec's batches are named inputs "
                         "(input.named / dataset glue: token ids, masks); remove data.augment")
    ds = spec.data.dataset
    if ds != "imagenet":
        folder_only = [f for f in ("crop",) if getattr(aug, f) is not None]
        folder_only += [f for f in ("eval_crop_ratio",) if f in aug.model_fields_set]
        if folder_only:
            raise ValueError(f"data.augment.{folder_only[0]}: crop settings apply to image folders (dataset "
                             f"imagenet); {ds} images are translated by up to 2 pixels instead. Remove "
                             f"{', '.join(folder_only)}")
    if ds == "synthetic":
        per_image = [f for f in (*POLICIES, "random_erasing") if getattr(aug, f) is not None]
        if per_image:
            raise ValueError(f"data.augment.{per_image[0]}: synthetic data are random values, not images; only "
                             f"mixup and cutmix apply to them. Use dataset fashion_mnist or imagenet, or remove "
                             f"{', '.join(per_image)}")
    if ds == "fashion_mnist" and aug.policy and aug.interpolation == "bicubic":
        raise ValueError(f"data.augment.interpolation: bicubic cannot be used with {aug.policy} on fashion_mnist: "
                         f"its images are tensors, on which torchvision's geometric ops take nearest or bilinear "
                         f"only; use interpolation bilinear or nearest")
    if aug.mixes and spec.runtime.teacher_cache:
        raise ValueError(f"data.augment.{aug.mixes[0]} cannot be used with runtime.teacher_cache: the cache holds "
                         f"the teacher's output on each single image, but with {' / '.join(aug.mixes)} the teacher "
                         f"sees mixed images, whose outputs are not the mix of the stored ones. Remove "
                         f"runtime.teacher_cache (the teacher then runs online) or the mixing")
