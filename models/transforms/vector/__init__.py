"""Vector flows on (B, D) inputs: autoregressive (MAF, IAF), planar, radial and Sylvester.

They use the same ``Transform`` contract and ``Flow`` class as the image layers
(base ``StandardNormal((D,))``).  Shape-generic layers that also serve vectors live in
``models.transforms.bijections``: masked affine/additive couplings (with
``masks.alternating``/``masks.half``), NICE's diagonal scaling, the batch-norm bijector,
fixed permutations (``ChannelPermutation``) and learned ones (``InvertibleConv1x1`` /
``InvertibleConv1x1LU``, which act on vectors as z = W x).  Every family builds its vector
layers with ``models.builders.vector_layers`` (the vector_flow family, the flow-VAE's posterior).
"""
