"""TIES merging (Yadav et al. 2023) as mergekit's ``ties``: trim, elect sign, disjoint mean.

Each task vector keeps its ``int(density·numel)`` largest-magnitude entries (entries equal to
the threshold are kept in storage order until the count is reached, so the result does not
depend on how the tensor is chunked; in a narrow compute dtype, mergekit's own sort decides
which equal ones are kept, see :mod:`.sortmask`); the sign of each entry is elected by the total weighted
mass; entries that agree are averaged (``normalize``, on by default).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from weightsmith.core.parallel import SUB_ELEMENTS, default_workers, pmap, sub_ranges
from weightsmith.kernels import merge as native
from weightsmith.merge.methods.base import (
    ChunkSource,
    Param,
    TensorParams,
    merge_method,
    merge_tensors,
)
from weightsmith.merge.methods.sortmask import (
    can_stream,
    sort_range_mask,
    stored_masks,
    stream_masked,
)
from weightsmith.merge.methods.task_arithmetic import GeneralizedTaskArithmetic
from weightsmith.merge.params import BOOL


@dataclass(frozen=True)
class TopK:
    """Keep |δ| > threshold, and |δ| == threshold at flat index <= last_tie."""

    threshold: float
    last_tie: int  # -1: keep no ties; numel: keep all


SAMPLE = 1 << 16  # values sampled to bracket the k-th largest before the exact selection
PIECE = SUB_ELEMENTS  # elements per parallel counting piece (cache-sized)


def _pieces(n: int) -> list[tuple[int, int]]:
    return sub_ranges(0, n, PIECE)


def kth_largest(values: torch.Tensor, k: int) -> float:
    """The exact k-th largest of a flat float tensor (1 <= k <= numel)."""
    return kth_largest_counts(values, k)[0]


def kth_largest_counts(values: torch.Tensor, k: int) -> tuple[float, int, int]:
    """(k-th largest value, how many values are greater, how many are equal to it).

    ``kthvalue`` on a whole weight matrix is slow on CPU, so a strided sample first brackets
    the answer in a narrow band [lo, hi]; the exact selection then runs on the band alone
    (counting and band extraction run in parallel pieces). When the sample misjudges (the band
    does not hold the k-th value) it falls back to ``kthvalue`` on everything, so the result is
    always exact.
    """
    n = values.numel()
    if n > 16 * SAMPLE:
        sample = values[:: n // SAMPLE].sort().values
        m = sample.numel()
        q = 1.0 - k / n  # the answer's quantile
        margin = 8.0 * (q * (1.0 - q) / m) ** 0.5 + 8.0 / m
        lo = float(sample[min(m, max(1, int((q - margin) * m))) - 1])
        hi = float(sample[min(m, max(1, int((q + margin) * m) + 1)) - 1])

        def scan(r: tuple[int, int]) -> tuple[int, torch.Tensor]:
            v = values[r[0] : r[1]]
            return int(torch.count_nonzero(v > hi)), v[(v >= lo) & (v <= hi)]

        parts = pmap(scan, _pieces(n))
        above = sum(c for c, _ in parts)
        band = torch.cat([b for _, b in parts])
        rank = k - above  # the answer is the rank-th largest inside the band
        if lo < hi and 1 <= rank <= band.numel():
            kth = float(torch.kthvalue(band, band.numel() - rank + 1).values)
            greater = above + int(torch.count_nonzero(band > kth))
            return kth, greater, int(torch.count_nonzero(band == kth))
    kth = float(torch.kthvalue(values, n - k + 1).values)
    return kth, int(torch.count_nonzero(values > kth)), int(torch.count_nonzero(values == kth))


def topk_threshold(magnitudes: torch.Tensor, k: int) -> TopK:
    """The cut that keeps exactly the ``k`` largest of a flat float tensor of magnitudes."""
    n = magnitudes.numel()
    if k >= n:
        return TopK(-1.0, n)
    kth, greater, equal = kth_largest_counts(magnitudes, k)
    need = k - greater  # >= 1 ties at the k-th largest value are kept, in storage order
    if need >= equal:
        return TopK(kth, n)  # every tie is kept (the usual case for real-valued deltas)
    pieces = _pieces(n)
    counts = pmap(lambda r: int(torch.count_nonzero(magnitudes[r[0] : r[1]] == kth)), pieces)
    seen = 0
    for (start, stop), count in zip(pieces, counts, strict=True):
        if seen + count >= need:
            eq = magnitudes[start:stop] == kth
            pos = torch.nonzero(eq).flatten()[need - seen - 1]
            return TopK(kth, start + int(pos))
        seen += count
    raise AssertionError("unreachable: not enough ties")


def apply_topk(delta: torch.Tensor, cut: TopK, offset: int) -> torch.Tensor:
    """Zero the entries of a chunk of δ (starting at flat ``offset``) outside the top k."""
    if cut.threshold < 0:
        return delta
    mag = delta.abs()
    end = offset + delta.numel()
    if cut.last_tie >= end - 1:  # every tie in this chunk is kept
        return delta.mul_(mag >= cut.threshold)  # (mul by a bool mask beats masked_fill_)
    keep = mag > cut.threshold
    if cut.last_tie >= offset:
        idx = torch.arange(offset, end, device=delta.device)
        keep |= (mag == cut.threshold) & (idx <= cut.last_tie)
    return delta.mul_(keep)


def native_topk_cuts(src: ChunkSource, keep: dict[int, int]) -> dict[int, TopK] | None:
    """The top-k cuts of several task vectors by radix selection with the native kernels.

    Two passes over the inputs (top 16 bits of |δ|'s float pattern, then the low 16 bits inside
    the bin that holds the k-th largest), no |δ| copy; a third pass only when ties at the
    threshold must be cut in storage order. Same cuts as :func:`topk_threshold`.
    None when a chunk is not something the kernels take.
    """
    models = sorted(keep)
    hist = {k: torch.zeros(native.BINS, dtype=torch.int64) for k in models}
    prefix = dict.fromkeys(models, 0)

    def scan(level: int) -> bool:
        workers = default_workers()
        for chunks in src.chunks([0, *[k + 1 for k in models]]):
            base, xs = chunks[0], chunks[1:]
            if not native.available(base, *xs):
                return False
            n = base.numel()
            step = -(-n // workers)
            ranges = [(a, min(a + step, n)) for a in range(0, n, step)]
            for k, x in zip(models, xs, strict=True):

                def count(r: tuple[int, int], base=base, x=x, k=k) -> torch.Tensor:
                    h = torch.zeros(native.BINS, dtype=torch.int64)
                    native.absdelta_hist(base[r[0] : r[1]], x[r[0] : r[1]], level, prefix[k], h)
                    return h

                for h in pmap(count, ranges):
                    hist[k] += h
        return True

    if not scan(0):
        return None
    above = {}
    for k in models:
        prefix[k], above[k] = native.select_from_hist(hist[k], keep[k])
        hist[k].zero_()
    if not scan(1):
        return None
    cuts: dict[int, TopK] = {}
    for k in models:
        low, above_low = native.select_from_hist(hist[k], keep[k] - above[k])
        kth = native.bits_to_float((prefix[k] << 16) | low)
        greater, equal = above[k] + above_low, int(hist[k][low])
        need = keep[k] - greater  # ties at the k-th value kept in storage order
        cuts[k] = TopK(kth, src.numel) if need >= equal else TopK(kth, _nth_tie(src, k, kth, need))
    return cuts


def _nth_tie(src: ChunkSource, k: int, value: float, need: int) -> int:
    """Flat index of the ``need``-th entry (1-based, storage order) with |δ_k| == value."""
    seen = offset = 0
    for base, x in src.chunks([0, k + 1]):
        pieces = _pieces(base.numel())
        counts = pmap(
            lambda r, base=base, x=x: native.absdelta_count_eq(
                base[r[0] : r[1]], x[r[0] : r[1]], value
            ),
            pieces,
        )
        for (a, b), c in zip(pieces, counts, strict=True):
            if seen + c >= need:
                return offset + a + native.absdelta_nth_eq(base[a:b], x[a:b], value, need - seen)
            seen += c
        offset += base.numel()
    raise AssertionError("unreachable: not enough ties")


@merge_method("ties")
class Ties(GeneralizedTaskArithmetic):
    tensor_statistics = True
    title = "TIES"
    reference = "https://arxiv.org/abs/2306.01708"
    consensus = True
    global_params = (
        Param("normalize", True, help="divide by the sum of the agreeing weights", kind=BOOL),
        Param("lambda", 1.0, help="scale of the mixed task vector"),
    )
    model_params = (
        Param("weight", required=True, help="weight of each task vector"),
        Param(
            "density",
            1.0,
            help="fraction of each task vector's entries kept (by magnitude)",
            low=0.0,
            low_open=True,
            high=1.0,
        ),
    )

    def prepare(self, src: ChunkSource, params: TensorParams) -> list[TopK | None]:
        densities = params.model_values("density")
        keep = {k: max(1, int(d * src.numel)) for k, d in enumerate(densities)}  # mergekit: >= 1
        active = [k for k, d in enumerate(densities) if d < 1.0 and keep[k] < src.numel]
        keep = {k: keep[k] for k in active}
        cuts: list[TopK | None] = [None] * len(densities)  # None: every entry is kept
        if active and not params.narrow and native.available(torch.empty(0)):
            found = native_topk_cuts(src, keep)
            if found is not None:
                for k, cut in found.items():
                    cuts[k] = cut
                return cuts
        for k in active:
            if params.narrow:  # mergekit's argsort(|δ|)[:k], its own pick among equal |δ|
                cuts[k] = sort_range_mask(src, k, params.dtype, 0, keep[k], descending=True)
                continue
            mags, pos = None, 0
            for base, x in src.chunks([0, k + 1]):
                n = base.numel()
                if mags is None:  # on the chunks' device (the compute device)
                    mags = torch.empty(src.numel, dtype=torch.float32, device=base.device)

                def fill(r: tuple[int, int], base=base, x=x, pos=pos, mags=mags) -> None:
                    a, b = r
                    torch.sub(x[a:b], base[a:b], out=mags[pos + a : pos + b]).abs_()

                pmap(fill, sub_ranges(0, n))
                pos += n
            cuts[k] = topk_threshold(mags if mags is not None else torch.empty(0), keep[k])
            del mags
        return cuts

    def stream_stored(
        self, src: ChunkSource, params: TensorParams, out_dtype: torch.dtype
    ) -> Iterator[torch.Tensor] | None:
        """bfloat16 arithmetic: mergekit's masks by the native sort selection, then one native
        pass of its masked task arithmetic over the stored inputs (the torch path's bits)."""
        if not params.narrow or not can_stream(src, params, out_dtype):
            return None
        wanted = {}
        for k, d in enumerate(params.model_values("density")):
            keep = max(1, int(d * src.numel))  # mergekit keeps at least one
            if d < 1.0 and keep < src.numel:
                wanted[k] = (0, keep, True)
        masks = stored_masks(src, wanted)
        if masks is None:
            return None
        return stream_masked(src, params, out_dtype, masks, consensus=True)

    def native_sparsify(self, k: int, state: Any, params: TensorParams) -> native.Sparsify:
        cut = state[k]
        if cut is None:
            return native.Sparsify()
        return native.Sparsify(native.TOPK, threshold=cut.threshold, last_tie=cut.last_tie)

    def sparsify(
        self, delta: torch.Tensor, k: int, state: Any, params: TensorParams, offset: int
    ) -> torch.Tensor:
        cut = state[k]
        if isinstance(cut, torch.Tensor):  # mergekit's own pick among the ties
            return delta.mul_(cut[offset : offset + delta.numel()])
        return delta if cut is None else apply_topk(delta, cut, offset)


def ties(
    base: torch.Tensor,
    models: list[torch.Tensor],
    weights: list[float],
    density: float | list[float],
    *,
    normalize: bool = True,
    lam: float = 1.0,
) -> torch.Tensor:
    """TIES-merge ``models`` onto ``base`` (float32 result)."""
    dens = density if isinstance(density, list) else [density] * len(models)
    params = TensorParams(
        "tensor",
        {"normalize": normalize, "lambda": lam},
        tuple({"weight": w, "density": d} for w, d in zip(weights, dens, strict=True)),
    )
    return merge_tensors("ties", [base, *models], params)
