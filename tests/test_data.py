"""Tests for the data layer: loading, IDX parsing, sharded batching, augmentation."""

import gzip
import struct

import numpy as np
import pytest
import torch

from data import ShardedBatches, augment, eval_batches, load_dataset, read_idx
from common.errors import FlowlabError
from tests.helpers import SUBSET  # ../shared's CIFAR-10 subset, else the sample in data/sample/


# ---- loading -----------------------------------------------------------------------------

def test_npz_subset_loads_as_nchw_uint8_with_labels():
    ds = load_dataset("npz", path=SUBSET)
    with np.load(SUBSET) as raw:
        x_train, x_test, y_train, y_test = (raw[k] for k in ("x_train", "x_test", "y_train", "y_test"))
    n_train, n_test = len(x_train), len(x_test)
    assert ds.train.shape == (n_train, 3, 32, 32) and ds.test.shape == (n_test, 3, 32, 32) and n_train >= 1000
    assert ds.train.dtype == ds.test.dtype == torch.uint8
    assert ds.shape == (3, 32, 32) and ds.num_dims == 3072 and ds.n_bits == 8
    assert np.array_equal(ds.train.numpy(), x_train.transpose(0, 3, 1, 2))
    assert np.array_equal(ds.test.numpy(), x_test.transpose(0, 3, 1, 2))
    assert f"{n_train} train / {n_test} test" in ds.source
    assert ds.train_labels.dtype == torch.int64 and torch.equal(ds.train_labels, torch.from_numpy(y_train))
    assert torch.equal(ds.test_labels, torch.from_numpy(y_test)) and set(ds.test_labels.tolist()) <= set(range(10))


def test_n_bits_reduction_and_truncation():
    full = load_dataset("npz", path=SUBSET, max_train=100, max_test=10)
    ds = load_dataset("npz", path=SUBSET, n_bits=5, max_train=100, max_test=10)
    assert ds.train.shape[0] == 100 and ds.test.shape[0] == 10 and "first 100 train" in ds.source
    assert int(ds.train.max()) < 32 and ds.train.dtype == torch.uint8
    assert torch.equal(ds.train, full.train >> 3) and torch.equal(ds.test, full.test >> 3)
    assert ds.train_labels.shape == (100,) and ds.test_labels.shape == (10,)  # labels truncated with the images
    assert torch.equal(ds.train_labels, load_dataset("npz", path=SUBSET).train_labels[:100])


def test_unlabelled_npz_and_bad_labels(tmp_path):
    x = np.zeros((4, 4, 4, 3), np.uint8)
    np.savez(tmp_path / "u.npz", x_train=x, x_test=x[:2])
    ds = load_dataset("npz", path=str(tmp_path / "u.npz"))
    assert ds.train_labels is None and ds.test_labels is None
    np.savez(tmp_path / "b.npz", x_train=x, x_test=x[:2], y_train=np.arange(3), y_test=np.arange(2))
    with pytest.raises(FlowlabError, match="3 labels .* for 4 images"):
        load_dataset("npz", path=str(tmp_path / "b.npz"))


@pytest.mark.parametrize("bad", [0, 9])
def test_bad_n_bits(bad):
    with pytest.raises(FlowlabError, match="n_bits"):
        load_dataset("npz", path="x.npz", n_bits=bad)


def test_grayscale_and_nchw_npz(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (6, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "g.npz", x_train=x, x_test=x[:2])
    ds = load_dataset("npz", path=str(tmp_path / "g.npz"))
    assert ds.train.shape == (6, 1, 8, 8) and np.array_equal(ds.train[:, 0].numpy(), x)
    chw = np.random.default_rng(1).integers(0, 256, (4, 3, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "c.npz", x_train=chw, x_test=chw)
    assert np.array_equal(load_dataset("npz", path=str(tmp_path / "c.npz")).train.numpy(), chw)


def test_npz_errors(tmp_path):
    with pytest.raises(FlowlabError, match="npz file not found: .*nope.npz"):
        load_dataset("npz", path=str(tmp_path / "nope.npz"))
    x = np.zeros((2, 4, 4, 3), np.uint8)
    np.savez(tmp_path / "k.npz", x_train=x)
    with pytest.raises(FlowlabError, match="lacks key.*x_test"):
        load_dataset("npz", path=str(tmp_path / "k.npz"))
    np.savez(tmp_path / "d.npz", x_train=np.zeros((2, 4), np.uint8), x_test=x)
    with pytest.raises(FlowlabError, match="ndim 2"):
        load_dataset("npz", path=str(tmp_path / "d.npz"))
    np.savez(tmp_path / "f.npz", x_train=x.astype(np.float32), x_test=x)
    with pytest.raises(FlowlabError, match="dtype float32"):
        load_dataset("npz", path=str(tmp_path / "f.npz"))


def test_unknown_name_lists_known():
    with pytest.raises(FlowlabError, match="unknown data set 'svhn'.*cifar10.*npz"):
        load_dataset("svhn")


def test_cifar10_absent_offline(tmp_path):
    with pytest.raises(FlowlabError, match=r"CIFAR-10 not found.*data\.root=.*data\.name=npz"):
        load_dataset("cifar10", root=str(tmp_path), download=False)


def _write_idx(path, arr):
    data = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_parsing_and_mnist_loader(tmp_path, suffix):
    rng = np.random.default_rng(0)
    train, test = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for n in (5, 3))
    _write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", train)
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", test)
    assert np.array_equal(read_idx(str(tmp_path / f"train-images-idx3-ubyte{suffix}")), train)
    ds = load_dataset("mnist", root=str(tmp_path), download=False)
    assert ds.train.shape == (5, 1, 28, 28) and ds.test.shape == (3, 1, 28, 28)
    assert np.array_equal(ds.test[:, 0].numpy(), test)
    assert ds.train_labels is None  # no label files: unlabelled
    labels = [rng.integers(0, 10, n, dtype=np.uint8) for n in (5, 3)]
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels[0])
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels[1])
    ds = load_dataset("mnist", root=str(tmp_path), download=False)
    assert ds.train_labels.dtype == torch.int64 and ds.train_labels.tolist() == labels[0].tolist()
    assert ds.test_labels.tolist() == labels[1].tolist() and ", with labels" in ds.source


def test_idx_bad_magic_and_missing_mnist(tmp_path, monkeypatch):
    monkeypatch.setattr("data.datasets.SYSTEM_DIRS", {})  # ignore an installed dataset-fashion-mnist
    (tmp_path / "junk").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(FlowlabError, match="bad magic"):
        read_idx(str(tmp_path / "junk"))
    with pytest.raises(FlowlabError, match="Fashion-MNIST IDX files.*apt-get install"):
        load_dataset("fashion_mnist", root=str(tmp_path / "empty"), download=False)


# ---- batching ----------------------------------------------------------------------------

def test_sharded_batches_reproducible_and_epochs_differ():
    a, b = ShardedBatches(100, 10, seed=3), ShardedBatches(100, 10, seed=3)
    assert all(torch.equal(a.indices(s), b.indices(s)) for s in (0, 7, 25))
    assert a.steps_per_epoch == 10 and a.epoch(9) == 0 and a.epoch(10) == 1
    assert not torch.equal(a.indices(0), a.indices(10))
    assert not torch.equal(a.indices(0), ShardedBatches(100, 10, seed=4).indices(0))
    assert a.indices(0).dtype == torch.long


def test_every_example_once_per_epoch_drop_last():
    sb = ShardedBatches(105, 10, seed=0)  # 10 steps, 5 examples dropped per epoch
    for epoch in (0, 1):
        seen = torch.cat([sb.indices(epoch * 10 + s) for s in range(10)])
        assert len(seen) == 100 and len(set(seen.tolist())) == 100


def test_rank_shards_union_is_global_batch():
    single = ShardedBatches(96, 12, seed=5)
    for step in (0, 3, 8, 11):
        shards = [ShardedBatches(96, 12, seed=5, rank=r, world_size=4).indices(step) for r in range(4)]
        assert all(len(s) == 3 for s in shards)
        assert torch.equal(torch.cat(shards), single.indices(step))
        assert len(set(torch.cat(shards).tolist())) == 12


def test_sharded_batches_errors():
    with pytest.raises(FlowlabError, match="multiple of the number of processes"):
        ShardedBatches(100, 10, seed=0, world_size=3)
    with pytest.raises(FlowlabError, match="exceeds"):
        ShardedBatches(5, 10, seed=0)


@pytest.mark.parametrize("world_size", [1, 3])
def test_eval_batches_cover_once(world_size):
    per_rank = [eval_batches(1017, 64, r, world_size) for r in range(world_size)]
    assert len({len(p) for p in per_rank}) == 1  # same number of batches on every rank
    allidx = torch.cat([b for p in per_rank for b in p])
    assert sorted(allidx.tolist()) == list(range(1017))
    assert all(len(b) <= 64 for p in per_rank for b in p)


# ---- augmentation ------------------------------------------------------------------------

def _batch(b=64):
    return torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_flip_is_exact_mirror_or_identity():
    x = _batch()
    y = augment(x, hflip=True, translate=0.0, generator=torch.Generator().manual_seed(1))
    flipped = [torch.equal(yi, xi.flip(-1)) for xi, yi in zip(x, y)]
    kept = [torch.equal(yi, xi) for xi, yi in zip(x, y)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54


def test_augment_deterministic_and_translate():
    x = _batch()
    y1 = augment(x, True, 0.125, torch.Generator().manual_seed(7))
    y2 = augment(x, True, 0.125, torch.Generator().manual_seed(7))
    assert torch.equal(y1, y2) and y1.dtype == torch.uint8 and y1.shape == x.shape
    y = augment(x, False, 0.125, torch.Generator().manual_seed(2))
    assert not torch.equal(y, x)
    for xi, yi in zip(x, y):  # every output pixel value comes from the same image and channel
        assert all(set(yi[c].unique().tolist()) <= set(xi[c].unique().tolist()) for c in range(3))


def test_translate_replicates_edge():
    x = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).repeat(50, 1, 1, 1)
    y = augment(x, False, 0.5, torch.Generator().manual_seed(0))  # shifts up to 2 pixels
    for yi in y:  # each output is a clamped shift: rows/cols are clamped index ranges of the input
        rows, cols = (yi[0] // 4)[:, 0], (yi[0] % 4)[0]
        assert torch.equal(yi[0], (rows[:, None] * 4 + cols[None, :]).to(torch.uint8))
        assert all(abs(int(rows[i + 1] - rows[i])) <= 1 for i in range(3))


def test_augment_noop_when_off():
    x = _batch(4)
    assert augment(x, False, 0.0, torch.Generator()) is x


def test_cifar10_layout_via_torchvision(monkeypatch):
    import torchvision

    class FakeCIFAR10:  # stands in for torchvision's class: .data is N,H,W,C uint8
        def __init__(self, root, train, download):
            self.data = np.full((5 if train else 2, 32, 32, 3), [1, 2, 3], dtype=np.uint8)
            self.targets = list(range(5)) if train else [9, 8]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    ds = load_dataset("cifar10", root="somewhere", download=False)
    assert ds.train.shape == (5, 3, 32, 32) and ds.test.shape == (2, 3, 32, 32)
    assert ds.train[:, 2].eq(3).all() and "CIFAR-10 (torchvision, 5 train / 2 test)" in ds.source
    assert ds.train_labels.tolist() == [0, 1, 2, 3, 4] and ds.test_labels.tolist() == [9, 8]


def test_fashion_mnist_loader_reads_the_idx_files(tmp_path, monkeypatch):
    """Tiny files in the real format (gzipped IDX, big-endian header, as Debian's
    dataset-fashion-mnist and torchvision ship them), in the system folder and under data.root."""
    rng = np.random.default_rng(2)
    train, test = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for n in (7, 4))
    system = tmp_path / "usr_share_datasets_fashion-mnist"
    system.mkdir()
    _write_idx(system / "train-images-idx3-ubyte.gz", train)
    _write_idx(system / "t10k-images-idx3-ubyte.gz", test)
    monkeypatch.setattr("data.datasets.SYSTEM_DIRS", {"FashionMNIST": [str(system)]})
    ds = load_dataset("fashion_mnist", root=str(tmp_path / "empty"), download=False, max_test=3, n_bits=1)
    assert ds.train.shape == (7, 1, 28, 28) and ds.test.shape == (3, 1, 28, 28) and ds.num_dims == 784
    assert torch.equal(ds.train[:, 0], torch.from_numpy(train >= 128).to(torch.uint8))  # n_bits=1: pixel >= 128
    assert "Fashion-MNIST (IDX, 7 train / 4 test)" in ds.source and str(system) in ds.source
    assert ds.train_labels is None
    _write_idx(system / "train-labels-idx1-ubyte.gz", np.arange(7, dtype=np.uint8))
    _write_idx(system / "t10k-labels-idx1-ubyte.gz", np.arange(4, dtype=np.uint8)[::-1].copy())
    ds = load_dataset("fashion_mnist", root=str(tmp_path / "empty"), download=False, max_test=3)
    assert ds.train_labels.tolist() == list(range(7)) and ds.test_labels.tolist() == [3, 2, 1]
    raw = tmp_path / "root" / "FashionMNIST" / "raw"  # torchvision's layout under data.root
    raw.mkdir(parents=True)
    _write_idx(raw / "train-images-idx3-ubyte", train[:2])
    _write_idx(raw / "t10k-images-idx3-ubyte", test[:2])
    ds = load_dataset("fashion_mnist", root=str(tmp_path / "root"), download=False)
    assert np.array_equal(ds.test[:, 0].numpy(), test[:2])
