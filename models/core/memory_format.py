"""Memory layout of the conditioner networks: ``train.memory_format: contiguous | channels_last``.

A conditioner network reads a few channels, computes on many and returns a few (Glow's coupling
net 6 -> 512 -> 512 -> 12 channels, FFJORD's ODE net 3 -> 64 -> 64 -> 64 -> 3, IDF's DenseNet
6 -> 518 -> 6).  Almost all of a step's arithmetic is in its convolutions, and they run faster on
NHWC tensors on many devices (oneDNN's kernels on AVX-512 CPUs, cuDNN's tensor-core kernels on GPUs;
the NCHW kernels of the same convolutions reorder the data internally).

``channels_last``: every module whose class declares ``channels_last_net = True`` gets its 4-D
floating inputs converted to ``torch.channels_last`` on entry and its 4-D outputs back to contiguous
NCHW on exit (forward hooks, ``set_memory_format``).  The wide activations inside the network are
NHWC throughout (convolutions, elementwise layers and channel concatenations keep the layout), the
two copies per call are of narrow tensors, and the flow's own stream (squeezes, channel splits, the
invertible 1x1 convolutions, log-determinants, priors) stays NCHW.  The map is the same; only the
summation order inside a convolution differs (float rounding).  Parameters, ``state_dict`` and
checkpoints do not change, so the option can differ between training, evaluation and sampling.
Random draws inside a network follow its memory order: dropout masks differ between the two layouts
(equally distributed, not the same draws).

A module that lays out its own state instead (it defines ``use_memory_format(name)``) gets that
call and no hooks: the CNF keeps its ODE state NHWC for the whole solve, so its ODE net, called at
every evaluation of f, is not converted twice per call (``relayout`` crosses the boundary once).

``contiguous`` (NCHW, PyTorch's default) removes the hooks again.
"""
from __future__ import annotations

import torch
from torch import nn

MEMORY_FORMATS = ("contiguous", "channels_last")
_HANDLES = "_memory_format_hooks"  # per-module attribute holding the hook handles (no global state)


class _Relayout(torch.autograd.Function):
    """y = x in ``memory_format``; the gradient goes back in ``grad_format``, through this same
    function, so derivatives of every order cross the boundary in the layout of their side
    (an elementwise kernel on operands of mixed layouts takes a slow strided path)."""

    @staticmethod
    def forward(ctx, x, memory_format, grad_format):
        ctx.formats = (memory_format, grad_format)
        return x.contiguous(memory_format=memory_format)

    @staticmethod
    def backward(ctx, grad):
        memory_format, grad_format = ctx.formats
        return _Relayout.apply(grad, grad_format, memory_format), None, None


def relayout(value, memory_format: torch.memory_format, grad_format: torch.memory_format):
    """``value`` with every 4-D floating tensor in it (also inside tuples/lists) in ``memory_format``;
    their gradients go back in ``grad_format``."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 4 and value.is_floating_point():
            return _Relayout.apply(value, memory_format, grad_format)
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(relayout(v, memory_format, grad_format) for v in value)
    return value


def _inputs_channels_last(module, args, kwargs):
    cl, nchw = torch.channels_last, torch.contiguous_format
    return relayout(args, cl, nchw), {k: relayout(v, cl, nchw) for k, v in kwargs.items()}


def _outputs_contiguous(module, args, output):
    return relayout(output, torch.contiguous_format, torch.channels_last)


def channels_last_nets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost modules of ``model`` that declare ``channels_last_net`` (nested ones are inside them)."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if getattr(type(module), "channels_last_net", False) and not any(name.startswith(f"{n}.") for n, _ in found):
            found.append((name, module))
    return found


def set_memory_format(model: nn.Module, memory_format: str) -> list[str]:
    """Run the conditioner networks of ``model`` in ``memory_format``; the names of those networks.

    Idempotent: the hooks of an earlier call are removed first."""
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {memory_format!r}")
    names = []
    for name, net in channels_last_nets(model):
        for handle in getattr(net, _HANDLES, ()):
            handle.remove()
        handles = []
        if hasattr(net, "use_memory_format"):  # it lays out its own state (module docstring)
            net.use_memory_format(memory_format)
            names += [name] if memory_format == "channels_last" else []
        elif memory_format == "channels_last":
            handles = [net.register_forward_pre_hook(_inputs_channels_last, with_kwargs=True),
                       net.register_forward_hook(_outputs_contiguous)]
            names.append(name)
        setattr(net, _HANDLES, handles)
    return names
