"""Training data: Fashion-MNIST (in memory), ImageNet-style folders (ImageFolder), synthetic images, GLUE and text
for causal LMs (:mod:`.text`, its readers :mod:`.text_sources` and R data files :mod:`.rdata`).

One module per kind (:mod:`.fashion_mnist`, :mod:`.image_folder`, :mod:`.synthetic`, :mod:`.glue`), reproducible sampling
(:mod:`.sampling`: a batch's content depends neither on workers, world size nor where a run resumed), and the
builder of what a spec names (:mod:`.bundle`). Every problem with a data folder is a
:class:`~kdgraph.errors.DataError` raised before any model is built.
"""
from ...distiller.data import Batch, unpack_batch
from ...distiller.data import wrap as wrap_train_dataset  # the spec's data wrapper
from .bundle import DataBundle, build_datasets, check_data, make_loader, subset
from .fashion_mnist import (_FASHION_FILES, DEBIAN_FASHION_DIR, FASHION_CLASSES, FASHION_HELP,  # noqa: F401
                            FASHION_MEAN, FASHION_STD, TensorImages, find_fashion_mnist, load_fashion_mnist)
from .glue import GLUE_TASKS, GlueDataset, glue_splits
from .image_folder import (IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, CheckedImageFolder, UnreadableImageError,
                           check_image_folder, imagenet_transforms)
from .sampling import ResumableSampler, SeededView, ShardSampler, collate, has_batch_reader, sample_seed
from .synthetic import SyntheticImages

__all__ = ["Batch", "unpack_batch", "wrap_train_dataset", "DataBundle", "build_datasets", "check_data",
           "make_loader", "subset", "DEBIAN_FASHION_DIR", "FASHION_CLASSES", "FASHION_HELP", "FASHION_MEAN",
           "FASHION_STD", "TensorImages", "find_fashion_mnist", "load_fashion_mnist", "IMAGE_EXTENSIONS",
           "IMAGENET_MEAN", "IMAGENET_STD", "CheckedImageFolder", "UnreadableImageError", "check_image_folder",
           "imagenet_transforms", "ResumableSampler", "SeededView", "ShardSampler", "collate", "has_batch_reader",
           "sample_seed", "SyntheticImages", "GLUE_TASKS", "GlueDataset", "glue_splits"]
