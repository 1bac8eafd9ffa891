"""Lipschitz-constrained layers for invertible residual blocks (Behrmann et al. 2019,
i-ResNet §3; Chen et al. 2019, Residual Flows §4 and App. D).

Spectral normalisation by power iteration (Miyato et al. 2018, in the "soft" form of
Residual Flows): for a linear operator W (a dense matrix, or a convolution acting on
inputs of a fixed shape (C, H, W), including its padding),

    v <- W^T u / ||W^T u||,   u <- W v / ||W v||        (power iteration on W^T W)
    sigma = u^T W v  ~= ||W||_2                         (a lower bound, tight at convergence)
    W_hat = W / max(1, sigma / coeff)                    so ||W_hat||_2 <= coeff

The weight is only rescaled when its norm exceeds ``coeff`` (0.98 for Residual Flows,
0.9 for i-ResNet).  With LipSwish (or ELU/ReLU) between layers, each 1-Lipschitz,
Lip(g) <= prod_l ||W_hat_l||_2 <= coeff^L < 1.

State and consistency
---------------------
``u`` and ``v`` are buffers: they are saved in checkpoints (a resumed run continues
from the same vectors) and copied, not averaged, by EMA.  ``forward`` never changes
them: in training it uses the stored vectors (sigma = u^T W v is differentiable in W,
so the gradient sees the normalisation); the vectors are refined in
:func:`power_iterate`, which the model calls from the trainer's
``after_optimizer_step`` hook, i.e. once after every optimizer step, until the RMS change
of both vectors falls below ``atol + rtol * max|vector|`` or ``max_iters`` is reached; it
steps all of a model's layers together and reads their stopping tests once per round.

Under DDP every rank holds identical weights after the optimizer step (gradients are
all-reduced) and identical ``u, v`` (same initial vectors from the seeded build, same
checkpoint on resume), and power iteration is deterministic (no random draws, a
data-independent stopping rule evaluated on identical numbers), so the vectors stay
identical on every rank without any communication; the trainer does not broadcast
buffers.  Lipschitz coefficients are plain floats, never parameters (a parameter
without gradient breaks DDP).

In eval mode (test bits/dim, sampling, possibly with EMA weights swapped in) the stored
vectors may lag the weights, so sigma is refined by power iteration on local copies of
the vectors (buffers untouched) and cached for as long as the weight and the buffers
are unchanged (``Tensor._version``): a pure function of (W, u, v).  One exception: when
:func:`power_iterate` stopped on its tolerance test for this very weight and these very
vectors (the trainer's hook after every optimizer step), they do not lag, and sigma is
u^T W v as the next training forward would use it, without another round (which would
only repeat the passed test: on a GPU one host read per layer, and at Residual Flows'
paper config 0.4 s of the first sample call after training on the 2-core CPU).

Induced mixed norms (Residual Flows §4.3 / App. D, ``vnorms``): with ``domain = p`` and
``codomain = q`` the same iteration, generalised with dual vectors (see ``SpectralNormBase._step_``),
estimates ||W||_{p->q}, and W is rescaled so that ||W_hat||_{p->q} <= coeff.  Chaining
layers whose codomain is the next layer's domain, with first domain = last codomain,
bounds Lip(g) in that norm (element-wise 1-Lipschitz activations are 1-Lipschitz in every
p-norm).  The default is the 2-norm everywhere ('2222').  Learnable p is not implemented.

Closed forms (no iteration): an induced norm from the 1-norm is the largest column
q-norm, ||W||_{1->q} = max_j ||W e_j||_q, and one into the inf-norm is the largest row
p*-norm, ||W||_{p->inf} = max_i ||W_i||_{p*} (Hoelder).  For a stride-1 zero-padded
convolution on an image at least as large as its kernel, the column of input (c, i, j)
at an interior position is the whole kernel slice W[:, c] and the row of output
(o, i, j) is W[o]; border positions see truncated slices with smaller norms, so
    ||conv||_{1->q} = max_c ||W[:, c]||_q,      ||conv||_{p->inf} = max_o ||W[o]||_{p*}
exactly, and the same formulas hold for dense matrices (kernel size 1).  These layers
keep their ``u, v`` buffers (unused) so every layer has the same state.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.nets.conv2d import conv2d


def _conjugate(r: float) -> float:
    """r* with 1/r + 1/r* = 1 (1 and inf are each other's conjugate)."""
    if r == 1.0:
        return math.inf
    if r == math.inf:
        return 1.0
    return r / (r - 1.0)


def _normalize(x: torch.Tensor, r: float) -> torch.Tensor:
    return x / x.norm(p=r).clamp_min(1e-30)


def _dual(x: torch.Tensor, r: float) -> torch.Tensor:
    """The unit r*-norm vector d with <d, x> = ||x||_r:  d = sign(x) |x|^(r-1) / ||x||_r^(r-1)."""
    if r == 2.0:
        return F.normalize(x, dim=0)
    y = x / x.abs().max().clamp_min(1e-30)  # scale-free, avoids overflow of |x|^(r-1)
    d = y.sign() * y.abs().pow(r - 1.0)
    return _normalize(d, _conjugate(r))


class SpectralNormBase(nn.Module):
    """Shared power-iteration logic; subclasses define the operator W and its adjoint."""

    def __init__(self, coeff: float, atol: float, rtol: float, max_iters: int, init_iters: int,
                 domain: float = 2.0, codomain: float = 2.0):
        # init_iters: power iterations at construction (cheap: the model's data_init hook
        # then runs them to the tolerance before training starts)
        super().__init__()
        if not 0 < coeff:
            raise ValueError("spectral normalisation needs coeff > 0")
        for r in (domain, codomain):
            if not 1.0 <= float(r) <= math.inf:
                raise ValueError(f"induced norms need 1 <= p <= inf, got {r}")
        self.domain, self.codomain = float(domain), float(codomain)
        # ||W||_{1->q} and ||W||_{p->inf} have closed forms (module docstring): no power iteration
        self.closed_form = self.domain == 1.0 or self.codomain == math.inf
        self.coeff, self.atol, self.rtol = float(coeff), float(atol), float(rtol)
        self.max_iters, self.init_iters = int(max_iters), int(init_iters)
        self.last_iters = 0  # diagnostics only
        self._eval_cache = None
        self._eval_weight_cache = None
        self._converged_key = None  # _eval_key() of the last (W, u, v) power_iterate's test passed on

    def _reset_weight(self, fan_in: int) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(fan_in)
        nn.init.uniform_(self.bias, -bound, bound)

    def _init_vectors(self, u_numel: int, v_numel: int) -> None:
        norms = (2.0, 2.0) if self.closed_form else (_conjugate(self.codomain), self.domain)
        self.register_buffer("u", _normalize(torch.randn(u_numel), norms[0]))
        self.register_buffer("v", _normalize(torch.randn(v_numel), norms[1]))
        self.power_iteration(self.init_iters)

    def _closed_form_sigma(self, weight: torch.Tensor) -> torch.Tensor:
        """max column q-norm (domain 1) or max row p*-norm (codomain inf) of the operator."""
        w = weight.reshape(weight.shape[0], weight.shape[1], -1)  # (out, in, kernel positions)
        if self.domain == 1.0:
            columns = w.transpose(0, 1).reshape(w.shape[1], -1)
            return torch.linalg.vector_norm(columns, ord=self.codomain, dim=1).max()
        rows = w.reshape(w.shape[0], -1)
        return torch.linalg.vector_norm(rows, ord=_conjugate(self.domain), dim=1).max()

    # operator interface: W v (flat -> flat) and W^T u
    def _mv(self, weight, v):
        raise NotImplementedError

    def _rmv(self, weight, u):
        raise NotImplementedError

    def affine(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """This layer's map with the given weight and bias (``forward`` passes W_hat and b;
        ``models.nets.resflow_nets`` passes them rescaled by the activations around it)."""
        raise NotImplementedError

    def forward(self, x):
        return self.affine(x, self.normalized_weight().to(x.dtype), self.bias.to(x.dtype))

    def _step_(self, weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        """One power-iteration step from (u, v), written into u and v; returns the stopping test
        as a 0-d bool tensor on the device (None without tolerances: a fixed count).

        Generalised to ||W||_{p->q} (p = domain, q = codomain; Boyd 1974, Higham 1992):
            v <- dual_{p*}(W^T u)    (the unit p-norm vector maximising <v, W^T u>)
            u <- dual_q(W v)         (the unit q*-norm vector with <u, W v> = ||W v||_q)
        so u^T W v = ||W v||_q / ||v||_p, a lower bound on ||W||_{p->q}, increasing along the
        iteration.  For p = q = 2 both duals are x / ||x||_2: plain power iteration.  The test:
        the RMS change of each vector at most atol + rtol * max|new vector|."""
        v_new = _dual(self._rmv(weight, u), _conjugate(self.domain))
        u_new = _dual(self._mv(weight, v_new), self.codomain)
        done = None
        if self.atol > 0 or self.rtol > 0:
            err_u = (u_new - u).norm() / math.sqrt(u.numel())
            err_v = (v_new - v).norm() / math.sqrt(v.numel())
            done = (err_u <= self.atol + self.rtol * u_new.abs().max()) & (err_v <= self.atol + self.rtol * v_new.abs().max())
        u.copy_(u_new)
        v.copy_(v_new)
        return done

    @torch.no_grad()
    def power_iteration(self, max_iters: int | None = None) -> int:
        """Refine the stored (u, v) for the current weight; returns the iterations used."""
        power_iterate([self], max_iters)
        return self.last_iters

    def sigma(self) -> torch.Tensor:
        """u^T W v with the stored vectors, or the closed form (differentiable in W)."""
        if self.closed_form:
            return self._closed_form_sigma(self.weight)
        return torch.dot(self.u.to(self.weight.dtype), self._mv(self.weight, self.v.to(self.weight.dtype)))

    def _eval_key(self) -> tuple:
        return (self.weight._version, self.weight.data_ptr(), self.u._version, self.v._version, self.weight.dtype)

    def _eval_sigma(self) -> torch.Tensor:
        if self.closed_form:
            return self._closed_form_sigma(self.weight.detach())
        key = self._eval_key()
        if self._eval_cache is None or self._eval_cache[0] != key:
            with torch.no_grad():
                w = self.weight.detach()
                u, v = self.u.to(w.dtype, copy=True), self.v.to(w.dtype, copy=True)
                if key != self._converged_key:  # else the stored vectors passed their test on w
                    _iterate_in_step([self], [w], [u], [v], [self.max_iters])
                s = torch.dot(u, self._mv(w, v))
            self._eval_cache = (key, s)
        return self._eval_cache[1]

    def train(self, mode: bool = True):
        if mode:  # the eval-mode W_hat is a copy of the weight: not kept through training
            self._eval_weight_cache = None
        return super().train(mode)

    def normalized_weight(self) -> torch.Tensor:
        """W / max(1, sigma / coeff).  In eval mode without autograd (sampling: every
        fixed-point iteration of the inverse calls it) W_hat itself is cached with sigma,
        keyed on the same versions, until the layer is put back in training mode."""
        if self.training:
            return self.weight / torch.clamp(self.sigma() / self.coeff, min=1.0)
        sigma = self._eval_sigma()
        if torch.is_grad_enabled() or self.closed_form:
            return self.weight / torch.clamp(sigma / self.coeff, min=1.0)
        key = self._eval_key()
        if self._eval_weight_cache is None or self._eval_weight_cache[0] != key:
            self._eval_weight_cache = (key, self.weight / torch.clamp(sigma / self.coeff, min=1.0))
        return self._eval_weight_cache[1]


def _iterate_in_step(layers: list[SpectralNormBase], weights, us, vs, max_iters: list[int]) -> tuple[list[int], list[bool]]:
    """Power iteration of several layers in step, in place on ``us`` and ``vs``: every round
    steps each layer still iterating, then reads all of their stopping tests at once (one host
    read per round, none when no layer has a tolerance left to test).  Each layer stops at its
    own test or its own ``max_iters``, as it would alone.  Returns the iterations of each and
    whether it stopped on its test (False: it ran into ``max_iters``)."""
    iters, passed = [0] * len(layers), [False] * len(layers)
    active = [i for i, n in enumerate(max_iters) if n > 0]
    while active:
        tests = {}
        for i in active:
            done = layers[i]._step_(weights[i], us[i], vs[i])
            iters[i] += 1
            if done is not None and iters[i] < max_iters[i]:
                tests[i] = done
        stopped = {i for i, d in zip(tests, torch.stack(list(tests.values())).tolist()) if d} if tests else set()
        for i in stopped:
            passed[i] = True
        active = [i for i in active if iters[i] < max_iters[i] and i not in stopped]
    return iters, passed


@torch.no_grad()
def power_iterate(layers: list[SpectralNormBase], max_iters: int | None = None) -> None:
    """Refine the stored (u, v) of every layer for its current weight (``max_iters`` overrides
    each layer's own), all layers in step: one host read per round for all of them rather than
    one per layer and iteration (on a GPU each read waits for the queue to drain; at Residual
    Flows' paper config every layer stops after one iteration, so one read for 156 layers).
    The same vectors and counts as iterating each layer alone.  Closed-form norms and
    meta-device builds have nothing to iterate."""
    todo = [m for m in layers if not (m.weight.is_meta or m.closed_form)]
    weights = [m.weight.detach().to(m.u.dtype) for m in todo]
    limits = [m.max_iters if max_iters is None else int(max_iters) for m in todo]
    iters, passed = _iterate_in_step(todo, weights, [m.u for m in todo], [m.v for m in todo], limits)
    for m, it, ok in zip(todo, iters, passed):
        m.last_iters = it
        m._converged_key = m._eval_key() if ok else None


class SpectralNormLinear(SpectralNormBase):
    """y = W_hat x + b with ||W_hat||_{domain->codomain} <= coeff (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, coeff: float = 0.98, atol: float = 1e-3,
                 rtol: float = 1e-3, max_iters: int = 2000, init_iters: int = 10, domain: float = 2.0,
                 codomain: float = 2.0):
        super().__init__(coeff, atol, rtol, max_iters, init_iters, domain, codomain)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        self._reset_weight(in_features)
        self._init_vectors(out_features, in_features)

    def _mv(self, weight, v):
        return torch.mv(weight, v)

    def _rmv(self, weight, u):
        return torch.mv(weight.t(), u)

    def affine(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def extra_repr(self):
        return (f"{self.in_features}, {self.out_features}, coeff={self.coeff}, norms={self.domain}->{self.codomain}, "
                f"atol={self.atol}, rtol={self.rtol}")


class SpectralNormConv2d(SpectralNormBase):
    """Stride-1 'same' convolution with operator 2-norm <= coeff on inputs of ``in_shape``.

    The norm of a convolution depends on the input size and the zero padding, so the
    power iteration runs on the operator itself (W and W^T as convolutions of one image
    of shape ``in_shape``), not on the reshaped kernel.  A 1x1 convolution is exactly a
    matrix acting on channels, so its vectors have C_out / C_in entries.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, in_shape: tuple[int, int, int],
                 coeff: float = 0.98, atol: float = 1e-3, rtol: float = 1e-3, max_iters: int = 2000,
                 init_iters: int = 10, domain: float = 2.0, codomain: float = 2.0):
        super().__init__(coeff, atol, rtol, max_iters, init_iters, domain, codomain)
        if kernel_size % 2 != 1:
            raise ValueError("SpectralNormConv2d needs an odd kernel size ('same' padding)")
        c, h, w = in_shape
        if c != in_channels:
            raise ValueError(f"in_shape {in_shape} does not have {in_channels} channels")
        if self.closed_form and min(h, w) < kernel_size:
            raise ValueError(f"the closed-form 1/inf induced norms need images at least {kernel_size} pixels wide")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.padding, self.spatial = kernel_size // 2, (h, w)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self._reset_weight(in_channels * kernel_size * kernel_size)
        if kernel_size == 1:
            self._init_vectors(out_channels, in_channels)
        else:
            self._init_vectors(out_channels * h * w, in_channels * h * w)

    def _mv(self, weight, v):
        if self.kernel_size == 1:
            return torch.mv(weight.reshape(self.out_channels, self.in_channels), v)
        out = F.conv2d(v.reshape(1, self.in_channels, *self.spatial), weight, padding=self.padding)
        return out.reshape(-1)

    def _rmv(self, weight, u):
        if self.kernel_size == 1:
            return torch.mv(weight.reshape(self.out_channels, self.in_channels).t(), u)
        # W^T of a stride-1 'same' convolution is the convolution with the flipped kernel, channels
        # swapped: conv_transpose2d(u, W, p) = conv2d(u, flip(W)^T, p).  oneDNN runs the latter;
        # CPU conv_transpose2d takes a slow path (7.6 vs 0.24 ms for 3 <- 512 at 32x32, one image)
        out = F.conv2d(u.reshape(1, self.out_channels, *self.spatial), weight.flip(2, 3).transpose(0, 1),
                       padding=self.padding)
        return out.reshape(-1)

    def affine(self, x, weight, bias):
        return conv2d(x, weight, bias, padding=self.padding)  # closed-form second derivatives (conv2d.py)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, in_hw={self.spatial}, "
                f"coeff={self.coeff}, norms={self.domain}->{self.codomain}, atol={self.atol}, rtol={self.rtol}")
