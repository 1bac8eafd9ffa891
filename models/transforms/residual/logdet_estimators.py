"""Log-determinant estimators for invertible residual blocks y = x + g(x), Lip(g) < 1.

Power series (Behrmann et al. 2019, i-ResNet eq. 6), with J = dg/dx:

    log det(I + J) = sum_{k>=1} (-1)^{k+1} / k * tr(J^k)
    tr(J^k) ~= v^T J^k v,   v ~ N(0, I)             (Hutchinson; one probe per example)

v^T J^k is k vector-Jacobian products, so no Jacobian is ever formed.

* Fixed truncation (i-ResNet): the first n terms.  Biased (the tail is dropped).
* Russian roulette (Chen et al. 2019, Residual Flows Thm. 1): draw N (Poisson(lambda) on
  {0, 1, ...} or Geometric(p) on {1, 2, ...}), keep the first ``n_exact`` terms always and
  terms k = n_exact + 1 .. n_exact + N reweighted by 1 / P(N >= k - n_exact):

      estimate = sum_{k=1}^{n_exact+N} (-1)^{k+1}/k * w_k * v^T J^k v,
      w_k = 1 (k <= n_exact),  1 / P(N >= k - n_exact) (k > n_exact)

  E[1{N >= k - n_exact}] w_k = 1 for every k, so the estimate is unbiased for log det.
  N is drawn from torch's global RNG (the trainer seeds it per step and rank), so no
  estimator state lives on the modules.
* Neumann-series gradient (Residual Flows Thm. 2): d/dθ log det(I + J) =
  tr((I + J)^{-1} dJ/dθ) = sum_{k>=0} (-1)^k tr(J^k dJ/dθ), estimated with the same
  roulette weights as  [sum_k (-1)^k w_k v^T J^k] (dJ/dθ) v.  The bracket is built
  from the same vector-Jacobian products as the estimate (no graph kept); one more
  vector-Jacobian product with ``create_graph`` gives a *surrogate* scalar
  (bracket . J v) whose gradient (w.r.t. θ and x) is this estimator.  The returned ldj is
  ``estimate.detach() + surrogate - surrogate.detach()``: the right value and the
  Neumann gradient, and memory does not grow with the number of terms.
* Memory-efficient backward (Residual Flows §3.2, "backward-in-forward"):
  :class:`MemoryEfficientLogDet` computes the gradient of the (surrogate) log-det
  w.r.t. x and g's parameters *inside the forward pass* and frees the double-backward
  graph at once; only g's own graph is kept for the backward of y = x + g(x).
* Exact (brute force, small inputs): the full Jacobian from D vector-Jacobian products,
  log det(I + J) by slogdet.  For tests and diagnostics.
"""
from __future__ import annotations

import math

import torch

DISTRIBUTIONS = ("poisson", "geometric")


def survival(dist: str, param: float, j: int) -> float:
    """P(N >= j) for the roulette distribution (Poisson(lambda) on {0,..}, Geometric(p) on {1,..})."""
    if dist == "poisson":
        if j <= 0:
            return 1.0
        # the upper tail summed directly (no 1 - cdf cancellation)
        log_terms = [-param + i * math.log(param) - math.lgamma(i + 1) for i in range(j, j + 200)]
        return float(sum(math.exp(t) for t in log_terms))
    if dist == "geometric":
        return 1.0 if j <= 1 else (1.0 - param) ** (j - 1)
    raise ValueError(f"unknown roulette distribution {dist!r}; known: {DISTRIBUTIONS}")


def sample_roulette(dist: str, param: float) -> int:
    """One draw of N from torch's global CPU RNG (N is host control flow: the number of terms to
    evaluate, so it is drawn on the host whatever device the model runs on)."""
    if dist == "poisson":
        return int(torch.poisson(torch.tensor([float(param)], dtype=torch.float64, device="cpu")).item())
    if dist == "geometric":
        return int(torch.empty(1, dtype=torch.float64, device="cpu").geometric_(param).item())
    raise ValueError(f"unknown roulette distribution {dist!r}; known: {DISTRIBUTIONS}")


def roulette_weights(n_exact: int, n_extra: int, dist: str, param: float) -> list[float]:
    """Weights w_0 .. w_{n_exact + n_extra} of the roulette estimator (w_0 = 1 for Neumann)."""
    return [1.0 if k <= n_exact else 1.0 / survival(dist, param, k - n_exact) for k in range(n_exact + n_extra + 1)]


def _per_example_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).reshape(a.shape[0], -1).sum(dim=1)


def power_series_logdet(g: torch.Tensor, x: torch.Tensor, v: torch.Tensor, weights: list[float], neumann: bool,
                        need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(estimate, surrogate) of log det(I + dg/dx) per example, terms k = 1 .. len(weights) - 1.

    ``g = net(x)`` must carry a graph back to ``x``.  ``neumann=False`` backpropagates through
    the series itself (``create_graph`` on every term when ``need_grad``: memory grows with
    the number of terms) and returns (estimate, None).  ``neumann=True`` returns the detached
    estimate and, when ``need_grad``, the surrogate whose gradient is the Neumann estimator.
    """
    n = len(weights) - 1
    est = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    w = v
    if not neumann:
        for k in range(1, n + 1):
            w = torch.autograd.grad(g, x, w, create_graph=need_grad, retain_graph=True)[0]
            est = est + (-1) ** (k + 1) / k * weights[k] * _per_example_dot(w, v)
        return est, None
    neumann_vec = v.clone()
    with torch.no_grad():
        for k in range(1, n + 1):
            w = torch.autograd.grad(g, x, w, retain_graph=True)[0]
            est = est + (-1) ** (k + 1) / k * weights[k] * _per_example_dot(w, v)
            neumann_vec = neumann_vec + (-1) ** k * weights[k] * w
    if not need_grad:
        return est, None
    vjp = torch.autograd.grad(g, x, neumann_vec, create_graph=True, retain_graph=True)[0]
    return est, _per_example_dot(vjp, v)


def exact_logdet(g: torch.Tensor, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """log|det(I + dg/dx)| per example from the full Jacobian (D vector-Jacobian products)."""
    b, d = x.shape[0], x[0].numel()
    rows = []
    for i in range(d):
        e = torch.zeros(b, d, device=x.device, dtype=g.dtype)
        e[:, i] = 1.0
        rows.append(torch.autograd.grad(g, x, e.reshape(g.shape), create_graph=create_graph, retain_graph=True)[0]
                    .reshape(b, d))
    jac = torch.stack(rows, dim=1)  # (B, D_out, D_in)
    eye = torch.eye(d, device=x.device, dtype=jac.dtype)
    return torch.linalg.slogdet(eye + jac)[1]


class MemoryEfficientLogDet(torch.autograd.Function):
    """(g(x), log-det estimate) with the log-det's gradient computed during the forward pass.

    forward(x, v, net, weights, *params): runs g = net(x) and the Neumann surrogate, takes
    its gradient w.r.t. (x, params) at once (the double-backward graph is freed there),
    keeps g's graph, returns g and the detached estimate.
    backward(dL/dg, dL/dldj): the gradient through g plus dL/dldj times the stored
    log-det gradients.  The per-example x-gradient is scaled per example; the parameter
    gradient was taken of the batch *sum* of log-dets, so it is exact when every example's
    log-det gets the same weight in the loss (a mean over the batch, as the trainer's
    mean bits/dim): a different weighting raises an error instead of a wrong gradient (checked
    on the device: no host synchronisation per block).
    """

    @staticmethod
    def forward(ctx, x, v, net, weights, *params):
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            g = net(xg)
            est, surrogate = power_series_logdet(g, xg, v, weights, neumann=True, need_grad=True)
            grads = torch.autograd.grad(surrogate.sum(), (xg, *params), allow_unused=True, retain_graph=True)
        ctx.g, ctx.xg, ctx.params = g, xg, params
        grads = [torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, (xg, *params))]
        ctx.save_for_backward(*grads)
        return g.detach(), est.detach()

    @staticmethod
    def backward(ctx, grad_g, grad_ldj):
        grad_x_ld, *grad_params_ld = ctx.saved_tensors
        g, xg, params = ctx.g, ctx.xg, ctx.params
        if grad_g is None:
            grad_g = torch.zeros_like(g)
        with torch.enable_grad():
            dg = torch.autograd.grad(g, (xg, *params), grad_g, allow_unused=True)
        ctx.g = ctx.xg = None
        if grad_ldj is None:
            grad_ldj = torch.zeros(xg.shape[0], device=xg.device, dtype=xg.dtype)
        scale = grad_ldj[0]
        # checked on the device (no host sync per block on a GPU, where a failure is a device-side
        # assert that stops the run; on the CPU it raises this RuntimeError at once)
        torch._assert_async(torch.isclose(grad_ldj, scale.expand_as(grad_ldj), rtol=1e-5, atol=1e-12).all(),
                            "the memory-efficient log-det backward needs equal loss weights for every example's "
                            "log-det (e.g. a batch mean); set model.mem_efficient=false for other losses")
        grad_x = grad_ldj.reshape(-1, *([1] * (xg.dim() - 1))).to(grad_x_ld.dtype) * grad_x_ld
        if dg[0] is not None:
            grad_x = grad_x + dg[0]
        grad_params = []
        for d, ld in zip(dg[1:], grad_params_ld):
            gp = scale.to(ld.dtype) * ld
            grad_params.append(gp if d is None else gp + d)
        return (grad_x, None, None, None, *grad_params)
