"""The container of a flow-coded file: a fixed header, per-latent alphabets, the ANS words.

    magic "FLIC" | version u16 | n_images u32 | C, H, W u16 | num_bits u8 | chunk u16
    | model sha256 (32 B) | images crc32 u32 | n_latents u8 | n_latents x (lo, hi) i32
    | n_words u64 | payload crc32 u32 | header crc32 u32 | payload (n_words little-endian u32)

Every check that can fail raises a one-line :class:`FlowlabError`: wrong magic or version,
a header or payload that is truncated or whose CRC does not match, trailing bytes.
"""
from __future__ import annotations

import dataclasses
import struct
import zlib

import numpy as np

from common.errors import FlowlabError

MAGIC, VERSION = b"FLIC", 1
_FIXED = struct.Struct("<4sHIHHHBH32sIB")
_RANGE = struct.Struct("<ii")
_TAIL = struct.Struct("<QII")


@dataclasses.dataclass
class Header:
    n_images: int
    shape: tuple[int, int, int]
    num_bits: int
    chunk: int
    model_hash: bytes
    images_crc: int
    ranges: list[tuple[int, int]]   # (lo, hi) of each latent, in encode order


def images_crc(images: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(images, dtype=np.uint8).tobytes())


def pack(header: Header, words: np.ndarray) -> bytes:
    words = np.ascontiguousarray(words, dtype="<u4")
    payload = words.tobytes()
    head = _FIXED.pack(MAGIC, VERSION, header.n_images, *header.shape, header.num_bits, header.chunk,
                       header.model_hash, header.images_crc, len(header.ranges))
    head += b"".join(_RANGE.pack(lo, hi) for lo, hi in header.ranges)
    head += struct.pack("<QI", words.size, zlib.crc32(payload))
    return head + struct.pack("<I", zlib.crc32(head)) + payload


def unpack(blob: bytes) -> tuple[Header, np.ndarray]:
    if len(blob) < _FIXED.size:
        raise FlowlabError(f"not a flow-coded file: {len(blob)} bytes is shorter than the header")
    magic, version, n, c, h, w, bits, chunk, model_hash, img_crc, n_lat = _FIXED.unpack_from(blob)
    if magic != MAGIC:
        raise FlowlabError(f"not a flow-coded file (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise FlowlabError(f"unsupported format version {version} (this build reads version {VERSION})")
    end = _FIXED.size + n_lat * _RANGE.size + _TAIL.size
    if len(blob) < end:
        raise FlowlabError("truncated file: the header is incomplete")
    ranges = [_RANGE.unpack_from(blob, _FIXED.size + i * _RANGE.size) for i in range(n_lat)]
    n_words, payload_crc, header_crc = _TAIL.unpack_from(blob, end - _TAIL.size)
    if zlib.crc32(blob[: end - 4]) != header_crc:
        raise FlowlabError("corrupt file: header checksum mismatch")
    payload = blob[end:]
    if len(payload) != 4 * n_words:
        raise FlowlabError(f"truncated or padded file: payload has {len(payload)} bytes, the header says {4 * n_words}")
    if zlib.crc32(payload) != payload_crc:
        raise FlowlabError("corrupt file: payload checksum mismatch")
    header = Header(n, (c, h, w), bits, chunk, model_hash, img_crc, [tuple(r) for r in ranges])
    return header, np.frombuffer(payload, dtype="<u4").astype(np.uint32)
