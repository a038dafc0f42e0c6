"""Karcher (Riemannian) mean on the unit sphere, as mergekit 0.1.5's ``karcher``.

Every input (the base too, when the recipe names one: mergekit adds it as the last input) has
equal weight αᵢ = 1/n. Directions uᵢ = xᵢ/‖xᵢ‖ of the inputs with ‖xᵢ‖ > tol start from their
normalized mean m; each of at most ``max_iter`` steps moves m along the mean tangent
Σ αᵢ θᵢ/sin θᵢ (uᵢ − cos θᵢ·m) (θᵢ = acos⟨m, uᵢ⟩, skipped when θᵢ < tol) and renormalizes,
stopping when the tangent's norm is below ``tol``. out = (Σ αᵢ‖xᵢ‖)·m.

The iteration needs whole tensors: ``prepare`` holds the directions (one tensor per input, in
the compute dtype) and the mean, computes as mergekit does, and keeps only the result, which
``combine`` hands out chunk by chunk.
"""

from __future__ import annotations

from typing import Any

import torch

from weightsmith.merge.methods.base import (
    ChunkSource,
    MergeMethod,
    Param,
    TensorParams,
    merge_method,
    merge_tensors,
    whole,
)
from weightsmith.merge.params import INT


def _norm(x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    return torch.linalg.vector_norm(x.to(dt))


def karcher_mean(
    tensors: list[torch.Tensor], alphas: list[float], max_iter: int = 10, tol: float = 1e-5
) -> torch.Tensor:
    """The weighted Karcher mean of flat tensors, scaled by the weighted mean norm."""
    if len(tensors) == 1:
        return tensors[0]
    acc = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [_norm(x, acc) for x in tensors]
    units = [
        torch.zeros_like(x) if float(n) == 0.0 else (x / n).to(x.dtype)
        for x, n in zip(tensors, norms, strict=True)
    ]
    keep = [i for i, n in enumerate(norms) if float(n) > tol]
    if not keep:
        return sum(x * 0 for x in tensors)
    total = sum(alphas[i] for i in keep)
    weights = [alphas[i] / total for i in keep]
    dirs = [units[i] for i in keep]
    del units
    mean = torch.zeros_like(dirs[0])
    for a, u in zip(weights, dirs, strict=True):
        mean += a * u
    size = _norm(mean, acc)
    mean = dirs[0].clone() if float(size) < tol else (mean / size).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(weights, dirs, strict=True):
            cos = torch.clamp(torch.dot(mean, u), -1.0, 1.0)
            theta = torch.arccos(cos)
            if float(theta) < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - cos * mean)
        step = _norm(tangent, acc)
        if float(step) < tol:
            break
        mean = (torch.cos(step) * mean + torch.sin(step) * (tangent / step)).to(mean.dtype)
        size = _norm(mean, acc)
        if float(size) > tol:
            mean = (mean / size).to(mean.dtype)
    scale = sum(a * n for a, n in zip(alphas, norms, strict=True))
    return scale * mean


@merge_method("karcher")
class Karcher(MergeMethod):
    tensor_statistics = True
    whole_tensor = True
    title = "Karcher mean"
    reference = "https://arxiv.org/abs/2603.04972"
    base_as_input = True
    global_params = (
        Param("max_iter", 10, help="most iterations", kind=INT, low=0),
        Param("tol", 1e-5, help="convergence tolerance", low=0.0),
    )

    def prepare(self, src: ChunkSource, params: TensorParams) -> torch.Tensor:
        n = src.num_inputs
        tensors = [whole(src, i, params.dtype) for i in range(n)]
        max_iter, tol = int(params.globals["max_iter"]), float(params.globals["tol"])
        return karcher_mean(tensors, [1.0 / n] * n, max_iter, tol)

    def combine(
        self, chunks: list[torch.Tensor], state: Any, params: TensorParams, offset: int
    ) -> torch.Tensor:
        return state[offset : offset + chunks[0].numel()]


def karcher(tensors: list[torch.Tensor], *, max_iter: int = 10, tol: float = 1e-5):
    """Karcher mean of ``tensors`` with equal weights."""
    return merge_tensors("karcher", tensors, max_iter=max_iter, tol=tol)
