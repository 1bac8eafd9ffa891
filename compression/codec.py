"""Lossless compression of integer images with an integer flow and rANS (IDF §4).

An IDF maps an image x bijectively to integer latents [y_1, ..., y_{L-1}, z_top] with

    P(x) = P(z_top) prod_l P(y_l | z_l),

so each latent is entropy coded with its own discretized logistic mixture and the code
length is -log2 P(x) plus the coder's overhead.  The coder is ``constriction``'s stack
ANS (LIFO): the encoder pushes, per chunk of images (last chunk first), y_1 ... y_{L-1},
z_top; the decoder pops z_top, inverts the top level, computes P(y_{L-1} | z_{L-1}) from
what it has rebuilt, pops y_{L-1}, and so on down to x.

Each latent is coded over a finite alphabet {lo..hi}: the smallest and largest value it
takes in the file (stored in the header), with the logistic tails folded into the edge
bins, so no in-range symbol gets less probability than the model gives it.

Bit-exactness needs the same probabilities at both ends: the codec runs a float64 copy of
the model on the CPU, chunk by chunk with the chunk size stored in the header (same
shapes, same kernels, same results), and checks a CRC of the decoded images.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import math

import constriction
import numpy as np
import torch

from compression.bitstream import Header, images_crc, pack, unpack
from common.errors import FlowlabError

MAX_ALPHABET = 1 << 16          # symbols per latent alphabet (a guard against diverged models; tables are sliced)
TABLE_ELEMENTS = 1 << 21        # probability-table entries x components computed at once
_CATEGORICAL = constriction.stream.model.Categorical(perfect=False)


def model_fingerprint(model: torch.nn.Module) -> bytes:
    """sha256 of every parameter and buffer (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.digest()


@dataclasses.dataclass
class EncodeResult:
    blob: bytes
    model_bits: np.ndarray        # -log2 P(x) per image under the (float64) model
    payload_bytes: int            # the ANS words; the rest of the blob is the header

    @property
    def coded_bits(self) -> int:
        """The whole file, header included."""
        return 8 * len(self.blob)

    @property
    def payload_bits(self) -> int:
        return 8 * self.payload_bytes


class FlowCodec:
    """Encode / decode batches of uint8 images with a discrete flow (``models.architectures.idf``)."""

    def __init__(self, model, num_bits: int = 8, chunk: int = 16):
        if not getattr(model, "is_discrete", False):
            raise FlowlabError(f"{type(model).__name__} is not an integer flow with discrete priors; "
                               "compression needs an IDF (model.name: idf)")
        if not hasattr(model.base, "distribution"):  # the discretized-logistic priors' interval tables
            raise FlowlabError(f"the rANS codec codes integer latents under discretized-logistic priors (IDF); "
                               f"this model's prior {type(model.base).__name__} has no interval probabilities "
                               "(model.name: idf)")
        if not 1 <= chunk <= 65535:
            raise FlowlabError(f"chunk must be in 1..65535, got {chunk}")
        self.fingerprint = model_fingerprint(model)
        self.model = copy.deepcopy(model).cpu().double().eval()
        self.num_bits, self.chunk, self.shape = num_bits, chunk, tuple(model.data_shape)
        self.n_latents = len(self.model.factor_out_layers()) + 1

    # --- the two directions of the flow, latent by latent -----------------------------------------
    @torch.no_grad()
    def latents(self, x: torch.Tensor) -> list[tuple[object, torch.Tensor]]:
        """[(P(y_1 | z_1), y_1), ..., (P(z_top), z_top)] for a float64 image batch, in encode order
        (``Flow.encode``, scoring each factored-out latent where it leaves the flow)."""
        out = []
        top, _ = self.model.encode(x, on_split=lambda layer, kept, y: out.append((layer.latent_distribution(kept.contiguous()), y)))
        out.append((self.model.base.distribution(top.shape[0]), top))
        for _, symbols in out:
            if not torch.equal(symbols, torch.round(symbols)):
                raise FlowlabError("the model produced non-integer latents; only integer flows can be coded")
        return out

    def _probabilities(self, dist, lo: int, hi: int) -> np.ndarray:
        """(n_symbols, hi - lo + 1) float64 table, computed in fixed slices."""
        flat = dist.flatten()
        n, k = flat.means.shape
        step = max(1, TABLE_ELEMENTS // ((hi - lo + 2) * k))
        return torch.cat([flat[i : i + step].interval_probs(lo, hi) for i in range(0, n, step)]).numpy()

    # --- encode ------------------------------------------------------------------------------------
    def _check_images(self, images) -> torch.Tensor:
        images = np.asarray(images)
        if images.ndim != 4 or tuple(images.shape[1:]) != self.shape:
            raise FlowlabError(f"images must have shape (N, {', '.join(map(str, self.shape))}), got {images.shape}")
        if images.shape[0] == 0:
            raise FlowlabError("no images to encode")
        if images.dtype != np.uint8 or (self.num_bits < 8 and images.max() >= 2 ** self.num_bits):
            raise FlowlabError(f"images must be uint8 with values below 2^{self.num_bits}")
        return torch.from_numpy(np.ascontiguousarray(images))

    @staticmethod
    def _chunks(n: int, size: int):
        return [(s, min(s + size, n)) for s in range(0, n, size)]

    def encode(self, images: np.ndarray) -> EncodeResult:
        x = self._check_images(images)
        chunks = self._chunks(x.shape[0], self.chunk)
        lows, highs = None, None
        for s, e in chunks:  # pass 1: the alphabet of each latent
            syms = [y for _, y in self.latents(x[s:e].double())]
            lo, hi = [int(y.min()) for y in syms], [int(y.max()) for y in syms]
            lows = lo if lows is None else [min(a, b) for a, b in zip(lows, lo)]
            highs = hi if highs is None else [max(a, b) for a, b in zip(highs, hi)]
        ranges = [(lo, max(hi, lo + 1)) for lo, hi in zip(lows, highs)]  # constriction needs >= 2 symbols
        for lo, hi in ranges:
            if hi - lo + 1 > MAX_ALPHABET:
                raise FlowlabError(f"a latent spans {lo}..{hi}, more than {MAX_ALPHABET} symbols; the model has diverged")
        coder = constriction.stream.stack.AnsCoder()
        model_nats = np.zeros(x.shape[0])
        for s, e in reversed(chunks):  # pass 2: push latents, last chunk first
            for (dist, y), (lo, hi) in zip(self.latents(x[s:e].double()), ranges):
                model_nats[s:e] -= dist.log_prob(y).reshape(e - s, -1).sum(dim=1).numpy()
                symbols = (y.reshape(-1) - lo).to(torch.int32).numpy()
                coder.encode_reverse(symbols, _CATEGORICAL, self._probabilities(dist, lo, hi))
        header = Header(x.shape[0], self.shape, self.num_bits, self.chunk, self.fingerprint,
                        images_crc(x.numpy()), ranges)
        words = coder.get_compressed()
        return EncodeResult(pack(header, words), model_nats / math.log(2.0), 4 * words.size)

    # --- decode ------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, blob: bytes) -> np.ndarray:
        header, words = unpack(blob)
        if header.model_hash != self.fingerprint:
            raise FlowlabError("this file was encoded with a different model (weights fingerprint mismatch)")
        if tuple(header.shape) != self.shape or header.num_bits != self.num_bits:
            raise FlowlabError(f"file holds {header.num_bits}-bit images of shape {header.shape}; "
                               f"the model expects {self.num_bits}-bit {self.shape}")
        if len(header.ranges) != self.n_latents:
            raise FlowlabError(f"file has {len(header.ranges)} latents, the model {self.n_latents}")
        coder = constriction.stream.stack.AnsCoder(words)
        out = [self._decode_chunk(coder, e - s, header.ranges) for s, e in self._chunks(header.n_images, header.chunk)]
        if not coder.is_empty():
            raise FlowlabError("corrupt file: data left over after decoding every image")
        images = np.concatenate(out)
        if images_crc(images) != header.images_crc:
            raise FlowlabError("decoded images do not match the encoded ones (image checksum mismatch)")
        return images

    def _pop(self, coder, dist, lo: int, hi: int) -> torch.Tensor:
        symbols = coder.decode(_CATEGORICAL, self._probabilities(dist, lo, hi))
        return torch.from_numpy(symbols.astype(np.float64) + lo).reshape(dist.shape)

    def _decode_chunk(self, coder, b: int, ranges) -> np.ndarray:
        """``Flow.decode``, popping each factored-out latent when the flow reaches its layer."""
        *split_ranges, top_range = ranges
        top = self._pop(coder, self.model.base.distribution(b), *top_range)

        def pop_latent(layer, kept):
            return self._pop(coder, layer.latent_distribution(kept.contiguous()), *split_ranges.pop())

        z = self.model.decode(top, pop_latent)
        if not torch.equal(z, torch.round(z)) or z.min() < 0 or z.max() >= 2 ** self.num_bits:
            raise FlowlabError("corrupt file or wrong model: decoded pixels are outside the image range")
        return z.to(torch.uint8).numpy()
