"""Typed wrappers around the native merge kernels (``merge_kernels.c``).

Every function returns None when the kernels are unavailable or the tensors are not contiguous
float32 on the CPU; the caller then runs its eager torch code, which gives the same bits.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from weightsmith.kernels import merge_kernels

NONE, TOPK, DARE = 0, 1, 2
BINS = 1 << 16


@dataclass(frozen=True)
class Sparsify:
    """How one task vector is sparsified: not at all, by a top-k cut, or by a DARE drop."""

    mode: int = NONE
    threshold: float = -1.0  # TOPK: keep |δ| > threshold ...
    last_tie: int = -1  # ... and |δ| == threshold at flat index <= last_tie
    seed: int = 0  # DARE: the task vector's SplitMix64 seed
    cut: int = 0  # DARE: keep entry when its 32-bit uniform < cut
    density: float = 1.0  # DARE: kept entries are divided by this when rescaling


def _usable(*tensors: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> bool:
    """CPU, contiguous and of one of ``dtypes`` (read-only buffers are fine: kernels only read
    their inputs)."""
    return all(t.device.type == "cpu" and t.dtype in dtypes and t.is_contiguous() for t in tensors)


def gta_combine(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    sparsify: Sequence[Sparsify],
    offset: int,
    *,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    lam: float,
) -> torch.Tensor | None:
    """The fused task-arithmetic / TIES / DARE output for one flat range (or None)."""
    lib = merge_kernels()
    k = len(models)
    if lib is None or k == 0 or k > lib.ws_max_models() or not _usable(base, *models):
        return None
    n = base.numel()
    out = torch.empty(n, dtype=torch.float32)
    total = float(sum(weights))
    divide_total = (not consensus) and normalize and abs(total) >= 1e-8
    f32 = ctypes.c_float * k
    lib.ws_gta_combine(
        base.data_ptr(),
        (ctypes.c_void_p * k)(*[m.data_ptr() for m in models]),
        k,
        n,
        offset,
        f32(*weights),
        (ctypes.c_int32 * k)(*[s.mode for s in sparsify]),
        f32(*[s.threshold for s in sparsify]),
        (ctypes.c_int64 * k)(*[s.last_tie for s in sparsify]),
        (ctypes.c_uint64 * k)(*[s.seed for s in sparsify]),
        (ctypes.c_uint64 * k)(*[s.cut for s in sparsify]),
        f32(*[s.density for s in sparsify]),
        int(rescale),
        int(consensus),
        int(normalize),
        int(divide_total),
        total,
        lam,
        out.data_ptr(),
    )
    return out.reshape(base.shape)


def to_float32(src: torch.Tensor, out: torch.Tensor, check: bool) -> int | None:
    """Copy bfloat16/float32 ``src`` into float32 ``out``; the number of NaN/Inf values seen
    when ``check`` (else 0), or None when the kernels cannot take these tensors."""
    lib = merge_kernels()
    if (
        lib is None
        or src.dtype not in (torch.bfloat16, torch.float32)
        or src.device.type != "cpu"
        or not src.is_contiguous()
        or not _usable(out)
    ):
        return None
    is_bf16 = int(src.dtype == torch.bfloat16)
    return int(lib.ws_to_f32(src.data_ptr(), is_bf16, src.numel(), int(check), out.data_ptr()))


def dare_keep(seed: int, cut: int, offset: int, n: int) -> torch.Tensor | None:
    """DARE's keep mask for entries ``[offset, offset + n)`` (bool), or None."""
    lib = merge_kernels()
    if lib is None:
        return None
    keep = torch.empty(n, dtype=torch.uint8)
    lib.ws_dare_keep(seed, cut, offset, n, keep.data_ptr())
    return keep.view(torch.bool)


def absdelta_hist(
    base: torch.Tensor, x: torch.Tensor, level: int, prefix: int, hist: torch.Tensor
) -> bool:
    """Add the radix histogram of |x − base| (level 0: top 16 bits; level 1: low 16 bits of
    entries whose top bits are ``prefix``) into ``hist`` (int64, 65536). False: unavailable."""
    lib = merge_kernels()
    if lib is None or not _usable(base, x):
        return False
    lib.ws_absdelta_hist(
        base.data_ptr(), x.data_ptr(), base.numel(), level, prefix, hist.data_ptr()
    )
    return True


def absdelta_count_eq(base: torch.Tensor, x: torch.Tensor, t: float) -> int:
    lib = merge_kernels()
    assert lib is not None
    return int(lib.ws_absdelta_count_eq(base.data_ptr(), x.data_ptr(), base.numel(), t))


def absdelta_nth_eq(base: torch.Tensor, x: torch.Tensor, t: float, need: int) -> int:
    lib = merge_kernels()
    assert lib is not None
    return int(lib.ws_absdelta_nth_eq(base.data_ptr(), x.data_ptr(), base.numel(), t, need))


def available(*tensors: torch.Tensor) -> bool:
    """True when the kernels are loaded and can take these tensors."""
    return merge_kernels() is not None and _usable(*tensors)


def select_from_hist(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """(bin holding the k-th largest entry, how many entries lie in higher bins)."""
    counts = hist.flip(0).cumsum(0)
    idx = int(torch.searchsorted(counts, torch.tensor([k], dtype=counts.dtype)))
    b = BINS - 1 - idx
    return b, int(counts[idx]) - int(hist[b])


def bits_to_float(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


_KERNEL_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
STORAGE = tuple(_KERNEL_DTYPES)  # what the SLERP kernels read and write directly


def slerp_dots(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float, int, int] | None:
    """(<a,b>, <a,a>, <b,b>, NaN/Inf in a, NaN/Inf in b) of two same-dtype float32/bfloat16
    ranges, products exact in float64; None when the kernels cannot take them."""
    lib = merge_kernels()
    if (
        lib is None
        or a.dtype != b.dtype
        or a.numel() != b.numel()
        or not _usable(a, b, dtypes=STORAGE)
    ):
        return None
    out = (ctypes.c_double * 3)()
    bad = (ctypes.c_int64 * 2)()
    lib.ws_slerp_dots(a.data_ptr(), b.data_ptr(), _KERNEL_DTYPES[a.dtype], a.numel(), out, bad)
    return out[0], out[1], out[2], bad[0], bad[1]


def lerp2(a: torch.Tensor, b: torch.Tensor, s0: float, s1: float, out: torch.Tensor) -> int | None:
    """``out = s0·a + s1·b`` (float32 arithmetic as torch's ``a.mul(s0).add_(b, alpha=s1)``)
    into a float32/bfloat16 ``out``: how many outputs are NaN/Inf (overflows of ``out``'s
    dtype), or None when the kernels cannot take these tensors."""
    lib = merge_kernels()
    if (
        lib is None
        or a.dtype != b.dtype
        or not (a.numel() == b.numel() == out.numel())
        or not _usable(a, b, out, dtypes=STORAGE)
    ):
        return None
    return lib.ws_lerp2(
        a.data_ptr(),
        b.data_ptr(),
        _KERNEL_DTYPES[a.dtype],
        a.numel(),
        s0,
        s1,
        out.data_ptr(),
        _KERNEL_DTYPES[out.dtype],
    )


LINEAR, TASK_ARITHMETIC = 0, 1  # ws_narrow_mix's modes


def narrow_mix(
    inputs: Sequence[torch.Tensor],
    mode: int,
    weights: Sequence[float],
    div: float | None,
    lam: float | None,
    out: torch.Tensor,
) -> tuple[int, list[int]] | None:
    """mergekit's bfloat16 linear (``LINEAR``) or task arithmetic (``TASK_ARITHMETIC``, input 0
    the base, ``weights`` already rounded to bfloat16) of same-dtype float32/bfloat16 ranges,
    into a float32/bfloat16 ``out``: (NaN/Inf outputs, NaN/Inf per input), or None when the
    kernels cannot take these tensors. ``div``/``lam``: divide / scale, or None to skip."""
    lib = merge_kernels()
    k = len(inputs)
    if (
        lib is None
        or k == 0
        or len({t.dtype for t in inputs}) != 1
        or any(t.numel() != out.numel() for t in inputs)
        or not _usable(*inputs, out, dtypes=STORAGE)
    ):
        return None
    bad = (ctypes.c_int64 * k)()
    bad_out = lib.ws_narrow_mix(
        (ctypes.c_void_p * k)(*[t.data_ptr() for t in inputs]),
        k,
        _KERNEL_DTYPES[inputs[0].dtype],
        out.numel(),
        mode,
        (ctypes.c_float * len(weights))(*weights),
        int(div is not None),
        0.0 if div is None else div,
        int(lam is not None),
        0.0 if lam is None else lam,
        out.data_ptr(),
        _KERNEL_DTYPES[out.dtype],
        bad,
    )
    return int(bad_out), list(bad)


def _narrow_args(inputs: Sequence[torch.Tensor], out: torch.Tensor | None) -> bool:
    """Whether the bfloat16-arithmetic kernels take these: one float32/bfloat16 dtype for all
    inputs, same sizes, contiguous CPU tensors (``out`` float32/bfloat16 too)."""
    n = inputs[0].numel() if inputs else 0
    outs = [] if out is None else [out]
    return (
        bool(inputs)
        and len({t.dtype for t in inputs}) == 1
        and all(t.numel() == n for t in [*inputs, *outs])
        and _usable(*inputs, *outs, dtypes=STORAGE)
    )


def _ptrs(inputs: Sequence[torch.Tensor]):
    return (ctypes.c_void_p * len(inputs))(*[t.data_ptr() for t in inputs])


def nearswap(
    a: torch.Tensor, b: torch.Tensor, t: float, lo: float, out: torch.Tensor
) -> tuple[int, list[int]] | None:
    """mergekit's bfloat16 nearswap of base ``a`` and ``b`` (``lo``: the clamp of |a − b|, as
    torch clamps a bfloat16 tensor: rounded to bfloat16 here) into
    ``out``: (NaN/Inf outputs, NaN/Inf per input), or None when the kernels cannot take them."""
    lib = merge_kernels()
    if lib is None or not _narrow_args([a, b], out):
        return None
    bad = (ctypes.c_int64 * 2)()
    lo = float(torch.tensor(lo, dtype=torch.bfloat16))
    n_out = lib.ws_nearswap(
        a.data_ptr(), b.data_ptr(), _KERNEL_DTYPES[a.dtype], a.numel(), t, lo,
        out.data_ptr(), _KERNEL_DTYPES[out.dtype], bad,
    )  # fmt: skip
    return int(n_out), list(bad)


RAM, RAMPLUS, RAMPLUS_COUNTS = 0, 1, 2  # ws_ram's modes
RAM_MAX_MODELS = 15  # torch sums up to 15 task vectors in order (the kernel's limit)


def ram(
    inputs: Sequence[torch.Tensor],
    eps: float,
    mode: int,
    lam: Sequence[float] = (),
    out: torch.Tensor | None = None,
) -> tuple[int, list[int], list[int]] | None:
    """mergekit's bfloat16 RAM (``RAM``) or RAM+ (``RAMPLUS``, ``lam`` one λ per model) of
    base-first ``inputs`` into ``out``, or RAM+'s counts (``RAMPLUS_COUNTS``, no ``out``):
    (NaN/Inf outputs, NaN/Inf per input, [shared, unique] per model), or None when the kernels
    cannot take these tensors. ``|δ| > eps`` compares with ``eps`` rounded to bfloat16, as
    torch compares a bfloat16 tensor with a Python number."""
    lib = merge_kernels()
    k = len(inputs)
    if lib is None or not 2 <= k <= RAM_MAX_MODELS + 1 or not _narrow_args(inputs, out):
        return None
    if (out is None) != (mode == RAMPLUS_COUNTS):
        return None
    bad = (ctypes.c_int64 * k)()
    counts = (ctypes.c_int64 * (2 * (k - 1)))()
    lams = (ctypes.c_float * (k - 1))(*(lam or [1.0] * (k - 1)))
    eps = float(torch.tensor(eps, dtype=torch.bfloat16))
    n_out = lib.ws_ram(
        _ptrs(inputs), k, _KERNEL_DTYPES[inputs[0].dtype], inputs[0].numel(), eps, mode, lams,
        counts, None if out is None else out.data_ptr(),
        _KERNEL_DTYPES[out.dtype] if out is not None else 0, bad,
    )  # fmt: skip
    return int(n_out), list(bad), list(counts)


def stock_mix(
    inputs: Sequence[torch.Tensor],
    offset: int,
    t_rows: torch.Tensor,
    u_rows: torch.Tensor,
    cols: int,
    out: torch.Tensor,
) -> tuple[int, list[int]] | None:
    """Model Stock's bfloat16 output ``t·mean(models) + u·base`` for flat entries ``[offset,
    offset + n)`` of base-first ``inputs`` (``t_rows``/``u_rows``: float32 tensors of
    bfloat16 values, one per row of ``cols`` entries; ``cols`` 0: one for all) into ``out``:
    (NaN/Inf outputs, NaN/Inf per input), or None when the kernels cannot take them."""
    lib = merge_kernels()
    k = len(inputs)
    if lib is None or k < 2 or not _narrow_args(inputs, out) or not _usable(t_rows, u_rows):
        return None
    bad = (ctypes.c_int64 * k)()
    n_out = lib.ws_stock_mix(
        _ptrs(inputs), k, _KERNEL_DTYPES[inputs[0].dtype], out.numel(), offset,
        t_rows.data_ptr(), u_rows.data_ptr(), cols, out.data_ptr(), _KERNEL_DTYPES[out.dtype],
        bad,
    )  # fmt: skip
    return int(n_out), list(bad)


def bf16_sub(x: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> list[int] | None:
    """``out = x.to(bfloat16) − b.to(bfloat16)`` (bfloat16 ``out``): NaN/Inf in x and in b, or
    None when the kernels cannot take these tensors."""
    lib = merge_kernels()
    if lib is None or out.dtype != torch.bfloat16 or not _narrow_args([x, b], out):
        return None
    bad = (ctypes.c_int64 * 2)()
    lib.ws_bf16_sub(x.data_ptr(), b.data_ptr(), _KERNEL_DTYPES[x.dtype], x.numel(),
                    out.data_ptr(), bad)  # fmt: skip
    return list(bad)
