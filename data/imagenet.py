"""Downsampled ImageNet at 32x32 and 64x64 (``imagenet32``, ``imagenet64``) in its two versions.

The two releases differ (the same model scores differently on them, so ``data.version`` is
part of every number; it is written into the data set's source sentence):

* ``data.version=new``: Chrabaszcz, Loshchilov & Hutter 2017, arXiv:1707.08819, from
  image-net.org ("Downsampled ImageNet", box resize of the whole image). Official npz batches:
  ``Imagenet32_train_npz/train_data_batch_1.npz`` ... ``_10`` and ``Imagenet32_val_npz/val_data.npz``
  (64x64: ``Imagenet64_train_part1_npz/`` holds batches 1-5, ``..._part2_npz/`` 6-10). Keys
  ``data`` (N, 3*S*S) uint8, each row channel-major (the S*S red values row by row, then green,
  then blue) and ``labels`` 1..1000. Test = the 50,000 validation images. Labelled.
* ``data.version=old``: van den Oord, Kalchbrenner & Kavukcuoglu 2016, arXiv:1601.06759 (PixelRNN),
  the version of Glow and Flow++; folders of PNG files ``train_32x32/`` and ``valid_32x32/``
  (``train_64x64/``, ``valid_64x64/``), formerly at image-net.org/small. Unlabelled.

Files are looked up under ``data.path`` if set, else ``<data.root>/imagenet32`` (``imagenet64``).
"""

from __future__ import annotations

import os
import re
import zipfile

import numpy as np

from common.errors import FlowlabError
from data.datasets import Loaded, register
from data.images import list_images, read_images

VERSIONS = ("new", "old")
PAPERS = {"new": "Chrabaszcz et al. 2017, arXiv:1707.08819", "old": "van den Oord et al. 2016, arXiv:1601.06759"}
BATCH = re.compile(r"train_data_batch_(\d+)\.npz$")


def npz_rows(path: str, key: str = "data") -> int:
    """Number of rows of array ``key`` of an npz file, read from its header only."""
    try:
        with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as f:
            fmt = np.lib.format
            version = fmt.read_magic(f)
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape = read_header(f)[0]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise FlowlabError(f"cannot read array {key!r} of npz file {path!r}: {type(err).__name__}: {err}") from err
    return int(shape[0])


def _train_batches(base: str, size: int) -> list[str]:
    """The train_data_batch_K.npz files of the new version under ``base``, in batch order."""
    found: dict[int, str] = {}
    for sub in (f"Imagenet{size}_train_npz", f"Imagenet{size}_train_part1_npz",
                f"Imagenet{size}_train_part2_npz", f"Imagenet{size}_train", ""):
        folder = os.path.join(base, sub)
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                m = BATCH.match(name)
                if m:
                    found.setdefault(int(m.group(1)), os.path.join(folder, name))
    numbers = sorted(found)
    if numbers and numbers != list(range(1, len(numbers) + 1)):
        raise FlowlabError(f"ImageNet {size}x{size} train batches under {base!r} are numbered {numbers}; "
                           f"expected train_data_batch_1 .. _{len(numbers)} without gaps")
    return [found[k] for k in numbers]


def _val_file(base: str, size: int) -> str | None:
    for sub in (f"Imagenet{size}_val_npz", f"Imagenet{size}_val", ""):
        path = os.path.join(base, sub, "val_data.npz")
        if os.path.isfile(path):
            return path
    return None


def read_batches(paths: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, size, size) and 0-based int64 labels of npz batch files, preallocated."""
    counts = [npz_rows(p) for p in paths]
    images = np.empty((sum(counts), 3, size, size), dtype=np.uint8)
    labels = np.empty(sum(counts), dtype=np.int64)
    start = 0
    for path, n in zip(paths, counts):
        with np.load(path, allow_pickle=False) as f:
            if "labels" not in f.files:
                raise FlowlabError(f"ImageNet batch {path!r} has no 'labels' (has: {', '.join(f.files)})")
            data, y = f["data"], np.asarray(f["labels"]).reshape(-1)
        if data.dtype != np.uint8 or data.shape != (n, 3 * size * size) or len(y) != n:
            raise FlowlabError(f"ImageNet batch {path!r}: data {data.dtype} {data.shape} with {len(y)} labels, "
                               f"expected uint8 ({n}, {3 * size * size}) rows of {size}x{size} images")
        if n and (y.min() < 1 or y.max() > 1000):
            raise FlowlabError(f"ImageNet batch {path!r}: labels span {y.min()}..{y.max()}, expected 1..1000")
        images[start:start + n] = data.reshape(n, 3, size, size)
        labels[start:start + n] = y - 1
        start += n
    return images, labels


def _missing(size: int, version: str, base: str) -> str:
    """The one-line 'not found' message: what to download and where to put it."""
    what = f"downsampled ImageNet {size}x{size} (data.version={version}: {PAPERS[version]}) not found under {base!r}"
    if version == "new":
        zips = ([f"Imagenet{size}_train_npz.zip"] if size == 32 else
                [f"Imagenet{size}_train_part1_npz.zip", f"Imagenet{size}_train_part2_npz.zip"])
        return (f"{what}: download {', '.join(zips)} and Imagenet{size}_val_npz.zip (https://image-net.org/"
                f"download-images, 'Downsampled ImageNet') and unzip them there, giving "
                f"{base}/Imagenet{size}_train*_npz/train_data_batch_1.npz ... and "
                f"{base}/Imagenet{size}_val_npz/val_data.npz; or set data.path=DIR")
    return (f"{what}: unpack train_{size}x{size}.tar and valid_{size}x{size}.tar (the PixelRNN release, "
            f"formerly image-net.org/small/download.php) there, giving {base}/train_{size}x{size}/*.png and "
            f"{base}/valid_{size}x{size}/*.png; or set data.path=DIR, or data.version=new")


def _load_imagenet(size: int):
    def load(root: str, path: str | None, download: bool, version: str = "new") -> Loaded:
        if version not in VERSIONS:
            raise FlowlabError(f"data.version must be one of {', '.join(VERSIONS)} for ImageNet, got {version!r}")
        base = path or os.path.join(root, f"imagenet{size}")
        title = f"downsampled ImageNet {size}x{size}, version {version} ({PAPERS[version]})"
        if version == "new":
            batches, val = _train_batches(base, size), _val_file(base, size)
            if not batches or val is None:
                raise FlowlabError(_missing(size, version, base))
            (train, y_train), (test, y_test) = read_batches(batches, size), read_batches([val], size)
            return Loaded(train, test, f"{title}: {len(train)} train ({len(batches)} of 10 batches) / "
                                       f"{len(test)} test (val_data) from {base}", y_train, y_test)
        folders = [os.path.join(base, f"{s}_{size}x{size}") for s in ("train", "valid")]
        files = [list_images(f) if os.path.isdir(f) else [] for f in folders]
        if not all(files):
            raise FlowlabError(_missing(size, version, base))
        train, test = (read_images(f, size) for f in files)
        return Loaded(train, test, f"{title}: {len(train)} train / {len(test)} test (PNG folders) from {base}")

    return load


register("imagenet32", options=("version",))(_load_imagenet(32))
register("imagenet64", options=("version",))(_load_imagenet(64))
