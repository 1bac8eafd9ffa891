"""Tests of models/nets/dropout.py: the distribution of the CPU mask, E[y] = x, its layout,
derivatives of every order, repeatability under a seed, and what the backward keeps."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.nets.dropout import Dropout, drop_mask, dropout


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5])
def test_each_element_drops_with_probability_p_and_the_mean_is_kept(p):
    torch.manual_seed(0)
    n = 2 ** 21
    x = torch.ones(n)
    y = dropout(x, p)
    dropped = (y == 0).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(dropped - p) < 5 * sigma
    assert abs(y.double().mean().item() - 1.0) < 5 * sigma / (1 - p)  # E[y] = x: the scale is 1 / P(keep)
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p)), rtol=1e-6)


def test_the_mask_words_are_uniform_in_both_halves():
    """Each 64-bit word gives two 32-bit uniforms: both halves drop at the same rate, independently."""
    torch.manual_seed(1)
    n, p = 2 ** 21, 0.3
    drop = drop_mask(torch.empty(n), round(p * 2 ** 32))
    low, high = drop[0::2].double(), drop[1::2].double()
    sigma = math.sqrt(p * (1 - p) / (n // 2))
    assert abs(low.mean().item() - p) < 5 * sigma and abs(high.mean().item() - p) < 5 * sigma
    assert abs((low * high).mean().item() - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / (n // 2))


def test_an_nhwc_activation_gets_an_nhwc_output_and_the_same_rate():
    torch.manual_seed(2)
    x = torch.randn(8, 16, 32, 32).contiguous(memory_format=torch.channels_last)
    y = dropout(x, 0.25)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    assert abs((y == 0).double().mean().item() - 0.25) < 5 * math.sqrt(0.25 * 0.75 / y.numel())
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.75)


def test_eval_mode_and_p0_are_the_identity_and_p1_drops_everything():
    x = torch.randn(4, 3, 5, 5)
    layer = Dropout(0.4).eval()
    assert layer(x) is x
    assert dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    with pytest.raises(ValueError):
        Dropout(1.5)


def test_derivatives_of_every_order_with_a_fixed_mask(float64):
    x = torch.randn(3, 4, 5, 6, requires_grad=True)

    def f(t):
        torch.manual_seed(3)
        return dropout(t, 0.3) ** 2  # a non-linear use, so second derivatives are not trivially 0

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))
    torch.manual_seed(3)
    y = dropout(x, 0.3)
    (g,) = torch.autograd.grad(y.sum(), x)
    kept = y.detach() != 0  # (x is never exactly 0 here)
    assert torch.equal(g != 0, kept) and torch.allclose(g[kept], torch.full_like(g[kept], 1 / 0.7))


def test_the_same_seed_gives_the_same_mask_and_the_backward_keeps_booleans():
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    torch.manual_seed(4)
    a = dropout(x, 0.2)
    torch.manual_seed(4)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        b = dropout(x, 0.2)
    assert torch.equal(a, b)
    assert saved == [torch.bool]  # one byte per element, where nn.Dropout keeps a float mask


def test_the_function_is_nn_dropouts():
    """Same function as F.dropout up to the draws: kept elements scaled by 1 / (1 - p), dropped ones 0,
    in bf16 as well."""
    torch.manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(64, 64).to(dtype)
        ours, theirs = dropout(x, 0.5), F.dropout(x, 0.5)
        assert ours.dtype == theirs.dtype == dtype
        for y in (ours, theirs):
            kept = y != 0
            assert torch.allclose(y[kept].float(), (x[kept] * 2).float())
