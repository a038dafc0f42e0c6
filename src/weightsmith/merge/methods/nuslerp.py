"""NuSLERP as mergekit 0.1.5's ``nuslerp``: SLERP of two models (or of their task vectors).

t = w₂ / (w₁ + w₂) (0.5 when the weights sum to ~0). With a base, the two task vectors
vᵢ = xᵢ − base are interpolated and the base added back; without, the models themselves.
The vectors are whole tensors (``nuslerp_flatten``, the default), else rows (the last
dimension), or columns with ``nuslerp_row_wise`` (mergekit's name: vectors along dim 0). Per
vector: û = v/max(‖v‖, 1e-7), cos = ⟨û₀, û₁⟩ clamped, θ = acos(cos), and
out = (sin((1−t)θ)·v₀ + sin(tθ)·v₁) / sin θ, or (1−t)·v₀ + t·v₁ when 1 − cos² ≤ 1e-16.

``prepare`` reduces the whole tensors in the compute dtype as mergekit does (one tensor per
input held while it runs); ``combine`` applies each vector's coefficients per entry.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from weightsmith.kernels import sphere
from weightsmith.merge.methods import sphere_native
from weightsmith.merge.methods.base import (
    TORCH_THREADS,
    ChunkSource,
    MergeMethod,
    Param,
    TensorParams,
    merge_method,
    merge_tensors,
    mergekit_threads,
    whole,
)
from weightsmith.merge.params import BOOL

EPS = 1e-8  # mergekit's colinearity eps (compared with 1 − cos², squared)
NORM_EPS = 1e-7  # mergekit's clamp of the norms


@dataclass(frozen=True)
class Coefficients:
    """Per vector (flat): sin((1−t)θ), sin(tθ), sin θ, colinear; and how entries map to them."""

    a: torch.Tensor
    b: torch.Tensor
    sin: torch.Tensor
    colinear: torch.Tensor
    t: float
    mode: str  # "one" | "div" (entry // size) | "mod" (entry % size)
    size: int


def interpolation_t(weights: list[float]) -> float:
    total = sum(weights)
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def vectors(x: torch.Tensor, shape: tuple[int, ...], flatten: bool, row_wise: bool):
    """The tensor laid out as mergekit reduces it (last dimension = one vector), and how a flat
    entry finds its vector."""
    if flatten or len(shape) <= 1:
        return x.reshape(-1), "one", 1
    v = x.reshape(shape)
    if row_wise:  # mergekit transposes dim 0 to the end
        rest = x.numel() // shape[0]
        return v.transpose(0, -1), "mod", rest
    return v, "div", shape[-1]


def nuslerp_coefficients(v0: torch.Tensor, v1: torch.Tensor, t: float, *, inplace=False):
    """(sin((1−t)θ), sin(tθ), sin θ, colinear) per vector, in the vectors' dtype.

    ``inplace``: the unit vectors and their product overwrite ``v0`` and ``v1`` (the same
    elementwise ops, so the same bits, without three more tensors of their size)."""

    def unit(x: torch.Tensor) -> torch.Tensor:
        n = torch.norm(x, dim=-1, keepdim=True).clamp(min=NORM_EPS)
        return x.div_(n) if inplace else x / n

    u0, u1 = unit(v0), unit(v1)
    cos = torch.sum(u0.mul_(u1) if inplace else u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    return angle_coefficients(cos, t)


def angle_coefficients(cos: torch.Tensor, t: float):
    """(sin((1−t)θ), sin(tθ), sin θ, colinear) from the clamped cosines, in their dtype."""
    colinear = (1 - cos.square()) <= EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    return torch.sin((1 - t) * theta), torch.sin(t * theta), torch.sin(theta), colinear


@merge_method("nuslerp")
class NuSlerp(MergeMethod):
    tensor_statistics = True
    stats_ahead = True
    whole_tensor = True
    title = "NuSLERP"
    reference = "https://github.com/arcee-ai/mergekit"
    optional_base = True
    min_models = max_models = 2
    global_params = (
        Param("nuslerp_row_wise", False, help="vectors along dim 0 (columns)", kind=BOOL),
        Param("nuslerp_flatten", True, help="the whole tensor is one vector", kind=BOOL),
    )
    model_params = (Param("weight", required=True, help="t = w2 / (w1 + w2)"),)

    def prepare(self, src: ChunkSource, params: TensorParams) -> Coefficients:
        dt, has_base = params.dtype, bool(params.has_base)
        t = interpolation_t(params.model_values("weight"))
        first = 1 if has_base else 0
        minus = 0 if has_base else None  # task vectors subtracted chunk by chunk
        x0, x1 = whole(src, first, dt, minus), whole(src, first + 1, dt, minus)
        flat, row = (
            bool(params.globals["nuslerp_flatten"]),
            bool(params.globals["nuslerp_row_wise"]),
        )
        v0, mode, size = vectors(x0, src.shape, flat, row)
        v1, _, _ = vectors(x1, src.shape, flat, row)
        del x0, x1  # only the views: the vectors are overwritten below
        a, b, s, colinear = nuslerp_coefficients(v0, v1, t, inplace=True)
        if mode == "mod":  # back to the original layout: one value per position past dim 0
            a, b, s, colinear = (c.transpose(0, -1) for c in (a, b, s, colinear))
        flat_of = lambda c: c.reshape(-1)  # noqa: E731
        return Coefficients(flat_of(a), flat_of(b), flat_of(s), flat_of(colinear), t, mode, size)

    def stream_stored(
        self, src: ChunkSource, params: TensorParams, out_dtype: torch.dtype
    ) -> Iterator[torch.Tensor] | None:
        """bfloat16 arithmetic on whole-tensor vectors: the native kernels write the two task
        vectors and the unit vectors' product for torch's norms and sum, then the output."""
        flat = bool(params.globals["nuslerp_flatten"]) or len(src.shape) <= 1
        if not (flat and sphere_native.applies(src, params, out_dtype)):
            return None
        has_base, t = bool(params.has_base), interpolation_t(params.model_values("weight"))
        f = int(has_base)

        def prepare(xs: list[torch.Tensor]) -> tuple:
            if sphere_native.native_reductions():
                return streamed_coefficients(src, xs, has_base, t)
            buf = torch.empty(src.numel, dtype=torch.bfloat16)
            norms = []
            for k in (f, f + 1):
                sphere_native.fill(src, xs, buf, lambda p, o, k=k: sphere.vector(p, has_base, k, o))
                norms.append(torch.norm(buf, dim=-1, keepdim=True).clamp(min=NORM_EPS))
            n1, n2 = (float(n) for n in norms)
            sphere_native.fill(src, xs, buf, lambda p, o: sphere.nus_prod(p, has_base, n1, n2, o))
            with mergekit_threads():
                cos = torch.sum(buf, dim=-1, keepdim=True).clamp(-1, 1)
            return tuple(float(c) for c in angle_coefficients(cos, t))

        def kernel(coef: tuple):
            return lambda p, o: sphere.nus_out(p, has_base, coef, t, o)

        return sphere_native.stream_mapped(src, out_dtype, prepare, kernel)

    def combine(
        self, chunks: list[torch.Tensor], state: Any, params: TensorParams, offset: int
    ) -> torch.Tensor:
        dt, c = params.dtype, state
        xs = [x.to(dt) for x in chunks]
        base = xs.pop(0) if params.has_base else None
        v0, v1 = (x - base for x in xs) if base is not None else xs
        a, b, s, colinear = c.a, c.b, c.sin, c.colinear
        if c.mode != "one":
            idx = torch.arange(offset, offset + v0.numel(), device=v0.device)
            idx = idx // c.size if c.mode == "div" else idx % c.size
            a, b, s, colinear = a[idx], b[idx], s[idx], colinear[idx]
        out = (a * v0 + b * v1) / s
        out = torch.where(colinear, (1 - c.t) * v0 + c.t * v1, out)
        return out if base is None else base + out


def streamed_coefficients(src: ChunkSource, xs: list[torch.Tensor], has_base: bool, t: float):
    """The bfloat16 coefficients of whole-tensor vectors with torch's norms and sum reproduced
    natively, fused with the kernels that make the values (no tensor of the input's size)."""
    f = int(has_base)
    kernels = [lambda p, o, k=k: sphere.vector(p, has_base, k, o) for k in (f, f + 1)]
    n1, n2 = (float(n.clamp(min=NORM_EPS)) for n in sphere_native.norms(src, xs, kernels))
    prod = lambda p, o: sphere.nus_prod(p, has_base, n1, n2, o)  # noqa: E731
    cos = sphere_native.tensor_sum(src, xs, prod, TORCH_THREADS).clamp(-1, 1)
    return tuple(float(c) for c in angle_coefficients(cos, t))


def nuslerp(
    a: torch.Tensor,
    b: torch.Tensor,
    weights: tuple[float, float] = (0.5, 0.5),
    *,
    base: torch.Tensor | None = None,
    row_wise: bool = False,
    flatten: bool = True,
) -> torch.Tensor:
    """NuSLERP of ``a`` and ``b`` (of their differences from ``base`` when given)."""
    params = TensorParams(
        "tensor",
        {"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten},
        tuple({"weight": w} for w in weights),
        has_base=base is not None,
    )
    tensors = [a, b] if base is None else [base, a, b]
    return merge_tensors("nuslerp", tensors, params)
