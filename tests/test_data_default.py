"""data.name=cifar10_default: full CIFAR-10 if cached > the subset beside the checkout > the sample
embedded in the repository; each fallback with monkeypatched paths, the sample itself, and that
the source sentence (the first line a run logs) names the one used."""

import os

import numpy as np
import pytest
import torch

import data.default as default
from data import load_dataset
from engine.config import CHOICES, load_config
from engine.setup import load_data
from tests.helpers import ROOT, SUBSET


def _npz(path, n_train, n_test, value):
    x = np.full((n_train + n_test, 32, 32, 3), value, np.uint8)
    y = np.arange(n_train + n_test) % 10
    np.savez(path, x_train=x[:n_train], y_train=y[:n_train], x_test=x[n_train:], y_test=y[n_train:])
    return str(path)


@pytest.fixture
def paths(tmp_path, monkeypatch):
    """A fake subset and sample; returns (subset, sample, empty data.root)."""
    subset, sample = _npz(tmp_path / "subset.npz", 6, 3, 1), _npz(tmp_path / "sample.npz", 4, 2, 2)
    monkeypatch.setattr(default, "SUBSET_PATH", subset)
    monkeypatch.setattr(default, "SAMPLE_PATH", sample)
    return subset, sample, str(tmp_path / "root")


def test_the_subset_beside_the_checkout_comes_before_the_sample(paths):
    subset, _, root = paths
    ds = load_dataset("cifar10_default", root=root, download=True)  # download=True: still never downloads
    assert ds.train.shape == (6, 3, 32, 32) and int(ds.train[0, 0, 0, 0]) == 1
    assert ds.source.startswith("CIFAR-10 default = the subset beside the checkout")
    assert subset in ds.source and ds.train_labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert default.default_npz() == subset


def test_the_embedded_sample_when_nothing_else_is_there(paths, monkeypatch, tmp_path):
    _, sample, root = paths
    monkeypatch.setattr(default, "SUBSET_PATH", str(tmp_path / "absent.npz"))
    ds = load_dataset("cifar10_default", root=root)
    assert ds.train.shape == (4, 3, 32, 32) and int(ds.test[0, 0, 0, 0]) == 2
    assert ds.source.startswith("CIFAR-10 default = the sample embedded in the repository")
    assert "absent.npz" in ds.source and sample in ds.source and default.default_npz() == sample


def test_cached_torchvision_cifar10_comes_first(paths, monkeypatch, tmp_path):
    import torchvision

    _, _, root = paths
    os.makedirs(os.path.join(root, "cifar-10-batches-py"))
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        open(os.path.join(root, "cifar-10-batches-py", name), "wb").close()
    calls = []

    class FakeCIFAR10:  # torchvision's class as it reads cached files: .data N,H,W,C, .targets
        def __init__(self, root, train, download):
            calls.append(download)
            self.data = np.full((8 if train else 5, 32, 32, 3), 3, dtype=np.uint8)
            self.targets = [7] * (8 if train else 5)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    ds = load_dataset("cifar10_default", root=root, download=True)
    assert calls == [False, False]  # read from the cache, never downloaded
    assert ds.train.shape == (8, 3, 32, 32) and ds.test_labels.tolist() == [7] * 5
    assert ds.source.startswith("CIFAR-10 default = the full data set (torchvision's, cached)")


def test_an_incomplete_torchvision_folder_is_not_used(paths):
    subset, _, root = paths
    os.makedirs(os.path.join(root, "cifar-10-batches-py"))
    open(os.path.join(root, "cifar-10-batches-py", "data_batch_1"), "wb").close()
    assert subset in load_dataset("cifar10_default", root=root).source


def test_an_explicit_path_skips_the_resolution(paths, tmp_path):
    _, _, root = paths
    given = _npz(tmp_path / "mine.npz", 5, 5, 9)
    ds = load_dataset("cifar10_default", root=root, path=given)
    assert int(ds.train[0, 0, 0, 0]) == 9 and f"data.path={given} (given" in ds.source


def test_the_embedded_sample_is_real_cifar10_with_labels():
    with np.load(default.SAMPLE_PATH) as f:
        x_train, y_train, x_test, y_test = (f[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    assert x_train.shape == (1000, 32, 32, 3) and x_test.shape == (200, 32, 32, 3) and x_train.dtype == np.uint8
    assert y_train.dtype == np.int64 and set(y_train.tolist()) == set(range(10)) and len(y_test) == 200
    assert x_train.std() > 40  # natural images, not a constant
    assert os.path.getsize(default.SAMPLE_PATH) < 5_000_000
    if SUBSET != default.SAMPLE_PATH:  # the subset is here: the sample is its first 1,000 / 200 images
        with np.load(SUBSET) as f:
            assert np.array_equal(f["x_train"][:1000], x_train) and np.array_equal(f["y_test"][:200], y_test)


def test_small_configs_and_quickstart_use_the_default():
    assert "cifar10_default" in CHOICES[("data", "name")]
    for name in ("quickstart", "glow_small", "flowpp_small", "realnvp_small", "resflow_small", "idf_small",
                 "ffjord_small", "argmax_small", "argmax_cifar10_4levels_small"):
        cfg = load_config(os.path.join(ROOT, "experiments", f"{name}.yaml"))
        assert cfg["data"]["name"] == "cifar10_default" and cfg["data"]["path"] is None, name
    ds = load_data(load_config(os.path.join(ROOT, "experiments", "quickstart.yaml"),
                               ["data.max_train=8", "data.max_test=4", "data.root=/nonexistent"]))
    assert ds.source.startswith("CIFAR-10 default = ") and ds.train.dtype == torch.uint8
