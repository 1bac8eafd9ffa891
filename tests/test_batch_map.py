"""``models/nets/batch_map.py``: one (1, C, H, W) map added to every image of a batch.

add_batch_map(y, m) must equal y + m in value and in both gradients (dL/dy = g, dL/dm = sum_b g_b)
in either memory layout of the batch, keep the batch's layout, and skip the map's gradient when
nothing asks for it; sum_batch must equal the plain batch sum in both layouts."""
from __future__ import annotations

import pytest
import torch

from models.nets.batch_map import add_batch_map, is_nhwc, sum_batch

LAYOUTS = [torch.contiguous_format, torch.channels_last]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sum_batch_is_the_batch_sum_in_either_layout(layout, float64):
    g = torch.randn(4, 5, 3, 6).contiguous(memory_format=layout)
    assert torch.allclose(sum_batch(g), g.sum(0, keepdim=True), atol=1e-12)
    assert sum_batch(g).shape == (1, 5, 3, 6)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("map_layout", LAYOUTS)
def test_add_batch_map_equals_the_broadcast_sum_and_its_gradients(layout, map_layout, float64):
    x = torch.randn(4, 5, 3, 6).contiguous(memory_format=layout).requires_grad_()
    m = torch.randn(1, 5, 3, 6).contiguous(memory_format=map_layout).requires_grad_()
    g = torch.randn(4, 5, 3, 6)
    y = add_batch_map(x * 2, m)  # a fresh batch, as a layer's output
    assert is_nhwc(y) == (layout == torch.channels_last)  # the batch keeps its layout
    expected = x * 2 + m
    assert torch.allclose(y, expected, atol=1e-12)
    dx, dm = torch.autograd.grad(y, (x, m), g)
    ex, em = torch.autograd.grad(expected, (x, m), g)
    assert torch.allclose(dx, ex, atol=1e-12) and torch.allclose(dm, em, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: add_batch_map(a * 1.0, b), (x.detach().requires_grad_(), m))


def test_add_batch_map_skips_the_map_gradient_nobody_asks_for(float64, monkeypatch):
    import models.nets.batch_map as batch_map
    calls = []
    monkeypatch.setattr(batch_map, "sum_batch", lambda g: calls.append(g) or g.sum(0, keepdim=True))
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    m = torch.randn(1, 3, 4, 4, requires_grad=True)
    (dx,) = torch.autograd.grad(add_batch_map(x * 1.0, m).sum(), (x,))
    assert torch.equal(dx, torch.ones_like(x)) and calls == []
    torch.autograd.grad(add_batch_map(x * 1.0, m).sum(), (m,))
    assert len(calls) == 1
