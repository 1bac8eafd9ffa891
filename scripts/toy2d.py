"""Fit a classic flow to a 2-D toy density (maximum likelihood) or to an unnormalised
energy of Rezende & Mohamed 2015 (reverse KL), and write a PNG:

    data (or target exp(-U)) | learned density | samples from the flow

    python scripts/toy2d.py --flow realnvp --data two_moons --out runs/toy2d/realnvp_two_moons.png
    python scripts/toy2d.py --flow planar --energy u2 --out runs/toy2d/planar_u2.png

Flows: realnvp (affine couplings, alternating masks), nice (additive couplings + diagonal
scaling), maf, iaf (MADE, alternating orderings), planar, radial, sylvester (--kind
orthogonal | householder | triangular).

Maximum likelihood (--data): a ``Flow`` over (2,) whose layers run data -> latent;
log p(x) = log N(z) + sum ldj, and samples come from the layers' inverses (planar and
Sylvester: bisection; MAF: two sequential passes).
Reverse KL (--energy): each layer's ``forward`` is used as the sampling map z0 -> x,
log q(x) = log N(z0) - sum ldj, loss = E_q[log q(x) + beta U(x)] with beta annealed from
0.01 to 1 over the first half of training (as Rezende & Mohamed).  The learned density
on the grid is log q(x) with z0 found through the layers' inverses.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from PIL import Image, ImageDraw


from data import toy2d
from models.core.compose import Compose
from models.core.distributions import StandardNormal
from models.core.flow import Flow
from models.nets.made import MADE
from models.nets.realnvp_nets import MLPConditioner
from models.transforms.bijections import masks
from models.transforms.bijections.diagonal_scaling import DiagonalScaling
from models.transforms.bijections.masked_additive_coupling import MaskedAdditiveCoupling
from models.transforms.bijections.masked_affine_coupling import MaskedAffineCoupling
from models.transforms.vector.iaf import IAF
from models.transforms.vector.maf import MAF
from models.transforms.vector.planar import PlanarFlow
from models.transforms.vector.radial import RadialFlow
from models.transforms.vector.sylvester import SylvesterFlow

FLOWS = ("realnvp", "nice", "maf", "iaf", "planar", "radial", "sylvester")
DEFAULT_LAYERS = {"realnvp": 8, "nice": 6, "maf": 5, "iaf": 5, "planar": 32, "radial": 32, "sylvester": 16}
BOX = 4.0


def build_layers(flow: str, layers: int | None = None, hidden: int = 64, kind: str = "orthogonal", dim: int = 2):
    n = layers or DEFAULT_LAYERS[flow]
    out = []
    for i in range(n):
        if flow == "realnvp":
            out.append(MaskedAffineCoupling(MLPConditioner(dim, 2 * dim, hidden), masks.alternating(dim, i)))
        elif flow == "nice":
            out.append(MaskedAdditiveCoupling(MLPConditioner(dim, dim, hidden), masks.alternating(dim, i)))
        elif flow in ("maf", "iaf"):
            made = MADE(dim, (hidden, hidden), ordering="natural" if i % 2 == 0 else "reverse")
            out.append(MAF(made) if flow == "maf" else IAF(made))
        elif flow == "planar":
            out.append(PlanarFlow(dim, init_scale=0.5))
        elif flow == "radial":
            out.append(RadialFlow(dim))
        elif flow == "sylvester":
            out.append(SylvesterFlow(dim, kind, flip=bool(i % 2)))
        else:
            raise ValueError(f"unknown flow {flow!r}; known: {', '.join(FLOWS)}")
    if flow == "nice":
        out.append(DiagonalScaling(dim))
    return out


def push_forward(layers, z0):
    """x = f_K(...f_1(z0)) with each layer's forward; returns (x, sum of log-dets)."""
    return Compose(layers)(z0)


@torch.no_grad()
def pull_back_log_q(layers, base, x):
    """log q(x) of the push-forward sampler: invert every layer, then score z0."""
    z0 = Compose(layers).inverse(x)
    x_rec, total = push_forward(layers, z0)
    return base.log_prob(z0) - total


def fit(flow: str, data: str | None = None, energy: str | None = None, steps: int = 3000, batch: int = 256,
        lr: float | None = None, layers: int | None = None, kind: str = "orthogonal", seed: int = 0, log_every: int = 500, anneal: bool = True):
    """Train; returns (model pieces, history of losses)."""
    torch.manual_seed(seed)
    base = StandardNormal((2,))
    layer_list = build_layers(flow, layers, kind=kind)
    lr = lr or (5e-3 if flow in ("planar", "radial", "sylvester") else 1e-3)
    g = torch.Generator().manual_seed(seed)
    if data is not None:
        model = Flow(layer_list, base, (2,))
        params = model.parameters()
    else:
        model = torch.nn.ModuleList(layer_list)
        params = model.parameters()
    opt = torch.optim.Adam(params, lr=lr)
    history = []
    for step in range(1, steps + 1):
        if data is not None:
            x = toy2d.sample(data, batch, g)
            loss = -model.log_prob(x).mean()
        else:
            beta = min(1.0, 0.01 + step / (0.5 * steps)) if anneal else 1.0
            z0 = torch.randn(batch, 2)
            x, ldj = push_forward(layer_list, z0)
            loss = (base.log_prob(z0) - ldj + beta * toy2d.energy(energy, x)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
        opt.step()
        history.append(loss.item())
        if log_every and step % log_every == 0:
            print(f"step {step}: loss {sum(history[-log_every:]) / log_every:.4f}", flush=True)
    return model, layer_list, base, history


# ---- rendering (PIL only) ----------------------------------------------------------------
_PALETTE = torch.tensor([[0, 0, 4], [59, 15, 112], [140, 41, 129], [222, 73, 104], [254, 159, 109], [252, 253, 191]],
                        dtype=torch.float32)


def colorize(values: torch.Tensor) -> Image.Image:
    """(H, W) non-negative values -> RGB image with a magma-like palette (max -> brightest)."""
    v = values.float().nan_to_num(0.0).clamp_min(0)
    v = v / v.max().clamp_min(1e-12)
    pos = v * (len(_PALETTE) - 1)
    lo = pos.floor().long().clamp(max=len(_PALETTE) - 2)
    frac = (pos - lo)[..., None]
    rgb = _PALETTE[lo] * (1 - frac) + _PALETTE[lo + 1] * frac
    return Image.fromarray(rgb.round().to(torch.uint8).numpy(), "RGB")


def histogram(points: torch.Tensor, res: int) -> torch.Tensor:
    p = points[torch.isfinite(points).all(dim=1)]
    ij = ((p + BOX) / (2 * BOX) * res).floor().long()
    keep = ((ij >= 0) & (ij < res)).all(dim=1)
    ij = ij[keep]
    h = torch.zeros(res * res)
    h.index_add_(0, (res - 1 - ij[:, 1]) * res + ij[:, 0], torch.ones(ij.shape[0]))
    return h.reshape(res, res)


def grid(res: int) -> torch.Tensor:
    c = (torch.arange(res) + 0.5) / res * 2 * BOX - BOX
    x1 = c[None, :].expand(res, res)
    x2 = c.flip(0)[:, None].expand(res, res)  # row 0 at the top = largest x2
    return torch.stack([x1.reshape(-1), x2.reshape(-1)], 1)


def figure(panels: list[tuple[str, torch.Tensor]], path: str, size: int = 256) -> None:
    pad, title = 6, 18
    img = Image.new("RGB", (len(panels) * (size + pad) + pad, size + title + pad), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for k, (name, values) in enumerate(panels):
        x0 = pad + k * (size + pad)
        img.paste(colorize(values).resize((size, size), Image.NEAREST), (x0, title))
        draw.text((x0, 3), name, fill=(0, 0, 0))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)


@torch.no_grad()
def render(model, layer_list, base, flow, data, energy, path, res: int = 128, n_samples: int = 20000, seed: int = 0):
    torch.manual_seed(seed)
    pts = grid(res)
    if data is not None:
        model.eval()
        left = ("data: " + data, histogram(toy2d.sample(data, n_samples, torch.Generator().manual_seed(seed + 1)), res))
        logq = torch.cat([model.log_prob(p) for p in pts.split(4096)])
        samples = model.sample(n_samples)
    else:
        left = ("target exp(-U): " + energy, torch.exp(-toy2d.energy(energy, pts)).reshape(res, res))
        logq = torch.cat([pull_back_log_q(layer_list, base, p) for p in pts.split(4096)])
        samples = push_forward(layer_list, torch.randn(n_samples, 2))[0]
    panels = [left, (f"{flow}: learned density", torch.exp(logq).reshape(res, res)),
              (f"{flow}: samples", histogram(samples, res))]
    figure(panels, path)
    return panels


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flow", choices=FLOWS, required=True)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", choices=toy2d.DATASETS)
    src.add_argument("--energy", choices=toy2d.ENERGIES)
    ap.add_argument("--out", required=True, help="PNG path")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--kind", default="orthogonal", choices=("orthogonal", "householder", "triangular"),
                    help="Sylvester variant")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, layer_list, base, history = fit(args.flow, args.data, args.energy, args.steps, args.batch, args.lr,
                                           args.layers, args.kind, args.seed)
    render(model, layer_list, base, args.flow, args.data, args.energy, args.out, seed=args.seed)
    final = sum(history[-100:]) / min(100, len(history))
    what = "NLL (nats)" if args.data else "reverse KL + log Z (nats)"
    print(f"{args.flow} on {args.data or args.energy}: final {what} {final:.4f}; "
          f"{args.steps} steps in {time.time() - t0:.0f}s -> {args.out}")
    return final


if __name__ == "__main__":
    main()
