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

from weightsmith.core.parallel import pmap, sub_ranges
from weightsmith.kernels import narrow as native
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


class TorchSteps:
    """The elementwise steps as mergekit writes them (any dtype)."""

    def div(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return (x / s).to(x.dtype)

    def axpy(self, y: torch.Tensor, x: torch.Tensor, a: float) -> None:
        y += a * x

    def tangent(self, t, u, m, cos: torch.Tensor, c: torch.Tensor) -> None:
        t += c * (u - cos * m)

    def step(self, m: torch.Tensor, t: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        return (torch.cos(step) * m + torch.sin(step) * (t / step)).to(m.dtype)

    def scale(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return s * x


class NativeSteps(TorchSteps):
    """The same steps on bfloat16 tensors by the native kernels, in parallel pieces and in
    place (the inputs' copies become the directions): the same bits, one pass per step. The
    scalars are passed as torch uses them: 0-dim float32 factors rounded to bfloat16, Python
    floats and divisors as float32."""

    @staticmethod
    def _run(name: str, *args: torch.Tensor | float) -> None:
        n = next(a for a in args if isinstance(a, torch.Tensor)).numel()

        def piece(r: tuple[int, int]) -> None:
            native.bf16_call(
                name, *[a[r[0] : r[1]] if isinstance(a, torch.Tensor) else a for a in args]
            )

        pmap(piece, sub_ranges(0, n))

    def div(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        self._run("ws_bf16_div", x, float(s), x)
        return x

    def axpy(self, y: torch.Tensor, x: torch.Tensor, a: float) -> None:
        self._run("ws_bf16_axpy", y, x, float(torch.tensor(a, dtype=torch.float32)))

    def tangent(self, t, u, m, cos: torch.Tensor, c: torch.Tensor) -> None:
        self._run("ws_karcher_tangent", t, u, m, float(cos), float(c))

    def step(self, m: torch.Tensor, t: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        cos, sin = float(torch.cos(step).bfloat16()), float(torch.sin(step).bfloat16())
        self._run("ws_karcher_step", m, t, cos, sin, float(step))
        return m

    def scale(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        self._run("ws_bf16_scale", x, float(s.to(torch.bfloat16)), x)
        return x


def karcher_mean(
    tensors: list[torch.Tensor],
    alphas: list[float],
    max_iter: int = 10,
    tol: float = 1e-5,
    steps: TorchSteps | None = None,
) -> torch.Tensor:
    """The weighted Karcher mean of flat tensors, scaled by the weighted mean norm
    (``steps``: :class:`NativeSteps` for bfloat16, which overwrites ``tensors``)."""
    if len(tensors) == 1:
        return tensors[0]
    steps = steps or TorchSteps()
    acc = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [_norm(x, acc) for x in tensors]
    keep = [i for i, n in enumerate(norms) if float(n) > tol]
    if not keep:
        return sum(x * 0 for x in tensors)
    total = sum(alphas[i] for i in keep)
    weights = [alphas[i] / total for i in keep]
    dirs = [steps.div(tensors[i], norms[i]) for i in keep]
    mean = torch.zeros_like(dirs[0])
    for a, u in zip(weights, dirs, strict=True):
        steps.axpy(mean, u, a)
    size = _norm(mean, acc)
    mean = dirs[0].clone() if float(size) < tol else steps.div(mean, size)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(weights, dirs, strict=True):
            # in this thread: torch's bfloat16 dot is a parallel reduction whose bits depend on
            # the thread count (mergekit_threads sets mergekit's); a pool thread differs
            cos = torch.clamp(torch.dot(mean, u), -1.0, 1.0)
            theta = torch.arccos(cos)
            if float(theta) < tol:
                continue
            steps.tangent(tangent, u, mean, cos, a * (theta / torch.sin(theta)))
        step = _norm(tangent, acc)
        if float(step) < tol:
            break
        mean = steps.step(mean, tangent, step)
        size = _norm(mean, acc)
        if float(size) > tol:
            mean = steps.div(mean, size)
    scale = sum(a * n for a, n in zip(alphas, norms, strict=True))
    return steps.scale(mean, scale)


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
        fast = params.dtype == torch.bfloat16 and src.numel > 0 and native.available()
        steps = NativeSteps() if fast and all(t.device.type == "cpu" for t in tensors) else None
        return karcher_mean(tensors, [1.0 / n] * n, max_iter, tol, steps)

    def combine(
        self, chunks: list[torch.Tensor], state: Any, params: TensorParams, offset: int
    ) -> torch.Tensor:
        return state[offset : offset + chunks[0].numel()]


def karcher(tensors: list[torch.Tensor], *, max_iter: int = 10, tol: float = 1e-5):
    """Karcher mean of ``tensors`` with equal weights."""
    return merge_tensors("karcher", tensors, max_iter=max_iter, tol=tol)
