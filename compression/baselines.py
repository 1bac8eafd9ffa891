"""Standard lossless image codecs, run through their reference libraries (``imagecodecs``).

Each image is compressed on its own, at the codec's strongest lossless setting, decoded
again and checked to be identical; bits/dim = 8 * total bytes / (N * C * H * W), the
file headers included (as in IDF's Table 3, where every image is one file).
"""
from __future__ import annotations

import numpy as np

from common.errors import FlowlabError

# name -> (encode kwargs); all through imagecodecs: libpng, libwebp, OpenJPEG, libjxl
CODECS = {
    "PNG": ("png", {"level": 9}),
    "WebP (lossless)": ("webp", {"lossless": True, "level": 100, "method": 6}),
    "JPEG 2000 (lossless)": ("jpeg2k", {"reversible": True}),
    "JPEG XL (lossless)": ("jpegxl", {"lossless": True, "effort": 9}),
}


def available_codecs() -> list[str]:
    """Codecs whose encoder and decoder this imagecodecs build has."""
    import imagecodecs

    out = []
    for name, (lib, _) in CODECS.items():
        codec = getattr(imagecodecs, lib.upper(), None)
        if codec is not None and getattr(codec, "available", True):
            out.append(name)
    return out


def codec_bits(name: str, images: np.ndarray) -> int:
    """Total bits of ``images`` (N, C, H, W) uint8 coded one by one with codec ``name``."""
    import imagecodecs

    lib, kwargs = CODECS[name]
    encode, decode = getattr(imagecodecs, f"{lib}_encode"), getattr(imagecodecs, f"{lib}_decode")
    total = 0
    for image in images:
        hwc = np.ascontiguousarray(image.transpose(1, 2, 0).squeeze(-1) if image.shape[0] == 1 else image.transpose(1, 2, 0))
        data = encode(hwc, **kwargs)
        if not np.array_equal(np.asarray(decode(data)).reshape(hwc.shape), hwc):
            raise FlowlabError(f"{name} did not reproduce an image exactly")
        total += 8 * len(data)
    return total
