"""mergekit's bfloat16 SCE in the native kernels, straight from the stored inputs.

Three passes over the inputs as stored: the variance across the task vectors (Welford in
float64 over the models, as torch.var reduces a bfloat16 stack, rounded to bfloat16), then
the per-model squares of the selected task vectors, then the erase-and-mean output. The
selection is torch.topk's set on the whole bfloat16 variance (its pick among equal variances
is mergekit's): libstdc++'s nth_element replayed on 4-byte indices (``ws_topk_mask``; torch's
own topk holds 16 bytes per entry) where torch uses nth_element, torch.topk otherwise. torch's
own ``mean`` (its float32 cascade sums) gives the model weights, with mergekit's thread count;
only the variance, the mask and one model's squares are held, never the stacked task vectors.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from weightsmith.core.parallel import pmap, sub_ranges
from weightsmith.kernels import merge_narrow
from weightsmith.merge.methods.base import (
    NATIVE_PIECE,
    ChunkSource,
    mergekit_threads,
    stored_inputs,
    stream_native,
)

MAX_MODELS = 31  # merge_kernels.c's MAXK − 1 (the base takes one slot)
BF16 = torch.bfloat16


def _check(src: ChunkSource, bad: list[int] | None) -> None:
    if bad is None:
        raise RuntimeError(f"{src.name}: native SCE kernel refused its inputs")
    for i, n in enumerate(bad):
        if n:
            src.fail_nonfinite(i)


def variance(src: ChunkSource) -> torch.Tensor:
    """torch.var(stack(δ), dim=0, unbiased=False) in bfloat16 (flat); NaN/Inf inputs raise."""
    var = torch.empty(src.numel, dtype=BF16)
    with stored_inputs(src) as stored:

        def fill(r: tuple[int, int]) -> list[int] | None:
            return merge_narrow.sce_var([x[r[0] : r[1]] for x in stored], var[r[0] : r[1]])

        for bad in pmap(fill, sub_ranges(0, src.numel, NATIVE_PIECE)):
            _check(src, bad)
    return var


def variance_mask(src: ChunkSource, fraction: float) -> torch.Tensor:
    """mergekit's ``sce_mask``: the ``int(nonzero · fraction)`` entries of largest bfloat16
    variance, torch.topk's set on the whole variance (its choice among ties). The inputs are
    unmapped while the selection runs; the native selection writes the mask over the
    variance's own storage (copied out, so only the mask stays)."""
    var = variance(src)
    with mergekit_threads():
        k = int(torch.count_nonzero(var) * fraction)
        if k == 0:
            return torch.zeros(src.numel, dtype=torch.bool)
        over = merge_narrow.topk_mask(var, k)
        if over is not None:
            return over.clone()
        # sorted or not, topk selects the same set (it sorts after selecting)
        mask = torch.zeros(src.numel, dtype=torch.bool)
        mask[torch.topk(var.abs_(), k=k, largest=True, sorted=False).indices] = True
    return mask


def normalised(weights: torch.Tensor) -> torch.Tensor:
    """mergekit's ``sce_weight`` normalisation of the per-model means (their dtype)."""
    total = torch.sum(weights).item()
    if abs(total) < 1e-6:
        return torch.ones_like(weights) / weights.shape[0]
    return weights / total


def squares(src: ChunkSource, mask: torch.Tensor | None, k: int) -> torch.Tensor:
    """``(1, numel)`` bfloat16: mergekit's ``(tvs * mask).square()`` of model ``k`` (only the
    base and that model mapped)."""
    sq = torch.empty((1, src.numel), dtype=BF16)
    with src.stored(0) as base, src.stored(k + 1) as x:
        pair = [base[: src.numel], x[: src.numel]]
        del base, x  # the mappings end with ``pair``

        def fill(r: tuple[int, int], pair: list[torch.Tensor] = pair) -> bool:
            keep = None if mask is None else mask[r[0] : r[1]]
            xs = [t[r[0] : r[1]] for t in pair]
            return merge_narrow.sce_sq(xs, keep, sq[:, r[0] : r[1]])

        ok = all(pmap(fill, sub_ranges(0, src.numel, NATIVE_PIECE)))
        del pair, fill
    if not ok:
        raise RuntimeError(f"{src.name}: native SCE kernel refused its inputs")
    return sq


def model_weights(src: ChunkSource, mask: torch.Tensor | None) -> list[float]:
    """mergekit's ``sce_weight``: the bfloat16 means of the (selected) squared task vectors,
    normalised to sum 1, as floats. torch's own mean reduces each model's squares (a
    ``(1, numel)`` row: the same float32 cascade as a row of mergekit's stack), one model's
    squares held at a time, inputs unmapped."""
    means = []
    for k in range(src.num_inputs - 1):
        sq = squares(src, mask, k)
        with mergekit_threads():
            means.append(sq.mean(dim=1))
        del sq
    return [float(w) for w in normalised(torch.cat(means))]


def stream_sce(src: ChunkSource, fraction: float, out_dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """The output of mergekit's bfloat16 SCE (``select_topk`` = ``fraction``) in ``out_dtype``."""
    mask = variance_mask(src, fraction) if fraction < 1.0 else None
    weights = model_weights(src, mask)
    lo = float(torch.tensor(1e-6, dtype=BF16))  # clamp(min=1e-6) of a bfloat16 tensor

    def kernel(xs: list[torch.Tensor], out: torch.Tensor, at: int):
        keep = None if mask is None else mask[at : at + out.numel()]
        return merge_narrow.sce_combine(xs, keep, weights, lo, out)

    yield from stream_native(src, out_dtype, kernel, offsets=True)
