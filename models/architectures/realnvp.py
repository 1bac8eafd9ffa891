"""Multi-scale RealNVP (Dinh, Sohl-Dickstein & Bengio 2017, §3.6 and §4.1).

    x (integers) -> uniform dequantization -> logit(alpha + (1 - 2 alpha) x), alpha = 0.05
    for scale in 1..L-1:
        3 x [checkerboard affine coupling -> batch norm]      (mask parity alternates)
        squeeze  (C, H, W) -> (4C, H/2, W/2)
        3 x [channel affine coupling -> batch norm]           (mask parity alternates)
        factor out half the channels to N(0, I)              (``Split`` with a zero prior)
    last scale: 4 x [checkerboard affine coupling -> batch norm]
    base: N(0, I)

Couplings: z = b x + (1 - b)(x exp(s) + t), s = scale * tanh(.), with ResNet conditioners
(``num_blocks`` residual blocks of ``features`` maps, batch norm, optional weight norm).
The paper's CIFAR-10 model uses 8 blocks x 64 features and "downscales only once"
(``scales: 2``).  Batch norm layers are RealNVP's bijector: batch statistics in
training, running averages in evaluation (the trainer switches modes).
"""
from __future__ import annotations

from models.core.distributions import StandardNormal
from models.core.flow import Flow
from models.nets.glow_nets import ZeroConv2d
from models.nets.realnvp_nets import ResNetConditioner, ZeroPrior
from models.transforms.bijections import masks
from models.transforms.bijections.batch_norm import BatchNormBijection
from models.transforms.bijections.elementwise import Logit
from models.transforms.bijections.masked_affine_coupling import MaskedAffineCoupling
from models.transforms.bijections.squeeze import Squeeze
from models.transforms.surjections.split import Split
from models.transforms.surjections.uniform_dequantization import UniformDequantization

DEFAULTS = {
    "scales": 2,                # L: squeeze + factor-out happen L - 1 times
    "num_blocks": 8,            # residual blocks per conditioner
    "features": 64,             # feature maps per residual block
    "weight_norm": True,        # weight normalisation on the conditioner convs
    "batch_norm": True,         # batch-norm bijector after every coupling
    "bn_momentum": 0.05,        # running-average momentum of the batch-norm bijector
    "logit_alpha": 0.05,        # RealNVP's pre-processing constant
    "factor_out_prior": "standard",  # standard (paper: N(0, I)) | learned (Glow's conditional prior)
    "dequantization": "uniform",
}

CHOICES = {
    "factor_out_prior": ("standard", "learned"),
    "dequantization": ("uniform",),
}


def _coupling(cfg: dict, mask, shape):
    c = shape[0]
    net = ResNetConditioner(c, 2 * c, cfg["features"], cfg["num_blocks"], cfg["weight_norm"])
    layers = [MaskedAffineCoupling(net, mask)]
    if cfg["batch_norm"]:
        layers.append(BatchNormBijection(c, momentum=cfg["bn_momentum"]))
    return layers


def build(cfg: dict, data_shape: tuple[int, int, int], num_bits: int) -> Flow:
    c, h, w = data_shape
    if cfg["scales"] < 1:
        raise ValueError("RealNVP needs scales >= 1")
    if h % 2 ** (cfg["scales"] - 1) or w % 2 ** (cfg["scales"] - 1):
        raise ValueError(f"image size {h}x{w} is not divisible by 2^(scales-1) = {2 ** (cfg['scales'] - 1)}")
    transforms = [UniformDequantization(num_bits), Logit(cfg["logit_alpha"])]
    shape = tuple(data_shape)
    for scale in range(cfg["scales"] - 1):
        for i in range(3):
            transforms += _coupling(cfg, masks.checkerboard(*shape, parity=i), shape)
        transforms.append(Squeeze())
        shape = transforms[-1].output_shape(shape)
        for i in range(3):
            transforms += _coupling(cfg, masks.channel(*shape, parity=i), shape)
        keep = shape[0] // 2
        prior = (ZeroPrior(2 * (shape[0] - keep)) if cfg["factor_out_prior"] == "standard"
                 else ZeroConv2d(keep, 2 * (shape[0] - keep), 3, True))
        transforms.append(Split(prior, keep))
        shape = transforms[-1].output_shape(shape)
    for i in range(4):
        transforms += _coupling(cfg, masks.checkerboard(*shape, parity=i), shape)
    return Flow(transforms, StandardNormal(shape), data_shape)
