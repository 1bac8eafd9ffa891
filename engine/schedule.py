"""Learning-rate schedule as a pure function of the step (so resuming needs no state).

    lr(step) = base_lr * min(1, (step + 1) / warmup)              during warm-up
             * (constant: 1 | cosine: 0.5 (1 + cos(pi * progress))
                | exponential: decay_rate ^ floor(step / decay_every))   after it

The exponential factor runs from step 0, alongside the warm-up, as IDF's
``min(1, (epoch + 1) / warmup) * 0.999 ^ epoch`` with decay_every = one epoch of steps.
"""
from __future__ import annotations

import math


def learning_rate(step: int, base_lr: float, warmup_steps: int, total_steps: int, schedule: str,
                  decay_rate: float = 1.0, decay_every: int = 1) -> float:
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if schedule == "constant":
        return base_lr * warm
    if schedule == "exponential":
        return base_lr * warm * decay_rate ** (step // max(1, decay_every))
    progress = min(1.0, max(0, step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * warm * 0.5 * (1.0 + math.cos(math.pi * progress))
