"""The spec's ``data.augment`` built: per-image policies on whole in-memory batches, random erasing, image-folder
transforms (torchvision.transforms.v2), and per-batch MixUp / CutMix giving soft targets.

Every draw is a function of the sample's seed (``sample_seed(seed, epoch, index)``) or, for mixing, of the batch's
first key: a batch's content depends neither on workers, world size nor where a run resumed (bit-exact resume).

- :class:`GroupedPolicy`: RandAugment / TrivialAugmentWide / AutoAugment on a uint8 batch. Each sample's ops and
  magnitudes are drawn from its seed with tensor ops (the same op spaces and probabilities as torchvision's
  classes), then torchvision's own op (``_apply_image_or_video_transform``) runs once per distinct (op, magnitude)
  on the samples that drew it: a loop over distinct draws (at most 14 x 2 per layer for RandAugment), not over
  samples.
- :func:`erase`: RandomErasing's algorithm (10 tries of area and aspect ratio, the first that fits) vectorised.
- :class:`ImageAugment`: both, for :class:`~kdgraph.train.data.TensorImages` (before / after normalisation).
- :func:`folder_transforms`: image folders, per image in the DataLoader workers (v2 transforms).
- :class:`BatchMix`: ``v2.MixUp`` / ``v2.CutMix`` (one of them per batch when both are given) on the collated
  batch, under torch's CPU generator seeded from the batch's first ``(index, epoch)`` key.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch

from ...data import Batch
from ...spec.augment import AugmentSpec, RandomErasingSpec
from .sampling import SeededView, _mix64, sample_seed, uniform_from_seeds

__all__ = ["GroupedPolicy", "erase", "ImageAugment", "folder_transforms", "BatchMix", "mixing_view"]

_MIX_SALT = 0x3D1C5EED  # mixing draws: a stream apart from the per-sample seeds
_POLICY_SALT = 100  # _uniform streams of the policies
_ERASE_SALT = 200


def _uniform(seeds: torch.Tensor, salt: int) -> torch.Tensor:
    """Per-sample uniforms in [0, 1) for stream ``salt`` (any int): the seeds keyed by a hash of the salt."""
    key = _mix64(salt) >> 1  # 63-bit, a valid int64
    return uniform_from_seeds(seeds ^ key, 1)


def _tv_policy(aug: AugmentSpec) -> Any:
    from torchvision.transforms import v2

    interp = aug.interpolation
    if aug.randaugment is not None:
        r = aug.randaugment
        return v2.RandAugment(r.num_ops, r.magnitude, r.num_magnitude_bins, interpolation=interp)
    if aug.trivialaugment is not None:
        return v2.TrivialAugmentWide(aug.trivialaugment.num_magnitude_bins, interpolation=interp)
    if aug.autoaugment is not None:
        return v2.AutoAugment(v2.AutoAugmentPolicy(aug.autoaugment.policy), interpolation=interp)
    return None


class GroupedPolicy:
    """A torchvision auto-augment policy applied to a uint8 ``B x C x H x W`` batch, each sample drawing its own
    ops from its seed; torchvision's op runs once per distinct (op, magnitude)."""

    def __init__(self, aug: AugmentSpec):
        self.kind = aug.policy
        self.tv = _tv_policy(aug)
        if self.tv is None:
            raise ValueError("GroupedPolicy needs randaugment, trivialaugment or autoaugment")
        self.ops = list(self.tv._AUGMENTATION_SPACE)

    def _magnitudes(self, op: str, bins: int, h: int, w: int) -> Optional[torch.Tensor]:
        fn, _ = self.tv._AUGMENTATION_SPACE[op]
        m = fn(bins, h, w)
        return None if m is None else m.double()

    def draws(self, seeds: torch.Tensor, h: int, w: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer: (op index per sample, -1 for none; signed magnitude per sample)."""
        n = len(self.ops)
        b = seeds.shape[0]
        layers = []
        if self.kind == "autoaugment":
            pols = self.tv._policies
            pick = (_uniform(seeds, _POLICY_SALT) * len(pols)).long().clamp_max(len(pols) - 1)
            for j in range(2):
                ops = torch.tensor([self.ops.index(p[j][0]) for p in pols])[pick]
                prob = torch.tensor([p[j][1] for p in pols], dtype=torch.double)[pick]
                table = torch.zeros(len(pols), dtype=torch.double)
                for k, p in enumerate(pols):
                    m = self._magnitudes(p[j][0], 10, h, w)
                    table[k] = 0.0 if m is None or p[j][2] is None else float(m[p[j][2]])
                mag = table[pick]
                applied = _uniform(seeds, _POLICY_SALT + 1 + 2 * j) <= prob
                layers.append((torch.where(applied, ops, -1), self._sign(seeds, ops, mag, _POLICY_SALT + 2 + 2 * j)))
            return layers
        num_layers = self.tv.num_ops if self.kind == "randaugment" else 1
        bins = self.tv.num_magnitude_bins
        for layer in range(num_layers):
            salt = _POLICY_SALT + 3 * layer
            ops = (_uniform(seeds, salt) * n).long().clamp_max(n - 1)
            if self.kind == "randaugment":
                idx = torch.full((b,), self.tv.magnitude, dtype=torch.long)
            else:
                idx = (_uniform(seeds, salt + 1) * bins).long().clamp_max(bins - 1)
            mag = torch.zeros(b, dtype=torch.double)
            for k, op in enumerate(self.ops):
                m = self._magnitudes(op, bins, h, w)
                if m is not None:
                    mag = torch.where(ops == k, m[idx], mag)
            layers.append((ops, self._sign(seeds, ops, mag, salt + 2)))
        return layers

    def _sign(self, seeds: torch.Tensor, ops: torch.Tensor, mag: torch.Tensor, salt: int) -> torch.Tensor:
        signed = torch.tensor([self.tv._AUGMENTATION_SPACE[op][1] for op in self.ops])[ops.clamp_min(0)]
        flip = signed & (_uniform(seeds, salt) <= 0.5)
        return torch.where(flip, -mag, mag)

    def __call__(self, x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        for ops, mag in self.draws(seeds, int(h), int(w)):
            keys = torch.stack([ops.double(), mag], dim=1)
            uniq, inverse = torch.unique(keys, dim=0, return_inverse=True)
            out = x.clone()
            for g in range(uniq.shape[0]):  # one call per distinct (op, magnitude) drawn
                op = int(uniq[g, 0])
                if op < 0 or self.ops[op] == "Identity":
                    continue
                rows = (inverse == g).nonzero().squeeze(1)
                out[rows] = self.tv._apply_image_or_video_transform(
                    x[rows], self.ops[op], float(uniq[g, 1]), interpolation=self.tv.interpolation,
                    fill=self.tv._fill)
            x = out
        return x


def erase(x: torch.Tensor, seeds: torch.Tensor, spec: RandomErasingSpec) -> torch.Tensor:
    """RandomErasing on a float ``B x C x H x W`` batch: with probability ``p`` each image gets one rectangle of
    ``value``, its area and aspect ratio drawn as torchvision draws them (10 tries, the first that fits)."""
    b, _, h, w = x.shape
    tries = 10
    salts = torch.arange(tries)
    u = lambda k: torch.stack([_uniform(seeds, _ERASE_SALT + 10 * k + int(t)) for t in salts], 1)  # noqa: E731
    area = h * w * (spec.scale[0] + u(0) * (spec.scale[1] - spec.scale[0]))
    lo, hi = math.log(spec.ratio[0]), math.log(spec.ratio[1])
    aspect = torch.exp(lo + u(1) * (hi - lo))
    eh = torch.sqrt(area * aspect).round().long()
    ew = torch.sqrt(area / aspect).round().long()
    fits = (eh < h) & (ew < w) & (eh > 0) & (ew > 0)
    first = fits.double().argmax(dim=1)
    pick = lambda t: t.gather(1, first[:, None]).squeeze(1)  # noqa: E731
    eh, ew = pick(eh), pick(ew)
    top = (pick(u(2)) * (h - eh + 1).double()).long()
    left = (pick(u(3)) * (w - ew + 1).double()).long()
    on = fits.any(dim=1) & (_uniform(seeds, _ERASE_SALT - 1) < spec.p)
    rows = torch.arange(h)[None, :]
    cols = torch.arange(w)[None, :]
    in_r = (rows >= top[:, None]) & (rows < (top + eh)[:, None])
    in_c = (cols >= left[:, None]) & (cols < (left + ew)[:, None])
    mask = (in_r[:, :, None] & in_c[:, None, :] & on[:, None, None])[:, None]
    return torch.where(mask, torch.as_tensor(spec.value, dtype=x.dtype), x)


class ImageAugment:
    """``data.augment`` for the in-memory sets: a policy on the uint8 images (after translation and flip), random
    erasing on the normalised ones; plus the flip probability and resize interpolation they use."""

    def __init__(self, aug: AugmentSpec):
        self.spec = aug
        self.policy = GroupedPolicy(aug) if aug.policy else None
        self.hflip = aug.hflip
        self.interpolation = aug.interpolation

    def pre(self, x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """uint8 ``B x H x W`` -> the same, the policy applied."""
        if self.policy is None:
            return x
        return self.policy(x.unsqueeze(1), seeds).squeeze(1)

    def post(self, x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """Normalised float ``B x C x H x W`` -> the same, random erasing applied."""
        er = self.spec.random_erasing
        return x if er is None else erase(x, seeds, er)

    def identity(self) -> dict[str, Any]:
        """What the cache fingerprint records (kdgraph.train.teacher_cache)."""
        return self.spec.model_dump(mode="json", exclude={"mixup", "cutmix"})


def folder_transforms(size: tuple[int, int], channels: int, train: bool, aug: AugmentSpec,
                      mean: Sequence[float], std: Sequence[float]) -> Any:
    """An image folder's per-image transform under ``data.augment`` (torchvision.transforms.v2)."""
    from torchvision.transforms import v2

    interp = v2.InterpolationMode(aug.interpolation)
    pre = [v2.Grayscale(1)] if channels == 1 else []
    if train:
        crop = aug.crop
        scale, ratio = (crop.scale, crop.ratio) if crop is not None else ((0.08, 1.0), (3 / 4, 4 / 3))
        ops = [v2.RandomResizedCrop(size, scale=scale, ratio=ratio, interpolation=interp, antialias=True)]
        if aug.hflip > 0:
            ops.append(v2.RandomHorizontalFlip(aug.hflip))
        policy = _tv_policy(aug)  # on the PIL image: every interpolation (tensors take nearest / bilinear only)
        ops += [*([policy] if policy is not None else []), v2.PILToTensor()]
    else:
        resize = int(round(min(size) / aug.eval_crop_ratio))
        ops = [v2.Resize(resize, interpolation=interp, antialias=True), v2.CenterCrop(size), v2.PILToTensor()]
    post = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    er = aug.random_erasing
    if train and er is not None:
        post.append(v2.RandomErasing(er.p, scale=er.scale, ratio=er.ratio, value=er.value))
    return v2.Compose(pre + ops + post)


class BatchMix:
    """MixUp / CutMix on a collated batch: images mixed with the batch rolled by one, targets one-hot and mixed
    (float ``B x num_classes``, rows summing to 1). Tensor ops on the whole batch; no loop over samples."""

    def __init__(self, aug: AugmentSpec, num_classes: int, seed: int):
        from torchvision.transforms import v2

        ts = []
        if aug.mixup is not None:
            ts.append(v2.MixUp(alpha=aug.mixup.alpha, num_classes=num_classes))
        if aug.cutmix is not None:
            ts.append(v2.CutMix(alpha=aug.cutmix.alpha, num_classes=num_classes))
        if not ts:
            raise ValueError("BatchMix needs mixup or cutmix")
        self.tf = ts[0] if len(ts) == 1 else v2.RandomChoice(ts)
        self.seed = seed

    def __call__(self, batch: Any, key: tuple[int, int]) -> Any:
        """The batch mixed; ``key``: its first ``(index, epoch)``, which seeds the draw."""
        images, targets = _images_targets(batch)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(self.seed ^ _MIX_SALT, int(key[1]), int(key[0])))
            images, targets = self.tf(images, targets.long())
        if isinstance(batch, Batch):
            return Batch(images, targets, batch.extras)
        if isinstance(batch, dict):
            return {**batch, "images": images, "targets": targets}
        return Batch(images, targets)  # a collated (images, targets) pair


def mixing_view(spec: Any, train_set: Any) -> Optional[SeededView]:
    """The training view that mixes every batch (``data.augment.mixup`` / ``cutmix``), or None without mixing."""
    aug = spec.data.augment
    if aug is None or not aug.mixes:
        return None
    seed = spec.runtime.seed
    return SeededView(train_set, seed, True, mix=BatchMix(aug, spec.input.num_classes, seed))


def _images_targets(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, Batch):
        return batch.images, batch.targets
    if isinstance(batch, dict):
        return batch["images"], batch["targets"]
    return batch[0], batch[1]
