"""Conditioner networks of Flow++ (Ho et al. 2019, §3.3; official ``flows/flows.py``).

concat_elu(x) = elu([x, -x])  (channels doubled)
GatedConv:      c = conv3x3(concat_elu(x)) [+ nin(concat_elu(context))];
                c = dropout(concat_elu(c));  out = x + GLU(nin_or_conv3x3(c))      (GLU: [a, b] -> a * sigmoid(b))
GatedAttention: c = nin(x + pos_emb) -> Q, K, V per head;  a = softmax(Q K^T / sqrt(d)) V;
                out = x + GLU(nin(dropout(a)))        (learned positional embedding, shared by the blocks)
GatedNIN:       the "no attention" ablation: c = nin(x + pos_emb) to 3C, max over the 3 per channel,
                out = x + GLU(nin(dropout(c)))        (the same parameters as GatedAttention)
FlowppCouplingNet: conv3x3 -> blocks x [GatedConv, LayerNorm, GatedAttention | GatedNIN, LayerNorm] -> conv3x3
DequantContextNet: x -> checkerboard halves stacked on channels -> conv3x3 to 32 -> 3 x GatedConv(conv3x3)

"nin" is a 1x1 convolution.  LayerNorm normalises over channels at each position.  Dropout is
``models.nets.dropout`` (``nn.Dropout``'s function with a cheaper mask on the CPU).
The official code initialises every conv by data-dependent weight normalisation with an
init scale of 0.1 on the residual outputs and the last layer; here the convs use
PyTorch's default init and those layers are scaled down by 0.1 instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.core.reshape import checkerboard_split
from models.nets.dropout import Dropout


def concat_elu(x: torch.Tensor) -> torch.Tensor:
    return F.elu(torch.cat([x, -x], dim=1))


def glu(x: torch.Tensor) -> torch.Tensor:
    """GLU over channels: a * sigmoid(b) for x = [a, b].  Written out rather than ``F.glu``, whose
    gradient comes back NCHW for an NHWC input (every convolution backward before it then copied
    it to NHWC): this one keeps x's layout both ways (forward and backward of a 4x192x32x16 NHWC
    activation 0.35 ms against 1.14 ms with ``F.glu`` and the copy)."""
    a, b = x.chunk(2, dim=1)
    return a * torch.sigmoid(b)


def _scale_init(conv: nn.Conv2d, factor: float) -> nn.Conv2d:
    with torch.no_grad():
        conv.weight.mul_(factor)
        conv.bias.zero_()
    return conv


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (eps 1e-5 as the official code)."""

    def __init__(self, channels: int):
        super().__init__(channels, eps=1e-5)

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GatedConv(nn.Module):
    def __init__(self, channels: int, context_channels: int = 0, use_nin: bool = True, dropout: float = 0.0):
        super().__init__()
        self.c1 = nn.Conv2d(2 * channels, channels, 3, padding=1)
        self.a_proj = nn.Conv2d(2 * context_channels, channels, 1) if context_channels else None
        self.dropout = Dropout(dropout)
        k = 1 if use_nin else 3
        self.c2 = _scale_init(nn.Conv2d(2 * channels, 2 * channels, k, padding=k // 2), 0.1)

    def forward(self, x, context=None):
        c = self.c1(concat_elu(x))
        if self.a_proj is not None:
            if context is None:
                raise ValueError("this GatedConv was built for a context and got none")
            c = c + self.a_proj(concat_elu(context))
        c = self.dropout(concat_elu(c))
        return x + glu(self.c2(c))


class GatedAttention(nn.Module):
    def __init__(self, channels: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels do not split into {heads} heads")
        self.heads = heads
        self.proj1 = nn.Conv2d(channels, 3 * channels, 1)
        self.dropout = Dropout(dropout)
        self.proj2 = _scale_init(nn.Conv2d(channels, 2 * channels, 1), 0.1)

    def forward(self, x, pos_emb):
        b, c, h, w = x.shape
        # tokens in (B, T, C) order, channels split as (3, heads, d): views of an NHWC activation (the
        # net's layout after its first LayerNorm), and q, k, v with d contiguous, as SDPA reads them
        qkv = self.proj1(x + pos_emb).permute(0, 2, 3, 1).reshape(b, h * w, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, T, d)
        a = F.scaled_dot_product_attention(q, k, v)
        a = a.transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)
        return x + glu(self.proj2(self.dropout(a)))


class GatedNIN(nn.Module):
    """Pointwise replacement of GatedAttention with the same parameter count."""

    def __init__(self, channels: int, heads: int = 0, dropout: float = 0.0):
        super().__init__()
        self.proj1 = nn.Conv2d(channels, 3 * channels, 1)
        self.dropout = Dropout(dropout)
        self.proj2 = _scale_init(nn.Conv2d(channels, 2 * channels, 1), 0.1)

    def forward(self, x, pos_emb):
        b, c, h, w = x.shape
        m = self.proj1(x + pos_emb).reshape(b, c, 3, h, w).amax(dim=2)
        return x + glu(self.proj2(self.dropout(m)))


class FlowppBlock(nn.Module):
    def __init__(self, filters, heads, dropout, context_channels, attention):
        super().__init__()
        self.conv = GatedConv(filters, context_channels, use_nin=True, dropout=dropout)
        self.ln1 = ChannelLayerNorm(filters)
        self.attn = (GatedAttention if attention else GatedNIN)(filters, heads, dropout)
        self.ln2 = ChannelLayerNorm(filters)

    def forward(self, x, pos_emb, context=None):
        x = self.ln1(self.conv(x, context))
        return self.ln2(self.attn(x, pos_emb))


class FlowppCouplingNet(nn.Module):
    """``in_channels`` -> ``out_channels`` on (H, W) = ``spatial_shape`` inputs (the positional
    embedding is learned per position, so the shape is fixed)."""
    channels_last_net = True  # train.memory_format=channels_last runs it NHWC (models.core.memory_format)

    def __init__(self, in_channels: int, out_channels: int, spatial_shape: tuple[int, int], filters: int = 96,
                 blocks: int = 10, heads: int = 4, dropout: float = 0.0, context_channels: int = 0,
                 attention: bool = True):
        super().__init__()
        self.pos_emb = nn.Parameter(0.01 * torch.randn(1, filters, *spatial_shape))
        self.proj_in = nn.Conv2d(in_channels, filters, 3, padding=1)
        self.blocks = nn.ModuleList(FlowppBlock(filters, heads, dropout, context_channels, attention) for _ in range(blocks))
        self.proj_out = _scale_init(nn.Conv2d(filters, out_channels, 3, padding=1), 0.1)

    def forward(self, x, context=None):
        h = self.proj_in(x)
        for block in self.blocks:
            h = block(h, self.pos_emb.to(h.dtype), context)
        return self.proj_out(h)


class DequantContextNet(nn.Module):
    """Context of Flow++'s dequantizer, on x scaled to [-0.5, 0.5): output (channels, H, W/2),
    the shape of one checkerboard half."""
    channels_last_net = True  # train.memory_format=channels_last runs it NHWC (models.core.memory_format)

    def __init__(self, in_channels: int, channels: int = 32, blocks: int = 3, dropout: float = 0.0):
        super().__init__()
        self.proj = nn.Conv2d(2 * in_channels, channels, 3, padding=1)
        self.blocks = nn.ModuleList(GatedConv(channels, use_nin=False, dropout=dropout) for _ in range(blocks))

    def forward(self, x):
        h = self.proj(checkerboard_split(x))
        for block in self.blocks:
            h = block(h)
        return h
