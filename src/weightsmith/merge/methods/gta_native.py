"""mergekit's bfloat16 DARE / DELLA task arithmetic in the native kernels, from stored inputs.

``_combine_narrow`` (task_arithmetic.py) op by op in ``ws_narrow_gta``: each task vector is
sparsified by a :class:`~weightsmith.kernels.merge_narrow.Drop` (a precomputed keep mask, or
DARE's counter-based draw made on the fly), rescaled by mergekit's L1 factor, weighted, mixed
with or without sign consensus. The L1 norms are float64 sums of the bfloat16 |δ| (torch sums
them in float32), rounded to bfloat16 as mergekit's are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import torch

from weightsmith.core.parallel import pmap, sub_ranges
from weightsmith.kernels import merge as native
from weightsmith.kernels import merge_narrow
from weightsmith.kernels.merge_narrow import Drop
from weightsmith.merge.methods.base import (
    NATIVE_PIECE,
    ChunkSource,
    TensorParams,
    stream_native,
)

BF16 = torch.bfloat16
RESCALE_EPS = 1e-7  # mergekit: no rescale when either L1 norm is below this


def usable(src: ChunkSource, params: TensorParams, out_dtype: torch.dtype) -> bool:
    """Whether the bfloat16 kernels can run this tensor."""
    return (
        params.dtype == BF16
        and src.numel > 0
        and out_dtype in native.STORAGE
        and native.available()
        and src.num_inputs - 1 <= 31
    )


def sliced(drop: Drop, at: int, n: int) -> Drop:
    """``drop`` for the range [at, at + n) of its tensor."""
    if drop.mask is None:
        return drop
    return dataclasses.replace(drop, mask=drop.mask[at : at + n])


def l1_scale(src: ChunkSource, stored: list[torch.Tensor], k: int, drop: Drop) -> float | None:
    """mergekit's RescaleNorm.l1 factor of task vector ``k`` under ``drop`` (a bfloat16 value),
    or None when either norm is below 1e-7. Checks both inputs for NaN/Inf."""

    def norms(r: tuple[int, int]) -> tuple:
        got = merge_narrow.narrow_l1(
            stored[0][r[0] : r[1]], stored[k + 1][r[0] : r[1]], r[0], sliced(drop, *r)
        )
        if got is None:
            raise RuntimeError(f"{src.name}: native L1 kernel refused its inputs")
        return got

    before = after = 0.0
    for b, a, bad_base, bad_x in pmap(norms, sub_ranges(0, src.numel, NATIVE_PIECE)):
        if bad_base or bad_x:
            src.fail_nonfinite(0 if bad_base else k + 1)
        before, after = before + b, after + a
    tb = torch.tensor(before, dtype=torch.float32).to(BF16)  # float32 sum, rounded to bf16
    ta = torch.tensor(after, dtype=torch.float32).to(BF16)
    if tb < RESCALE_EPS or ta < RESCALE_EPS:
        return None
    return float(tb / ta)


def mix_args(params: TensorParams) -> tuple[list[float], float, float | None]:
    """The bfloat16 weights, the divisor without consensus and λ (None: 1), as
    ``_combine_narrow`` computes them."""
    w = torch.tensor(params.model_values("weight"), dtype=BF16)
    divisor = w.sum(dim=0, keepdim=True)
    divisor[divisor.abs() < 1e-8] = 1
    lam = float(params.globals["lambda"])
    return [float(x) for x in w], float(divisor), (lam if lam != 1 else None)


def stream_gta(
    src: ChunkSource,
    params: TensorParams,
    out_dtype: torch.dtype,
    consensus: bool,
    drops: Sequence[Drop],
) -> Iterator[torch.Tensor]:
    """The bfloat16 output of mergekit's DARE/DELLA with these ``drops``, in ``out_dtype``."""
    weights, total, lam = mix_args(params)
    normalize = bool(params.globals["normalize"])

    def kernel(xs: list[torch.Tensor], out: torch.Tensor, at: int):
        n = out.numel()
        return merge_narrow.narrow_gta(
            xs,
            at,
            [sliced(d, at, n) for d in drops],
            weights,
            consensus=consensus,
            normalize=normalize,
            total=total,
            lam=lam,
            out=out,
        )

    yield from stream_native(src, out_dtype, kernel, offsets=True)
