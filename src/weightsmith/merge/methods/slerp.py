"""Spherical linear interpolation of two tensors, with mergekit's ``slerp`` semantics.

The angle comes from the normalized tensors (norm > eps, else the tensor itself), but the
coefficients are applied to the *original* tensors, so magnitudes interpolate as in mergekit.
When the directions are nearly colinear or opposite (|cos| > 0.9995) it falls back to lerp.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from weightsmith.core.parallel import pmap, sub_ranges
from weightsmith.kernels import dot, sphere
from weightsmith.kernels import merge as native
from weightsmith.merge.methods import sphere_native
from weightsmith.merge.methods.base import (
    NATIVE_PIECE,
    OUT_PIECES,
    ChunkSource,
    MergeMethod,
    Param,
    TensorParams,
    merge_method,
    merge_tensors,
    mergekit_threads,
    stream_native,
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
    tensor_statistics = True
    stats_ahead = True
    title = "SLERP"
    reference = "https://en.wikipedia.org/wiki/Slerp"
    needs_base = True
    exact_inputs = 2
    global_params = (Param("t", required=True, help="0 gives the base, 1 the other model"),)

    def prepare(self, src: ChunkSource, params: TensorParams) -> SlerpCoefficients | tuple:
        if params.narrow:
            return streamed_mergekit_coefficients(src, params.dtype, float(params.globals["t"]))
        dot = aa = bb = 0.0
        offset = 0
        for a, b in src.chunks([0, 1]):
            # products in float64 (exact for float32 inputs), like the native kernel, so both
            # paths derive the same coefficients; sub-chunk sums added in a fixed order

            def dots(r: tuple[int, int], a=a, b=b, start=offset) -> tuple[float, float, float]:
                x = a[r[0] - start : r[1] - start].double()
                y = b[r[0] - start : r[1] - start].double()
                return float(torch.dot(x, y)), float(torch.dot(x, x)), float(torch.dot(y, y))

            for d, xx, yy in pmap(dots, sub_ranges(offset, offset + a.numel())):
                dot, aa, bb = dot + d, aa + xx, bb + yy
            offset += a.numel()
        return slerp_coefficients(float(params.globals["t"]), dot, math.sqrt(aa), math.sqrt(bb))

    def combine(
        self, chunks: list[torch.Tensor], state: Any, params: TensorParams, offset: int
    ) -> torch.Tensor:
        a, b = chunks
        if params.narrow:  # mergekit: float32 products and sum (no fma), rounded to dtype
            s0, s1 = state
            dt = params.dtype
            return (s0 * a.to(dt).float() + s1 * b.to(dt).float()).to(dt)
        return a.mul(state.s0).add_(b, alpha=state.s1)

    def stream_stored(
        self, src: ChunkSource, params: TensorParams, out_dtype: torch.dtype
    ) -> Iterator[torch.Tensor] | None:
        """Both passes in the native kernels, straight from bfloat16/float32 storage: the
        statistics pass also checks for NaN/Inf, the second writes ``out_dtype`` directly.
        Products are exact in float64 (the torch path sums float32 dots of 256k pieces)."""
        if params.narrow:
            if not sphere_native.applies(src, params, out_dtype):
                return None
            return native_mergekit_slerp(src, float(params.globals["t"]), out_dtype)
        if not native.available():
            return None
        if out_dtype not in (torch.float32, torch.bfloat16):
            return None
        return self._stream_stored(src, params, out_dtype)

    def _stream_stored(
        self, src: ChunkSource, params: TensorParams, out_dtype: torch.dtype
    ) -> Iterator[torch.Tensor]:
        with src.stored(0) as a, src.stored(1) as b:
            if a.numel() != src.numel or b.numel() != src.numel:
                raise RuntimeError(f"{src.name}: stored inputs do not match the planned size")
            pieces = sub_ranges(0, src.numel, NATIVE_PIECE)

            def stats(r: tuple[int, int]):
                d = native.slerp_dots(a[r[0] : r[1]], b[r[0] : r[1]])
                if d is None:
                    raise RuntimeError(f"native SLERP kernel refused {a.dtype} / {b.dtype}")
                return d

            dot = aa = bb = 0.0
            for d, xx, yy, bad_a, bad_b in pmap(stats, pieces):  # fixed order of the sums
                if bad_a or bad_b:
                    src.fail_nonfinite(0 if bad_a else 1)
                dot, aa, bb = dot + d, aa + xx, bb + yy
            c = slerp_coefficients(float(params.globals["t"]), dot, math.sqrt(aa), math.sqrt(bb))

        def mix(xs: list[torch.Tensor], o: torch.Tensor) -> tuple[int, list[int]] | None:
            bad = native.lerp2(xs[0], xs[1], c.s0, c.s1, o)  # inputs checked by the stats pass
            return None if bad is None else (bad, [0, 0])

        yield from stream_native(src, out_dtype, mix)


MERGEKIT_CHUNK = 1 << 20  # elements per piece of mergekit's norm and dot sums


def mergekit_coefficients(a: torch.Tensor, b: torch.Tensor, t: float) -> tuple:
    """(s0, s1) as float32 tensors, computed as mergekit 0.1.5 does for a narrow compute dtype:
    float32 norms of 1M-element pieces, their norm, the dot of the normalized pieces."""
    pieces = range(0, a.numel(), MERGEKIT_CHUNK)
    na = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(a[i : i + MERGEKIT_CHUNK]) for i in pieces])
    )
    nb = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(b[i : i + MERGEKIT_CHUNK]) for i in pieces])
    )
    na, nb = torch.where(na > EPS, na, 1), torch.where(nb > EPS, nb, 1)
    parts = [
        ((a[i : i + MERGEKIT_CHUNK] / na) * (b[i : i + MERGEKIT_CHUNK] / nb)).sum() for i in pieces
    ]
    return _coefficients(torch.stack(parts).sum().clamp(-1, 1), t)


def _coefficients(dot: torch.Tensor, t: float) -> tuple:
    """(s0, s1) from mergekit's clamped float32 cosine."""
    tt = torch.tensor(t, dtype=torch.float32)
    linear = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    s0 = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    s1 = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    return s0, s1


def mergekit_pieces(src: ChunkSource, dtype: torch.dtype) -> Iterator[list[torch.Tensor]]:
    """Inputs 0 and 1 as mergekit's float32 pieces of ``MERGEKIT_CHUNK`` elements (rounded to
    ``dtype`` first), streamed from the chunks: each piece is the same contiguous float32
    tensor mergekit reduces, so its norms and sums come out bit for bit."""
    carry: list[list[torch.Tensor]] = [[], []]
    held = 0
    for pair in src.chunks([0, 1]):
        n, pos = pair[0].numel(), 0
        while pos < n:
            take = min(MERGEKIT_CHUNK - held, n - pos)
            for c, x in zip(carry, pair, strict=True):
                c.append(x[pos : pos + take])
            held, pos = held + take, pos + take
            if held == MERGEKIT_CHUNK:
                yield [_piece(c, dtype) for c in carry]
                carry, held = [[], []], 0
    if held:
        yield [_piece(c, dtype) for c in carry]


def _piece(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    x = parts[0] if len(parts) == 1 else torch.cat(parts)
    return x.to(dtype).float()


def streamed_mergekit_coefficients(src: ChunkSource, dtype: torch.dtype, t: float) -> tuple:
    """:func:`mergekit_coefficients` of inputs 0 and 1 in two streamed passes (norms, then the
    dot of the normalized pieces), holding one piece per input instead of whole tensors."""
    norms_a, norms_b = [], []
    for a, b in mergekit_pieces(src, dtype):
        norms_a.append(torch.linalg.vector_norm(a))
        norms_b.append(torch.linalg.vector_norm(b))
    if not norms_a:
        return mergekit_coefficients(torch.empty(0), torch.empty(0), t)
    na = torch.linalg.vector_norm(torch.stack(norms_a))
    nb = torch.linalg.vector_norm(torch.stack(norms_b))
    na, nb = torch.where(na > EPS, na, 1), torch.where(nb > EPS, nb, 1)
    parts = [((a / na) * (b / nb)).sum() for a, b in mergekit_pieces(src, dtype)]
    return _coefficients(torch.stack(parts).sum().clamp(-1, 1), t)


def native_mergekit_slerp(src: ChunkSource, t: float, out_dtype: torch.dtype):
    """mergekit's bfloat16 SLERP from the stored inputs: the float32 pieces' norms (torch's
    norm of a piece does not depend on the threads: pieces run in parallel), the native
    products of the normalized pieces summed as mergekit's threads sum them, then the native
    float32 mix rounded to bfloat16."""

    def kernel(coef: tuple[float, float]):
        return lambda p, o: sphere.slerp_pass(p, sphere.MIX, coef, o)

    return sphere_native.stream_mapped(
        src, out_dtype, lambda xs: _native_coefficients(src, xs, t), kernel
    )


def _native_coefficients(src: ChunkSource, xs: list[torch.Tensor], t: float) -> tuple:
    """(s0, s1) as floats: :func:`mergekit_coefficients` from the stored inputs."""
    n = src.numel

    def piece_norms(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = [x[i : i + MERGEKIT_CHUNK] for x in xs]
        direct = [dot.norm(q) for q in p]  # bfloat16 storage: torch's float32 norm, natively
        if all(v is not None and math.isfinite(v) for v in direct):
            return tuple(torch.tensor(v, dtype=torch.float32) for v in direct)
        f = sphere_native.span_buffers("slerp", 2, p[0].numel(), torch.float32)  # else (NaN/Inf)
        for k in (0, 1):
            if sphere.vector(p, False, k, f[k])[k]:
                src.fail_nonfinite(k)
        return torch.linalg.vector_norm(f[0]), torch.linalg.vector_norm(f[1])

    norms = pmap(piece_norms, range(0, n, MERGEKIT_CHUNK))
    if not norms:
        return tuple(float(c) for c in mergekit_coefficients(torch.empty(0), torch.empty(0), t))
    na, nb = (torch.linalg.vector_norm(torch.stack(ns)) for ns in zip(*norms, strict=True))
    na, nb = float(torch.where(na > EPS, na, 1)), float(torch.where(nb > EPS, nb, 1))
    if sphere_native.split_sum_matches() and sphere_native.native_float_sums():
        parts = _dot_parts(xs, n, na, nb)
    else:
        parts = _stored_dot_parts(xs, n, na, nb)
    return tuple(float(c) for c in _coefficients(torch.stack(parts).sum().clamp(-1, 1), t))


PRODUCT_SPAN = (
    1 << 18
)  # products made per call into a cached buffer (1 MB: in L2) that the sum reads


def _dot_parts(xs: list[torch.Tensor], n: int, na: float, nb: float) -> list[torch.Tensor]:
    """Each 1M piece's sum of the normalized products (a/na)·(b/nb), as mergekit's threads sum
    it: the products made span by span and fed in order to torch's float32 cascade, natively
    (each thread's part of each piece a task on the pool; no float32 product buffer)."""
    pieces = [(f, min(n, f + MERGEKIT_CHUNK)) for f in range(0, n, MERGEKIT_CHUNK)]
    tasks = [(f + a, f + b) for f, e in pieces for a, b in sphere_native.sum_parts(e - f)]

    def part(r: tuple[int, int]) -> float:
        red = sphere_native.float_sum(r[1] - r[0])
        (buf,) = sphere_native.span_buffers("slerp", 1, MERGEKIT_CHUNK, torch.float32)
        for s in range(r[0], r[1], PRODUCT_SPAN):
            o = buf[: min(r[1], s + PRODUCT_SPAN) - s]
            sphere.slerp_pass([x[s : s + o.numel()] for x in xs], sphere.PRODUCTS, (na, nb), o)
            red.feed(o)
        return red.result()

    sums = iter(pmap(part, tasks))
    return [
        sphere_native.split_sum_of([next(sums) for _ in sphere_native.sum_parts(e - f)], e - f)
        for f, e in pieces
    ]


def _stored_dot_parts(xs: list[torch.Tensor], n: int, na: float, nb: float) -> list[torch.Tensor]:
    """:func:`_dot_parts` with the products stored (a group of pieces at a time) and summed by
    torch."""
    parts = []
    group = OUT_PIECES * MERGEKIT_CHUNK
    held = torch.empty(min(group, n), dtype=torch.float32)  # reused by every group
    for first in range(0, n, group):
        prods = held[: min(group, n - first)]

        def products(i: int, first=first, prods=prods) -> None:
            p, o = [x[i : i + MERGEKIT_CHUNK] for x in xs], prods[i - first :][:MERGEKIT_CHUNK]
            sphere.slerp_pass(p, sphere.PRODUCTS, (na, nb), o)

        pmap(products, range(first, first + prods.numel(), MERGEKIT_CHUNK))
        sums = [prods[j : j + MERGEKIT_CHUNK] for j in range(0, prods.numel(), MERGEKIT_CHUNK)]
        if sphere_native.split_sum_matches():  # a piece's sum as mergekit's threads split it
            parts += pmap(sphere_native.split_sum, sums)
        else:
            with mergekit_threads():
                parts += [p.sum() for p in sums]
    return parts


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """mergekit-compatible SLERP of two tensors (float32 result)."""
    return merge_tensors("slerp", [a, b], t=t)
