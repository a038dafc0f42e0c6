"""The learning-rate schedule: linear warm-up, then cosine decay (a pure function of the step)."""

from __future__ import annotations

import math


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then cosine decay to ``min_ratio`` at the end.

    ``step`` counts optimizer steps from 0; the factor at step 0 is 1/warmup (never 0, so the
    first step already moves the weights).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
