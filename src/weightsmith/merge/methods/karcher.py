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

import ctypes
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch

from weightsmith.core.memory import release_freed_memory
from weightsmith.core.parallel import pipelined, pmap, pool_workers, sub_ranges
from weightsmith.kernels import dot as torch_order
from weightsmith.kernels import narrow as native
from weightsmith.kernels.quant import count_nonfinite
from weightsmith.merge.methods.base import (
    ChunkSource,
    MergeMethod,
    Param,
    TensorParams,
    fail_overflow,
    merge_method,
    merge_tensors,
    mergekit_threads,
    whole,
)
from weightsmith.merge.params import INT

Term = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (direction u, cos, coefficient c)
LEAN_NUMEL = 1 << 25  # from this size on the tangent is remade where used, never stored
SPAN = 1 << 20  # entries of a remade tangent made at a time for its norm
OUT_PIECE = 1 << 23  # entries per output piece handed to the writer (16 MB of bfloat16)


class Remade(NamedTuple):
    """A tangent that is not stored: the mean and the terms it is remade from where it is
    used (its norm, the step), for tensors of :data:`LEAN_NUMEL` entries or more."""

    m: torch.Tensor
    terms: list[Term]


class TorchSteps:
    """The steps as mergekit writes them (any dtype)."""

    def norm(self, x: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
        return torch.linalg.vector_norm(x.to(acc))

    def dots(self, m: torch.Tensor, units: list[torch.Tensor], div: torch.Tensor | None):
        """(m, [torch.dot(m, u) for u in units]), m divided by ``div`` first when given."""
        m = m if div is None else self.div(m, div)
        # in this thread: torch's bfloat16 dot is a parallel reduction whose bits may depend on
        # the thread count (mergekit_threads sets mergekit's); a pool thread could differ
        return m, [torch.dot(m, u) for u in units]

    def div(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return (x / s).to(x.dtype)

    def axpy(self, y: torch.Tensor, x: torch.Tensor, a: float) -> None:
        y += a * x

    def tangent(self, t, u, m, cos: torch.Tensor, c: torch.Tensor) -> None:
        t += c * (u - cos * m)

    def weighted_sum(self, units: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
        """0 + Σ a·u, in order (the starting mean)."""
        out = torch.zeros_like(units[0])
        for a, u in zip(weights, units, strict=True):
            self.axpy(out, u, a)
        return out

    def tangents(self, m: torch.Tensor, terms: list[Term], out: torch.Tensor | None):
        """Σ c·(u − cos·m) over the terms (u, cos, c), in order, from zeros."""
        t = torch.zeros_like(m)
        for u, cos, c in terms:
            self.tangent(t, u, m, cos, c)
        return t

    def step(self, m: torch.Tensor, t: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        return (torch.cos(step) * m + torch.sin(step) * (t / step)).to(m.dtype)

    def tangents_normed(self, m: torch.Tensor, terms: list[Term], out, acc: torch.dtype):
        """(the tangent, its norm)."""
        t = self.tangents(m, terms, out)
        return t, self.norm(t, acc)

    def step_normed(self, m: torch.Tensor, t, step: torch.Tensor, acc: torch.dtype):
        """(the stepped mean, its norm)."""
        m = self.step(m, t, step)
        return m, self.norm(m, acc)

    def scale(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return s * x


class NativeSteps(TorchSteps):
    """The same steps on bfloat16 tensors by the native kernels, in parallel pieces and in
    place (the inputs' copies become the directions): the same bits, one pass per step. The
    scalars are passed as torch uses them: 0-dim float32 factors rounded to bfloat16, Python
    floats and divisors as float32. Norms and dots are torch's reductions in torch's order
    (:mod:`weightsmith.kernels.dot`), or torch's own where that order is not known here."""

    def __init__(self, lean: bool = False) -> None:
        self.lean = lean

    def norm(self, x: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
        v = torch_order.norm(x) if acc == torch.float32 else None
        return super().norm(x, acc) if v is None else torch.tensor(v, dtype=torch.float32)

    def tangents_normed(self, m: torch.Tensor, terms: list[Term], out, acc: torch.dtype):
        """The tangent made span by span on the pool while one task feeds the finished spans to
        the norm in order; lean: into a few span buffers only (:class:`Remade`)."""
        n = m.numel()
        if acc != torch.float32 or torch_order.norm_lanes() is None:
            t = torch.empty_like(m)
            self._tangent_into(t, m, terms, 0, n)
            return (Remade(m, terms) if self.lean else t), super().norm(t, acc)
        feed = torch_order.NormFeed(n)
        if self.lean:
            bufs = [torch.empty(min(n, SPAN), dtype=m.dtype) for _ in range(4 * pool_workers())]
            t = Remade(m, terms)

            def at(s: int) -> torch.Tensor:
                return bufs[(s // SPAN) % len(bufs)]
        else:
            t = out if isinstance(out, torch.Tensor) else torch.empty_like(m)

            def at(s: int) -> torch.Tensor:
                return t[s:]

        pipelined(
            n,
            SPAN,
            lambda s, e: self._tangent_into(at(s), m, terms, s, e),
            lambda s, e: feed.feed(at(s)[: e - s]),
        )
        return t, torch.tensor(feed.result(), dtype=torch.float32)

    def step_normed(self, m: torch.Tensor, t, step: torch.Tensor, acc: torch.dtype):
        """The step span by span on the pool, the stepped spans fed to the norm in order."""
        if acc != torch.float32 or torch_order.norm_lanes() is None:
            return super().step_normed(m, t, step, acc)
        feed = torch_order.NormFeed(m.numel())
        pipelined(
            m.numel(),
            SPAN,
            lambda s, e: self._step_span(m, t, step, s, e),
            lambda s, e: feed.feed(m[s:e]),
        )
        return m, torch.tensor(feed.result(), dtype=torch.float32)

    def dots(self, m: torch.Tensor, units: list[torch.Tensor], div: torch.Tensor | None):
        got = torch_order.dots(m, units, 0.0 if div is None else float(div), pmap)
        return (m, got) if got is not None else super().dots(m, units, div)

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

    def weighted_sum(self, units: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
        """One pass for all the terms (weights as the float32 values torch multiplies by)."""
        out, lib = torch.empty_like(units[0]), native.library()
        a = (ctypes.c_float * len(units))(*[float(torch.tensor(w)) for w in weights])

        def piece(r: tuple[int, int]) -> None:
            at = 2 * r[0]
            us = (ctypes.c_void_p * len(units))(*[u.data_ptr() + at for u in units])
            lib.ws_bf16_wsum(out.data_ptr() + at, us, len(units), r[1] - r[0], a)

        pmap(piece, sub_ranges(0, out.numel()))
        return out

    def tangents(self, m: torch.Tensor, terms: list[Term], out: torch.Tensor | None):
        """One pass for all the terms, into ``out`` (reused between iterations) when given; lean:
        nothing stored (:class:`Remade`)."""
        if self.lean:
            return Remade(m, terms)
        t = torch.empty_like(m) if not isinstance(out, torch.Tensor) else out
        self._tangent_into(t, m, terms, 0, m.numel())
        return t

    @staticmethod
    def _term_args(terms: list[Term], at: int) -> tuple:
        """The C arguments of the terms for entries from ``at``: units, k, cos, coefficients."""
        k = len(terms)
        units = (ctypes.c_void_p * max(k, 1))(*[u.data_ptr() + 2 * at for u, _, _ in terms])
        cos = (ctypes.c_float * max(k, 1))(*[float(c) for _, c, _ in terms])
        coef = (ctypes.c_float * max(k, 1))(*[float(c) for _, _, c in terms])
        return units, k, cos, coef

    def _tangent_into(self, t: torch.Tensor, m: torch.Tensor, terms: list[Term], lo: int, hi: int):
        """t[: hi − lo] = the tangent of entries [lo, hi), in parallel pieces."""
        lib = native.library()

        def piece(r: tuple[int, int]) -> None:
            units, k, cos, coef = self._term_args(terms, r[0])
            out, mid = t.data_ptr() + 2 * (r[0] - lo), m.data_ptr() + 2 * r[0]
            lib.ws_karcher_tangents(out, units, k, mid, r[1] - r[0], cos, coef)

        pmap(piece, sub_ranges(lo, hi))

    def step(self, m: torch.Tensor, t: torch.Tensor | Remade, step: torch.Tensor) -> torch.Tensor:
        pmap(lambda r: self._step_span(m, t, step, r[0], r[1]), sub_ranges(0, m.numel()))
        return m

    def _step_span(self, m: torch.Tensor, t, step: torch.Tensor, lo: int, hi: int) -> None:
        """The step on entries [lo, hi) of m, in place (a lean tangent remade tile by tile)."""
        cos, sin = float(torch.cos(step).bfloat16()), float(torch.sin(step).bfloat16())
        lib, at, n = native.library(), m.data_ptr() + 2 * lo, hi - lo
        if isinstance(t, Remade):
            units, k, cs, coef = self._term_args(t.terms, lo)
            lib.ws_karcher_step_terms(at, units, k, n, cs, coef, cos, sin, float(step))
        else:
            lib.ws_karcher_step(at, t.data_ptr() + 2 * lo, n, cos, sin, float(step))

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
    norms = [steps.norm(x, acc) for x in tensors]
    keep = [i for i, n in enumerate(norms) if float(n) > tol]
    if not keep:
        return sum(x * 0 for x in tensors)
    total = sum(alphas[i] for i in keep)
    weights = [alphas[i] / total for i in keep]
    dirs = [steps.div(tensors[i], norms[i]) for i in keep]
    mean = steps.weighted_sum(dirs, weights)
    size = steps.norm(mean, acc)
    mean = dirs[0].clone() if float(size) < tol else steps.div(mean, size)
    tangent = due = None  # due: the mean's norm, its division fused into the next dots
    for _ in range(max_iter):
        terms = []
        mean, dots = steps.dots(mean, dirs, due)
        due = None
        for a, u, dot in zip(weights, dirs, dots, strict=True):
            cos = torch.clamp(dot, -1.0, 1.0)
            theta = torch.arccos(cos)
            if float(theta) >= tol:
                terms.append((u, cos, a * (theta / torch.sin(theta))))
        tangent, step = steps.tangents_normed(mean, terms, tangent, acc)
        if float(step) < tol:
            break
        mean, size = steps.step_normed(mean, tangent, step, acc)
        if float(size) > tol:
            due = size
    if due is not None:
        mean = steps.div(mean, due)
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
        fast = params.dtype == torch.bfloat16 and src.numel > 0 and native.available()
        if fast and n > 1:
            torch_order.chunk_groups(src.numel)  # probes torch first: before the inputs load
            release_freed_memory()  # and hands the probes' buffers back
        tensors = [whole(src, i, params.dtype) for i in range(n)]
        max_iter, tol = int(params.globals["max_iter"]), float(params.globals["tol"])
        lean = src.numel >= LEAN_NUMEL
        cpu = all(t.device.type == "cpu" for t in tensors)
        steps = NativeSteps(lean) if fast and cpu else None
        return karcher_mean(tensors, [1.0 / n] * n, max_iter, tol, steps)

    def combine(
        self, chunks: list[torch.Tensor], state: Any, params: TensorParams, offset: int
    ) -> torch.Tensor:
        return state[offset : offset + chunks[0].numel()]

    def stream_stored(
        self, src: ChunkSource, params: TensorParams, out_dtype: torch.dtype
    ) -> Iterator[torch.Tensor] | None:
        """bfloat16 arithmetic and output: the result handed out as it is, in pieces (the
        inputs are not read again just to pace ``combine``)."""
        if params.dtype != torch.bfloat16 or out_dtype != torch.bfloat16 or src.numel == 0:
            return None
        self.validate(params)
        with mergekit_threads():
            out = self.prepare(src, params)
        return _checked_pieces(out, src.name)


def _checked_pieces(out: torch.Tensor, name: str) -> Iterator[torch.Tensor]:
    for first in range(0, out.numel(), OUT_PIECE):
        piece = out[first : first + OUT_PIECE]
        bad = count_nonfinite(piece)
        if bad if bad is not None else not bool(torch.isfinite(piece).all()):
            fail_overflow(name, out.dtype)
        yield piece


def karcher(tensors: list[torch.Tensor], *, max_iter: int = 10, tol: float = 1e-5):
    """Karcher mean of ``tensors`` with equal weights."""
    return merge_tensors("karcher", tensors, max_iter=max_iter, tol=tol)
