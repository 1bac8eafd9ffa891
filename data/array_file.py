"""Prepared data sets: one uint8 array file per split, memory-mapped read-only by every process.

A prepared directory (written by ``python -m data.prepare``) holds

    manifest.json            format, source, and per split: file, shape, count, dtype, bytes, sha256
    train.npy, test.npy      raw .npy arrays (N, C, H, W) of uint8, no compression
    train_labels.npy, ...    int64 class labels (N,), when the source has them

Training opens it with ``data.name=prepared data.path=DIR``: each split is an ``np.load(...,
mmap_mode="r")`` view, so all processes of a node share the kernel's page cache and none holds
a private copy.  :class:`MappedImages` hands out batches gathered by index (``images[idx]``): the
rows are copied with numpy into a small new array and only that becomes a tensor, so nothing
ever materializes the whole split (``torch.from_numpy`` of the read-only map itself would warn,
and a bit reduction or ``max_train`` on the whole tensor would copy it).  ``data.n_bits`` is
applied per batch (x >> (8 - n_bits)) and ``data.max_train`` / ``max_test`` are views of the map.

The sha256 of each split's array bytes (the data after the .npy header) is checked at every load
(with ordinary reads, which fill the shared page cache without mapping the file into the
process; 16 s for the 4.1 GB of a generated ImageNet-32-size set, cold cache, loaded machine); a missing, truncated, corrupted or differently shaped file, or a
manifest that does not match its files, is one clear error.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

from common.errors import FlowlabError
from data.datasets import register

MANIFEST = "manifest.json"
FORMAT = "flowlab-prepared"
FORMAT_VERSION = 1
SPLITS = ("train", "test")
HASH_CHUNK = 1 << 20  # bytes per read while hashing (small: a big buffer would stay in the heap)


class MappedImages:
    """uint8 images (N, C, H, W) on a read-only memory map, reduced to ``n_bits`` per batch.

    It offers what the trainer and the evaluators use of an image tensor: ``shape``, ``dtype``,
    ``len``, ``images[slice]`` (another view), ``images[int | indices]`` (a new uint8 tensor),
    and ``numpy()`` (the whole split, for small sets only)."""

    def __init__(self, array: np.ndarray, n_bits: int = 8):
        if array.dtype != np.uint8 or array.ndim != 4:
            raise FlowlabError(f"mapped images must be uint8 N,C,H,W, got {array.dtype} of shape {array.shape}")
        self.array, self.n_bits = array, n_bits

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.array.shape)

    dtype = torch.uint8

    def __len__(self) -> int:
        return self.array.shape[0]

    def _reduce(self, batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(batch)
        return x >> (8 - self.n_bits) if self.n_bits < 8 else x

    def __getitem__(self, key):
        if isinstance(key, slice):
            return MappedImages(self.array[key], self.n_bits)
        if isinstance(key, (int, np.integer)):
            return self._reduce(np.array(self.array[key]))
        idx = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
        if idx.dtype == bool or idx.ndim != 1:
            raise TypeError(f"MappedImages takes a slice, an int or a 1-D array of indices, got {idx.dtype} {idx.shape}")
        return self._reduce(gather(self.array, idx.astype(np.int64, copy=False)))

    def numpy(self) -> np.ndarray:
        """The whole split as an in-memory uint8 array (a copy: small sets only)."""
        return self._reduce(np.array(self.array)).numpy()

    def __repr__(self) -> str:
        return f"MappedImages(shape={tuple(self.array.shape)}, n_bits={self.n_bits})"


def gather(array: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``array[idx]`` as a new in-memory array, rows read in increasing file order (less seeking
    on a cold cache) and put back in the order of ``idx``."""
    n = array.shape[0]
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise IndexError(f"index out of range for {n} images")
    idx = np.where(idx < 0, idx + n, idx)
    order = np.argsort(idx, kind="stable")
    out = np.empty((idx.size, *array.shape[1:]), dtype=array.dtype)
    out[order] = np.take(array, idx[order], axis=0)
    return out


# ---- the format -----------------------------------------------------------------------------

def npy_header(shape: tuple[int, ...], dtype=np.uint8) -> bytes:
    """The .npy (version 1.0) header of a C-ordered array of ``shape`` and ``dtype``."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


class ArrayWriter:
    """Streams one .npy array of known shape to ``path`` chunk by chunk, hashing the data bytes.

    Writes to ``path + '.part'`` and renames on :meth:`close`, so a crash leaves no file that
    looks complete."""

    def __init__(self, path: str, shape: tuple[int, ...], dtype=np.uint8):
        self.path, self.shape, self.dtype = path, tuple(int(s) for s in shape), np.dtype(dtype)
        self.rows, self.sha = 0, hashlib.sha256()
        self.file = open(path + ".part", "wb")
        self.file.write(npy_header(self.shape, self.dtype))

    def write(self, chunk: np.ndarray) -> None:
        chunk = np.ascontiguousarray(chunk, dtype=self.dtype)
        if chunk.shape[1:] != self.shape[1:] or self.rows + len(chunk) > self.shape[0]:
            raise FlowlabError(f"{self.path}: chunk of shape {chunk.shape} does not fit an array of {self.shape} "
                               f"after {self.rows} rows")
        data = memoryview(chunk).cast("B")
        self.file.write(data)
        self.sha.update(data)
        self.rows += len(chunk)

    def close(self) -> dict:
        """Finish the file; its manifest entry (file name, shape, count, dtype, bytes, sha256)."""
        self.file.close()
        if self.rows != self.shape[0]:
            raise FlowlabError(f"{self.path}: wrote {self.rows} rows, expected {self.shape[0]}")
        os.replace(self.path + ".part", self.path)
        return {"file": os.path.basename(self.path), "shape": list(self.shape), "count": self.shape[0],
                "dtype": self.dtype.name, "bytes": int(np.prod(self.shape)) * self.dtype.itemsize,
                "sha256": self.sha.hexdigest()}


def write_manifest(out_dir: str, manifest: dict) -> None:
    """Write ``manifest.json`` atomically (last, so a directory without it is incomplete)."""
    tmp = os.path.join(out_dir, MANIFEST + ".part")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    os.replace(tmp, os.path.join(out_dir, MANIFEST))


def read_manifest(directory: str) -> dict:
    """The manifest of a prepared directory (or of the manifest file itself), checked for form."""
    if not directory:
        raise FlowlabError("data.name=prepared needs data.path=DIR, a directory made by "
                           "`python -m data.prepare SOURCE --out DIR`")
    path = directory if os.path.isfile(directory) else os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise FlowlabError(f"no prepared data set at {directory!r} ({MANIFEST} not found): make one with "
                           f"`python -m data.prepare SOURCE --out {directory}`")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FlowlabError(f"cannot read the manifest {path!r}: {type(err).__name__}: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FlowlabError(f"{path!r} is not a flowlab prepared-data manifest (format is not {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FlowlabError(f"{path!r} has format_version {manifest.get('format_version')!r}; this flowlab reads "
                           f"{FORMAT_VERSION}: prepare the data set again with `python -m data.prepare`")
    for split in SPLITS:
        entry = manifest.get("splits", {}).get(split)
        if not isinstance(entry, dict) or not {"file", "shape", "count", "dtype", "sha256"} <= set(entry):
            raise FlowlabError(f"manifest {path!r} lacks a complete entry for the {split} split")
    return manifest


def sha256_of_file_data(path: str, offset: int) -> str:
    """sha256 of a file's bytes from ``offset`` on (plain reads: the page cache fills, the process
    maps nothing)."""
    sha = hashlib.sha256()
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            sha.update(view[:n])
    return sha.hexdigest()


def _data_offset(path: str, what: str) -> tuple[int, tuple, np.dtype]:
    """(offset of the data, shape, dtype) from a .npy file's header."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            offset = f.tell()
    except (OSError, ValueError) as err:
        raise FlowlabError(f"{what}: {path!r} is not a readable .npy file ({type(err).__name__}: {err})") from err
    if fortran:
        raise FlowlabError(f"{what}: {path!r} is Fortran-ordered; prepare the data set again")
    return offset, tuple(shape), dtype


def open_array(directory: str, entry: dict, what: str, verify: bool) -> np.ndarray:
    """The read-only memory map of one manifest entry, after checking the file against it."""
    path = os.path.join(directory, entry["file"])
    if not os.path.isfile(path):
        raise FlowlabError(f"{what}: array file {path!r} is missing; prepare the data set again "
                           f"(`python -m data.prepare ... --out {directory}`)")
    offset, shape, dtype = _data_offset(path, what)
    if list(shape) != list(entry["shape"]) or dtype.name != entry["dtype"] or shape[0] != entry["count"]:
        raise FlowlabError(f"{what}: {path!r} holds {dtype.name} {list(shape)} but the manifest says "
                           f"{entry['dtype']} {entry['shape']} ({entry['count']} items): manifest and file do not match")
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    size = os.path.getsize(path)
    if size != expected:
        state = "truncated" if size < expected else "longer than its header says"
        raise FlowlabError(f"{what}: {path!r} is {state} ({size:,} bytes, expected {expected:,}); "
                           f"prepare the data set again")
    if verify:
        digest = sha256_of_file_data(path, offset)
        if digest != entry["sha256"]:
            raise FlowlabError(f"{what}: {path!r} is corrupted (sha256 {digest[:16]}... differs from the manifest's "
                               f"{str(entry['sha256'])[:16]}...); prepare the data set again")
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _directory(path: str) -> str:
    return os.path.dirname(path) if os.path.isfile(path) else path


@register("prepared")
def load_prepared(root: str, path: str | None, download: bool):
    """A prepared directory (``data.path=DIR``): its train and test splits as read-only
    memory maps (``np.memmap``), checked against the manifest (size, shape, sha256)."""
    manifest = read_manifest(path)
    maps = {}
    for split in SPLITS:
        what = f"prepared data set {_directory(path)!r}, {split} split"
        maps[split] = open_array(_directory(path), manifest["splits"][split], what, verify=True)
        if maps[split].dtype != np.uint8 or maps[split].ndim != 4:
            raise FlowlabError(f"{what}: expected uint8 images N,C,H,W, got {maps[split].dtype} {maps[split].shape}")
    train, test = maps["train"], maps["test"]
    return train, test, (f"prepared {path} (memory-mapped, {len(train)} train / {len(test)} test) "
                         f"of: {manifest.get('source', {}).get('sentence', '?')}")


def prepared_labels(path: str) -> dict:
    """{split: int64 labels (N,) or None} of a prepared directory (checked like the images)."""
    manifest = read_manifest(path)
    out = {}
    for split in SPLITS:
        entry = manifest["splits"][split]
        labels = None
        if entry.get("labels"):
            what = f"prepared data set {_directory(path)!r}, {split} labels"
            labels = np.array(open_array(_directory(path), entry["labels"], what, verify=True))
            if labels.shape != (entry["count"],):
                raise FlowlabError(f"{what}: shape {labels.shape} for {entry['count']} images")
        out[split] = labels
    return out


def mapped_dataset(path: str, train: np.ndarray, test: np.ndarray, source: str, name: str, n_bits: int = 8,
                   max_train: int | None = None, max_test: int | None = None):
    """The :class:`data.datasets.ImageDataset` of the maps ``load_prepared`` returned: splits as
    :class:`MappedImages` (first ``max_train`` / ``max_test`` as views, ``n_bits`` per batch).

    The labels files of the manifest (``path``) are attached as ``train_labels`` /
    ``test_labels`` (one int64 per image, in memory; None when the set has none)."""
    from data.datasets import ImageDataset

    extra, labels_of = {}, prepared_labels(path)
    for split, limit in (("train", max_train), ("test", max_test)):
        labels = labels_of[split]
        extra[f"{split}_labels"] = None if labels is None else torch.from_numpy(np.array(labels[:limit], dtype=np.int64))
    if max_train is not None or max_test is not None:
        train, test = train[:max_train], test[:max_test]
        source += f"; using the first {len(train)} train / {len(test)} test"
    return ImageDataset(train=MappedImages(train, n_bits), test=MappedImages(test, n_bits), n_bits=n_bits,
                        name=name, source=source, **extra)
