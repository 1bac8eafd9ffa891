"""The file-format loaders (data/imagenet.py, data/celeba.py, data/folder.py) on tiny generated
files of each format: downsampled ImageNet npz batches and PNG folders, a CelebA tree with its
partition file, image folders flat and with class subfolders."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import FlowlabError
from data import load_dataset
from data.images import read_image, split_indices
from engine.setup import load_data
from tests.helpers import resolve_overrides


def _png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def _mkdir_then(path):
    os.makedirs(path, exist_ok=True)
    return path


def _rgb(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---- downsampled ImageNet ------------------------------------------------------------------------

def _imagenet_new(base, size, counts=(3, 2), n_val=4, seed=0):
    """npz batches as image-net.org ships them: channel-major rows, labels 1..1000."""
    rng = np.random.default_rng(seed)
    images = {}
    for k, n in enumerate(counts, 1):
        sub = f"Imagenet{size}_train_npz" if size == 32 else f"Imagenet{size}_train_part{1 + (k > 5)}_npz"
        x = rng.integers(0, 256, (n, 3 * size * size), dtype=np.uint8)
        y = rng.integers(1, 1001, n)
        os.makedirs(base / sub, exist_ok=True)
        np.savez_compressed(base / sub / f"train_data_batch_{k}.npz", data=x, labels=list(y), mean=np.zeros(3))
        images[k] = (x, y)
    x = rng.integers(0, 256, (n_val, 3 * size * size), dtype=np.uint8)
    y = rng.integers(1, 1001, n_val)
    os.makedirs(base / f"Imagenet{size}_val_npz")
    np.savez(base / f"Imagenet{size}_val_npz" / "val_data.npz", data=x, labels=y)
    return images, (x, y)


@pytest.mark.parametrize("size", [32, 64])
def test_imagenet_new_version_reads_the_npz_batches_channel_major_with_labels(tmp_path, size):
    batches, (xv, yv) = _imagenet_new(tmp_path / f"imagenet{size}", size)
    ds = load_dataset(f"imagenet{size}", root=str(tmp_path), download=False, image_options={"version": "new"})
    assert ds.train.shape == (5, 3, size, size) and ds.test.shape == (4, 3, size, size)
    x1 = batches[1][0]
    # row layout: the size*size red values row by row, then green, then blue
    assert int(ds.train[0, 0, 0, 1]) == x1[0, 1] and int(ds.train[0, 1, 0, 0]) == x1[0, size * size]
    assert int(ds.train[0, 2, size - 1, size - 1]) == x1[0, -1] and int(ds.train[0, 0, 1, 0]) == x1[0, size]
    assert np.array_equal(ds.train[3:].numpy().reshape(2, -1), batches[2][0])  # batch 2 after batch 1
    assert ds.train_labels.tolist() == [*(batches[1][1] - 1), *(batches[2][1] - 1)]  # 1-based -> 0-based
    assert ds.test_labels.tolist() == list(yv - 1) and np.array_equal(ds.test.numpy().reshape(4, -1), xv)
    assert f"{size}x{size}, version new (Chrabaszcz et al. 2017, arXiv:1707.08819)" in ds.source
    assert "2 of 10 batches" in ds.source


def test_imagenet_old_version_reads_png_folders_and_names_the_version(tmp_path):
    rng = np.random.default_rng(1)
    train, valid = [_rgb(rng, 32, 32) for _ in range(3)], [_rgb(rng, 32, 32) for _ in range(2)]
    for i, a in enumerate(train):
        _png(tmp_path / "in" / "train_32x32" / f"{i:07d}.png", a)
    for i, a in enumerate(valid):
        _png(tmp_path / "in" / "valid_32x32" / f"{i:07d}.png", a)
    ds = load_dataset("imagenet32", path=str(tmp_path / "in"), download=False, image_options={"version": "old"})
    assert ds.train.shape == (3, 3, 32, 32) and ds.test.shape == (2, 3, 32, 32) and ds.train_labels is None
    assert np.array_equal(ds.train[1].numpy(), train[1].transpose(2, 0, 1))  # PNGs at 32x32 stay exact
    assert "version old (van den Oord et al. 2016, arXiv:1601.06759)" in ds.source


def test_imagenet_missing_files_say_what_to_download_and_where(tmp_path):
    with pytest.raises(FlowlabError, match=r"ImageNet 64x64 \(data.version=new.*Imagenet64_train_part1_npz.zip.*"
                                           r"Imagenet64_val_npz.zip.*imagenet64"):
        load_dataset("imagenet64", root=str(tmp_path), download=False)
    with pytest.raises(FlowlabError, match=r"train_32x32.tar and valid_32x32.tar.*train_32x32/\*.png"):
        load_dataset("imagenet32", root=str(tmp_path), image_options={"version": "old"})
    _imagenet_new(tmp_path / "imagenet32", 32, counts=(2, 2))
    os.rename(tmp_path / "imagenet32" / "Imagenet32_train_npz" / "train_data_batch_2.npz",
              tmp_path / "imagenet32" / "Imagenet32_train_npz" / "train_data_batch_3.npz")
    with pytest.raises(FlowlabError, match=r"numbered \[1, 3\]"):
        load_dataset("imagenet32", root=str(tmp_path))


def test_imagenet_version_through_the_config(tmp_path):
    _imagenet_new(tmp_path / "imagenet32", 32, counts=(2,), n_val=2)
    cfg = resolve_overrides(["model.name=glow", "data.name=imagenet32", f"data.root={tmp_path}", "data.version=new"])
    ds = load_data(cfg)
    assert ds.shape == (3, 32, 32) and "version new" in ds.source and ds.train_labels.shape == (2,)
    with pytest.raises(FlowlabError, match="data.version"):
        resolve_overrides(["model.name=glow", "data.name=imagenet32", "data.version=2016"])


# ---- CelebA --------------------------------------------------------------------------------------

def _face(value_inside, h=40, w=30, crop=20):
    """An image whose central crop x crop box is value_inside and the rest 0."""
    a = np.zeros((h, w, 3), np.uint8)
    top, left = (h - crop) // 2, (w - crop) // 2
    a[top:top + crop, left:left + crop] = value_inside
    return a


def test_celeba_reads_torchvision_layout_partitions_and_center_crop(tmp_path):
    base = tmp_path / "celeba"
    parts = {"000001.jpg": 0, "000002.jpg": 2, "000003.jpg": 0, "000004.jpg": 1, "000005.jpg": 2}
    images = _mkdir_then(base / "img_align_celeba")
    for i, name in enumerate(parts):
        Image.fromarray(_face(40 * (i + 1))).save(images / name, quality=100)
    (base / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in parts.items()))
    cfg = resolve_overrides(["model.name=glow", "data.name=celeba", f"data.root={tmp_path}",
                             "data.center_crop=20", "data.image_size=8"])
    ds = load_data(cfg)
    assert ds.train.shape == (2, 3, 8, 8) and ds.test.shape == (2, 3, 8, 8) and ds.train_labels is None
    # train = partition 0 (images 1, 3), test = partition 2 (images 2, 5); the crop keeps only the inside
    for images, values in ((ds.train, (40, 120)), (ds.test, (80, 200))):
        for img, v in zip(images, values):
            assert abs(img.float().mean().item() - v) < 4  # JPEG: near, not exact
    assert "central 20x20 crop resized to 8x8" in ds.source and "2 train / 2 test" in ds.source


def test_celeba_missing_and_bad_partition_are_one_line_errors(tmp_path):
    with pytest.raises(FlowlabError, match=r"CelebA not found: download img_align_celeba.zip and "
                                           r"list_eval_partition.txt.*celeba"):
        load_dataset("celeba", root=str(tmp_path))
    _mkdir_then(tmp_path / "celeba" / "img_align_celeba")
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text("000001.jpg 7\n")
    with pytest.raises(FlowlabError, match=r"list_eval_partition.txt:1: expected"):
        load_dataset("celeba", root=str(tmp_path))


# ---- image folders -------------------------------------------------------------------------------

def test_read_image_resizes_the_shorter_side_and_center_crops(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high: the middle 20x20 is white
    a[:, 10:30] = 255
    _png(tmp_path / "wide.png", a)
    out = read_image(str(tmp_path / "wide.png"), 10)
    assert out.shape == (3, 10, 10) and out.dtype == np.uint8 and int(out.min()) == 255  # only the centre kept
    _png(tmp_path / "small.png", a[:4, :4])
    assert read_image(str(tmp_path / "small.png"), 8).shape == (3, 8, 8)  # enlarged


def test_folder_of_images_seeded_split_unlabelled(tmp_path):
    rng = np.random.default_rng(3)
    for i in range(10):
        _png(tmp_path / "imgs" / f"{i}.png", _rgb(rng, 16, 24))
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    options = {"image_size": 8, "test_fraction": 0.3, "split_seed": 5}
    ds = load_dataset("folder", path=str(tmp_path / "imgs"), image_options=options)
    assert ds.train.shape == (7, 3, 8, 8) and ds.test.shape == (3, 3, 8, 8) and ds.train_labels is None
    again = load_dataset("folder", path=str(tmp_path / "imgs"), image_options=options)
    assert torch.equal(ds.test, again.test)  # the same seed, the same split
    other = load_dataset("folder", path=str(tmp_path / "imgs"), image_options={**options, "split_seed": 6})
    assert not torch.equal(ds.test, other.test)
    every = {bytes(x.numpy()) for x in torch.cat([ds.train, ds.test])}
    assert len(every) == 10  # each image in exactly one split
    assert "10 images, unlabelled, resized to 8x8; 7 train / 3 test" in ds.source


def test_folder_with_class_subfolders_has_labels(tmp_path):
    colours = {"cat": 10, "dog": 200, "empty": None}
    for name, value in colours.items():
        _mkdir_then(tmp_path / "d" / name)
        for i in range(4 if value is not None else 0):
            _png(tmp_path / "d" / name / f"{i}.png", np.full((8, 8, 3), value, np.uint8))
    cfg = resolve_overrides(["model.name=glow", "data.name=folder", f"data.path={tmp_path / 'd'}",
                             "data.image_size=4", "data.test_fraction=0.25"])
    ds = load_data(cfg)
    assert ds.train.shape == (6, 3, 4, 4) and ds.test.shape == (2, 3, 4, 4)
    for images, labels in ((ds.train, ds.train_labels), (ds.test, ds.test_labels)):
        assert labels.dtype == torch.int64
        for img, y in zip(images, labels.tolist()):  # class k = the k-th non-empty subfolder, sorted
            assert int(img[0, 0, 0]) == (10, 200)[y]
    assert "2 classes (subfolders), labelled" in ds.source


def test_folder_errors_are_one_line(tmp_path):
    with pytest.raises(FlowlabError, match="data.name=folder needs data.path=DIR"):
        load_dataset("folder", image_options={"image_size": 8})
    with pytest.raises(FlowlabError, match="image folder not found"):
        load_dataset("folder", path=str(tmp_path / "nope"), image_options={"image_size": 8})
    _mkdir_then(tmp_path / "e")
    with pytest.raises(FlowlabError, match="needs data.image_size"):
        load_dataset("folder", path=str(tmp_path / "e"))
    with pytest.raises(FlowlabError, match="no png/jpg/jpeg images"):
        load_dataset("folder", path=str(tmp_path / "e"), image_options={"image_size": 8})
    with pytest.raises(FlowlabError, match="test_fraction"):
        resolve_overrides(["model.name=glow", "data.name=folder", "data.test_fraction=1.0"])
    with pytest.raises(FlowlabError, match="at least 2"):
        split_indices(1, 0.5, 0)


def test_celeba_hq_folder_any_size_resized(tmp_path):
    rng = np.random.default_rng(4)
    for i in range(5):
        _png(tmp_path / "celeba_hq" / f"{i:05d}.png", _rgb(rng, 48, 48))
    ds = load_dataset("celeba_hq", root=str(tmp_path), image_options={"image_size": 16, "test_fraction": 0.2})
    assert ds.train.shape == (4, 3, 16, 16) and ds.test.shape == (1, 3, 16, 16)
    assert ds.source.startswith("CelebA-HQ folder")
    with pytest.raises(FlowlabError, match="CelebA-HQ images not found.*data.path=DIR"):
        load_dataset("celeba_hq", root=str(tmp_path / "none"))
