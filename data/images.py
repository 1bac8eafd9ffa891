"""Image files (PNG/JPEG) to uint8 N,C,H,W arrays: listing, resizing, center crops, seeded splits.

The shared pieces of the file-based loaders (``folder``, ``celeba``, ``celeba_hq``, ImageNet's
PNG version). Geometry of :func:`read_image`, for an image of width W and height H:

* optional ``crop``: the central ``crop x crop`` box, ((W - crop) // 2, (H - crop) // 2) at its top left;
* resize so that the shorter side is ``size`` (Pillow; BOX = area averaging when shrinking,
  the antialiased choice of the 2017 downsampled ImageNet, arXiv:1707.08819; BICUBIC when enlarging);
* the central ``size x size`` crop of that.
"""

from __future__ import annotations

import os

import numpy as np

from common.errors import FlowlabError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def list_images(folder: str) -> list[str]:
    """Sorted paths of the PNG/JPEG files directly inside ``folder`` (any letter case)."""
    try:
        names = os.listdir(folder)
    except OSError as err:
        raise FlowlabError(f"cannot list image folder {folder!r}: {err.strerror}") from err
    return sorted(os.path.join(folder, n) for n in names
                  if n.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(folder, n)))


def read_image(path: str, size: int, crop: int | None = None):
    """One image file as uint8 (3, size, size): central ``crop`` box, shorter side to ``size``, center crop."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except OSError as err:  # Pillow's UnidentifiedImageError is an OSError
        raise FlowlabError(f"cannot read image {path!r}: {' '.join(str(err).split())}") from err
    if crop is not None:
        w, h = im.size
        if crop > min(w, h):
            raise FlowlabError(f"image {path!r} is {w}x{h}, smaller than the {crop}x{crop} center crop "
                               f"(data.center_crop)")
        left, top = (w - crop) // 2, (h - crop) // 2
        im = im.crop((left, top, left + crop, top + crop))
    w, h = im.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    if new != (w, h):
        im = im.resize(new, Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def read_images(paths: list[str], size: int, crop: int | None = None) -> np.ndarray:
    """Image files as one uint8 (N, 3, size, size) array (preallocated: no second copy)."""
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for i, p in enumerate(paths):
        out[i] = read_image(p, size, crop)
    return out


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, test) index arrays of ``n`` items, round(n * test_fraction) held out (at least
    one of each), both in ascending order: the same files and seed always give the same split."""
    if n < 2:
        raise FlowlabError(f"{n} image(s): a train/test split needs at least 2")
    if not 0 < test_fraction < 1:
        raise FlowlabError(f"data.test_fraction must be in (0, 1), got {test_fraction!r}")
    n_test = min(n - 1, max(1, round(n * test_fraction)))
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_test:]), np.sort(order[:n_test])
