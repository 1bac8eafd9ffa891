"""FFJORD's ODE net with its Hutchinson trace, and their vector-Jacobian product, written out.

For an ``ODENet`` of "concat" 3x3 convolutions with softplus between them (FFJORD's CIFAR-10 net,
arXiv:1810.01367), with h_0 = z:

    u_l = Wx_l * h_{l-1} + b_l + t m_l,   m_l = Wt_l * 1,   h_l = softplus(u_l) (l < L),   f = u_L
    s_l = softplus'(u_l) = sigmoid(u_l),  softplus''(u_l) = s_l (1 - s_l)

(* a convolution, Wx^T * its input gradient, a (*) g its weight gradient for input a and output
gradient g).  The trace chain of the Hutchinson estimate with noise e (FFJORD §2.2):

    v_L = e,   q_{l-1} = Wx_l^T * v_l,   v_{l-1} = q_{l-1} s_{l-1},   tr = <q_0, e> per example

The adjoint (arXiv:1806.07366 App. B) needs the vector-Jacobian product of
Phi = <c_f, f> + sum_b c_tr[b] tr[b] in z, t and the weights, here in two sweeps:

    trace chain, l = 1..L:  Q_0 = c_tr e,   V_l = Wx_l * Q_{l-1},   dWx_l += Q_{l-1} (*) v_l,
                            (l < L)  Q_l = V_l s_l,   U_l = V_l q_l s_l (1 - s_l)
    net, l = L..1:          Ub_L = c_f,   dWx_l += h_{l-1} (*) Ub_l,   g_l = sum_batch Ub_l,
                            db_l = sum g_l,   dWt_l = 1 (*) t g_l,   dt += <g_l, m_l>,
                            H_{l-1} = Wx_l^T * Ub_l,   (l > 1) Ub_{l-1} = H_{l-1} s_{l-1} + U_{l-1}
                            dz = H_0

The same convolutions as autograd's double backward (6L - 1 here, 6L there) and the same
elementwise work; what goes is the autograd graph around them: building it at every evaluation of
f and running its ~60 nodes through the engine, a few milliseconds per evaluation that outweigh
the arithmetic at the 8x8 and 4x4 scales (batch 16, the 24-channel 4x4 block: a forward-solve
evaluation 2.14 -> 1.42 ms, an adjoint evaluation 5.76 -> 4.33 ms; the 3-channel 32x32 block
42.2 -> 32.9 and 107.2 -> 103.9 ms).  Tested against autograd in float64 (values and every
gradient, both layouts, the softplus threshold) and through a whole CNF training step.
Nets of other layers or activations are not covered (``supports``): they take autograd's way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.nets import conv2d
from models.nets.batch_map import is_nhwc, sum_batch
from models.nets.ode_nets import ConcatLayer, ODENet
from models.nets.softplus import Softplus

_BETA, _THRESHOLD = 1.0, 20.0


def supports(net: nn.Module) -> bool:
    """An ODENet of concat 3x3 convolutions (padding 1, with bias) and softplus."""
    return (isinstance(net, ODENet) and isinstance(net.activation, Softplus) and all(
        isinstance(layer, ConcatLayer) and isinstance(layer.layer, nn.Conv2d) and layer.layer.bias is not None
        and layer.layer.kernel_size == (3, 3) and layer.layer.padding == (1, 1) for layer in net.layers))


class _Layers:
    """Per layer: Wx in x's layout, Wt, b, and the time map m = Wt * 1 (one evaluation's constants)."""

    def __init__(self, net: nn.Module, x: torch.Tensor):
        nhwc = is_nhwc(x)
        ones = torch.ones((1, 1, *x.shape[2:]), device=x.device, dtype=x.dtype)
        self.ones, self.wx, self.wt, self.bias, self.maps = ones, [], [], [], []
        for layer in net.layers:
            w = layer.layer.weight.detach()
            wx = w[:, 1:].contiguous(memory_format=torch.channels_last) if nhwc else w[:, 1:]
            m = F.conv2d(ones, w[:, :1], padding=1)
            self.wx.append(wx)
            self.wt.append(w[:, :1])
            self.bias.append(layer.layer.bias.detach())
            self.maps.append(m.contiguous(memory_format=torch.channels_last) if nhwc else m)


def _forward(layers: _Layers, t: torch.Tensor, z: torch.Tensor, e: torch.Tensor):
    """f, the inputs h_{l-1}, the slopes s_l, and the trace chain's v_l and q_l."""
    n = len(layers.wx)
    hs, ss = [z], []
    h = z
    for l in range(n):
        shift = torch.addcmul(layers.bias[l].view(1, -1, 1, 1), layers.maps[l], t)
        u = F.conv2d(h, layers.wx[l], padding=1).add_(shift)
        if l == n - 1:
            f = u
            break
        ss.append(torch.ops.aten.softplus_backward(torch.ones((), dtype=u.dtype, device=u.device).expand_as(u), u,
                                                   _BETA, _THRESHOLD))
        h = F.softplus(u, _BETA, _THRESHOLD)
        hs.append(h)
    vs, qs = [None] * (n + 1), [None] * n  # v_l for l = 1..L, q_l for l = 0..L-1
    vs[n] = e
    for l in range(n, 0, -1):
        qs[l - 1] = conv2d._grads(vs[l], hs[l - 1], layers.wx[l - 1], 1, [True, False])[0]
        if l > 1:
            vs[l - 1] = qs[l - 1] * ss[l - 2]
    return f, hs, ss, vs, qs


def _per_example_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=tuple(range(1, a.dim())))


@torch.no_grad()
def hutchinson(net: nn.Module, t: torch.Tensor, z: torch.Tensor, e: torch.Tensor):
    """(f(t, z), e^T (df/dz) e per example)."""
    f, _, _, _, qs = _forward(_Layers(net, z), t.to(z.dtype), z, e)
    return f, _per_example_dot(qs[0], e)


@torch.no_grad()
def hutchinson_vjp(net: nn.Module, t: torch.Tensor, z: torch.Tensor, e: torch.Tensor, c_f: torch.Tensor,
                   c_tr: torch.Tensor):
    """(f, tr, dPhi/dz, dPhi/dt, {parameter: dPhi/dparameter}) for Phi = <c_f, f> + <c_tr, tr>."""
    layers = _Layers(net, z)
    t = t.to(z.dtype)
    f, hs, ss, vs, qs = _forward(layers, t, z, e)
    tr = _per_example_dot(qs[0], e)
    n = len(layers.wx)
    d_wx = [None] * n
    trace_u = [None] * n  # U_l, l = 1..L-1 (index l - 1)
    big_q = c_tr.reshape(-1, *([1] * (z.dim() - 1))).to(e.dtype) * e  # Q_0
    for l in range(1, n + 1):
        d_wx[l - 1] = conv2d._grads(vs[l], big_q, layers.wx[l - 1], 1, [False, True])[1]  # Q_{l-1} (*) v_l
        if l == n:
            break
        big_v = F.conv2d(big_q, layers.wx[l - 1], padding=1)  # V_l
        trace_u[l - 1] = torch.ops.aten.sigmoid_backward(big_v * qs[l], ss[l - 1])  # V_l q_l s_l (1 - s_l)
        big_q = big_v.mul_(ss[l - 1])  # Q_l
    grads = {}
    d_t = torch.zeros((), dtype=z.dtype, device=z.device)
    ub = c_f
    for l in range(n, 0, -1):
        layer = net.layers[l - 1].layer
        d_wx[l - 1] = d_wx[l - 1] + conv2d._grads(ub, hs[l - 1], layers.wx[l - 1], 1, [False, True])[1]
        g = sum_batch(ub)
        d_wt = conv2d._grads(g * t, layers.ones, layers.wt[l - 1], 1, [False, True])[1]
        grads[layer.weight] = torch.cat([d_wt, d_wx[l - 1].contiguous()], dim=1)
        grads[layer.bias] = g.sum(dim=(0, 2, 3))
        d_t = d_t + (g * layers.maps[l - 1]).sum()
        h_grad = conv2d._grads(ub, hs[l - 1], layers.wx[l - 1], 1, [True, False])[0]  # H_{l-1}
        if l > 1:
            ub = h_grad.mul_(ss[l - 2]).add_(trace_u[l - 2])
    return f, tr, h_grad, d_t, grads
