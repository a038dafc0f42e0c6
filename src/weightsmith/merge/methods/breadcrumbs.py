"""Model Breadcrumbs (Davari & Belilovsky 2023) as mergekit 0.1.5's ``breadcrumbs`` and
``breadcrumbs_ties``.

Each task vector δ (numel n) drops its ``int(gamma·n)`` largest-magnitude entries (outliers)
and the smallest ones, keeping ``int(density·n)`` entries: by ascending |δ| rank, ranks
``[n_bot, n_bot + int(density·n))`` with ``n_bot = max(0, n − int(density·n) − int(gamma·n))``
(fewer outliers are dropped when density + gamma > 1). ``density`` 1 keeps δ unchanged.
``rescale`` (off by default) matches the L1 norm of δ; ``breadcrumbs_ties`` adds TIES' sign
election. Ties at either magnitude cut are kept in storage order (mergekit's sort picks
arbitrary ones), so exactly ``int(density·n)`` entries survive.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from weightsmith.merge.methods.base import (
    ChunkSource,
    Param,
    TensorParams,
    merge_method,
    merge_tensors,
    whole,
)
from weightsmith.merge.methods.sortmask import (
    can_stream,
    sort_range_mask,
    stored_masks,
    stream_masked,
)
from weightsmith.merge.methods.sparsify import (
    MaskedTaskArithmetic,
    NarrowMask,
    l1_scales,
    mergekit_l1_scale,
    topk_cuts,
    topk_mask,
)
from weightsmith.merge.methods.ties import TopK
from weightsmith.merge.params import BOOL


@dataclass(frozen=True)
class Band:
    """Keep the entries inside the top ``upper`` but outside the top ``lower`` (by |δ|)."""

    upper: TopK | None  # None: keep nothing
    lower: TopK | None  # None: no outlier is dropped
    scale: float = 1.0


def band_counts(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """(entries kept from the top, of which the largest are dropped as outliers), as
    mergekit's index ranges give them."""
    target = int(density * numel)
    n_top = int(gamma * numel)
    n_bot = max(0, numel - target - n_top)
    upper = numel - n_bot
    return upper, upper - target


def apply_band(delta: torch.Tensor, band: Band, offset: int) -> torch.Tensor:
    """Zero the entries of a chunk of δ (flat offset ``offset``) outside ``band`` and scale."""
    if band.upper is None:
        return delta.zero_()
    mag = delta.abs()
    keep = topk_mask(mag, band.upper, offset)
    if band.lower is not None:
        keep &= ~topk_mask(mag, band.lower, offset)
    delta.mul_(keep)
    return delta if band.scale == 1.0 else delta.mul_(band.scale)


class _Breadcrumbs(MaskedTaskArithmetic):
    tensor_statistics = True
    reference = "https://arxiv.org/abs/2312.06795"
    global_params = (
        Param("normalize", False, help="divide by the sum of the (agreeing) weights", kind=BOOL),
        Param("rescale", False, help="rescale kept entries to δ's L1 norm", kind=BOOL),
        Param("lambda", 1.0, help="scale of the mixed task vector"),
    )
    model_params = (
        Param("weight", required=True, help="weight of each task vector"),
        Param(
            "density",
            1.0,
            help="fraction of each task vector's entries kept",
            low=0.0,
            low_open=True,
            high=1.0,
        ),
        Param(
            "gamma",
            0.01,
            help="fraction of the largest-magnitude entries dropped",
            low=0.0,
            high=1.0,
        ),
    )

    def prepare(self, src: ChunkSource, params: TensorParams) -> list[Any]:
        if params.narrow:
            return narrow_bands(src, params)
        bands: list[Band | None] = [None] * len(params.models)  # None: δ unchanged
        counts = {}
        for k, m in enumerate(params.models):
            if float(m["density"]) < 1.0:
                counts[k] = band_counts(src.numel, float(m["density"]), float(m["gamma"]))
        upper = topk_cuts(src, {k: u for k, (u, lo) in counts.items() if u > lo})
        lower = topk_cuts(src, {k: lo for k, (u, lo) in counts.items() if u > lo and lo > 0})
        for k in counts:
            bands[k] = Band(upper.get(k), lower.get(k))
        if params.globals["rescale"] and counts:
            scales = l1_scales(src, sorted(counts), lambda d, k, o: apply_band(d, bands[k], o))
            for k, s in scales.items():
                bands[k] = Band(bands[k].upper, bands[k].lower, s)
        return bands

    def stream_stored(
        self, src: ChunkSource, params: TensorParams, out_dtype: torch.dtype
    ) -> Iterator[torch.Tensor] | None:
        """bfloat16 arithmetic without rescale: mergekit's masks by the native sort
        selection, then one native pass of its masked task arithmetic over the stored inputs."""
        if not params.narrow or params.globals["rescale"]:
            return None
        if not can_stream(src, params, out_dtype):
            return None
        wanted = {}
        for k, m in enumerate(params.models):
            if float(m["density"]) < 1.0:
                lo, hi = sort_band(src.numel, float(m["density"]), float(m["gamma"]))
                wanted[k] = (lo, hi, False)
        masks = stored_masks(src, wanted)
        if masks is None:
            return None
        return stream_masked(src, params, out_dtype, masks, consensus=self.consensus)

    def sparsify(
        self, delta: torch.Tensor, k: int, state: Any, params: TensorParams, offset: int
    ) -> torch.Tensor:
        band = state[k]
        if isinstance(band, NarrowMask):
            return band.apply(delta, offset)
        return delta if band is None else apply_band(delta, band, offset)


def sort_band(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """The positions [lo, hi) of mergekit's ascending sort of |δ| that ``magnitude_outliers``
    keeps."""
    target = int(density * numel)
    n_bot = max(0, numel - target - int(gamma * numel))
    return n_bot, n_bot + target


def narrow_bands(src: ChunkSource, params: TensorParams) -> list[NarrowMask | None]:
    """mergekit's ``magnitude_outliers`` masks in the compute dtype: the entries torch's
    ascending sort of the task vector's float32 |δ| (δ in that dtype) puts in
    :func:`sort_band` (so entries equal at a cut are picked as mergekit's sort picks them),
    and the L1 rescale in that dtype."""
    out: list[NarrowMask | None] = [None] * len(params.models)
    for k, m in enumerate(params.models):
        if float(m["density"]) >= 1.0:
            continue
        lo, hi = sort_band(src.numel, float(m["density"]), float(m["gamma"]))
        mask = sort_range_mask(src, k, params.dtype, lo, hi, descending=False)
        scale = None
        if params.globals["rescale"]:
            scale = mergekit_l1_scale(whole(src, k + 1, params.dtype, minus=0), mask)
        out[k] = NarrowMask(mask, scale)
    return out


@merge_method("breadcrumbs")
class Breadcrumbs(_Breadcrumbs):
    title = "Model Breadcrumbs"


@merge_method("breadcrumbs_ties")
class BreadcrumbsTies(_Breadcrumbs):
    title = "Model Breadcrumbs with TIES"
    consensus = True


def breadcrumbs(
    base: torch.Tensor,
    models: list[torch.Tensor],
    weights: list[float],
    density: float,
    gamma: float = 0.01,
    *,
    ties: bool = False,
    normalize: bool = False,
    rescale: bool = False,
    lam: float = 1.0,
) -> torch.Tensor:
    """Breadcrumbs-merge ``models`` onto ``base`` (float32 result)."""
    params = TensorParams(
        "tensor",
        {"normalize": normalize, "rescale": rescale, "lambda": lam},
        tuple({"weight": w, "density": density, "gamma": gamma} for w in weights),
    )
    return merge_tensors("breadcrumbs_ties" if ties else "breadcrumbs", [base, *models], params)
