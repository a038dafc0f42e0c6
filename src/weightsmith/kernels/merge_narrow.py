"""Typed wrappers around the bfloat16 SCE / DARE / DELLA kernels of ``merge_kernels.c``.

They reproduce mergekit's bfloat16 torch ops one rounding at a time on ranges of the stored
inputs (float32 or bfloat16, base first). Every function returns None when the kernels are
unavailable or cannot take the tensors; the caller then runs its torch code.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from weightsmith.kernels import merge_kernels
from weightsmith.kernels.merge import STORAGE

_u8 = torch.uint8
_KERNEL_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # merge_kernels.c's DT_F32 / DT_BF16


def _lib(inputs: Sequence[torch.Tensor], n: int, extra: int = 0):
    """The library when it can take ``inputs`` (same storage dtype, CPU, contiguous, ``n``
    entries each, at most ws_max_models() models), else None."""
    lib = merge_kernels()
    if lib is None or len(inputs) < 2 or len(inputs) - 1 > lib.ws_max_models() - extra:
        return None
    dt = inputs[0].dtype
    ok = all(
        t.dtype == dt and dt in STORAGE and t.device.type == "cpu" and t.is_contiguous()
        for t in inputs
    )
    return lib if ok and all(t.numel() == n for t in inputs) else None


def _ptrs(tensors: Sequence[torch.Tensor | None]) -> ctypes.Array:
    ptrs = [None if t is None else t.data_ptr() for t in tensors]
    return (ctypes.c_void_p * len(ptrs))(*ptrs)


def _mask_ptr(mask: torch.Tensor | None) -> int | None:
    return None if mask is None else mask.view(_u8).data_ptr()


def sce_var(inputs: Sequence[torch.Tensor], out: torch.Tensor) -> list[int] | None:
    """mergekit's bfloat16 ``torch.var(stack(x_k − base), dim=0, unbiased=False)`` of one range
    into bfloat16 ``out``: NaN/Inf count per input, or None."""
    lib = _lib(inputs, out.numel())
    if lib is None or out.dtype != torch.bfloat16 or not out.is_contiguous():
        return None
    bad = (ctypes.c_int64 * len(inputs))()
    dt = _KERNEL_DTYPES[inputs[0].dtype]
    lib.ws_sce_var(_ptrs(inputs), len(inputs), dt, out.numel(), out.data_ptr(), bad)
    return list(bad)


def sce_sq(
    inputs: Sequence[torch.Tensor], mask: torch.Tensor | None, outs: Sequence[torch.Tensor]
) -> bool:
    """``((x_k − base)·mask)²`` in bfloat16 into ``outs[k]`` (one per model); False: refused."""
    n = outs[0].numel()
    lib = _lib(inputs, n)
    if lib is None or len(outs) != len(inputs) - 1:
        return False
    dt = _KERNEL_DTYPES[inputs[0].dtype]
    lib.ws_sce_sq(_ptrs(inputs), len(inputs), dt, n, _mask_ptr(mask), _ptrs(outs))
    return True


def sce_combine(
    inputs: Sequence[torch.Tensor],
    mask: torch.Tensor | None,
    weights: Sequence[float],
    lo: float,
    out: torch.Tensor,
) -> tuple[int, list[int]] | None:
    """mergekit's bfloat16 SCE erase and weighted mean of one range into ``out`` (float32 or
    bfloat16); ``weights``: bfloat16 values; ``lo``: the divisor's clamp in bfloat16.
    (NaN/Inf outputs, NaN/Inf per input), or None."""
    lib = _lib(inputs, out.numel())
    if lib is None or out.dtype not in STORAGE:
        return None
    bad = (ctypes.c_int64 * len(inputs))()
    res = lib.ws_sce_combine(
        _ptrs(inputs),
        len(inputs),
        _KERNEL_DTYPES[inputs[0].dtype],
        out.numel(),
        _mask_ptr(mask),
        (ctypes.c_float * len(weights))(*weights),
        lo,
        out.data_ptr(),
        _KERNEL_DTYPES[out.dtype],
        bad,
    )
    return int(res), list(bad)


@dataclass(frozen=True)
class Drop:
    """How one task vector is sparsified: ``mask`` (this range's flat bool, or None), else
    DARE's counter draw (``cut`` > 0: keep when SplitMix64(seed)'s 32-bit uniform < cut),
    else not at all; then × ``scale`` (a bfloat16 value) unless it is None."""

    mask: torch.Tensor | None = None
    seed: int = 0
    cut: int = 0
    scale: float | None = None


def narrow_l1(base: torch.Tensor, x: torch.Tensor, offset: int, drop: Drop) -> tuple | None:
    """(Σ|δ|, Σ|kept δ|, NaN/Inf in base, NaN/Inf in x) of δ = bf16(x − base) on one range at
    flat ``offset`` (sums of the bfloat16 |δ| in float64), or None."""
    lib = _lib([base, x], base.numel())
    if lib is None:
        return None
    out = (ctypes.c_double * 2)()
    bad = (ctypes.c_int64 * 2)()
    lib.ws_narrow_l1(
        base.data_ptr(),
        x.data_ptr(),
        _KERNEL_DTYPES[base.dtype],
        base.numel(),
        offset,
        _mask_ptr(drop.mask),
        drop.seed,
        drop.cut,
        out,
        bad,
    )
    return out[0], out[1], bad[0], bad[1]


def narrow_gta(
    inputs: Sequence[torch.Tensor],
    offset: int,
    drops: Sequence[Drop],
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    total: float,
    lam: float | None,
    out: torch.Tensor,
) -> tuple[int, list[int]] | None:
    """mergekit's bfloat16 DARE / DELLA task arithmetic (weightsmith's ``_combine_narrow``) of
    one range at flat ``offset`` into ``out``; ``weights``/``total``: bfloat16 values (total:
    the divisor without consensus). (NaN/Inf outputs, NaN/Inf per input), or None."""
    lib = _lib(inputs, out.numel())
    k = len(drops)
    if lib is None or out.dtype not in STORAGE or k != len(inputs) - 1:
        return None
    bad = (ctypes.c_int64 * len(inputs))()
    masks = (ctypes.c_void_p * k)(*[_mask_ptr(d.mask) for d in drops])
    res = lib.ws_narrow_gta(
        _ptrs(inputs),
        len(inputs),
        _KERNEL_DTYPES[inputs[0].dtype],
        out.numel(),
        offset,
        masks,
        (ctypes.c_uint64 * k)(*[d.seed for d in drops]),
        (ctypes.c_uint64 * k)(*[d.cut for d in drops]),
        (ctypes.c_int32 * k)(*[int(d.scale is not None) for d in drops]),
        (ctypes.c_float * k)(*[1.0 if d.scale is None else d.scale for d in drops]),
        (ctypes.c_float * k)(*weights),
        int(consensus),
        int(normalize),
        total,
        int(lam is not None),
        1.0 if lam is None else lam,
        out.data_ptr(),
        _KERNEL_DTYPES[out.dtype],
        bad,
    )
    return int(res), list(bad)


def della_keep(
    base: torch.Tensor, x: torch.Tensor, cols: int, row0: int, seed: int, cuts: torch.Tensor,
    keep: torch.Tensor,
) -> bool:  # fmt: skip
    """DELLA's keep decisions for the whole rows of ``cols`` entries in ``base``/``x`` (the
    first one is row ``row0``): each row ranked by bfloat16 |x − base| (stable), the entry of
    rank r kept when its SplitMix64 draw (seed, flat index) is below ``cuts[r]`` (uint64,
    32-bit scale), into bool ``keep``. False: refused."""
    n = base.numel()
    lib = _lib([base, x], n)
    if lib is None or cols <= 0 or n % cols or keep.numel() != n or cuts.numel() != cols:
        return False
    ok = lib.ws_della_keep(
        base.data_ptr(),
        x.data_ptr(),
        _KERNEL_DTYPES[base.dtype],
        n // cols,
        cols,
        row0,
        seed,
        cuts.data_ptr(),
        keep.view(_u8).data_ptr(),
    )
    return ok == 0


def topk_mask(
    values: torch.Tensor, k: int, mask: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The bool mask of the ``k`` entries torch.topk(values.abs(), k) selects on a flat
    bfloat16 ``values`` (the same pick among equal values: libstdc++'s nth_element replayed on
    4-byte indices), when torch would use nth_element (k·64 > numel); None: not this case, or
    the kernels are unavailable. Written into ``mask`` when given, else over ``values``'
    own storage (a bool view of its first bytes; ``values`` is consumed): no second buffer."""
    lib = merge_kernels()
    n = values.numel()
    if lib is None or values.dtype != torch.bfloat16 or not values.is_contiguous():
        return None
    if not (0 < k <= n < 2**32) or k * 64 <= n or (mask is not None and mask.numel() != n):
        return None
    if mask is None:
        mask = values.view(_u8)[:n].view(torch.bool)
    idx = torch.empty(n, dtype=torch.int32)
    lib.ws_topk_mask(values.data_ptr(), n, k, idx.data_ptr(), mask.view(_u8).data_ptr())
    return mask
