"""Prepare a data set once per machine: one uint8 .npy array per split plus a JSON manifest.

    python -m data.prepare npz --out /data/cifar_sub data.path=../shared/data/cifar10_subset.npz
    python -m data.prepare cifar10 --out /data/cifar10 data.root=datasets
    python -m data.prepare random --out /tmp/imagenet32_size --count 1281167 --test-count 50000 --shape 3 32 32
    python train.py experiments/glow_small.yaml data.name=prepared data.path=/data/cifar_sub

A source is any registered image loader (``data.datasets.LOADERS``) at its ``data.KEY=VALUE``
options, resolved and checked like any config's ``data`` section, or ``random``: seeded uniform
uint8 images of a given shape and count, generated and written chunk by chunk (a data set of
ImageNet-32 size without holding it in memory).  The files are streamed to ``*.part`` names,
hashed as they are written (sha256 of the array bytes) and renamed; ``manifest.json`` (format,
source sentence and version, shape, count, dtype, bytes, sha256 and labels file per split) is
written last, so a directory without it is incomplete.  The format is ``data.array_file``'s.

The images are stored at 8 bits and in full: ``data.n_bits`` and ``data.max_train`` /
``max_test`` apply when a run reads the prepared set (``data.max_train`` given here keeps only
that many images in the files, and the manifest's source sentence says so).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import numpy as np

from common.errors import FlowlabError
from data.array_file import FORMAT, FORMAT_VERSION, MANIFEST, SPLITS, ArrayWriter, write_manifest

CHUNK_IMAGES = 16384  # images per write
PLACEHOLDER_MODEL = "glow"  # resolve() needs a model section; only the data section is used


def data_section(source: str, overrides: list[str]) -> dict:
    """The resolved ``data`` section of ``source`` with ``data.KEY=VALUE`` overrides."""
    from engine.config import apply_overrides, resolve

    for item in overrides:
        if not item.startswith("data."):
            raise FlowlabError(f"override {item!r}: prepare takes only data.KEY=VALUE options of the source")
    raw = apply_overrides({"model": {"name": PLACEHOLDER_MODEL}, "data": {"name": source}}, overrides)
    cfg = resolve(raw)
    if cfg["data"]["n_bits"] != 8:
        raise FlowlabError("prepare stores 8-bit images: drop data.n_bits here and set it when training "
                           "(data.name=prepared data.n_bits=N reduces each batch)")
    return cfg


def _source_dataset(source: str, overrides: list[str]):
    """(ImageDataset, options) of a registered image loader."""
    from data.datasets import LOADERS
    from engine.setup import load_data

    if source not in LOADERS:
        raise FlowlabError(f"unknown source {source!r}: one of random, {', '.join(sorted(LOADERS))}")
    cfg = data_section(source, overrides)
    data = load_data(cfg)
    if data.kind != "image":
        raise FlowlabError(f"data.name={source} gives {data.kind} data; prepare converts image data sets")
    options = {item.split("=", 1)[0][len("data."):]: item.split("=", 1)[1] for item in overrides}
    return data, options


def _chunks(images, chunk: int = CHUNK_IMAGES):
    """uint8 numpy chunks of an image tensor (or mapped images), in order."""
    for start in range(0, images.shape[0], chunk):
        yield np.asarray(images[start:start + chunk].numpy())


def _random_chunks(count: int, shape: tuple[int, ...], rng: np.random.Generator, chunk: int = CHUNK_IMAGES):
    for start in range(0, count, chunk):
        yield rng.integers(0, 256, (min(chunk, count - start), *shape), dtype=np.uint8)


def _write_split(out_dir: str, split: str, shape: tuple[int, ...], chunks, labels) -> dict:
    writer = ArrayWriter(os.path.join(out_dir, f"{split}.npy"), shape)
    try:
        for chunk in chunks:
            writer.write(chunk)
        entry = writer.close()
    finally:
        writer.file.close()
        if os.path.exists(writer.path + ".part"):  # failed part-way: leave nothing half-written
            os.remove(writer.path + ".part")
    entry["labels"] = None
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        lw = ArrayWriter(os.path.join(out_dir, f"{split}_labels.npy"), labels.shape, np.int64)
        lw.write(labels)
        entry["labels"] = lw.close()
    return entry


def _prepare_dir(out_dir: str, force: bool) -> None:
    manifest = os.path.join(out_dir, MANIFEST)
    if os.path.exists(manifest):
        if not force:
            raise FlowlabError(f"{out_dir} already holds a prepared data set ({MANIFEST}); pass --force to replace it")
        os.remove(manifest)  # from here on the directory reads as incomplete
    os.makedirs(out_dir, exist_ok=True)


def prepare_random(out_dir: str, count: int, test_count: int, shape: tuple[int, ...], seed: int = 0,
                   classes: int = 0, force: bool = False) -> dict:
    """Write a prepared set of seeded uniform uint8 images (and labels in [0, classes) when
    ``classes`` > 0); returns the manifest."""
    if count < 1 or test_count < 1:
        raise FlowlabError(f"--count and --test-count must be at least 1, got {count} and {test_count}")
    if len(shape) != 3 or min(shape) < 1:
        raise FlowlabError(f"--shape must be three positive integers C H W, got {list(shape)}")
    if classes < 0:
        raise FlowlabError(f"--classes must be at least 0, got {classes}")
    _prepare_dir(out_dir, force)
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", count), ("test", test_count)):
        labels = rng.integers(0, classes, n) if classes else None
        splits[split] = _write_split(out_dir, split, (n, *shape), _random_chunks(n, tuple(shape), rng), labels)
    sentence = (f"random uniform uint8 images {list(shape)}, {count} train / {test_count} test, "
                f"numpy default_rng({seed})" + (f", labels in [0, {classes})" if classes else ""))
    source = {"name": "random", "options": {"count": count, "test_count": test_count, "shape": list(shape),
                                            "seed": seed, "classes": classes},
              "sentence": sentence, "version": None}
    return _finish(out_dir, source, splits)


def prepare_source(out_dir: str, source: str, overrides: list[str] = (), version: str | None = None,
                   force: bool = False) -> dict:
    """Write a prepared set from registered image loader ``source``; returns the manifest."""
    data, options = _source_dataset(source, list(overrides))
    _prepare_dir(out_dir, force)
    splits = {}
    for split in SPLITS:
        images = getattr(data, split)
        labels = getattr(data, f"{split}_labels", None)
        splits[split] = _write_split(out_dir, split, tuple(images.shape), _chunks(images),
                                     None if labels is None else np.asarray(labels))
    info = {"name": source, "options": options, "sentence": data.source, "version": version}
    return _finish(out_dir, info, splits)


def _finish(out_dir: str, source: dict, splits: dict) -> dict:
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "source": source, "splits": splits}
    write_manifest(out_dir, manifest)
    return manifest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a registered image loader (cifar10, npz, mnist, ...) or 'random'")
    p.add_argument("overrides", nargs="*", help="data.KEY=VALUE options of the source (e.g. data.path=FILE.npz)")
    p.add_argument("--out", required=True, help="directory to write (created if missing)")
    p.add_argument("--force", action="store_true", help="replace a prepared set already in --out")
    p.add_argument("--source-version", default=None, help="the source's version/release, recorded in the manifest")
    p.add_argument("--count", type=int, default=None, help="random: train images")
    p.add_argument("--test-count", type=int, default=10000, help="random: test images (default 10000)")
    p.add_argument("--shape", type=int, nargs=3, default=None, metavar=("C", "H", "W"), help="random: image shape")
    p.add_argument("--seed", type=int, default=0, help="random: generator seed")
    p.add_argument("--classes", type=int, default=0, help="random: also write labels in [0, CLASSES)")
    args = p.parse_intermixed_args(argv)
    t0 = time.perf_counter()
    if args.source == "random":
        if args.overrides:
            raise FlowlabError("source random takes --count/--test-count/--shape/--seed/--classes, not data.* options")
        if args.count is None or args.shape is None:
            raise FlowlabError("source random needs --count N and --shape C H W")
        manifest = prepare_random(args.out, args.count, args.test_count, tuple(args.shape), args.seed,
                                  args.classes, args.force)
    else:
        if args.count is not None or args.shape is not None or args.classes:
            raise FlowlabError("--count/--shape/--classes are options of source random only")
        manifest = prepare_source(args.out, args.source, args.overrides, args.source_version, args.force)
    seconds = time.perf_counter() - t0
    for split, e in manifest["splits"].items():
        print(f"{split}: {e['shape']} {e['dtype']}, {e['bytes'] / 2**20:,.1f} MiB, sha256 {e['sha256']}"
              + (", with labels" if e["labels"] else ""))
    print(f"prepared {args.out} in {seconds:.1f} s from: {manifest['source']['sentence']}")
    print(f"train on it with: data.name=prepared data.path={args.out}")


if __name__ == "__main__":
    from engine.cli import run_cli

    sys.argv[0] = "python -m data.prepare"
    run_cli(main)
