"""DELLA (Deep et al. 2024) as mergekit 0.1.5's ``della`` and ``della_linear`` (MagPrune).

Within each row of a task vector δ (1-D tensors are one row; along dim 1 otherwise, as
mergekit's ``argsort(dim=1)``), entries are ranked by |δ|; the entry of 0-based rank r in a
row of c entries is kept with probability ``density − epsilon + 2·epsilon·r/(c − 1)``, so
small entries are dropped more often. ``rescale`` (on by default) then scales the kept entries
so the task vector keeps its L1 norm (mergekit's RescaleNorm.l1, one factor per tensor; the
paper's per-entry 1/p differs). ``della`` elects signs as TIES does (normalize on); ``della_linear``
sums (normalize off). ``density`` 1 keeps δ unchanged.

Each keep decision compares the probability with a counter-based uniform draw (SplitMix64
seeded by seed, tensor name and model, indexed by the entry's flat position), so a run is
reproducible and independent of chunking and threads; mergekit draws from torch's global RNG,
so the two agree in distribution, not entry by entry. Rows of one entry (c = 1), where
mergekit fails (0/0), are kept with probability ``density``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from weightsmith.errors import ConfigError
from weightsmith.merge.methods.base import (
    ChunkSource,
    Param,
    TensorParams,
    merge_method,
    merge_tensors,
)
from weightsmith.merge.methods.dare import splitmix64, tensor_seed
from weightsmith.merge.methods.sparsify import MaskedTaskArithmetic, gather_delta, l1_scales
from weightsmith.merge.params import BOOL, INT

BLOCK = 1 << 20  # elements ranked at a time


@dataclass(frozen=True)
class Kept:
    """The entries of one task vector that survive (flat, bool) and their rescale factor."""

    mask: torch.Tensor
    scale: float = 1.0


def uniform(seed: int, index: torch.Tensor) -> torch.Tensor:
    """A float64 uniform in [0, 1) per flat index: the top 53 bits of SplitMix64(seed)'s
    ``index``-th output."""
    bits = splitmix64(seed, index)
    return ((bits >> 11) & ((1 << 53) - 1)).to(torch.float64) * 2.0**-53


def keep_probabilities(mags: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """mergekit's MagPrune probabilities for a block of rows of |δ| (float32 ops as its)."""
    cols = mags.shape[1]
    order = torch.argsort(mags, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(cols, device=mags.device).expand_as(order))
    ranks = ranks.to(torch.float32) + 1
    if cols == 1:
        rank_norm = torch.full_like(ranks, 0.5)
    else:
        lo = ranks.min(dim=1, keepdim=True).values
        hi = ranks.max(dim=1, keepdim=True).values
        rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    return (density - epsilon) + rank_norm * 2 * epsilon


def magprune_mask(
    delta: torch.Tensor, shape: tuple[int, ...], density: float, epsilon: float, seed: int
) -> torch.Tensor:
    """Which entries of the flat task vector ``delta`` (of ``shape``) MagPrune keeps."""
    numel, dev = delta.numel(), delta.device
    if len(shape) < 2:
        rows, index = delta.view(1, -1), None
    else:
        moved = delta.view(shape).movedim(1, -1)
        rows = moved.reshape(-1, shape[1])
        index = None
        if len(shape) > 2:  # rows are not contiguous: carry each entry's flat index
            flat = torch.arange(numel, device=dev).view(shape).movedim(1, -1)
            index = flat.reshape(-1, shape[1])
    n_rows, cols = rows.shape
    keep = torch.empty((n_rows, cols), dtype=torch.bool, device=dev)
    step = max(1, BLOCK // max(cols, 1))
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        probs = keep_probabilities(rows[r0:r1].abs().to(torch.float32), density, epsilon)
        if index is None:
            idx = torch.arange(r0 * cols, r1 * cols, dtype=torch.int64, device=dev)
            idx = idx.view(r1 - r0, cols)
        else:
            idx = index[r0:r1]
        keep[r0:r1] = uniform(seed, idx) < probs.to(torch.float64)
    if index is None:
        return keep.view(-1)
    out = torch.empty(numel, dtype=torch.bool, device=dev)
    out[index.reshape(-1)] = keep.view(-1)
    return out


class _Della(MaskedTaskArithmetic):
    reference = "https://arxiv.org/abs/2406.11617"
    default_normalize = False
    model_params = (
        Param("weight", required=True, help="weight of each task vector"),
        Param(
            "density",
            1.0,
            help="mean probability of keeping each task-vector entry",
            low=0.0,
            low_open=True,
            high=1.0,
        ),
        Param("epsilon", 0.15, help="keep probabilities span density ± epsilon by |δ| rank"),
    )

    def validate(self, params: TensorParams) -> None:
        for k, m in enumerate(params.models):
            d, e = float(m["density"]), float(m["epsilon"])
            if d < 1.0 and not (d - abs(e) > 0.0 and d + abs(e) < 1.0):
                raise ConfigError(
                    f"tensor {params.name!r}: {self.name}: epsilon {e:g} with density {d:g} "
                    f"for {params.model_label(k)} puts keep probabilities outside (0, 1) "
                    "(need 0 < density − |epsilon| and density + |epsilon| < 1)"
                )

    def prepare(self, src: ChunkSource, params: TensorParams) -> list[Kept | None]:
        seed = int(params.globals["seed"])
        kept: list[Kept | None] = [None] * len(params.models)  # None: δ unchanged
        for k, m in enumerate(params.models):
            d, e = float(m["density"]), float(m["epsilon"])
            if d < 1.0:
                delta = gather_delta(src, k)
                kept[k] = Kept(
                    magprune_mask(delta, src.shape, d, e, tensor_seed(seed, src.name, k))
                )
                del delta
        active = [k for k, x in enumerate(kept) if x is not None]
        if params.globals["rescale"] and active:
            scales = l1_scales(src, active, lambda d, k, o: self.sparsify(d, k, kept, params, o))
            kept = [None if x is None else Kept(x.mask, scales[k]) for k, x in enumerate(kept)]
        return kept

    def sparsify(
        self, delta: torch.Tensor, k: int, state: Any, params: TensorParams, offset: int
    ) -> torch.Tensor:
        kept = state[k]
        if kept is None:
            return delta
        delta.mul_(kept.mask[offset : offset + delta.numel()])
        return delta if kept.scale == 1.0 else delta.mul_(kept.scale)


def _globals(normalize: bool) -> tuple[Param, ...]:
    return (
        Param(
            "normalize", normalize, help="divide by the sum of the (agreeing) weights", kind=BOOL
        ),
        Param("rescale", True, help="rescale kept entries to δ's L1 norm", kind=BOOL),
        Param("lambda", 1.0, help="scale of the mixed task vector"),
        Param("seed", 0, help="seed of the random keep decisions", kind=INT),
    )


@merge_method("della")
class Della(_Della):
    title = "DELLA"
    consensus = True
    global_params = _globals(True)


@merge_method("della_linear")
class DellaLinear(_Della):
    title = "Linear DELLA"
    global_params = _globals(False)


def della(
    base: torch.Tensor,
    models: list[torch.Tensor],
    weights: list[float],
    density: float,
    epsilon: float = 0.15,
    *,
    linear: bool = False,
    seed: int = 0,
    rescale: bool = True,
    normalize: bool | None = None,
    name: str = "tensor",
) -> torch.Tensor:
    """DELLA-merge ``models`` onto ``base`` (float32 result)."""
    params = TensorParams(
        name,
        {"normalize": normalize, "rescale": rescale, "lambda": 1.0, "seed": seed},
        tuple({"weight": w, "density": density, "epsilon": epsilon} for w in weights),
    )
    return merge_tensors("della_linear" if linear else "della", [base, *models], params)
