"""DELLA (Deep et al. 2024) as mergekit 0.1.5's ``della`` and ``della_linear`` (MagPrune).

Within each row of a task vector δ (1-D tensors are one row; along dim 1 otherwise, as
mergekit's ``argsort(dim=1)``), entries are ranked by |δ|; the entry of 0-based rank r in a
row of c entries is kept with probability ``density − epsilon + 2·epsilon·r/(c − 1)``, so
small entries are dropped more often. ``rescale`` (on by default) then scales the kept entries
so the task vector keeps its L1 norm (mergekit's RescaleNorm.l1, one factor per tensor; the
paper's per-entry 1/p differs). ``della`` elects signs as TIES does (normalize on); ``della_linear``
sums (normalize off). ``density`` 1 keeps δ unchanged.

The keep decisions are drawn in ``prepare``, in blocks of rows (in float32 work each with its
own generator, torch's CPU Mersenne Twister seeded by seed, tensor name, model and first row;
in narrow dtypes the counter-based draws below), as the chunks stream in, so a run is reproducible and independent of chunking, threads and device; mergekit
draws from torch's global generator, so the two agree in distribution, not entry by entry.
Rows of one entry (c = 1), where mergekit fails (0/0), are kept with probability ``density``.
With a bfloat16/float16 compute dtype, |δ| is ranked, the probabilities and the L1 rescale are
computed (whole-tensor sums) and the task vectors mixed in that dtype, as mergekit does, and
the keep decisions are drawn from a counter-based SplitMix64 (entry i of the tensor draws
``uniform32(seed, i)``, kept below ``round(p·2³²)``): the native path (``stream_stored``,
bfloat16 on stored CPU inputs, 1-D/2-D tensors, :func:`native_keep`) and the torch path (a
CUDA device, no compiler) keep the same entries.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from weightsmith.core.parallel import pmap
from weightsmith.errors import ConfigError
from weightsmith.kernels import merge_narrow
from weightsmith.kernels.merge_narrow import Drop
from weightsmith.merge.methods import gta_native
from weightsmith.merge.methods.base import (
    ChunkSource,
    Param,
    TensorParams,
    merge_method,
    merge_tensors,
    stored_inputs,
)
from weightsmith.merge.methods.dare import tensor_seed, uniform32
from weightsmith.merge.methods.sparsify import (
    MaskedTaskArithmetic,
    NarrowMask,
    gather_delta,
    l1_ratio,
    mergekit_l1_scale,
    narrow_deltas,
)
from weightsmith.merge.params import BOOL, INT

BLOCK = 1 << 18  # elements ranked at a time (a few MB of temporaries per thread)


@dataclass(frozen=True)
class Kept:
    """The entries of one task vector that survive (flat, bool) and their rescale factor."""

    mask: torch.Tensor
    scale: float = 1.0


def rank_probabilities(
    cols: int, density: float, epsilon: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Keep probability of the entry of 0-based |δ| rank r = 0 … cols − 1 in a row of ``cols``
    (mergekit's arithmetic in its work dtype, float32 or the narrow compute dtype: ranks
    1 … c normalised by their min and max)."""
    ranks = torch.arange(cols).to(dtype) + 1
    if cols == 1:
        rank_norm = torch.full_like(ranks, 0.5)
    else:
        lo, hi = ranks[:1], ranks[-1:]
        rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    return ((density - epsilon) + rank_norm * 2 * epsilon).to(torch.float64)


def region_shape(src: ChunkSource) -> tuple[int, ...]:
    """The shape of what ``src`` streams: the tensor's, or its leading rows only (the rows
    all models share, when vocabulary sizes differ)."""
    if len(src.shape) < 2:
        return (src.numel,)
    inner = math.prod(src.shape[1:])
    return (src.numel // inner, *src.shape[1:])


def block_seed(seed: int, row: int) -> int:
    """The generator seed of the block of rows starting at ``row`` (63 bits)."""
    return (seed + (row + 1) * 0x9E3779B97F4A7C15) % (1 << 63)


class _RowPruner:
    """MagPrune over rows of ``cols`` entries, a block of ``step`` rows at a time.

    In each row the entries are sorted by |δ| (stable) and the j-th smallest is kept when its
    draw is below p(j) (:meth:`_draws_below`: in float32 work a float64 uniform drawn in order
    from torch's CPU generator seeded with ``block_seed(seed, first row of the block)``).
    Blocks are independent (they write disjoint rows of ``keep``), so they run on the pool's
    threads with the same result.
    """

    def __init__(self, n_rows: int, cols: int, density: float, epsilon: float, seed: int,
                 device: torch.device, dtype: torch.dtype = torch.float32) -> None:  # fmt: skip
        self.cols, self.seed, self.dtype = cols, seed, dtype
        self.step = max(1, BLOCK // max(cols, 1))
        self.probs = rank_probabilities(cols, density, epsilon, dtype).to(device)
        self.cuts = (self.probs * 2.0**32).round().to(torch.int64)  # narrow dtypes' draws
        self.keep = torch.empty((n_rows, cols), dtype=torch.bool, device=device)

    def block(self, r0: int, rows: torch.Tensor) -> tuple[float, float]:
        """Decide rows ``r0 …`` (their δ: ``rows``); return (‖δ‖₁, ‖kept δ‖₁) of the block."""
        mags = rows.abs()
        # ranked by |δ| in the work dtype, as mergekit ranks them
        key = mags if self.dtype == torch.float32 else rows.to(self.dtype).abs_()
        order = torch.argsort(key, dim=1, stable=True)
        del key
        keep = self.keep[r0 : r0 + rows.shape[0]]
        keep.scatter_(1, order, self._draws_below(r0, rows, order))
        del order
        before = float(mags.sum(dtype=torch.float64))
        return before, float(mags.mul_(keep).sum(dtype=torch.float64))

    def _draws_below(self, r0: int, rows: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Whether each entry, in rank order, draws below its rank's keep probability: float32
        work draws float64 uniforms from torch's CPU generator; narrow dtypes draw the native
        kernel's 32-bit ``uniform32(seed, flat index)`` against ``round(p·2³²)``, so the
        torch path (a CUDA device, no compiler) keeps the native path's entries."""
        if self.dtype == torch.float32:
            gen = torch.Generator().manual_seed(block_seed(self.seed, r0))
            draws = torch.rand(rows.shape, generator=gen, dtype=torch.float64).to(rows.device)
            return draws < self.probs
        n, cols = rows.shape
        first = torch.arange(r0, r0 + n, dtype=torch.int64, device=rows.device) * cols
        flat = first[:, None] + torch.arange(cols, dtype=torch.int64, device=rows.device)
        return uniform32(self.seed, flat).gather(1, order) < self.cuts

    def blocks(self, first_row: int, rows: torch.Tensor) -> list[tuple[float, float]]:
        """Every block of ``rows`` (which start at ``first_row``, a multiple of ``step``)."""
        starts = range(0, rows.shape[0], self.step)
        return pmap(lambda s: self.block(first_row + s, rows[s : s + self.step]), starts)


def _rescale_of(norms: list[tuple[float, float]]) -> float:
    return l1_ratio(sum(b for b, _ in norms), sum(a for _, a in norms))


def magprune_mask(
    delta: torch.Tensor, shape: tuple[int, ...], density: float, epsilon: float, seed: int
) -> torch.Tensor:
    """Which entries of the flat task vector ``delta`` (of ``shape``) MagPrune keeps."""
    return _magprune_memory(delta, shape, density, epsilon, seed)[0]


def _magprune_memory(
    delta: torch.Tensor, shape: tuple[int, ...], density: float, epsilon: float, seed: int,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, float]:  # fmt: skip
    """(mask, L1 rescale factor) for a task vector in memory; rows run along dim 1."""
    moved_shape = (-1, shape[1]) if len(shape) >= 2 else (1, -1)
    if len(shape) > 2:
        rows = delta.view(shape).movedim(1, -1).reshape(moved_shape)
    else:
        rows = delta.view(moved_shape)
    pruner = _RowPruner(*rows.shape, density, epsilon, seed, delta.device, dtype)
    scale = _rescale_of(pruner.blocks(0, rows))
    if len(shape) > 2:
        moved = [s for i, s in enumerate(shape) if i != 1] + [shape[1]]
        return pruner.keep.view(moved).movedim(-1, 1).reshape(-1), scale
    return pruner.keep.view(-1), scale


def magprune_stream(
    src: ChunkSource, k: int, cols: int, density: float, epsilon: float, seed: int,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, float]:  # fmt: skip
    """(mask, L1 rescale factor) of task vector ``k`` of a tensor of rows of ``cols``
    entries, read chunk by chunk: only a block of rows of δ is held besides the mask. The
    same result as :func:`magprune_mask` on the whole δ."""
    pruner: _RowPruner | None = None
    buf: torch.Tensor | None = None  # δ of the rows not yet decided, then the new chunk
    fill, row, n_rows = 0, 0, src.numel // cols
    norms: list[tuple[float, float]] = []
    for base, x in src.chunks([0, k + 1]):
        n = base.numel()
        if pruner is None:
            pruner = _RowPruner(n_rows, cols, density, epsilon, seed, base.device, dtype)
        if buf is None or buf.numel() < fill + n:  # one buffer, reused chunk after chunk
            grown = torch.empty(fill + n, dtype=base.dtype, device=base.device)
            if buf is not None:
                grown[:fill] = buf[:fill]
            buf = grown
        torch.sub(x, base, out=buf[fill : fill + n])
        fill += n
        ready = fill // cols
        take = ready if row + ready == n_rows else ready // pruner.step * pruner.step
        norms += pruner.blocks(row, buf[: take * cols].view(take, cols))
        row += take
        rest = fill - take * cols
        if rest:
            buf[:rest] = buf[take * cols : fill].clone()
        fill = rest
    if pruner is None:
        return torch.zeros(0, dtype=torch.bool), 1.0
    return pruner.keep.view(-1), _rescale_of(norms)


def native_keep(
    src: ChunkSource, stored: list[torch.Tensor], k: int, cols: int, density: float,
    epsilon: float, seed: int,
) -> torch.Tensor:  # fmt: skip
    """MagPrune's keep mask of task vector ``k`` (flat bool) in the native kernel: each row of
    ``cols`` entries ranked by bfloat16 |δ| (stable), the entry of rank r kept with the
    bfloat16 probability of :func:`rank_probabilities` (a 32-bit SplitMix64 draw per entry,
    counter-based on seed and flat index, so blocks run on any thread with the same result)."""
    probs = rank_probabilities(cols, density, epsilon, torch.bfloat16)
    cuts = (probs * 2.0**32).round().to(torch.int64)
    keep = torch.empty(src.numel, dtype=torch.bool)
    rows = src.numel // cols
    step = max(1, BLOCK // cols)

    def fill(r0: int) -> None:
        a, b = r0 * cols, min(r0 + step, rows) * cols
        x0, x1 = stored[0][a:b], stored[k + 1][a:b]
        if not merge_narrow.della_keep(x0, x1, cols, r0, seed, cuts, keep[a:b]):
            raise RuntimeError(f"{src.name}: native DELLA kernel refused its inputs")

    pmap(fill, range(0, rows, step))
    return keep


class _Della(MaskedTaskArithmetic):
    tensor_statistics = True
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

    def prepare(self, src: ChunkSource, params: TensorParams) -> list[Any]:
        seed, rescale = int(params.globals["seed"]), bool(params.globals["rescale"])
        kept: list[Any] = [None] * len(params.models)  # None: δ unchanged
        for k, m in enumerate(params.models):
            d, e = float(m["density"]), float(m["epsilon"])
            if d < 1.0:
                shape, tseed = region_shape(src), tensor_seed(seed, src.name, k)
                if len(shape) <= 2:
                    cols = shape[-1] if len(shape) == 2 else src.numel
                    mask, scale = magprune_stream(src, k, cols, d, e, tseed, params.dtype)
                else:  # rows along dim 1 are strided: rank them in memory
                    delta = gather_delta(src, k)
                    mask, scale = _magprune_memory(delta, shape, d, e, tseed, params.dtype)
                kept[k] = Kept(mask, scale if rescale else 1.0)
        if params.narrow:  # mergekit's rescale: its L1 sums in the compute dtype
            models = [k for k, x in enumerate(kept) if x is not None]
            for k, delta in narrow_deltas(src, models, params.dtype):
                mask = kept[k].mask
                kept[k] = NarrowMask(mask, mergekit_l1_scale(delta, mask) if rescale else None)
        return kept

    def stream_stored(
        self, src: ChunkSource, params: TensorParams, out_dtype: torch.dtype
    ) -> Iterator[torch.Tensor] | None:
        """bfloat16 arithmetic in the native kernels (gta_native.py), rows of 2-D/1-D tensors
        ranked natively (:func:`native_keep`)."""
        self.validate(params)
        shape = region_shape(src)
        if len(shape) > 2 or not gta_native.usable(src, params, out_dtype):
            return None
        return self._stream_narrow(src, params, out_dtype, shape[-1])

    def _stream_narrow(
        self, src: ChunkSource, params: TensorParams, out_dtype: torch.dtype, cols: int
    ) -> Iterator[torch.Tensor]:
        seed, rescale = int(params.globals["seed"]), bool(params.globals["rescale"])
        drops = []
        with stored_inputs(src) as stored:
            for k, m in enumerate(params.models):
                d, e = float(m["density"]), float(m["epsilon"])
                if d >= 1.0:
                    drops.append(Drop())
                    continue
                mask = native_keep(src, stored, k, cols, d, e, tensor_seed(seed, src.name, k))
                drop = Drop(mask=mask)
                if rescale:
                    drop = replace(drop, scale=gta_native.l1_scale(src, stored, k, drop))
                drops.append(drop)
            del stored  # unmap before the second pass maps the inputs again
        yield from gta_native.stream_gta(src, params, out_dtype, self.consensus, drops)

    def sparsify(
        self, delta: torch.Tensor, k: int, state: Any, params: TensorParams, offset: int
    ) -> torch.Tensor:
        kept = state[k]
        if kept is None:
            return delta
        if isinstance(kept, NarrowMask):
            return kept.apply(delta, offset)
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
