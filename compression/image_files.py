"""Reading and writing the images a user compresses: PNG/BMP/... files, .npy or .npz arrays.

Only what the model can code exactly is read: 8-bit grayscale (L) or RGB pixels, palette
images without transparency (as their RGB colours) and 1-bit images (as 0/255), of the
model's channels and size and below 2^n_bits.  An alpha channel (RGBA, LA, a transparent
palette or colour key), 16-bit or float samples, other colour modes and other shapes are
refused with one line, never converted.  ``file_pixels`` re-reads a file's pixels with
nothing dropped, which is what ``compress.py`` verifies the decoded images against.
"""
from __future__ import annotations

import os

import numpy as np

from common.errors import FlowlabError

WIDE_MODES = {"I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32}


def _refusal(path: str, im) -> str | None:
    """Why the image ``im`` (read from ``path``) cannot be coded losslessly, or None."""
    if im.mode[-1] in "Aa" or im.has_transparency_data:
        return (f"{path} has an alpha channel or transparency (mode {im.mode}); the model codes grayscale or RGB "
                f"pixels, so the alpha would be lost: flatten or drop it first")
    if im.mode in WIDE_MODES:
        return f"{path} has {WIDE_MODES[im.mode]}-bit samples (mode {im.mode}); the model codes 8-bit images"
    if im.mode not in ("L", "RGB", "P", "1"):
        return f"{path} is in colour mode {im.mode}, which cannot be coded losslessly as grayscale or RGB"
    return None


def file_pixels(path: str) -> np.ndarray:
    """Every pixel of an image file at its own depth: (H, W) or (H, W, channels), alpha included."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode == "P":
            return np.asarray(im.convert("RGBA" if im.has_transparency_data else "RGB"))
        if im.mode == "1":
            return np.asarray(im.convert("L"))
        return np.asarray(im)


def _read_image_file(path: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            problem = _refusal(path, im)
            if problem:
                raise FlowlabError(problem)
            if im.mode == "P":
                im = im.convert("RGB")
            elif im.mode == "1":
                im = im.convert("L")
            array = np.asarray(im)
    except OSError as e:
        raise FlowlabError(f"cannot read image {path}: {e}") from None
    return array[None, None] if array.ndim == 2 else array.transpose(2, 0, 1)[None]


def _to_nchw(array: np.ndarray, source: str, shape: tuple | None) -> np.ndarray:
    """A uint8 array of images as (N, C, H, W); with the model's ``shape`` (C, H, W) the layout is
    decided by it (N,C,H,W / N,H,W,C / one image / N grayscale images), else guessed."""
    if array.dtype != np.uint8:
        raise FlowlabError(f"{source}: images must be uint8, got {array.dtype}")
    if shape is not None:
        c, h, w = shape
        if array.shape == (h, w) and c == 1:
            return array[None, None]
        if array.ndim == 3 and c == 1 and array.shape[1:] == (h, w):
            return np.ascontiguousarray(array[:, None])
        if array.ndim == 3:
            array = array[None]
        if array.ndim == 4 and array.shape[1:] == (c, h, w):
            return np.ascontiguousarray(array)
        if array.ndim == 4 and array.shape[1:] == (h, w, c):
            return np.ascontiguousarray(array.transpose(0, 3, 1, 2))
        raise FlowlabError(f"{source}: images of shape {array.shape} cannot be the model's {c} channel(s) of {h}x{w}")
    if array.ndim == 2:
        array = array[None, None]
    if array.ndim == 3:                       # one image, H W C or C H W
        array = array[None]
    if array.ndim != 4:
        raise FlowlabError(f"{source}: expected images (N, C, H, W) or (N, H, W, C), got shape {array.shape}")
    if array.shape[-1] in (1, 3, 4) and array.shape[1] not in (1, 3, 4):
        array = array.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(array)


def read_images(paths: list[str], npz_key: str = "x_test", shape: tuple | None = None,
                num_bits: int = 8) -> np.ndarray:
    """All images of ``paths`` as one uint8 (N, C, H, W) array, in order; with the model's
    ``shape`` (C, H, W) and ``num_bits`` every image must fit them (else a one-line error)."""
    out = []
    for path in paths:
        if not os.path.isfile(path):
            raise FlowlabError(f"image file not found: {path}")
        ext = os.path.splitext(path)[1].lower()
        try:
            if ext == ".npy":
                part, source = np.load(path, allow_pickle=False), path
            elif ext == ".npz":
                with np.load(path, allow_pickle=False) as f:
                    if npz_key not in f:
                        raise FlowlabError(f"{path} has no array {npz_key!r} (has {', '.join(f.files)})")
                    part, source = f[npz_key], f"{path}[{npz_key}]"
            else:
                part, source = _read_image_file(path), path
        except (OSError, ValueError) as e:
            raise FlowlabError(f"cannot read {path}: {' '.join(str(e).split())[:160]}") from None
        part = _to_nchw(part, source, shape)
        if num_bits < 8 and part.size and int(part.max()) >= 2 ** num_bits:
            raise FlowlabError(f"{source} has pixel values up to {int(part.max())}; the model codes {num_bits}-bit "
                               f"values 0..{2 ** num_bits - 1}")
        out.append(part)
    shapes = {a.shape[1:] for a in out}
    if len(shapes) > 1:
        raise FlowlabError(f"images have different shapes {sorted(shapes)}; one file holds one shape")
    images = np.concatenate(out)
    if images.shape[0] == 0:
        raise FlowlabError(f"no images in {', '.join(paths)}")
    return images


def matches_files(decoded: np.ndarray, paths: list[str], npz_key: str = "x_test", shape: tuple | None = None) -> bool:
    """Whether the decoded (N, C, H, W) images are exactly the first N images ``paths`` hold, read
    afresh: an image file's every pixel and channel (``file_pixels``), an array's values."""
    n, i = decoded.shape[0], 0
    for path in paths:
        if i >= n:
            break
        if os.path.splitext(path)[1].lower() in (".npy", ".npz"):
            part = read_images([path], npz_key, shape)[: n - i]
            if not np.array_equal(decoded[i : i + part.shape[0]], part):
                return False
            i += part.shape[0]
            continue
        original, image = file_pixels(path), decoded[i]
        i += 1
        hwc = image[0] if original.ndim == 2 else image.transpose(1, 2, 0)
        if original.shape != hwc.shape or original.dtype != hwc.dtype or not np.array_equal(original, hwc):
            return False
    return i == n


def write_pngs(images: np.ndarray, out_dir: str) -> list[str]:
    """images (N, C, H, W) uint8 -> out_dir/00000.png, ... (lossless)."""
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        hwc = image.transpose(1, 2, 0)
        path = os.path.join(out_dir, f"{i:05d}.png")
        Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc).save(path)
        paths.append(path)
    return paths
