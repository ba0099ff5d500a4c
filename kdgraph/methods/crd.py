"""CRD: contrastive representation distillation.

Y. Tian, D. Krishnan, P. Isola, "Contrastive Representation Distillation", ICLR 2020,
https://openreview.net/forum?id=SkgpBJrtvS (reference code: github.com/HobbitLong/RepDistiller)

A head on each network maps the pooled features to a unit vector: ``s = h_s(S.avgpool)``,
``t = h_t(T.avgpool)`` (flatten -> Linear(C, 128) -> L2-normalise; the teacher's head trains,
the teacher's backbone stays frozen). Two memory banks of N x 128 unit vectors hold a momentum
average of every training sample's embedding, ``M_s`` (student) and ``M_t`` (teacher). For a
sample i with contrast indices ``c = [c_0, c_1..c_K]`` (``c_0``: the positive, i itself in
"exact" mode; ``c_1..c_K``: K samples of other classes, drawn by the data wrapper)::

    P_s[j] = exp(<M_t[c_j], s> / tau) / Z_s        P_t[j] = exp(<M_s[c_j], t> / tau) / Z_t
    Z = mean(exp(...)) * N                          fixed on the first batch, then kept (a buffer)
    NCE(P) = -1/B * sum_i [ log(P[0] / (P[0] + K/N + eps)) + sum_j>0 log((K/N) / (P[j] + K/N + eps)) ]
    L_CRD = NCE(P_s) + NCE(P_t)

after which, without gradient, ``M_s[i] <- normalise(m * M_s[i] + (1 - m) * s)`` and likewise for
``M_t`` (momentum m = 0.5, tau = 0.07, eps = 1e-7). The banks, Z and nothing else are state; they
are buffers of the loss module, so they live in the distiller's ``state_dict``.

The data wrapper ``crd`` adds the per-batch inputs ``index`` (B) and ``contrast_index`` (B x K+1)
to every batch; the loss reads them through ``batch:`` taps. ImageNet reference (torchdistill
1.1.5, 70.93 top-1)::

    adapters:
      student_head: {type: crd_head, inputs: {x: "student:avgpool"}, args: {feature_dim: 128}}
      teacher_head: {type: crd_head, inputs: {x: "teacher:avgpool"}, args: {feature_dim: 128}}
    stages:
      - name: main
        train: [student, student_head, teacher_head]
        losses:
          - {name: ce, type: cross_entropy, weight: 1.0}
          - {name: crd, type: crd, weight: 0.8, args: {num_samples: 1281167},
             inputs: {student: "adapter:student_head", teacher: "adapter:teacher_head",
                      index: "batch:index", contrast_index: "batch:contrast_index"}}
    data: {wrapper: {type: crd, args: {num_negative_samples: 16384, mode: exact}}}

``num_samples`` must equal the length of the (wrapped) training set; the wrapper checks it.
"""
from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Mapping, Optional, Sequence

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.utils.data import Dataset, Subset

from ..errors import DataError, ShapeError
from .registry import register_adapter, register_data_wrapper, register_loss
from .args import Features, Flag, MethodArgs, NonNegative, PosInt, Positive
from .base import Batch, DistillLoss, FlatInputAdapter, Shape, _fmt


# --------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------


class CRDHeadArgs(MethodArgs):
    in_features: Optional[Features] = Field(None, description="input features, >= 1 (default: the input tap, flattened)")
    feature_dim: Features = Field(128, description="embedding size, >= 1")
    power: PosInt = Field(2, description="the norm the embedding is divided by, an integer >= 1")
    bias: Flag = Field(True, description="true / false: a bias in the linear layer")


class CRDArgs(MethodArgs):
    num_samples: Annotated[PosInt, Field(ge=2)] = Field(description="memory rows = training set length, >= 2")
    feature_dim: Features = Field(128, description="embedding size, >= 1 (the heads' feature_dim)")
    temperature: Positive = Field(0.07, description="NCE temperature, > 0")
    momentum: Annotated[NonNegative, Field(lt=1)] = Field(0.5, description="memory momentum, in [0, 1)")
    eps: Positive = Field(1e-7, description="NCE noise constant, > 0")

    @model_validator(mode="after")
    def _memory_bounded(self) -> "CRDArgs":
        if self.num_samples * self.feature_dim > MAX_MEMORY_VALUES:
            raise ValueError(f"num_samples x feature_dim = {self.num_samples * self.feature_dim:,} memory values per "
                             f"bank is more than {MAX_MEMORY_VALUES:,} (two banks of 4 GiB each)")
        return self


class CRDWrapperArgs(MethodArgs):
    num_negative_samples: PosInt = Field(16384, description="negatives K drawn per sample, >= 1")
    mode: Literal["exact", "relax"] = Field("exact", description="'exact' (the positive is the sample) or 'relax'")


MAX_MEMORY_VALUES = 2 ** 30


@register_adapter("crd_head")
class CRDHead(FlatInputAdapter):
    """flatten -> Linear(in_features, feature_dim) -> divide by the L_p norm (p = ``power``, 2).

    The state_dict keys (``linear.weight``, ``linear.bias``) are those of torchdistill's
    ``Normalizer4CRD``, so its checkpoints load as they are.
    """

    inputs = ("x",)
    Args = CRDHeadArgs

    def __init__(self, in_features: int, feature_dim: int = 128, power: int = 2, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(in_features, feature_dim, bias=bias)
        self.power = power

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.linear(torch.flatten(x, 1))
        norm = z.pow(self.power).sum(1, keepdim=True).pow(1.0 / self.power)
        return z / norm


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


@register_loss("crd")
class CRDLoss(DistillLoss):
    """Contrastive loss against two momentum memory banks (see the module docstring).

    Buffers: ``memory_student`` and ``memory_teacher`` (``num_samples x feature_dim`` each, one
    contiguous tensor, initialised uniform in +-1/sqrt(feature_dim/3) like the reference code) and
    ``z`` = [Z_s, Z_t] (negative until the first training batch sets them). The banks and Z are
    updated in place (``index_copy_``) under ``no_grad``, only in training mode. The number of negatives
    K is ``contrast_index.shape[1] - 1``; column 0 of ``contrast_index`` is the positive.
    """

    inputs = ("student", "teacher", "index", "contrast_index")
    default_inputs = {"index": "batch:index", "contrast_index": "batch:contrast_index"}
    same_shape = (("student", "teacher"),)
    batch_only_inputs = ("index", "contrast_index")
    Args = CRDArgs

    def __init__(self, num_samples: int, feature_dim: int = 128, temperature: float = 0.07,
                 momentum: float = 0.5, eps: float = 1e-7):
        super().__init__()
        if int(num_samples) < 2:
            raise ValueError(f"num_samples (the memory size, = training set length) must be >= 2, got {num_samples}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.num_samples = int(num_samples)
        self.feature_dim = int(feature_dim)
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.eps = float(eps)
        stdv = 1.0 / math.sqrt(self.feature_dim / 3)
        for name in ("memory_student", "memory_teacher"):
            bank = torch.empty(self.num_samples, self.feature_dim).uniform_(-stdv, stdv)
            self.register_buffer(name, bank)
        self.register_buffer("z", torch.full((2,), -1.0))

    @classmethod
    def check_shapes(cls, shapes: Mapping[str, Shape | None], taps: Mapping[str, str], where: str) -> None:
        super().check_shapes(shapes, taps, where)
        s = shapes.get("student")
        if s is not None and len(s) != 2:
            raise ShapeError(f"{where}: CRD embeddings must be B x D (put a crd_head adapter on the features); "
                             f"input 'student' ({taps.get('student')}) has shape {_fmt(s)}")
        c = shapes.get("contrast_index")
        if c is not None and len(c) != 2:
            raise ShapeError(f"{where}: 'contrast_index' ({taps.get('contrast_index')}) must be B x (K+1), "
                             f"got shape {_fmt(c)}; use the 'crd' data wrapper")

    def _check(self, student: torch.Tensor, teacher: torch.Tensor, index: torch.Tensor,
               contrast_index: torch.Tensor) -> None:
        b = student.shape[0]
        if student.dim() != 2 or student.shape != teacher.shape or student.shape[1] != self.feature_dim:
            raise ShapeError(f"crd: student and teacher embeddings must both be B x feature_dim "
                             f"(feature_dim={self.feature_dim}); got {_fmt(tuple(student.shape))} and "
                             f"{_fmt(tuple(teacher.shape))}")
        if index.shape != (b,) or contrast_index.dim() != 2 or contrast_index.shape[0] != b \
                or contrast_index.shape[1] < 2:
            raise ShapeError(f"crd: expected index of shape [{b}] and contrast_index of shape [{b}, K+1] "
                             f"(K >= 1), got {_fmt(tuple(index.shape))} and {_fmt(tuple(contrast_index.shape))}")

    def _scores(self, memory: torch.Tensor, embedding: torch.Tensor, contrast_index: torch.Tensor) -> torch.Tensor:
        """exp(<memory[c_ij], e_i> / tau), B x (K+1); the memory rows are a detached gathered copy."""
        b, k1 = contrast_index.shape
        rows = memory.index_select(0, contrast_index.reshape(-1)).view(b, k1, self.feature_dim)
        return torch.exp(torch.bmm(rows, embedding.unsqueeze(2)).squeeze(2) / self.temperature)

    def _nce(self, p: torch.Tensor) -> torch.Tensor:
        b, k1 = p.shape
        noise = (k1 - 1) / float(self.num_samples)  # K * P_n, P_n = 1/N uniform noise
        log_pos = torch.log(p[:, 0] / (p[:, 0] + noise + self.eps))
        log_neg = torch.log(noise / (p[:, 1:] + noise + self.eps))
        return -(log_pos.sum() + log_neg.sum()) / b

    @torch.no_grad()
    def _update(self, memory: torch.Tensor, embedding: torch.Tensor, index: torch.Tensor) -> None:
        rows = memory.index_select(0, index)
        rows.mul_(self.momentum).add_(embedding * (1.0 - self.momentum))
        rows.div_(rows.pow(2).sum(1, keepdim=True).pow(0.5))
        memory.index_copy_(0, index, rows)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, index: torch.Tensor,
                contrast_index: torch.Tensor) -> torch.Tensor:
        self._check(student, teacher, index, contrast_index)
        device = self.memory_student.device
        index = index.to(device=device, dtype=torch.long)
        contrast_index = contrast_index.to(device=device, dtype=torch.long)
        s = student.float()
        t = teacher.float()
        p_s = self._scores(self.memory_teacher, s, contrast_index)  # student vs teacher memory
        p_t = self._scores(self.memory_student, t, contrast_index)  # teacher vs student memory
        with torch.no_grad():  # Z: fixed once, by the first training batch (no host sync)
            first = torch.stack([p_s.mean(), p_t.mean()]) * self.num_samples
            z = torch.where(self.z < 0, first, self.z)
            if self.training:
                self.z.copy_(z)
        loss = self._nce(p_s / z[0]) + self._nce(p_t / z[1])
        if self.training:
            self._update(self.memory_student, s.detach(), index)
            self._update(self.memory_teacher, t.detach(), index)
        return loss

    def extra_repr(self) -> str:
        return (f"num_samples={self.num_samples}, feature_dim={self.feature_dim}, "
                f"temperature={self.temperature}, momentum={self.momentum}")


# --------------------------------------------------------------------------------------------
# Data wrapper
# --------------------------------------------------------------------------------------------


def dataset_targets(dataset: Dataset) -> torch.Tensor:
    """The class of every sample as a 1-D int64 tensor: ``dataset.targets`` when there is one
    (ImageFolder, the torchvision MNIST family; through ``Subset``), else one pass over the data."""
    n = len(dataset)  # type: ignore[arg-type]
    if isinstance(dataset, Subset):
        base = dataset_targets(dataset.dataset)
        return base[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        try:
            t = torch.as_tensor(targets).long().reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            t = None
        if t is not None and t.numel() == n:
            return t
    out = []
    for i in range(n):
        item = dataset[i]
        out.append(int(item["targets"] if isinstance(item, Mapping) else item[1]))
    return torch.tensor(out, dtype=torch.long)


def _sample_without_replacement(n: int, k: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """k distinct integers in [0, n), uniformly, in random order (with replacement if k > n, as the
    reference does). Costs O(k log k), not O(n): the negative pool of ImageNet has ~1.28M entries.
    Draws from ``generator`` (default: torch's global RNG)."""
    g = generator
    if k > n:
        return torch.randint(n, (k,), generator=g)
    if 2 * k >= n:
        return torch.randperm(n, generator=g)[:k]
    # k iid draws repeat ~k^2/2n values: draw a few more than that once, then keep a random k of the
    # distinct ones (uniform by symmetry); a second round is rare
    m = k + int(2.0 * k * k / n) + 16
    picked = torch.unique(torch.randint(n, (m,), generator=g))
    while picked.numel() < k:
        picked = torch.unique(torch.cat([picked, torch.randint(n, (m - picked.numel(),), generator=g)]))
    return picked[torch.randperm(picked.numel(), generator=g)[:k]]


class ContrastiveDataset(Dataset):
    """Wraps a map-style dataset of ``(image, target)`` items (or dicts with ``images`` and
    ``targets``) and returns ``{"images", "targets", "index", "contrast_index"}``.

    ``contrast_index = [positive, K negatives]``; the negatives are drawn uniformly, without
    replacement (with replacement only if K exceeds the pool), from the samples of the *other*
    classes. ``mode="exact"``: the positive is the sample itself; ``mode="relax"``: a random
    sample of the same class (the memory update still uses ``index``). Sampling uses torch's
    global RNG, which DataLoader seeds per worker. Memory: O(N) (one sorted index), not the
    reference's per-class negative lists.

    :meth:`get_batch` builds a whole batch at once (kdgraph's trainer calls it with one seed per
    sample): the wrapped dataset's own ``get_batch`` when it has one (the in-memory data sets, whose
    batched augmentation is ~50x cheaper than item by item), and each sample's draws from a generator
    seeded by that sample's seed.
    """

    def __init__(self, dataset: Dataset, num_negative_samples: int = 16384, mode: str = "exact"):
        if mode not in ("exact", "relax"):
            raise DataError(f"crd data wrapper: mode must be 'exact' or 'relax', got {mode!r}")
        if int(num_negative_samples) < 1:
            raise DataError(f"crd data wrapper: num_negative_samples must be >= 1, got {num_negative_samples}")
        self.dataset = dataset
        self.num_negative_samples = int(num_negative_samples)
        self.mode = mode
        targets = dataset_targets(dataset)
        if targets.numel() == 0:
            raise DataError("crd data wrapper: the dataset is empty")
        if int(targets.min()) < 0:
            raise DataError("crd data wrapper: class targets must be >= 0")
        self.targets = targets
        # sample indices grouped by class (int32 halves the random reads of every draw)
        self.order = torch.argsort(targets, stable=True).to(torch.int32 if len(targets) < 2 ** 31 else torch.long)
        self.counts = torch.bincount(targets)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        if int((self.counts > 0).sum()) < 2:
            raise DataError("crd data wrapper: CRD draws negatives from other classes; the dataset has one class")

    def __len__(self) -> int:
        return len(self.targets)

    def negatives(self, cls: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """K indices of samples whose class is not ``cls``."""
        start, count = int(self.starts[cls]), int(self.counts[cls])
        pos = _sample_without_replacement(len(self.targets) - count, self.num_negative_samples, generator)
        pos = pos + count * (pos >= start).long()  # skip over the block of class ``cls``
        return self.order[pos].long()

    def contrast_index(self, index: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``[positive, K negatives]`` for sample ``index``."""
        cls = int(self.targets[index])
        if self.mode == "exact":
            positive = int(index)
        else:
            start, count = int(self.starts[cls]), int(self.counts[cls])
            positive = int(self.order[start + int(torch.randint(count, (), generator=generator))])
        return torch.cat([torch.tensor([positive]), self.negatives(cls, generator)])

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        if isinstance(item, Mapping):
            out = dict(item)
        else:
            out = {"images": item[0], "targets": item[1]}
        out["index"] = int(index)
        out["contrast_index"] = self.contrast_index(index)
        return out

    def get_batch(self, indices: Sequence[int], seeds: Optional[Sequence[int]]) -> Batch:
        """A collated batch of ``indices``: images and targets from the wrapped dataset, plus ``index`` and
        ``contrast_index`` (B x K+1). With ``seeds`` (one per sample), every draw is a function of the
        sample's seed; without, draws come from torch's global RNG."""
        idx = [int(i) for i in indices]
        inner = self.dataset
        if callable(getattr(type(inner), "get_batch", None)):
            base = inner.get_batch(idx, seeds)
            images, targets = base.images, base.targets
        else:
            items = []
            for j, i in enumerate(idx):
                with torch.random.fork_rng(devices=[]):
                    if seeds is not None:
                        torch.default_generator.manual_seed(int(seeds[j]))
                    item = inner[i]
                items.append((item["images"], item["targets"]) if isinstance(item, Mapping) else (item[0], item[1]))
            images = torch.stack([torch.as_tensor(x) for x, _ in items])
            targets = torch.as_tensor([int(y) for _, y in items], dtype=torch.long)
        gens = [None] * len(idx)
        if seeds is not None:
            gens = [torch.Generator().manual_seed(int(sd) ^ 0x5DEECE66D) for sd in seeds]
        contrast = torch.stack([self.contrast_index(i, g) for i, g in zip(idx, gens)])
        return Batch(images, targets, {"index": torch.as_tensor(idx, dtype=torch.long), "contrast_index": contrast})

    def __getattr__(self, name: str) -> Any:  # classes, class_to_idx, ... of the wrapped dataset
        if name.startswith("__") or name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


@register_data_wrapper("crd")
def crd_wrapper(dataset: Dataset, spec: Any = None, num_negative_samples: int = 16384,
                mode: str = "exact") -> ContrastiveDataset:
    """Data wrapper ``crd``: per-batch ``index`` and ``contrast_index`` for the ``crd`` loss.

    With a spec, checks that every ``crd`` loss's ``num_samples`` equals the dataset's length.
    """
    wrapped = ContrastiveDataset(dataset, num_negative_samples=num_negative_samples, mode=mode)
    for si, stage in enumerate(getattr(spec, "stages", None) or []):
        for li, loss in enumerate(stage.losses):
            if loss.type == "crd":
                n = loss.args.get("num_samples")
                if n is not None and int(n) != len(wrapped):
                    raise DataError(
                        f"stages[{si}].losses[{li}].args.num_samples is {n} but the training set has "
                        f"{len(wrapped)} samples; CRD keeps one memory row per sample, so set num_samples "
                        f"to {len(wrapped)} (e.g. when data.train_subset is used)")
    return wrapped


crd_wrapper.Args = CRDWrapperArgs
crd_wrapper.batch_keys = ("index", "contrast_index")
