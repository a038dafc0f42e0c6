"""Whole-tensor pieces shared by the masked task-vector methods (breadcrumbs, DELLA, SCE).

mergekit sparsifies each task vector on the whole tensor at once; here the statistics a mask
needs (top-k cuts, per-row ranks, L1 norms) are found in ``prepare`` passes over the streamed
chunks, holding at most one tensor per model, and ``combine`` applies the mask chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from weightsmith.core.parallel import pmap, sub_ranges
from weightsmith.kernels import merge as native
from weightsmith.merge.methods.base import ChunkSource, TensorParams, whole
from weightsmith.merge.methods.task_arithmetic import (
    GeneralizedTaskArithmetic,
    combine_task_vectors,
)
from weightsmith.merge.methods.ties import TopK, native_topk_cuts, topk_threshold

RESCALE_EPS = 1e-7  # mergekit: no rescale when either L1 norm is below this


def gather_delta(src: ChunkSource, k: int) -> torch.Tensor:
    """Task vector ``k`` (input k + 1 minus input 0) as one flat tensor (the chunks' dtype
    and device)."""
    out: torch.Tensor | None = None
    pos = 0
    for base, x in src.chunks([0, k + 1]):
        n = base.numel()
        if out is None:
            out = torch.empty(src.numel, dtype=base.dtype, device=base.device)

        def fill(r: tuple[int, int], base=base, x=x, dst=out[pos : pos + n]) -> None:
            torch.sub(x[r[0] : r[1]], base[r[0] : r[1]], out=dst[r[0] : r[1]])

        pmap(fill, sub_ranges(0, n))
        pos += n
    return out if out is not None else torch.empty(0)


def topk_cuts(src: ChunkSource, keep: dict[int, int]) -> dict[int, TopK]:
    """For each task vector k, the cut keeping its ``keep[k]`` largest |δ| (ties in storage
    order); counts must be >= 1, a count >= numel keeps everything."""
    cuts = {k: TopK(-1.0, src.numel) for k, c in keep.items() if c >= src.numel}
    active = {k: c for k, c in keep.items() if c < src.numel}
    if active and native.available(torch.empty(0)):
        found = native_topk_cuts(src, active)
        if found is not None:
            return {**cuts, **found}
    for k, count in active.items():
        cuts[k] = topk_threshold(gather_delta(src, k).abs_(), count)
    return cuts


def topk_mask(values: torch.Tensor, cut: TopK, offset: int) -> torch.Tensor:
    """Which entries of a chunk of non-negative ``values`` (flat offset ``offset``) are
    inside the top-k that ``cut`` describes."""
    end = offset + values.numel()
    if cut.last_tie >= end - 1:  # every tie in this chunk is kept
        return values >= cut.threshold
    keep = values > cut.threshold
    if cut.last_tie >= offset:
        idx = torch.arange(offset, end, device=values.device)
        keep |= (values == cut.threshold) & (idx <= cut.last_tie)
    return keep


def l1_scales(
    src: ChunkSource,
    models: list[int],
    masked: Callable[[torch.Tensor, int, int], torch.Tensor],
) -> dict[int, float]:
    """mergekit's ``rescale`` (RescaleNorm.l1): for each task vector k, ‖δ‖₁ / ‖masked δ‖₁,
    or 1 when either norm is below 1e-7. ``masked(delta, k, offset)`` sparsifies a chunk."""
    before = dict.fromkeys(models, 0.0)
    after = dict.fromkeys(models, 0.0)
    offset = 0
    for chunks in src.chunks():
        base = chunks[0]

        def norms(r: tuple[int, int], chunks=chunks, base=base, offset=offset) -> list:
            out = []
            for k in models:
                delta = chunks[k + 1][r[0] : r[1]] - base[r[0] : r[1]]
                b = float(delta.abs().sum(dtype=torch.float64))
                a = float(masked(delta, k, offset + r[0]).abs().sum(dtype=torch.float64))
                out.append((b, a))
            return out

        for part in pmap(norms, sub_ranges(0, base.numel())):
            for k, (b, a) in zip(models, part, strict=True):
                before[k] += b
                after[k] += a
        offset += base.numel()
    return {k: l1_ratio(before[k], after[k]) for k in models}


def l1_ratio(before: float, after: float) -> float:
    """mergekit's L1 rescale factor from the two norms: before / after in float32, or 1 when
    either is below 1e-7."""
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return 1.0
    return float(torch.tensor(before / after, dtype=torch.float32))


def narrow_deltas(src: ChunkSource, models: list[int], dt: torch.dtype) -> Iterator[tuple]:
    """(k, task vector k as one flat tensor in ``dt``) for each of ``models``: mergekit's
    ``x − base`` after its load cast, one task vector held at a time besides the base."""
    if not models:
        return
    base = whole(src, 0, dt)
    for k in models:
        yield k, whole(src, k + 1, dt).sub_(base)


def mergekit_l1_scale(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """mergekit's RescaleNorm.l1 factor in ``delta``'s dtype (its whole-tensor sums, rounded
    as torch rounds them): ‖δ‖₁ / ‖mask·δ‖₁, or None when either is below 1e-7."""
    masked = delta * mask.to(delta.dtype)
    before, after = delta.abs().sum(), masked.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return None
    return before / after


@dataclass(frozen=True)
class NarrowMask:
    """A task vector's mask and rescale factor as mergekit computes them in a narrow dtype."""

    mask: torch.Tensor  # flat bool
    scale: torch.Tensor | None = None  # 0-dim, in the compute dtype; None: no rescale

    def apply(self, delta: torch.Tensor, offset: int) -> torch.Tensor:
        """``mask · δ`` (then × scale) on a chunk of δ at flat ``offset``, in δ's dtype."""
        delta.mul_(self.mask[offset : offset + delta.numel()])
        return delta if self.scale is None else delta.mul_(self.scale)


class MaskedTaskArithmetic(GeneralizedTaskArithmetic):
    """Generalized task arithmetic whose ``sparsify`` the native kernel does not know."""

    def combine(
        self, chunks: list[torch.Tensor], state: Any, params: TensorParams, offset: int
    ) -> torch.Tensor:
        if params.narrow:  # mergekit's ops in the compute dtype (sparsify sees that dtype)
            return self._combine_narrow(chunks, state, params, offset)
        base, models = chunks[0], chunks[1:]
        deltas = [self.sparsify(x - base, k, state, params, offset) for k, x in enumerate(models)]
        return combine_task_vectors(
            base,
            deltas,
            params.model_values("weight"),
            consensus=self.consensus,
            normalize=bool(params.globals["normalize"]),
            lam=float(params.globals["lambda"]),
        )
