"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"), eq. 1.

The score of ``W_ij`` is ``|W_ij| * ||X_j||_2``, where ``X_j`` is input feature ``j`` of the
Linear over every calibration token; scores are compared within each output row.
"""

from __future__ import annotations

import torch

from weightsmith.compress.prune.registry import prune_method


class ColumnNormStat:
    """Accumulates ``sum_t x_tj^2`` over the inputs of one Linear (an ``InputStat``)."""

    def __init__(self, in_features: int) -> None:
        self.sq = torch.zeros(in_features, dtype=torch.float64)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        self.sq += x.double().pow(2).sum(0).cpu()  # a CUDA batch adds into the host sum
        self.tokens += x.shape[0]

    def norm(self) -> torch.Tensor:
        """``||X_j||_2`` per input column, float32."""
        return self.sq.sqrt().float()


@prune_method(
    "wanda",
    kind="unstructured",
    needs_calibration=True,
    compare="row",
    description="|W| * ||X_j||_2 from calibration activations, compared per output row",
)
def wanda_scores(w: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2`` for an ``(out, in)`` weight and its ``(in,)`` input norms."""
    if input_norm.shape != (w.shape[1],):
        raise ValueError(
            f"input norms {tuple(input_norm.shape)} do not fit weight {tuple(w.shape)}"
        )
    return w.abs() * input_norm.to(w.dtype)[None, :]
