"""Data layer: integer image data sets, seeded sharded batching and augmentation."""

from data.augment import augment
from data.batches import ShardedBatches, eval_batches
from data.datasets import LOADERS, ImageDataset, load_dataset, read_idx, register

__all__ = ["ImageDataset", "LOADERS", "ShardedBatches", "augment", "eval_batches", "load_dataset",
           "read_idx", "register"]
