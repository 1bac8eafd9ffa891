"""CelebA (Liu et al. 2015, arXiv:1411.7766) at 64x64 in torchvision's ``CelebA`` layout.

Files: ``<data.root>/celeba/img_align_celeba/*.jpg`` (the 202,599 aligned 178x218 images) and
``<data.root>/celeba/list_eval_partition.txt`` (lines ``000001.jpg 0``: 0 train, 1 valid, 2 test);
``data.path=DIR`` names the ``celeba`` folder itself. Train is partition 0 (162,770 images), test
partition 2 (19,962); the validation partition is not used.

Each image: the central ``data.center_crop`` x ``data.center_crop`` box (default 148, the crop of
Real NVP, Dinh et al. 2016, arXiv:1605.08803 sec. 4.1; other papers use 108 or 160, so the crop
is part of the protocol), resized to ``data.image_size`` (default 64). CelebA has attributes,
not classes: no labels.
"""

from __future__ import annotations

import os

from common.errors import FlowlabError
from data.datasets import Loaded, register
from data.images import read_images

PARTITIONS = {"train": "0", "valid": "1", "test": "2"}


def read_partition(path: str) -> dict[str, list[str]]:
    """File names per partition ("0", "1", "2") of a ``list_eval_partition.txt``."""
    out: dict[str, list[str]] = {v: [] for v in PARTITIONS.values()}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in out:
                raise FlowlabError(f"{path}:{number}: expected 'FILE.jpg 0|1|2', got {line.strip()!r}")
            out[parts[1]].append(parts[0])
    return out


@register("celeba", options=("image_size", "center_crop"))
def _load_celeba(root: str, path: str | None, download: bool, image_size: int | None = None,
                 center_crop: int = 148) -> Loaded:
    base = path or os.path.join(root, "celeba")
    images, partition = os.path.join(base, "img_align_celeba"), os.path.join(base, "list_eval_partition.txt")
    if not (os.path.isdir(images) and os.path.isfile(partition)):
        raise FlowlabError(f"CelebA not found: download img_align_celeba.zip and list_eval_partition.txt "
                           f"(https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html, 'Align&Cropped Images' and "
                           f"'Eval') into {base!r}, giving {images}/000001.jpg ... and {partition} "
                           f"(torchvision's CelebA layout under data.root), or set data.path=DIR")
    size = image_size or 64
    split = read_partition(partition)
    train, test = (read_images([os.path.join(images, n) for n in split[PARTITIONS[s]]], size, center_crop)
                   for s in ("train", "test"))
    return Loaded(train, test, f"CelebA (aligned, central {center_crop}x{center_crop} crop resized to "
                               f"{size}x{size}; partitions train / test of list_eval_partition.txt: "
                               f"{len(train)} train / {len(test)} test) from {base}")
