"""Argmax surjections for categorical data (Argmax Flows, Hoogeboom et al. 2021; SurVAE Flows).

Each categorical variable x in {0, ..., K-1} (one per sub-pixel) is lifted to E continuous
dimensions z with a generative map x = decode(z) that is many-to-one.  The variational
inference surjection draws z ~ q(z | x) supported only where decode(z) = x:

    v ~ q(v | x)           a learned conditional flow (``ConditionalNoise``)
    z = threshold_x(v)     a bijection of v onto the region {decode(z) = x}
    log q(z | x) = log q(v | x) - log|det d threshold_x / d v|
    ldj = -log q(z | x),   so  E_q[log p(z) + ldj] <= log P(x)    (and the IW bound tightens it)

Encodings (one variable; the layer works on all C*H*W of them at once):

* :class:`OneHotEncoding` (E = K, decode = argmax):  T = v_x,  z_x = T,
  z_i = T - softplus(T - v_i) for i != x, so z_i < z_x;  log|det| = sum_{i != x} log sigmoid(T - v_i).
* :class:`BinaryEncoding` (E = ceil(log2 K), decode = bits of sign(z), most significant first):
  z_j = (2 b_j(x) - 1) softplus(v_j);  log|det| = sum_j log sigmoid(v_j).
  For K not a power of two the codes K..2^E-1 are never produced by q; ``decode`` maps them
  to K - 1 (clamp).  The model's mass on those codes is simply lost to P, so the bound is
  still a lower bound on the probability the sampler gives x.

Both guard float rounding so that decode(z) == x holds for every sample: non-maximal
one-hot coordinates stay at least one ulp below T, binary magnitudes at least the smallest
normal float.  The layer maps (B, C, H, W) integers to (B, C*E, H, W), the E dims of each
input channel adjacent (channel c*E + e).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.core.transform import Transform, compute_dtype, sum_except_batch
from models.transforms.surjections.conditional_noise import ConditionalNoise


class OneHotEncoding:
    """K dims per variable, decode = argmax."""

    def __init__(self, num_classes: int):
        if num_classes < 2:
            raise ValueError(f"an argmax surjection needs at least 2 classes, got {num_classes}")
        self.num_classes = self.dims = num_classes

    def features(self, x: torch.Tensor, dtype) -> torch.Tensor:
        """x (B, C, H, W) long -> one-hot (B, C, K, H, W) in {0, 1}."""
        return F.one_hot(x, self.num_classes).movedim(-1, 2).to(dtype)

    def threshold(self, v: torch.Tensor, x: torch.Tensor):
        """v (B, C, K, H, W) -> (z with argmax over dim 2 equal to x, log|det dz/dv| per example)."""
        is_x = self.features(x, torch.bool)
        top = v.gather(2, x.unsqueeze(2))
        gap = top - v
        # the largest float below top, with d/dtop = 1 written out (torch < 2.15 has no derivative of nextafter)
        under_top = top + (torch.nextafter(top.detach(), torch.full_like(top, -math.inf)) - top.detach())
        below = torch.minimum(top - F.softplus(gap), under_top)
        z = torch.where(is_x, top, below)
        return z, sum_except_batch(torch.where(is_x, 0.0, F.logsigmoid(gap)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z.argmax(dim=2)


class BinaryEncoding:
    """ceil(log2 K) dims per variable: the sign of z_j is bit j of x (most significant first)."""

    def __init__(self, num_classes: int):
        if num_classes < 2:
            raise ValueError(f"an argmax surjection needs at least 2 classes, got {num_classes}")
        self.num_classes = num_classes
        self.dims = math.ceil(math.log2(num_classes))

    def _powers(self, device):
        return 2 ** torch.arange(self.dims - 1, -1, -1, device=device)

    def bits(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) long -> bits (B, C, E, H, W) long."""
        return (x.unsqueeze(2) // self._powers(x.device).view(-1, 1, 1)) % 2

    def features(self, x: torch.Tensor, dtype) -> torch.Tensor:
        """The signs 2 b - 1 in {-1, +1}."""
        return (2 * self.bits(x) - 1).to(dtype)

    def threshold(self, v: torch.Tensor, x: torch.Tensor):
        magnitude = F.softplus(v).clamp(min=torch.finfo(v.dtype).tiny)
        return self.features(x, v.dtype) * magnitude, sum_except_batch(F.logsigmoid(v))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bits of sign(z) -> category; codes >= K (never drawn by q) map to K - 1."""
        code = ((z > 0).long() * self._powers(z.device).view(-1, 1, 1)).sum(dim=2)
        return code.clamp(max=self.num_classes - 1)


ENCODINGS = {"onehot": OneHotEncoding, "binary": BinaryEncoding}


class ArgmaxSurjection(Transform):
    """x (integers in 0..K-1) -> z ~ q(z | x) with decode(z) = x; ldj = -log q(z | x).

    ``noise`` draws v ~ q(v | x) with C*E channels from the encoding's features of x
    (one-hot, or the signs of the bits).  Inverse: decode(z), as floats."""

    bijective = False
    stochastic_forward = True
    exact_ldj = False

    def __init__(self, encoding: OneHotEncoding | BinaryEncoding, noise: ConditionalNoise):
        super().__init__()
        self.encoding, self.noise = encoding, noise

    @property
    def num_classes(self) -> int:
        return self.encoding.num_classes

    def forward_aux(self, x, context=None):
        dtype = compute_dtype(x) if x.is_floating_point() else torch.get_default_dtype()
        idx = x.long()
        b, c, h, w = idx.shape
        e = self.encoding.dims
        features = self.encoding.features(idx, dtype).reshape(b, c * e, h, w)
        v, log_q_v, aux = self.noise(features)
        z, log_det = self.encoding.threshold(v.to(dtype).reshape(b, c, e, h, w), idx)
        return z.reshape(b, c * e, h, w), log_det - log_q_v.to(log_det.dtype), {f"noise.{k}": a for k, a in aux.items()}

    def forward(self, x, context=None):
        z, ldj, _ = self.forward_aux(x, context)
        return z, ldj

    def inverse(self, z, context=None, *, temperature=1.0):
        b, ce, h, w = z.shape
        e = self.encoding.dims
        return self.encoding.decode(z.reshape(b, ce // e, e, h, w)).to(z.dtype)

    def output_shape(self, in_shape):
        c, h, w = in_shape
        return (c * self.encoding.dims, h, w)
