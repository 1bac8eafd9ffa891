"""Reading and writing the images a user compresses: PNG/BMP/... files, .npy or .npz arrays."""
from __future__ import annotations

import os

import numpy as np

from common.errors import FlowlabError


def _to_nchw(array: np.ndarray, source: str) -> np.ndarray:
    if array.dtype != np.uint8:
        raise FlowlabError(f"{source}: images must be uint8, got {array.dtype}")
    if array.ndim == 3:                       # one image, H W C or C H W
        array = array[None]
    if array.ndim != 4:
        raise FlowlabError(f"{source}: expected images (N, C, H, W) or (N, H, W, C), got shape {array.shape}")
    if array.shape[-1] in (1, 3, 4) and array.shape[1] not in (1, 3, 4):
        array = array.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(array)


def read_images(paths: list[str], npz_key: str = "x_test") -> np.ndarray:
    """All images of ``paths`` as one uint8 (N, C, H, W) array, in order."""
    from PIL import Image

    out = []
    for path in paths:
        if not os.path.isfile(path):
            raise FlowlabError(f"image file not found: {path}")
        ext = os.path.splitext(path)[1].lower()
        if ext == ".npy":
            out.append(_to_nchw(np.load(path), path))
        elif ext == ".npz":
            with np.load(path) as f:
                if npz_key not in f:
                    raise FlowlabError(f"{path} has no array {npz_key!r} (has {', '.join(f.files)})")
                out.append(_to_nchw(f[npz_key], f"{path}[{npz_key}]"))
        else:
            try:
                with Image.open(path) as im:
                    out.append(_to_nchw(np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im), path))
            except OSError as e:
                raise FlowlabError(f"cannot read image {path}: {e}") from None
    shapes = {a.shape[1:] for a in out}
    if len(shapes) > 1:
        raise FlowlabError(f"images have different shapes {sorted(shapes)}; one file holds one shape")
    return np.concatenate(out)


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
