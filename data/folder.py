"""Folders of PNG/JPEG images: users' own data (``folder``) and CelebA-HQ-style folders (``celeba_hq``).

``data.name=folder data.path=DIR data.image_size=S``: every image of DIR, shorter side resized
to S and center-cropped to S x S (``data.images.read_image``). Labels come from class
subfolders: when DIR holds no images itself but subfolders that do, subfolder k (in sorted
order) is class k. The held-out split is seeded: ``data.test_fraction`` of the images (at
least one), drawn with ``data.split_seed`` from the sorted file list.

``data.name=celeba_hq``: the same for a folder of CelebA-HQ images at any size (e.g. the
30,000 1024x1024 images of Karras et al. 2018, arXiv:1710.10196), at ``data.image_size``
(default 256), unlabelled.
"""

from __future__ import annotations

import os

import numpy as np

from common.errors import FlowlabError
from data.datasets import Loaded, register
from data.images import IMAGE_SUFFIXES, list_images, read_images, split_indices

OPTIONS = ("image_size", "test_fraction", "split_seed")


def scan_folder(folder: str) -> tuple[list[str], np.ndarray | None, list[str]]:
    """(image paths, labels or None, class names) of ``folder``: its own images, else class subfolders."""
    if not os.path.isdir(folder):
        raise FlowlabError(f"image folder not found: {folder!r} (set data.path to a folder of PNG/JPEG images)")
    files = list_images(folder)
    if files:
        return files, None, []
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    per_class = [list_images(os.path.join(folder, c)) for c in classes]
    kept = [(c, f) for c, f in zip(classes, per_class) if f]
    paths = [p for _, f in kept for p in f]
    labels = np.concatenate([np.full(len(f), k, dtype=np.int64) for k, (_, f) in enumerate(kept)]) if kept else None
    return paths, labels, [c for c, _ in kept]


def load_folder(folder: str, image_size: int, test_fraction: float, split_seed: int, title: str) -> Loaded:
    """The images of ``folder`` at ``image_size``, split into train / test by the seeded fraction."""
    paths, labels, classes = scan_folder(folder)
    if not paths:
        raise FlowlabError(f"no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images in {folder!r} "
                           f"nor in class subfolders of it")
    train_idx, test_idx = split_indices(len(paths), test_fraction, split_seed)
    train, test = (read_images([paths[i] for i in idx], image_size) for idx in (train_idx, test_idx))
    kinds = f"{len(classes)} classes (subfolders), labelled" if labels is not None else "unlabelled"
    source = (f"{title} {folder}: {len(paths)} images, {kinds}, resized to {image_size}x{image_size}; "
              f"{len(train)} train / {len(test)} test (data.test_fraction={test_fraction:g}, "
              f"data.split_seed={split_seed})")
    if labels is None:
        return Loaded(train, test, source)
    return Loaded(train, test, source, labels[train_idx], labels[test_idx])


@register("folder", options=OPTIONS)
def _load_folder(root: str, path: str | None, download: bool, image_size: int | None = None,
                 test_fraction: float = 0.1, split_seed: int = 0) -> Loaded:
    if not path:
        raise FlowlabError("data.name=folder needs data.path=DIR (a folder of PNG/JPEG images, or of class "
                           "subfolders of them) and data.image_size=N")
    if image_size is None:
        raise FlowlabError(f"data.name=folder needs data.image_size=N (the images of {path!r} are resized "
                           f"and center-cropped to N x N)")
    return load_folder(path, image_size, test_fraction, split_seed, "image folder")


@register("celeba_hq", options=OPTIONS)
def _load_celeba_hq(root: str, path: str | None, download: bool, image_size: int | None = None,
                    test_fraction: float = 0.1, split_seed: int = 0) -> Loaded:
    folder = path or os.path.join(root, "celeba_hq")
    if not os.path.isdir(folder) or not list_images(folder):
        raise FlowlabError(f"CelebA-HQ images not found in {folder!r}: make the 30,000 images (Karras et al. "
                           f"2018, https://github.com/tkarras/progressive_growing_of_gans, or a PNG/JPEG "
                           f"export of them at any size) a folder {folder!r}, or set data.path=DIR")
    return load_folder(folder, image_size or 256, test_fraction, split_seed, "CelebA-HQ folder")
