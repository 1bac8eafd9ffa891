"""``data.name=cifar10_default``: the best CIFAR-10 this machine has, without downloading.

Resolution order (the first that exists is used, and the source sentence, the first line a
run logs, says which and why):

1. torchvision's full CIFAR-10 (50,000 / 10,000), if already under ``data.root``
   (``<root>/cifar-10-batches-py``); never downloaded here (``data.name=cifar10`` downloads);
2. the CIFAR-10 subset beside the checkout, ``../shared/data/cifar10_subset.npz`` (5,085 / 1,017);
3. the sample embedded in the repository, ``data/sample/cifar10_sample.npz`` (1,000 / 200).

An explicit ``data.path=FILE.npz`` skips the resolution: that file is read (as ``data.name=npz``
would), and the source sentence says so.

The quickstart, the small configs and the tests train on it, so a bare clone runs them all.
"""

from __future__ import annotations

import os

from data.datasets import LOADERS, Loaded, register

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBSET_PATH = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "cifar10_subset.npz"))
SAMPLE_PATH = os.path.join(REPO, "data", "sample", "cifar10_sample.npz")


def torchvision_cached(root: str) -> bool:
    """Whether torchvision's CIFAR-10 python batches are under ``root`` (the files only; their
    checksums are checked when loading)."""
    folder = os.path.join(root, "cifar-10-batches-py")
    names = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]
    return all(os.path.isfile(os.path.join(folder, n)) for n in names)


def default_npz() -> str:
    """The npz file of the default resolution: the subset beside the checkout, else the embedded sample."""
    return SUBSET_PATH if os.path.isfile(SUBSET_PATH) else SAMPLE_PATH


@register("cifar10_default")
def _load_cifar10_default(root: str, path: str | None, download: bool) -> Loaded:
    if path:
        which = f"data.path={path} (given; no resolution)"
        loaded = Loaded(*LOADERS["npz"](root, path, False))
    elif torchvision_cached(root):
        which = "the full data set (torchvision's, cached)"
        loaded = Loaded(*LOADERS["cifar10"](root, None, False))
    else:
        npz = default_npz()
        absent = f"no CIFAR-10 under data.root={root!r}" + ("" if npz == SUBSET_PATH else f", no {SUBSET_PATH}")
        which = ("the subset beside the checkout" if npz == SUBSET_PATH else
                 "the sample embedded in the repository") + f" ({absent})"
        loaded = Loaded(*LOADERS["npz"](root, npz, False))
    return loaded._replace(source=f"CIFAR-10 default = {which}: {loaded.source}")
