"""Multi-SLERP as mergekit 0.1.5's ``multislerp``: barycentric interpolation on a hypersphere.

With vᵢ = xᵢ (− base when there is one), weights wᵢ (divided by their sum with
``normalize_weights``): uᵢ = vᵢ / (‖vᵢ‖ + eps), m = Σ wᵢuᵢ / ‖Σ wᵢuᵢ‖, tangents
τᵢ = uᵢ − ⟨uᵢ, m⟩·m, τ = Σ wᵢτᵢ, and out = (m·cos‖τ‖' + τ·sin‖τ‖'/‖τ‖')·Σ wᵢ‖vᵢ‖ (+ base),
with ‖τ‖' = ‖τ‖ + eps. One model: that model. When ‖Σ wᵢuᵢ‖ < eps: with two models their
weighted sum (+ base), with more an error.

``prepare`` computes the norms and dot products from whole tensors in the compute dtype as
mergekit does (the inputs of one tensor held while it runs); ``combine`` is per entry.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from weightsmith.errors import CheckpointError
from weightsmith.kernels import reduce, sphere
from weightsmith.merge.methods import sphere_native
from weightsmith.merge.methods.base import (
    ChunkSource,
    MergeMethod,
    Param,
    TensorParams,
    merge_method,
    merge_tensors,
    whole,
)
from weightsmith.merge.params import BOOL


@dataclass(frozen=True)
class SphereStats:
    weights: torch.Tensor  # (n, 1), normalized when asked
    norms: torch.Tensor  # (n, 1)
    mean_norm: torch.Tensor | None  # None: the linear fallback
    dots: torch.Tensor | None  # (n, 1)
    tangent_norm: torch.Tensor | None
    avg_norm: torch.Tensor | None


def sphere_stats(v: torch.Tensor, weights: torch.Tensor, eps: float, name: str) -> SphereStats:
    """The whole-tensor statistics of stacked flat vectors ``v`` (n, numel), as mergekit.

    ``v`` is overwritten (by the unit vectors) and every (n, numel) temporary of mergekit's
    expressions is written into one buffer: the same elementwise ops and reductions, so the
    same bits, with two tensors of that size instead of five."""
    w = weights.view(-1, 1)
    norms = torch.norm(v, dim=-1, keepdim=True)
    unit = v.div_(norms + eps)
    buf = torch.mul(unit, w)
    mean = buf.sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if v.shape[0] == 2:
            return SphereStats(w, norms, None, None, None, None)
        raise CheckpointError(
            f"tensor {name!r}: multislerp's weighted mean direction is zero (antipodal inputs "
            "whose weights cancel); change the weights"
        )
    mean = mean / mean_norm
    dots = torch.mul(unit, mean, out=buf).sum(-1, keepdim=True)
    torch.mul(dots, mean, out=buf)
    tangent = torch.sub(unit, buf, out=buf).mul_(w).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    avg_norm = (norms.squeeze(-1) * weights).sum()
    return SphereStats(w, norms, mean_norm, dots, tangent_norm, avg_norm)


@merge_method("multislerp")
class MultiSlerp(MergeMethod):
    tensor_statistics = True
    stats_ahead = True
    whole_tensor = True
    title = "Multi-SLERP"
    reference = "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"
    optional_base = True
    global_params = (
        Param("normalize_weights", True, help="divide the weights by their sum", kind=BOOL),
        Param("eps", 1e-8, help="added to norms", low=0.0),
    )
    model_params = (Param("weight", required=True, help="weight of each model"),)

    def prepare(self, src: ChunkSource, params: TensorParams) -> SphereStats | None:
        if len(params.models) == 1:
            return None
        dt = params.dtype
        first = 1 if params.has_base else 0
        minus = 0 if params.has_base else None  # task vectors subtracted chunk by chunk
        row = whole(src, first, dt, minus)
        v = torch.empty(src.num_inputs - first, src.numel, dtype=dt, device=row.device)
        v[0].copy_(row)
        del row
        for k in range(1, len(v)):
            whole(src, first + k, dt, minus, out=v[k])
        weights = self._weights(params, v)
        return sphere_stats(v, weights, float(params.globals["eps"]), src.name)

    def stream_stored(
        self, src: ChunkSource, params: TensorParams, out_dtype: torch.dtype
    ) -> Iterator[torch.Tensor] | None:
        """bfloat16 arithmetic: the native kernels write each tensor mergekit reduces (task
        vector, mean, products with the mean, tangent) into one buffer for torch's norms and
        sums, then the output. None (the torch path) for one model or the linear fallback."""
        if len(params.models) == 1 or not sphere_native.applies(src, params, out_dtype):
            return None
        has_base, eps = bool(params.has_base), float(params.globals["eps"])

        def kernel(stats: dict):
            if "cache" not in stats:
                return lambda p, o, s: sphere.ms_pass(p, has_base, sphere.OUTPUT, stats, o)
            rows = stats["cache"].rows
            return lambda p, o, s: sphere.ms_rows(
                [r[s : s + o.numel()] for r in rows],
                p[0] if has_base else None, sphere.OUTPUT, stats, o,
            )  # fmt: skip

        return sphere_native.stream_mapped(
            src,
            out_dtype,
            lambda xs: self._native_stats(src, xs, params, has_base, eps),
            kernel,
            offsets=True,
        )

    def _native_stats(
        self, src: ChunkSource, xs: list[torch.Tensor], params: TensorParams, has_base, eps
    ) -> dict | None:
        k = src.num_inputs - int(has_base)
        if sphere_native.native_reductions():
            return streamed_stats(src, xs, has_base, eps, lambda n: self._weights(params, n))
        buf = torch.empty(src.numel, dtype=torch.bfloat16)

        def run(mode: int, stats: dict, which: int = 0) -> torch.Tensor:
            fill = sphere_native.fill
            return fill(
                src, xs, buf, lambda p, o: sphere.ms_pass(p, has_base, mode, stats, o, which)[1]
            )

        norms = []
        for i in range(k):  # a row's norm of mergekit's (k, n) norm is that row's alone
            fill = sphere_native.fill
            fill(src, xs, buf, lambda p, o, i=i: sphere.vector(p, has_base, int(has_base) + i, o))
            norms.append(torch.norm(buf, dim=-1, keepdim=True))
        norms_t = torch.stack(norms)  # (k, 1)
        w = self._weights(params, norms_t)
        stats = {"ne": (norms_t + eps).float().reshape(-1).tolist(), "w": w.float().tolist()}
        mean_norm = torch.norm(run(sphere.MEAN, stats))
        if mean_norm < eps:
            return None  # the two-model linear fallback (or its error): the torch path
        stats["mn"] = float(mean_norm)
        dots = []
        for i in range(k):  # mergekit's (k, n).sum(-1): each row summed by one thread
            run(sphere.UNIT_DOT, stats, i)
            with sphere_native.single_thread():
                dots.append(buf.sum(-1, keepdim=True))
        stats["dots"] = torch.stack(dots).float().reshape(-1).tolist()
        tangent_norm = torch.norm(run(sphere.TANGENT, stats)) + eps
        stats["c1"] = float(torch.cos(tangent_norm))
        stats["c2"] = float(torch.sin(tangent_norm) / tangent_norm)
        stats["avg"] = float((norms_t.squeeze(-1) * w).sum())
        return stats

    @staticmethod
    def _weights(params: TensorParams, like: torch.Tensor) -> torch.Tensor:
        w = torch.tensor(params.model_values("weight"), dtype=like.dtype, device=like.device)
        return w / w.sum() if params.globals["normalize_weights"] else w

    def combine(
        self, chunks: list[torch.Tensor], state: Any, params: TensorParams, offset: int
    ) -> torch.Tensor:
        dt = params.dtype
        has_base = bool(params.has_base)
        if state is None:  # one model: that model, as mergekit
            return chunks[-1].to(dt)
        base = chunks[0].to(dt) if has_base else None
        v = torch.stack([c.to(dt) for c in chunks[1 if has_base else 0 :]])
        if base is not None:
            v -= base
        s: SphereStats = state
        w = s.weights
        if s.mean_norm is None:  # the two-model linear fallback
            out = v[0] * w[0] + v[1] * w[1]
        else:
            unit = v / (s.norms + float(params.globals["eps"]))
            mean = (unit * w).sum(0) / s.mean_norm
            tangent = ((unit - s.dots * mean) * w).sum(0)
            n = s.tangent_norm
            out = (mean * torch.cos(n) + tangent * (torch.sin(n) / n)) * s.avg_norm
        return out if base is None else out + base


class _Passes:
    """The statistics passes after the task vectors' norms: the mean's norm, the products'
    row sums, the tangent's norm. Where k + 1 rows of the tensor fit
    ``sphere_native.ROWS_BYTES`` (``cache``), the first pass keeps the task vectors and each
    later pass reads what the one before left there, its kernel feeding the reductions itself
    on this thread (``sphere.ms_reduce``, :func:`sphere_native.fused_reductions`), the pool
    left to the previous tensor's output; otherwise each pass reads the inputs again on the
    pool (``sphere.ms_pass``)."""

    def __init__(self, src: ChunkSource, xs: list[torch.Tensor], has_base: bool, k: int):
        self.src, self.xs, self.has_base, self.k = src, xs, has_base, k
        fits = sphere_native.RowCache.fits(k + 1, src.numel)
        self.cache = sphere_native.RowCache(k + 1, src.numel) if fits else None

    def _fused(self, mode: int, stats: dict, kind: str, rows: int) -> list[float]:
        def run(feeds: list, scratch: torch.Tensor, step: int) -> None:
            sphere.ms_reduce(self.cache.rows, mode, stats, feeds, scratch, step)

        whole = [(0, self.src.numel)]
        return [v[0] for v in sphere_native.fused_reductions([(kind, whole)] * rows, run)]

    def norm(self, mode: int, stats: dict) -> torch.Tensor:
        """torch.norm (bfloat16) of the mean (``MEAN``) or the tangent (``TANGENT``)."""
        if self.cache is not None:
            return torch.tensor(self._fused(mode, stats, "norm", 1)[0], dtype=torch.bfloat16)
        has_base = self.has_base
        kernel = lambda p, o: sphere.ms_pass(p, has_base, mode, stats, o)[1]  # noqa: E731
        return sphere_native.norms(self.src, self.xs, [kernel])[0]

    def dots(self, stats: dict) -> list[torch.Tensor]:
        """mergekit's (k, n).sum(-1) of the products with the direction: each row summed by
        one thread (one part), bfloat16."""
        if self.cache is not None:
            sums = self._fused(sphere.UNIT_DOT, stats, "casc", self.k)
            return [torch.tensor(reduce.combine([v], 1), dtype=torch.bfloat16) for v in sums]
        has_base = self.has_base
        kernel = lambda p, o: sphere.ms_pass(p, has_base, sphere.UNIT_DOT, stats, o, -1)[1]  # noqa: E731
        return sphere_native.row_sums(self.src, self.xs, kernel, self.k)


def streamed_stats(src: ChunkSource, xs: list[torch.Tensor], has_base: bool, eps: float, weights):
    """The native statistics with torch's norms and sums reproduced natively, each fused with
    the kernel that makes the values it reduces (no tensor of the input's size is stored but
    the kept rows, :class:`_Passes`). ``weights(norms)``: the recipe's weights in the norms'
    dtype. None: the linear fallback."""
    k, f = src.num_inputs - int(has_base), int(has_base)
    passes = _Passes(src, xs, has_base, k)
    cache = passes.cache
    vectors = [lambda p, o, i=i: sphere.vector(p, has_base, f + i, o) for i in range(k)]
    norms = sphere_native.norms(src, xs, vectors, None if cache is None else cache.rows[:k])
    norms_t = torch.stack([n.reshape(1) for n in norms])
    w = weights(norms_t)
    stats = {"ne": (norms_t + eps).float().reshape(-1).tolist(), "w": w.float().tolist()}
    mean_norm = passes.norm(sphere.MEAN, stats)
    if mean_norm < eps:
        return None  # the two-model linear fallback (or its error): the torch path
    stats["mn"] = float(mean_norm)
    stats["dots"] = torch.stack(passes.dots(stats)).float().reshape(-1).tolist()
    tangent_norm = passes.norm(sphere.TANGENT, stats) + eps
    stats["c1"] = float(torch.cos(tangent_norm))
    stats["c2"] = float(torch.sin(tangent_norm) / tangent_norm)
    stats["avg"] = float((norms_t.squeeze(-1) * w).sum())
    if cache is not None:
        stats["cache"] = cache  # the output pass reads the direction and the tangent kept
    return stats


def multislerp(
    tensors: list[torch.Tensor],
    weights: list[float],
    *,
    base: torch.Tensor | None = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Multi-SLERP of ``tensors`` (of their differences from ``base`` when given)."""
    params = TensorParams(
        "tensor",
        {"normalize_weights": normalize_weights, "eps": eps},
        tuple({"weight": w} for w in weights),
        has_base=base is not None,
    )
    return merge_tensors("multislerp", tensors if base is None else [base, *tensors], params)
