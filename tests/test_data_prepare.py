"""Prepared data sets (data/prepare.py, data/array_file.py): the manifest and its sha256, one-line
errors for damaged sets, batches gathered from the memory map equal to the in-memory ones (and
resumed exactly), a shared page cache across two processes, and a short training run."""
from __future__ import annotations

import hashlib
import json
import sys
import warnings

import numpy as np
import pytest
import torch

from benchmarks.data_loader import two_process_memory
from common.errors import FlowlabError
from data import ShardedBatches, load_dataset
from data.array_file import MappedImages, prepared_labels
from data.prepare import main as prepare_main
from data.prepare import prepare_random, prepare_source
from tests.helpers import read_metric
from tests.helpers import run_command as run


def _npz(tmp_path, n_train=40, n_test=12, seed=0):
    rng = np.random.default_rng(seed)
    x_train, x_test = (rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8) for n in (n_train, n_test))
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=x_train, x_test=x_test)
    return str(path), x_train.transpose(0, 3, 1, 2), x_test.transpose(0, 3, 1, 2)


def test_prepare_writes_arrays_and_a_manifest_with_their_sha256(tmp_path):
    path, x_train, x_test = _npz(tmp_path)
    out = tmp_path / "prep"
    manifest = prepare_source(str(out), "npz", [f"data.path={path}"], version="tiny v1")
    assert json.load(open(out / "manifest.json")) == manifest
    assert manifest["format"] == "flowlab-prepared" and manifest["format_version"] == 1
    assert manifest["source"]["version"] == "tiny v1" and path in manifest["source"]["sentence"]
    for split, x in (("train", x_train), ("test", x_test)):
        e = manifest["splits"][split]
        assert e["shape"] == list(x.shape) and e["count"] == len(x) and e["dtype"] == "uint8"
        assert e["bytes"] == x.nbytes and e["sha256"] == hashlib.sha256(x.tobytes()).hexdigest()
        mapped = np.load(out / e["file"], mmap_mode="r")
        assert isinstance(mapped, np.memmap) and np.array_equal(mapped, x)
    ds = load_dataset("prepared", path=str(out))
    assert isinstance(ds.train, MappedImages) and ds.shape == (3, 8, 8) and ds.num_dims == 192
    assert "memory-mapped" in ds.source and path in ds.source
    # bit reduction per batch and truncation as views give what the in-memory loader gives
    ref = load_dataset("npz", path=path, n_bits=5, max_train=30, max_test=5)
    red = load_dataset("prepared", path=str(out), n_bits=5, max_train=30, max_test=5)
    assert red.train.shape == ref.train.shape and red.test.shape == ref.test.shape
    assert torch.equal(red.train[torch.arange(30)], ref.train) and torch.equal(red.test[torch.arange(5)], ref.test)
    assert np.array_equal(red.train.numpy(), ref.train.numpy()) and "first 30 train" in red.source


def test_random_source_is_seeded_streamed_and_labelled(tmp_path):
    a = prepare_random(str(tmp_path / "a"), 50, 7, (1, 4, 4), seed=3, classes=4)
    b = prepare_random(str(tmp_path / "b"), 50, 7, (1, 4, 4), seed=3, classes=4)
    c = prepare_random(str(tmp_path / "c"), 50, 7, (1, 4, 4), seed=4)
    assert a["splits"]["train"]["sha256"] == b["splits"]["train"]["sha256"] != c["splits"]["train"]["sha256"]
    assert a["splits"]["train"]["shape"] == [50, 1, 4, 4] and a["splits"]["test"]["count"] == 7
    labels = prepared_labels(str(tmp_path / "a"))
    assert labels["train"].shape == (50,) and labels["test"].shape == (7,) and labels["train"].dtype == np.int64
    assert 0 <= labels["train"].min() and labels["train"].max() < 4
    assert prepared_labels(str(tmp_path / "c")) == {"train": None, "test": None}
    with pytest.raises(FlowlabError, match="already holds a prepared data set.*--force"):
        prepare_random(str(tmp_path / "a"), 50, 7, (1, 4, 4))
    prepare_random(str(tmp_path / "a"), 20, 7, (1, 4, 4), force=True)
    assert load_dataset("prepared", path=str(tmp_path / "a")).train.shape[0] == 20


def _damage(out, how):
    manifest_path = out / "manifest.json"
    manifest = json.load(open(manifest_path))
    train = out / "train.npy"
    if how == "truncated":
        train.write_bytes(train.read_bytes()[:-100])
    elif how == "corrupted":
        raw = bytearray(train.read_bytes())
        raw[-1] ^= 0xFF
        train.write_bytes(bytes(raw))
    elif how == "missing file":
        train.unlink()
    elif how == "manifest shape":
        manifest["splits"]["train"]["shape"][0] += 1
        manifest["splits"]["train"]["count"] += 1
    elif how == "manifest sha256":
        manifest["splits"]["train"]["sha256"] = "0" * 64
    elif how == "not a manifest":
        manifest = {"hello": 1}
    elif how == "no manifest":
        manifest_path.unlink()
    if how.startswith("manifest") or how == "not a manifest":
        json.dump(manifest, open(manifest_path, "w"))


@pytest.mark.parametrize("how, message", [
    ("truncated", "is truncated"), ("corrupted", "is corrupted .sha256"), ("missing file", "array file .* is missing"),
    ("manifest shape", "manifest and file do not match"), ("manifest sha256", "is corrupted"),
    ("not a manifest", "not a flowlab prepared-data manifest"), ("no manifest", "no prepared data set at .*data.prepare"),
])
def test_a_damaged_prepared_set_is_one_clear_error(tmp_path, how, message):
    out = tmp_path / "prep"
    prepare_random(str(out), 30, 5, (3, 4, 4), seed=1)
    _damage(out, how)
    with pytest.raises(FlowlabError, match=message) as err:
        load_dataset("prepared", path=str(out))
    assert "\n" not in str(err.value)


def test_prepare_cli_errors_are_one_line(tmp_path):
    with pytest.raises(FlowlabError, match="needs --count N and --shape"):
        prepare_main(["random", "--out", str(tmp_path / "r")])
    with pytest.raises(FlowlabError, match="stores 8-bit images"):
        prepare_main(["npz", "data.path=x.npz", "data.n_bits=4", "--out", str(tmp_path / "r")])
    with pytest.raises(FlowlabError, match="only data.KEY=VALUE"):
        prepare_main(["npz", "train.steps=3", "--out", str(tmp_path / "r")])
    with pytest.raises(FlowlabError, match="unknown source 'nope'"):
        prepare_main(["nope", "--out", str(tmp_path / "r")])
    with pytest.raises(FlowlabError, match="data.name=prepared needs data.path=DIR"):
        load_dataset("prepared")


def test_batches_are_gathered_by_index_from_the_read_only_map(tmp_path):
    out = tmp_path / "prep"
    prepare_random(str(out), 64, 8, (3, 4, 4), seed=2)
    images = load_dataset("prepared", path=str(out)).train
    array = images.array
    assert isinstance(array, np.memmap) and not array.flags.writeable
    idx = torch.tensor([5, 63, 0, 5, -1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.from_numpy of the read-only map itself would warn
        batch = images[idx]
    assert batch.dtype == torch.uint8 and batch.is_contiguous()
    assert torch.equal(batch, torch.from_numpy(np.array(array[[5, 63, 0, 5, 63]])))
    batch += 1  # a batch is its own memory, never the map's
    assert np.array_equal(array[5], np.load(out / "train.npy")[5])
    view = images[10:20]
    assert isinstance(view, MappedImages) and np.shares_memory(view.array, array) and view.shape[0] == 10
    assert torch.equal(view[3], torch.from_numpy(np.array(array[13])))
    with pytest.raises(IndexError):
        images[torch.tensor([64])]


def test_sharded_batches_over_the_prepared_set_equal_the_in_memory_set_and_resume_exactly(tmp_path):
    path, _, _ = _npz(tmp_path, n_train=60)
    out = tmp_path / "prep"
    prepare_source(str(out), "npz", [f"data.path={path}"])
    mapped, loaded = load_dataset("prepared", path=str(out)).train, load_dataset("npz", path=path).train
    straight = ShardedBatches(60, 8, seed=7)
    for step in range(3 * straight.steps_per_epoch):
        resumed = ShardedBatches(60, 8, seed=7)  # a fresh process resuming at ``step``: no sampler state
        assert torch.equal(mapped[resumed.indices(step)], loaded[straight.indices(step)])
        ranks = [ShardedBatches(60, 8, seed=7, rank=r, world_size=2) for r in (0, 1)]
        assert torch.equal(torch.cat([mapped[b.indices(step)] for b in ranks]), loaded[straight.indices(step)])


def test_two_processes_share_the_mapped_file(tmp_path):
    """Each of two processes draws its shard of 4 epochs from a 64 MB prepared file: its own
    memory (USS) grows far less than the file, while reading the same file into memory (the
    control, as every loader did before) grows it by the whole file."""
    out = tmp_path / "prep"
    prepare_random(str(out), 21845, 16, (3, 32, 32), seed=0)  # 21845 x 3072 B = 64 MiB
    file_bytes = 21845 * 3072
    ranks = two_process_memory(str(out), batch_size=512, epochs=4, timeout=300)
    for r in ranks:
        assert r["file_bytes"] == file_bytes
        assert r["memmap"]["uss"] < 0.1 * file_bytes, r
        assert r["memmap"]["pss"] < 0.75 * file_bytes, r  # shared pages are split between the two
        assert r["in_memory"]["uss"] > 0.9 * file_bytes, r


def test_training_on_a_prepared_set(tmp_path):
    out, run_dir = tmp_path / "prep", tmp_path / "run"
    prepare_main(["random", "--out", str(out), "--count", "256", "--test-count", "32", "--shape", "3", "8", "8"])
    run([sys.executable, "train.py", "experiments/glow_small.yaml", "--out", str(run_dir),
         "model.levels=2", "model.steps=2", "model.hidden_channels=8", "data.name=prepared", f"data.path={out}",
         "data.n_bits=5", "data.max_train=128", "data.hflip=true", "train.batch_size=16", "train.init_batch_size=32",
         "train.steps=3", "train.log_every=1", "train.eval_every=3", "train.sample_every=0",
         "train.checkpoint_every=0", "eval.batch_size=32", "sample.n=4", "sample.temperatures=[0.7]"],
        env={"OMP_NUM_THREADS": "1"})
    summary = json.load(open(run_dir / "summary.json"))
    assert summary["images_seen"] == 3 * 16
    test_bpd = read_metric(run_dir, "test/bpd")
    assert set(test_bpd) == {0, 3} and all(0 < v < 10 for v in test_bpd.values()), test_bpd
    assert sorted(read_metric(run_dir, "train/bpd")) == [1, 2, 3]
    assert (run_dir / "model.safetensors").exists()
