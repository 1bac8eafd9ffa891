"""``models/nets/narrow_conv2d.py``: a 'same' convolution to a few output channels as one GEMM.

It must equal F.conv2d (values and NHWC layout) for odd kernels with and without bias, be chosen
only where its bounds say (NHWC, CPU, k^2 C_out <= 32, enough pixels, 'same' padding), and
``models.nets.conv2d.conv2d`` must take it only without autograd."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models.nets.conv2d as conv2d_module
from models.nets.narrow_conv2d import MIN_PIXELS, narrow_output_conv2d, use_narrow_output

NHWC = torch.channels_last


def batch(c_in=4, n=16, hw=32):
    return torch.randn(n, c_in, hw, hw).contiguous(memory_format=NHWC)


@pytest.mark.parametrize("c_out,k", [(1, 3), (3, 3), (1, 5)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_it_equals_conv2d_in_value_and_layout(c_out, k, with_bias, float64):
    x = batch(n=2, hw=9)
    weight, bias = torch.randn(c_out, 4, k, k), (torch.randn(c_out) if with_bias else None)
    got = narrow_output_conv2d(x, weight, bias)
    expected = F.conv2d(x, weight, bias, padding=k // 2)
    assert got.shape == expected.shape and got.is_contiguous(memory_format=NHWC)
    assert torch.allclose(got, expected, atol=1e-12)


def test_it_is_chosen_only_within_its_bounds():
    w3 = torch.randn(3, 4, 3, 3)
    assert use_narrow_output(batch(), w3, 1)  # Residual Flows' last layer of g at 32x32, batch 16
    assert 16 * 32 * 32 == MIN_PIXELS
    assert not use_narrow_output(batch().contiguous(), w3, 1)  # NCHW: the rows are not a matrix view
    assert not use_narrow_output(batch(n=8), w3, 1)  # too few pixels for the extra passes
    assert not use_narrow_output(batch(), torch.randn(12, 4, 3, 3), 1)  # 108 columns: oneDNN's lanes are busy
    assert not use_narrow_output(batch(), w3, 0)  # not 'same' padding
    assert not use_narrow_output(batch(), torch.randn(3, 4, 1, 1), 0)  # 1x1: a plain GEMM already
    assert not use_narrow_output(batch().double(), w3, 1)  # mixed dtypes go to F.conv2d


def test_conv2d_takes_it_without_autograd_only(monkeypatch):
    taken = []
    real = conv2d_module.narrow_output_conv2d
    monkeypatch.setattr(conv2d_module, "narrow_output_conv2d", lambda *a: taken.append(1) or real(*a))
    x = batch(c_in=8)
    weight, bias = torch.randn(3, 8, 3, 3, requires_grad=True), torch.randn(3, requires_grad=True)
    with torch.no_grad():
        sampled = conv2d_module.conv2d(x, weight, bias, padding=1)
    assert taken == [1] and sampled.grad_fn is None
    trained = conv2d_module.conv2d(x, weight, bias, padding=1)
    assert taken == [1] and trained.grad_fn is not None  # with autograd: the closed-form Function
    assert torch.allclose(sampled, trained, atol=1e-5)
