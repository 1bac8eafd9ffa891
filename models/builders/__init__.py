"""Building blocks shared by the family builders in ``models.architectures``.

A family module imports from here (and from ``models.core``, ``models.nets`` and
``models.transforms``), never from another family:

    stack.py          LayerStack: transforms appended in order, with the shape after the last one
    dequantizer.py    the ``dequantizer:`` config section (uniform | variational | argmax) and its builder
    flowpp_steps.py   Flow++'s coupling steps (the Flow++ family and the conditional dequantizer flow)
    glow_levels.py    Glow's multi-scale levels (the glow and argmax families)
    vector_layers.py  flow layers over vectors (the vector_flow family, the flow-VAE's posterior, benchmarks)
"""
