"""Categories to one-hot vectors (the input layer of Discrete Flows, Tran et al. 2019,
arXiv:1905.10347 §2):

    x in {0..K-1}^(C x H x W)  ->  z = one_hot(x) in {0, 1}^(C x H x W x K),    ldj = 0

(K on a new last dimension), inverse: x = argmax_k z_k.  A bijection between the categories
and the one-hot vectors, so no likelihood term.  Integer input (the data layer's uint8) becomes
the default float dtype; float input keeps its dtype.  Values outside {0..K-1} are a
``FlowlabError`` (data at more bits than the model's K).
"""
from __future__ import annotations

import torch

from common.errors import FlowlabError
from models.core.transform import Transform, zeros_ldj
from models.transforms.discrete.modular_affine import to_one_hot


class OneHot(Transform):
    discrete = True

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x, context=None):
        dtype = x.dtype if torch.is_floating_point(x) else torch.get_default_dtype()
        index = x.long()
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_classes):
            raise FlowlabError(f"categories must be in 0..{self.num_classes - 1} (K = {self.num_classes}), got values "
                               f"in {int(index.min())}..{int(index.max())}: set data.n_bits to the model's bits")
        return to_one_hot(index, self.num_classes, dtype), zeros_ldj(x)

    def inverse(self, z, context=None, *, temperature=1.0):
        return z.argmax(dim=-1).to(z.dtype)

    def output_shape(self, in_shape):
        return (*in_shape, self.num_classes)

    def input_shape(self, out_shape):
        return tuple(out_shape[:-1])
