"""Seeded, resumable batch indices for (distributed) training and evaluation.

Batches are a pure function of (seed, step), so resuming at step k needs no
sampler state, and every rank computes the same global batch and takes its own
contiguous chunk of it.
"""

from __future__ import annotations

import torch

from common.errors import FlowlabError


class ShardedBatches:
    """Per-epoch shuffled batches of example indices, split across ranks (last partial batch dropped)."""

    def __init__(self, num_examples: int, global_batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise FlowlabError(f"rank {rank} is invalid for world_size {world_size}")
        if global_batch_size < 1 or global_batch_size % world_size:
            raise FlowlabError(f"global batch size {global_batch_size} must be a positive multiple "
                               f"of the number of processes ({world_size})")
        if global_batch_size > num_examples:
            raise FlowlabError(f"global batch size {global_batch_size} exceeds the {num_examples} "
                               f"training examples")
        self.num_examples, self.global_batch_size, self.seed = num_examples, global_batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = global_batch_size // world_size
        self.steps_per_epoch = num_examples // global_batch_size
        self._cache: tuple[int, torch.Tensor] | None = None  # (epoch, permutation) memo

    def epoch(self, step: int) -> int:
        """Epoch that global step ``step`` falls in."""
        return step // self.steps_per_epoch

    def permutation(self, epoch: int) -> torch.Tensor:
        """The shuffled order of all examples in ``epoch``."""
        if self._cache is None or self._cache[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = (epoch, torch.randperm(self.num_examples, generator=gen))
        return self._cache[1]

    def indices(self, step: int) -> torch.Tensor:
        """This rank's example indices (LongTensor of local_batch_size) for global step ``step``."""
        if step < 0:
            raise FlowlabError(f"step must be non-negative, got {step}")
        start = (step % self.steps_per_epoch) * self.global_batch_size + self.rank * self.local_batch_size
        return self.permutation(self.epoch(step))[start:start + self.local_batch_size].clone()


def eval_batches(num_examples: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[torch.Tensor]:
    """In-order batches covering each of ``num_examples`` exactly once across ranks, without padding.

    Global batches of ``batch_size * world_size`` consecutive indices are split into
    ``world_size`` contiguous pieces (sizes differ by at most one), so every rank gets
    the same number of batches and concatenating the ranks' k-th batches in rank
    order gives global batch k. Near the end a rank's batch may be smaller, or even
    empty when fewer examples than ranks remain.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise FlowlabError(f"rank {rank} is invalid for world_size {world_size}")
    if batch_size < 1:
        raise FlowlabError(f"eval batch size must be positive, got {batch_size}")
    step = batch_size * world_size
    return [torch.arange(s, min(s + step, num_examples)).tensor_split(world_size)[rank]
            for s in range(0, num_examples, step)]
