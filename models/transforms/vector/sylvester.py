"""Sylvester normalizing flows (van den Berg, Hasenclever, Tomczak & Welling 2018).

    f(z) = z + Q R h(R~ Q^T z + b),   h = tanh
    log|det df/dz| = sum_i log|1 + h'(s_i) R_ii R~_ii|,   s = R~ Q^T z + b

Q (D x M) has orthonormal columns; R, R~ (M x M) are upper triangular.  Invertibility
(paper, Theorem 2): R_ii R~_ii > -1 / ||h'||_inf = -1; we set R_ii = tanh(.), R~_ii = tanh(.),
so the product lies in (-1, 1) and every factor of the determinant is positive.

Variants of Q:
  "orthogonal"   (O-SNF): Q from a free D x M matrix A by the iterative
                  orthogonalisation Q <- Q (I + (I - Q^T Q) / 2), started at A / ||A||_2
                  and run until max |Q^T Q - I| < ``ortho_tol`` (at most ``ortho_steps`` steps);
  "householder"  (H-SNF): Q = H_1 ... H_K, H_k = I - 2 v_k v_k^T / |v_k|^2 (M = D);
  "triangular"   (T-SNF): Q = identity, or the reversal permutation when ``flip`` (M = D;
                  alternate ``flip`` between layers).

No closed-form inverse (``exact_inverse = False``).  ``inverse`` solves it exactly up to
bisection tolerance: with v = Q^T z, Q^T y = v + R h(R~ v + b) is upper triangular in v,
so v_M, ..., v_1 are found one scalar monotone equation at a time; then
z = y - Q R h(R~ v + b).  Parameters are not amortised here (shared over examples).
"""
from __future__ import annotations

import torch
from torch import nn

from models.core.transform import Transform, compute_dtype
from models.transforms.vector.scalar_solve import solve_tanh_equation


def orthogonalize(a: torch.Tensor, steps: int = 100, tol: float = 1e-7) -> torch.Tensor:
    """Columns of ``a`` (D x M, M <= D) made orthonormal by Björck-type iterations."""
    eye = torch.eye(a.shape[1], dtype=a.dtype, device=a.device)
    tol = max(tol, 20 * torch.finfo(a.dtype).eps)  # float32 cannot get below ~1e-6
    q = a / torch.linalg.matrix_norm(a, ord=2).clamp_min(1e-12)
    for _ in range(steps):
        err = eye - q.T @ q
        if err.abs().max() < tol:
            break
        q = q @ (eye + 0.5 * err)
    return q


class SylvesterFlow(Transform):
    exact_inverse = False  # inverse by back-substitution with bisection

    def __init__(self, dim: int, kind: str = "orthogonal", num_ortho_vecs: int | None = None,
                 num_householder: int | None = None, flip: bool = False,
                 ortho_steps: int = 100, ortho_tol: float = 1e-7):
        super().__init__()
        if kind not in ("orthogonal", "householder", "triangular"):
            raise ValueError(f"unknown Sylvester kind {kind!r}")
        self.dim, self.kind, self.flip = dim, kind, flip
        self.ortho_steps, self.ortho_tol = ortho_steps, ortho_tol
        m = (num_ortho_vecs or dim) if kind == "orthogonal" else dim
        if m > dim:
            raise ValueError("num_ortho_vecs must be <= dim")
        self.m = m
        if kind == "orthogonal":
            q = torch.linalg.qr(torch.randn(dim, m))[0] + 0.1 * torch.randn(dim, m)
            self.q_raw = nn.Parameter(q.contiguous())  # row-major (LAPACK's Q is column-major), as every parameter
        elif kind == "householder":
            self.v = nn.Parameter(torch.randn(num_householder or dim, dim))
        self.r_off = nn.Parameter(0.1 * torch.randn(m, m))
        self.rt_off = nn.Parameter(0.1 * torch.randn(m, m))
        self.r_diag = nn.Parameter(0.5 + 0.1 * torch.randn(m))
        self.rt_diag = nn.Parameter(0.5 + 0.1 * torch.randn(m))
        self.b = nn.Parameter(0.1 * torch.randn(m))
        self.register_buffer("triu", torch.triu(torch.ones(m, m), 1))

    def q(self, dtype=torch.float32) -> torch.Tensor:
        if self.kind == "orthogonal":
            return orthogonalize(self.q_raw.to(dtype), self.ortho_steps, self.ortho_tol)
        if self.kind == "householder":
            q = torch.eye(self.dim, dtype=dtype, device=self.r_off.device)
            for v in self.v.to(dtype):
                q = q - 2 * torch.outer(q @ v, v) / (v @ v).clamp_min(1e-12)
            return q
        eye = torch.eye(self.dim, dtype=dtype, device=self.r_off.device)
        return eye.flip(1) if self.flip else eye

    def rs(self, dtype=torch.float32):
        """(R, R~): upper triangular with diagonals tanh(.) (invertibility constraint)."""
        triu = self.triu.to(dtype)
        r = self.r_off.to(dtype) * triu + torch.diag(torch.tanh(self.r_diag.to(dtype)))
        rt = self.rt_off.to(dtype) * triu + torch.diag(torch.tanh(self.rt_diag.to(dtype)))
        return r, rt

    def forward(self, x, context=None):
        dtype = compute_dtype(x)
        q, (r, rt), b = self.q(dtype), self.rs(dtype), self.b.to(dtype)
        xc = x.to(dtype)
        s = (xc @ q) @ rt.T + b                     # (B, M): R~ Q^T x + b
        t = torch.tanh(s)
        z = xc + (t @ r.T) @ q.T                    # x + Q R h(s)
        diag = 1 + (1 - t * t) * torch.diagonal(r) * torch.diagonal(rt)
        return z.to(x.dtype), torch.log(diag.abs()).sum(dim=1)

    @torch.no_grad()
    def inverse(self, z, context=None, *, temperature=1.0, iters: int = 80):
        dtype = compute_dtype(z)
        q, (r, rt), b = self.q(dtype), self.rs(dtype), self.b.to(dtype)
        y = z.to(dtype)
        c = y @ q                                   # Q^T y = v + R h(R~ v + b)
        v = torch.zeros_like(c)
        h = torch.zeros_like(c)
        for d in range(self.m - 1, -1, -1):
            k = (v[:, d + 1:] @ rt[d, d + 1:]) + b[d]
            target = c[:, d] - h[:, d + 1:] @ r[d, d + 1:]
            v[:, d] = solve_tanh_equation(target, r[d, d], rt[d, d], k, iters)
            h[:, d] = torch.tanh(rt[d, d] * v[:, d] + k)
        return (y - (h @ r.T) @ q.T).to(z.dtype)
