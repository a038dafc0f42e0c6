"""Checks on the tensors a command reads."""

from __future__ import annotations

import math

import torch

from weightsmith.errors import CheckpointError


def require_finite(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` itself; a :class:`CheckpointError` naming ``name`` if it holds NaN or Inf."""
    if not t.is_floating_point() or not t.numel():
        return t
    # a float64 sum is finite exactly when no NaN/Inf is there (float32 values cannot overflow it)
    if not math.isfinite(float(t.sum(dtype=torch.float64))):
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointError(f"{name}: {bad} non-finite value(s) (NaN or Inf)")
    return t
