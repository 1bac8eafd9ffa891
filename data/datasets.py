"""In-memory image data sets as integer (uint8, N,C,H,W) tensors.

Every data set is one loader function registered in :data:`LOADERS`; it returns
uint8 numpy arrays ``(train, test)`` laid out N,C,H,W plus a sentence saying what
was read, and for labelled sets the int64 class labels of both splits (a :class:`Loaded`;
a plain ``(train, test, source)`` tuple means no labels). A loader registered with
``options`` also gets those keys of the ``data`` section (``version``, ``image_size``, ...).
:func:`load_dataset` adds bit reduction and truncation on top.
Dequantization is left to the model.  ``data.n_bits=1`` binarizes (pixel >= 128): the
binary images of the flow-VAE and of argmax flows.

:func:`load_dataset` also loads the vector data sets of ``data.vectors`` (``toy2d``,
``none``), whose options it passes on.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import socket
import zipfile
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch

from common.errors import FlowlabError

Loader = Callable[..., "Loaded | tuple[np.ndarray, np.ndarray, str]"]
LOADERS: dict[str, Loader] = {}
LOADER_OPTIONS: dict[str, tuple[str, ...]] = {}  # name -> the data-section keys its loader takes
DOWNLOAD_TIMEOUT_S = 30.0  # per socket operation, so an offline download fails instead of hanging
SYSTEM_DIRS = {"FashionMNIST": ["/usr/share/datasets/fashion-mnist"]}  # Debian dataset-* packages


@dataclass
class ImageDataset:
    """Train and test images as uint8 tensors (N,C,H,W) with values in [0, 2**n_bits)."""

    train: torch.Tensor
    test: torch.Tensor
    n_bits: int
    name: str
    source: str
    train_labels: torch.Tensor | None = None  # int64 class labels (N,), for labelled sets
    test_labels: torch.Tensor | None = None

    kind = "image"  # what the trainer and the objectives ask: "image" | "vector" | "none"

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.train.shape[1:])

    @property
    def num_dims(self) -> int:
        """Number of values per image, C*H*W (the denominator of bits/dim)."""
        c, h, w = self.shape
        return c * h * w


class Loaded(NamedTuple):
    """What a loader returns: N,C,H,W uint8 splits, a sentence naming the source, labels or None."""

    train: np.ndarray
    test: np.ndarray
    source: str
    train_labels: np.ndarray | None = None
    test_labels: np.ndarray | None = None


def register(name: str, options: tuple[str, ...] = ()) -> Callable[[Loader], Loader]:
    """Decorator adding ``loader(root, path, download, **options) -> Loaded | (train, test, source)``
    to LOADERS; ``options`` names the ``data`` keys passed to it as keyword arguments."""

    def wrap(fn: Loader) -> Loader:
        LOADERS[name] = fn
        LOADER_OPTIONS[name] = tuple(options)
        return fn

    return wrap


def _labels(labels, count: int, what: str) -> torch.Tensor | None:
    """Class labels as an int64 tensor of ``count``, or None."""
    if labels is None:
        return None
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != count or not np.issubdtype(labels.dtype, np.integer):
        raise FlowlabError(f"{what}: {len(labels)} labels of dtype {labels.dtype} for {count} images "
                           f"(expected one integer label per image)")
    return torch.from_numpy(labels.astype(np.int64))


def load_dataset(name: str, root: str = "datasets", path: str | None = None, download: bool = True,
                 n_bits: int = 8, max_train: int | None = None,
                 max_test: int | None = None, image_options: dict | None = None, **vector_options) -> ImageDataset:
    """Load data set ``name`` into memory, keep the first max_train/max_test images, reduce to n_bits.

    ``image_options`` holds ``data`` keys (``version``, ``image_size``, ``test_fraction``, ...); the
    loader gets those it was registered with. A vector data set (``data.vectors.VECTOR_LOADERS``) is loaded by ``load_vectors`` with
    ``vector_options`` (``toy``, ``n_train``, ``n_test``, ``dim``) and is a ``VectorDataset``."""
    from data.vectors import VECTOR_LOADERS, load_vectors

    if name in VECTOR_LOADERS:
        return load_vectors(name, max_train=max_train, max_test=max_test, **vector_options)
    if name not in LOADERS:
        known = sorted({*LOADERS, *VECTOR_LOADERS})
        raise FlowlabError(f"unknown data set {name!r}: data.name must be one of {', '.join(known)}")
    if not (isinstance(n_bits, int) and 1 <= n_bits <= 8):
        raise FlowlabError(f"data.n_bits must be an integer in 1..8, got {n_bits!r}")
    for key, value in (("max_train", max_train), ("max_test", max_test)):
        if value is not None and value < 1:
            raise FlowlabError(f"data.{key} must be at least 1 or unset, got {value}")
    options = {k: v for k, v in (image_options or {}).items() if k in LOADER_OPTIONS[name]}
    train, test, source, train_labels, test_labels = Loaded(*LOADERS[name](root, path, download, **options))
    for split, images in (("train", train), ("test", test)):
        if len(images) == 0:
            raise FlowlabError(f"data set {name!r} has no {split} images ({source})")
    if isinstance(train, np.memmap):  # a prepared set (data/array_file.py): mapped, gathered per batch
        from data.array_file import mapped_dataset
        return mapped_dataset(path, train, test, source, name, n_bits, max_train, max_test)
    labels = [_labels(y, len(x), f"data set {name!r} ({split})")
              for y, x, split in ((train_labels, train, "train"), (test_labels, test, "test"))]
    if max_train is not None or max_test is not None:
        train, test = train[:max_train].copy(), test[:max_test].copy()  # don't pin the full arrays
        labels = [None if y is None else y[:n].clone() for y, n in zip(labels, (max_train, max_test))]
        source += f"; using the first {len(train)} train / {len(test)} test"
    train, test = (torch.from_numpy(np.ascontiguousarray(a)) for a in (train, test))
    if n_bits < 8:
        train, test = train >> (8 - n_bits), test >> (8 - n_bits)
    return ImageDataset(train=train, test=test, n_bits=n_bits, name=name, source=source,
                        train_labels=labels[0], test_labels=labels[1])


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    """Temporarily set the default socket timeout (torchvision's urlopen sets none)."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _one_line(err: Exception) -> str:
    """An exception as 'Type: message' on a single line."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


@register("cifar10")
def _load_cifar10(root: str, path: str | None, download: bool):
    """CIFAR-10 through torchvision (50000 train / 10000 test), downloading when allowed."""
    import torchvision

    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            sets = [torchvision.datasets.CIFAR10(root, train=t, download=download) for t in (True, False)]
    except Exception as err:  # offline downloads raise URLError, missing files RuntimeError, ...
        how = "could not be downloaded (offline?)" if download else "download=False"
        raise FlowlabError(
            f"CIFAR-10 not found under {root!r} and {how}: set data.root=DIR to a folder holding "
            f"cifar-10-batches-py, or use data.name=npz data.path=FILE.npz "
            f"(e.g. ../shared/data/cifar10_subset.npz) [{_one_line(err)}]") from err
    train, test = (s.data.transpose(0, 3, 1, 2) for s in sets)  # N,H,W,C -> N,C,H,W
    labels = [getattr(s, "targets", None) for s in sets]
    where = os.path.join(root, "cifar-10-batches-py")
    return Loaded(train, test, f"CIFAR-10 (torchvision, {len(train)} train / {len(test)} test) from {where}", *labels)


@register("npz")
def _load_npz(root: str, path: str | None, download: bool):
    """A .npz file with uint8 x_train / x_test (N,H,W,C, N,C,H,W or grayscale N,H,W)."""
    if not path:
        raise FlowlabError("data.name=npz needs data.path=FILE.npz (e.g. ../shared/data/cifar10_subset.npz)")
    if not os.path.isfile(path):
        raise FlowlabError(f"npz file not found: {path!r} (set data.path to an existing .npz file)")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x_train", "x_test") if k not in f.files]
            if missing:
                raise FlowlabError(f"npz file {path!r} lacks key(s) {', '.join(missing)} "
                                   f"(has: {', '.join(f.files) or 'nothing'})")
            train, test = (_to_nchw(f[k], f"{path}[{k}]") for k in ("x_train", "x_test"))
            labels = [f[k] if k in f.files else None for k in ("y_train", "y_test")]
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise FlowlabError(f"cannot read npz file {path!r}: {_one_line(err)}") from err
    if train.shape[1:] != test.shape[1:]:
        raise FlowlabError(f"npz file {path!r}: x_train images {train.shape[1:]} differ from "
                           f"x_test images {test.shape[1:]}")
    return Loaded(train, test, f"npz {path}: {len(train)} train / {len(test)} test", *labels)


def _to_nchw(a: np.ndarray, what: str) -> np.ndarray:
    """Check a uint8 image array and view it as N,C,H,W (N,H,W -> N,1,H,W)."""
    if a.dtype != np.uint8:
        raise FlowlabError(f"{what} has dtype {a.dtype}, expected uint8 integer images")
    if a.ndim == 3:
        return a[:, None]
    if a.ndim != 4:
        raise FlowlabError(f"{what} has ndim {a.ndim} (shape {a.shape}), expected N,H,W,C or N,H,W")
    if a.shape[1] in (1, 3) and a.shape[-1] not in (1, 3):
        return a  # already N,C,H,W
    return a.transpose(0, 3, 1, 2)


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file of unsigned bytes (MNIST format), gzipped or plain."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise FlowlabError(f"cannot read IDX file {path!r}: {_one_line(err)}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise FlowlabError(f"{path!r} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise FlowlabError(f"IDX file {path!r} is truncated inside its header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise FlowlabError(f"IDX file {path!r} holds {data.size} bytes, header says {dims}")
    return data.reshape(dims).copy()  # writable, owns its memory


def _find_idx(dirs: list[str], stem: str) -> str | None:
    """First existing ``stem`` or ``stem.gz`` in dirs."""
    for d in dirs:
        for name in (stem, stem + ".gz"):
            if os.path.isfile(os.path.join(d, name)):
                return os.path.join(d, name)
    return None


def _load_idx_set(title: str, tv_class: str, hint: str = ""):
    """Build a loader for an MNIST-style data set stored as IDX files."""

    def load(root: str, path: str | None, download: bool):
        dirs = [root, os.path.join(root, tv_class, "raw"), *SYSTEM_DIRS.get(tv_class, [])]
        files = [_find_idx(dirs, f"{s}-images-idx3-ubyte") for s in ("train", "t10k")]
        if None in files and download:
            import torchvision

            try:
                with _socket_timeout(DOWNLOAD_TIMEOUT_S):
                    getattr(torchvision.datasets, tv_class)(root, download=True)
            except Exception:  # offline: fall through to the error below
                pass
            files = [_find_idx(dirs, f"{s}-images-idx3-ubyte") for s in ("train", "t10k")]
        if None in files:
            how = "could not be downloaded (offline?)" if download else "download=False"
            raise FlowlabError(f"{title} IDX files (train-images-idx3-ubyte[.gz], t10k-images-idx3-ubyte[.gz]) "
                               f"not found in {', '.join(dirs)} and {how}: set data.root=DIR to a folder "
                               f"holding them{hint}")
        train, test = (read_idx(f) for f in files)
        if train.ndim != 3 or test.ndim != 3 or train.shape[1:] != test.shape[1:]:
            raise FlowlabError(f"{title} IDX files {files} hold shapes {train.shape} / {test.shape}, "
                               f"expected N,H,W images of one size")
        train, test = train[:, None], test[:, None]
        label_files = [_find_idx([os.path.dirname(f)], f"{s}-labels-idx1-ubyte")  # beside the images
                       for f, s in zip(files, ("train", "t10k"))]
        labelled = None not in label_files  # both label files, or no labels
        labels = [read_idx(f) for f in label_files] if labelled else [None, None]
        return Loaded(train, test, f"{title} (IDX, {len(train)} train / {len(test)} test"
                                   f"{', with labels' if labelled else ''}) "
                                   f"from {os.path.dirname(files[0])}", *labels)

    return load


register("mnist")(_load_idx_set("MNIST", "MNIST"))
register("fashion_mnist")(_load_idx_set(
    "Fashion-MNIST", "FashionMNIST",
    ", or run `apt-get install -y dataset-fashion-mnist` (installs to /usr/share/datasets/fashion-mnist)"))


import data.array_file  # noqa: E402,F401  (registers "prepared": memory-mapped prepared sets)
