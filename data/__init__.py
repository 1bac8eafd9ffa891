"""Data layer: integer image data sets, continuous vector data sets, seeded sharded batching and augmentation."""

from data.augment import augment
from data.batches import ShardedBatches, eval_batches
from data.datasets import LOADERS, ImageDataset, load_dataset, read_idx, register
from data.vectors import VECTOR_LOADERS, VectorDataset, load_vectors, register_vectors

__all__ = ["ImageDataset", "LOADERS", "ShardedBatches", "VECTOR_LOADERS", "VectorDataset", "augment", "eval_batches",
           "load_dataset", "load_vectors", "read_idx", "register", "register_vectors"]

# the loaders kept in their own modules register themselves in LOADERS on import
from data import celeba, default, folder, imagenet  # noqa: E402,F401
