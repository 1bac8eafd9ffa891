"""A shape-tracking stack of transforms, the bookkeeping every builder needs.

    stack = LayerStack((3, 32, 32))
    stack.add(Squeeze())                 # stack.shape == (12, 16, 16)
    stack.add(ActNorm(stack.shape[0]))   # layers built for the current shape
    Flow(stack.transforms, StandardNormal(stack.shape), data_shape)

``add`` appends each transform and replaces ``shape`` by its ``output_shape`` (the shape
of what the transform passes on: factor-out layers keep only their first part).
"""
from __future__ import annotations

from models.core.transform import Transform


class LayerStack:
    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)
        self.transforms: list[Transform] = []

    def add(self, *transforms: Transform) -> "LayerStack":
        """Append ``transforms`` in order, tracking the shape after each; returns the stack."""
        for t in transforms:
            self.shape = tuple(t.output_shape(self.shape))
            self.transforms.append(t)
        return self

    def __len__(self) -> int:
        return len(self.transforms)
