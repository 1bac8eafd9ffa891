"""``models/nets/dense_block.py``: IDF's dense block computed in one shared buffer.

It must be the layer-by-layer module's map with its gradients (input and every parameter) in
either memory layout and under bf16 autocast, pass gradcheck, keep the input's layout, run
without autograd, and keep about half the activations the layer-by-layer module keeps."""
from __future__ import annotations

import pytest
import torch

from models.nets.batch_map import is_nhwc
from models.nets.dense_block import shared_buffer_dense_block
from models.nets.densenet import DenseNet

LAYOUTS = [torch.contiguous_format, torch.channels_last]


def layer_by_layer(net: DenseNet, x: torch.Tensor) -> torch.Tensor:
    """The block as the plain module computes it: x_{d+1} = cat(x_d, layer_d(x_d))."""
    return net.block(x)


def small_net(c_in=5, growth_total=13, depth=3, seed=0):
    torch.manual_seed(seed)
    net = DenseNet(c_in, 4, hidden_channels=growth_total, depth=depth)
    for p in net.parameters():  # away from ReLU's kink at 0 for gradcheck; the zero-initialised out conv too
        torch.nn.init.normal_(p, std=0.5)
    return net


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shared_buffer_block_is_the_layer_by_layer_map_with_its_gradients(layout, float64):
    net = small_net()
    x = torch.randn(3, 5, 6, 7).contiguous(memory_format=layout).requires_grad_()
    expected, got = layer_by_layer(net, x), shared_buffer_dense_block(x, net.block)
    assert got.shape == (3, 5 + 13, 6, 7) and is_nhwc(got) == (layout == torch.channels_last)
    assert torch.allclose(got, expected, atol=1e-12)
    upstream = torch.randn_like(expected)
    inputs = [x, *net.block.parameters()]
    for a, b in zip(torch.autograd.grad(got, inputs, upstream), torch.autograd.grad(expected, inputs, upstream)):
        assert torch.allclose(a, b, atol=1e-10)


def test_shared_buffer_block_passes_gradcheck(float64):
    net = small_net(c_in=2, growth_total=5, depth=2)
    x = torch.randn(2, 2, 4, 3, requires_grad=True)
    params = list(net.block.parameters())
    # the parameters enter through the module: check the input gradient with gradcheck and the
    # parameter gradients against finite differences of the same function
    assert torch.autograd.gradcheck(lambda x: shared_buffer_dense_block(x, net.block), (x,))
    y = shared_buffer_dense_block(x, net.block)
    upstream = torch.randn_like(y)
    grads = torch.autograd.grad(y, params, upstream)
    eps = 1e-6
    for p, g in zip(params, grads):
        for index in [(0,) * p.dim(), tuple(s - 1 for s in p.shape)]:
            with torch.no_grad():
                p[index] += eps
                up = (shared_buffer_dense_block(x, net.block) * upstream).sum()
                p[index] -= 2 * eps
                down = (shared_buffer_dense_block(x, net.block) * upstream).sum()
                p[index] += eps
            assert float(g[index]) == pytest.approx(float(up - down) / (2 * eps), rel=1e-6, abs=1e-8)


def test_under_bf16_autocast_it_computes_as_the_module_does():
    net = small_net(c_in=6, growth_total=24, depth=3)
    x = torch.randn(2, 6, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = layer_by_layer(net, x)
        got = shared_buffer_dense_block(x, net.block)
    # torch.cat promotes the float32 input with the bf16 growth: a float32 buffer
    assert got.dtype == expected.dtype == torch.float32
    assert torch.equal(got, expected)
    upstream = torch.randn_like(expected)
    inputs = [x, *net.block.parameters()]
    for a, b in zip(torch.autograd.grad(got, inputs, upstream), torch.autograd.grad(expected, inputs, upstream)):
        assert a.dtype == b.dtype
        assert torch.allclose(a, b, rtol=2e-2, atol=2e-2 * float(b.abs().max()))


def test_without_autograd_it_is_the_same_map_and_keeps_no_graph():
    net = small_net()
    x = torch.randn(2, 5, 6, 6)
    with torch.no_grad():
        got = shared_buffer_dense_block(x, net.block)
        assert torch.allclose(got, layer_by_layer(net, x), atol=1e-6)
    assert got.grad_fn is None
    frozen = x.requires_grad_(False)
    for p in net.parameters():
        p.requires_grad_(False)
    assert shared_buffer_dense_block(frozen, net.block).grad_fn is None


def _saved_bytes(fn, *args) -> int:
    seen, total = set(), [0]

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total[0] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return total[0], out


def test_it_keeps_the_buffer_and_the_hidden_activations_only():
    """Saved: x_L and each a_d (plus the weights); the module also keeps every concatenation x_d
    and every g_d: for IDF's shapes about twice as much."""
    torch.manual_seed(0)
    net = DenseNet(6, 6, hidden_channels=96, depth=6)
    x = torch.randn(4, 6, 8, 8, requires_grad=True)
    weights = sum(p.numel() * p.element_size() for p in net.block.parameters())
    conv_weights = sum(p.numel() * p.element_size() for n, p in net.block.named_parameters() if n.endswith("weight"))
    plain, _ = _saved_bytes(layer_by_layer, net, x)
    shared, out = _saved_bytes(shared_buffer_dense_block, x, net.block)
    channels = [6 + 16 * d for d in range(6)]  # c_d: the 1x1 convolution's width in layer d
    per_channel = 4 * 8 * 8 * 4  # bytes of one channel of the batch
    assert shared - weights == (sum(channels) + out.shape[1]) * per_channel
    assert plain - conv_weights == (2 * sum(channels) + 96) * per_channel  # x_d, a_d, g_d
    assert shared - weights < 0.6 * (plain - conv_weights)
