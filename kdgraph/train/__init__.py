"""The training runtime: ``kdgraph train / eval / export`` and their Python API.

    from kdgraph.train import train
    results = train("specs/fashion_mnist/kd.yaml", out="runs/kd", device="cpu")

See :mod:`kdgraph.train.loop` (the run: folder, pretraining, stages) and the modules it composes:
:mod:`.runfolder` (lock, resume, files), :mod:`.networks`, :mod:`.steps` (epochs, logging, NaN policy),
:mod:`.optim` (optimizers, schedules, lr scaling), :mod:`.evaluation`, :mod:`.checkpoint` (the
:class:`Checkpoint` dataclass; atomic, verified, resumable), :mod:`.data` (Fashion-MNIST, ImageFolder,
synthetic; reproducible sampling), :mod:`.distributed` (torchrun / DDP), :mod:`.pretrain` (cached
teachers), :mod:`.monitor` (progress, JSON lines, TensorBoard, plot), and docs/training.md.
"""
from .checkpoint import Checkpoint, atomic_save, load_checkpoint
from .export import evaluate_checkpoint, export_student
from .loop import TrainOptions, Trainer, lr_used, train
from .overrides import apply_overrides, load_with_overrides

__all__ = ["train", "TrainOptions", "Trainer", "lr_used", "export_student", "evaluate_checkpoint", "atomic_save",
           "load_checkpoint", "Checkpoint", "apply_overrides", "load_with_overrides"]
