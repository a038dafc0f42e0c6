"""SCE (Wan et al. 2024, FuseChat) as mergekit 0.1.5's ``sce``: select, calculate, erase.

With task vectors δ_i = x_i − base (no per-model weights):
- select: when ``select_topk`` < 1, keep only the entries whose variance across the δ_i
  (population variance) is among the ``int(select_topk · #nonzero-variance)`` largest of the
  tensor (ties in storage order), zero the rest in every δ_i;
- calculate: weight each model by the mean of its (selected) δ_i², normalised to sum 1
  (uniform when the sum is below 1e-6);
- erase: elect sign(Σ δ_i) per entry and drop the entries that disagree;
- out = base + Σ w_i m_i δ_i / max(Σ w_i m_i, 1e-6).
The variance and the per-model means are whole-tensor statistics found in ``prepare`` passes
(one float32 variance tensor, then a bool mask, at most); ``combine`` streams the rest.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from weightsmith.core.parallel import pmap, sub_ranges
from weightsmith.kernels import merge as native
from weightsmith.merge.methods.base import (
    ChunkSource,
    MergeMethod,
    Param,
    TensorParams,
    merge_method,
    merge_tensors,
    whole,
)
from weightsmith.merge.methods.sce_native import MAX_MODELS, normalised, stream_sce
from weightsmith.merge.methods.sparsify import topk_mask
from weightsmith.merge.methods.ties import topk_threshold


@dataclass(frozen=True)
class SceState:
    mask: torch.Tensor | None  # selected entries (flat bool); None: every entry
    weights: tuple[float, ...]


def population_variance(values: list[torch.Tensor]) -> torch.Tensor:
    """Σ (xᵢ − mean)² / n per entry, in float64 (rounded once to the caller's dtype, this is
    torch.var(unbiased=False)'s float32 result: it accumulates in float64 too, and is much
    slower across a short leading dimension)."""
    mean = values[0].clone()
    for v in values[1:]:
        mean.add_(v)
    mean.div_(len(values))
    out = torch.zeros_like(mean)
    for v in values:
        out.add_((v - mean).square_())
    return out.div_(len(values))


def variance_mask(src: ChunkSource, fraction: float) -> torch.Tensor:
    """The entries of highest variance across the task vectors (flat bool)."""
    var: torch.Tensor | None = None
    pos = 0
    for chunks in src.chunks():
        base = chunks[0]
        if var is None:
            var = torch.empty(src.numel, dtype=base.dtype, device=base.device)
        n = base.numel()

        def fill(r: tuple[int, int], chunks=chunks, dst=var[pos : pos + n]) -> None:
            a, b = r
            tvs = [(x[a:b] - chunks[0][a:b]).to(torch.float64) for x in chunks[1:]]
            dst[a:b] = population_variance(tvs)

        pmap(fill, sub_ranges(0, n))
        pos += n
    k = 0 if var is None else int(int(torch.count_nonzero(var)) * fraction)
    if var is None or k == 0:
        return torch.zeros(src.numel, dtype=torch.bool, device=None if var is None else var.device)
    return topk_mask(var, topk_threshold(var, k), 0)


@dataclass(frozen=True)
class NarrowSce:
    """SCE's statistics as mergekit computes them in a narrow dtype."""

    mask: torch.Tensor | None  # selected entries (flat bool); None: every entry
    weights: torch.Tensor  # (models, 1), in the compute dtype


def narrow_state(src: ChunkSource, params: TensorParams) -> NarrowSce:
    """mergekit's ``sce_mask`` and ``sce_weight`` on the whole task vectors in the compute
    dtype (every task vector held while it runs): variance, ``topk`` (its own pick among
    equal variances) and the per-model means of δ², rounded as torch rounds them."""
    dt, fraction = params.dtype, float(params.globals["select_topk"])
    base = whole(src, 0, dt)
    tvs = torch.stack([whole(src, i, dt).sub_(base) for i in range(1, src.num_inputs)])
    del base
    mask = None
    if fraction < 1.0:
        var = torch.var(tvs, dim=0, unbiased=False)
        k = int(torch.count_nonzero(var) * fraction)
        mask = torch.zeros(var.numel(), dtype=torch.bool, device=var.device)
        if k > 0:
            mask[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = True
        del var
        tvs = tvs * mask.to(dt).unsqueeze(0)
    weights = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    del tvs
    return NarrowSce(mask, normalised(weights).unsqueeze(-1))


def combine_narrow(chunks: list[torch.Tensor], state: NarrowSce, dt: torch.dtype,
                   offset: int) -> torch.Tensor:  # fmt: skip
    """mergekit's select, erase and weighted mean on a chunk, every op in ``dt``."""
    base = chunks[0].to(dt)
    tvs = torch.stack([x.to(dt) - base for x in chunks[1:]])
    if state.mask is not None:
        tvs = tvs * state.mask[offset : offset + base.numel()].to(dt).unsqueeze(0)
    majority = (tvs.sum(dim=0) >= 0).to(dt) * 2 - 1
    erased = state.weights * (tvs.sign().to(dt) == majority)
    merged = (tvs * erased).sum(dim=0)
    return base + merged / torch.sum(erased, dim=0).clamp(min=1e-6)


@merge_method("sce")
class Sce(MergeMethod):
    tensor_statistics = True
    title = "SCE"
    reference = "https://arxiv.org/abs/2408.07990"
    needs_base = True
    global_params = (
        Param(
            "select_topk",
            1.0,
            help="fraction of the entries (by variance across models) kept",
            low=0.0,
            low_open=True,
            high=1.0,
        ),
    )

    def prepare(self, src: ChunkSource, params: TensorParams) -> SceState | NarrowSce:
        if params.narrow:
            return narrow_state(src, params)
        fraction = float(params.globals["select_topk"])
        mask = variance_mask(src, fraction) if fraction < 1.0 else None
        n_models = src.num_inputs - 1
        sums = [0.0] * n_models
        offset = 0
        for chunks in src.chunks():

            def energy(r: tuple[int, int], chunks=chunks, offset=offset) -> list[float]:
                a, b = r
                out = []
                for x in chunks[1:]:
                    delta = x[a:b] - chunks[0][a:b]
                    if mask is not None:
                        delta.mul_(mask[offset + a : offset + b])
                    out.append(float(delta.square().sum(dtype=torch.float64)))
                return out

            for part in pmap(energy, sub_ranges(0, chunks[0].numel())):
                sums = [s + p for s, p in zip(sums, part, strict=True)]
            offset += chunks[0].numel()
        means = torch.tensor([s / max(src.numel, 1) for s in sums], dtype=torch.float32)
        total = float(means.sum())
        if abs(total) < 1e-6:
            weights = torch.full((n_models,), 1.0 / n_models)
        else:
            weights = means / total
        return SceState(mask, tuple(float(w) for w in weights))

    def stream_stored(
        self, src: ChunkSource, params: TensorParams, out_dtype: torch.dtype
    ) -> Iterator[torch.Tensor] | None:
        """bfloat16 arithmetic in the native kernels (sce_native.py): the same bits as
        ``narrow_state`` + ``combine_narrow``, with torch's own topk and mean."""
        if params.dtype != torch.bfloat16 or out_dtype not in native.STORAGE:
            return None
        if not native.available() or src.num_inputs - 1 > MAX_MODELS or src.numel == 0:
            return None
        return stream_sce(src, float(params.globals["select_topk"]), out_dtype)

    def combine(
        self, chunks: list[torch.Tensor], state: Any, params: TensorParams, offset: int
    ) -> torch.Tensor:
        if isinstance(state, NarrowSce):
            return combine_narrow(chunks, state, params.dtype, offset)
        base = chunks[0]
        tvs = [x - base for x in chunks[1:]]
        if state.mask is not None:
            keep = state.mask[offset : offset + base.numel()]
            for tv in tvs:
                tv.mul_(keep)
        total = tvs[0].clone()
        for tv in tvs[1:]:
            total.add_(tv)
        majority = torch.where(total >= 0, 1.0, -1.0).to(base.dtype)  # ties go to +, as mergekit
        merged = torch.zeros_like(base)
        divisor = torch.zeros_like(base)
        for tv, w in zip(tvs, state.weights, strict=True):
            erased = (torch.sign(tv) == majority) * torch.tensor(w, dtype=base.dtype)
            merged.add_(tv * erased)
            divisor.add_(erased)
        return base + merged / divisor.clamp(min=1e-6)


def sce(base: torch.Tensor, models: list[torch.Tensor], select_topk: float = 1.0) -> torch.Tensor:
    """SCE-merge ``models`` onto ``base`` (float32 result)."""
    return merge_tensors("sce", [base, *models], select_topk=select_topk)
