"""Spherical linear interpolation of two tensors, with mergekit's ``slerp`` semantics.

The angle comes from the normalized tensors (norm > eps, else the tensor itself), but the
coefficients are applied to the *original* tensors, so magnitudes interpolate as in mergekit.
When the directions are nearly colinear or opposite (|cos| > 0.9995) it falls back to lerp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from weightsmith.core.parallel import pmap, sub_ranges
from weightsmith.errors import ConfigError
from weightsmith.merge.methods.base import (
    ChunkSource,
    MergeMethod,
    Param,
    TensorParams,
    merge_method,
    merge_tensors,
)

DOT_THRESHOLD = 0.9995  # mergekit's colinearity threshold on the cosine
EPS = 1e-8  # norms at or below this are not normalized (mergekit's eps)


@dataclass(frozen=True)
class SlerpCoefficients:
    s0: float
    s1: float
    cosine: float
    colinear: bool


def slerp_coefficients(
    t: float, dot: float, norm_a: float, norm_b: float, threshold: float = DOT_THRESHOLD
) -> SlerpCoefficients:
    """Coefficients (s0, s1) with slerp(a, b) = s0·a + s1·b, from <a,b>, |a| and |b|."""
    na = norm_a if norm_a > EPS else 1.0
    nb = norm_b if norm_b > EPS else 1.0
    cos = dot / (na * nb)
    if abs(cos) > threshold:
        return SlerpCoefficients(1.0 - t, t, cos, True)
    theta = math.acos(max(-1.0, min(1.0, cos)))
    sin_theta = math.sin(theta)
    s0 = math.sin(theta - theta * t) / sin_theta
    s1 = math.sin(theta * t) / sin_theta
    return SlerpCoefficients(s0, s1, cos, False)


@merge_method("slerp")
class Slerp(MergeMethod):
    title = "SLERP"
    reference = "https://en.wikipedia.org/wiki/Slerp"
    needs_base = True
    exact_inputs = 2
    global_params = (Param("t", required=True, help="0 gives the base, 1 the other model"),)

    def validate(self, params: TensorParams) -> None:
        t = params.globals["t"]
        if not isinstance(t, (int, float)) or isinstance(t, bool):
            raise ConfigError(f"{params.name}: slerp t must be a number, got {t!r}")

    def prepare(self, src: ChunkSource, params: TensorParams) -> SlerpCoefficients:
        dot = aa = bb = 0.0
        offset = 0
        for a, b in src.chunks([0, 1]):
            # float32 per sub-chunk (as mergekit), summed in float64 in a fixed order

            def dots(r: tuple[int, int], a=a, b=b, start=offset) -> tuple[float, float, float]:
                x, y = a[r[0] - start : r[1] - start], b[r[0] - start : r[1] - start]
                return float(torch.dot(x, y)), float(torch.dot(x, x)), float(torch.dot(y, y))

            for d, xx, yy in pmap(dots, sub_ranges(offset, offset + a.numel())):
                dot, aa, bb = dot + d, aa + xx, bb + yy
            offset += a.numel()
        return slerp_coefficients(float(params.globals["t"]), dot, math.sqrt(aa), math.sqrt(bb))

    def combine(
        self, chunks: list[torch.Tensor], state: Any, params: TensorParams, offset: int
    ) -> torch.Tensor:
        a, b = chunks
        return a.mul(state.s0).add_(b, alpha=state.s1)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """mergekit-compatible SLERP of two tensors (float32 result)."""
    return merge_tensors("slerp", [a, b], t=t)
