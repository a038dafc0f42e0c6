"""Magnitude pruning: the score of a weight is its absolute value.

As locuslab/wanda defines the baseline: one threshold per weight matrix for unstructured
sparsity, and per row (per block of M) for N:M.
"""

from __future__ import annotations

import torch

from weightsmith.compress.prune.registry import prune_method


@prune_method(
    "magnitude",
    kind="unstructured",
    needs_calibration=False,
    compare="tensor",
    description="|W|, one threshold per weight matrix (N:M: per row); no calibration",
)
def magnitude_scores(w: torch.Tensor) -> torch.Tensor:
    """|W| for an ``(out, in)`` weight."""
    return w.abs()
