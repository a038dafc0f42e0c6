"""Typed wrappers around the native data-free quantization kernels (``quant_kernels.c``).

Each function returns None (or False) when the kernels are unavailable (no compiler, a failed
build, ``WEIGHTSMITH_KERNELS=0``) or cannot take the tensors (not contiguous bfloat16/float32
on the CPU); the caller then runs its torch code, which gives the same bits (tests compare
both). :class:`Scratch` holds work buffers that a stream reuses from tensor to tensor.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from weightsmith.kernels import load_library, run_rows

_SOURCE = Path(__file__).with_name("quant_kernels.c")
_ABI = 6
_p, _i64, _i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
SIGNATURES = {
    "ws_quant_abi_version": ([], ctypes.c_int),
    "ws_count_nonfinite": ([_p, _i32, _i64], _i64),
    "ws_rtn_rows": ([_p, _i32, _i64, _i64, _i64, _i32, _i32, _i32, _i32, _p, _p, _p], None),
    "ws_pack_rows": ([_p, _i64, _i64, _i32, _p], None),
    "ws_fake_quant_scaled_rows": (
        [_p, _i32, _p, _i32, _i64, _i64, _i64, _i32, _i32, _i32, _i32, _p, _i32],
        _i32,
    ),
    "ws_sq_err": ([_p, _i32, _p, _i32, _i64], ctypes.c_double),
    "ws_mse_rows": (
        [_p, _i64, _i64, _i64, _i32, _i32, _i32, _i32, _p, _i32, _p, _p, _p],
        None,
    ),
}
_STORED = (torch.bfloat16, torch.float32)


def quant_kernels() -> ctypes.CDLL | None:
    return load_library("quant", _SOURCE, SIGNATURES, ("ws_quant_abi_version", _ABI))


def _cpu_contiguous(t: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> bool:
    return t.device.type == "cpu" and t.dtype in dtypes and t.is_contiguous()


def count_nonfinite(t: torch.Tensor) -> int | None:
    """How many entries of bfloat16/float32 ``t`` are NaN/Inf (None: no kernel for it)."""
    lib = quant_kernels()
    if lib is None or not _cpu_contiguous(t, _STORED):
        return None
    if t.numel() == 0:
        return 0
    return int(lib.ws_count_nonfinite(t.data_ptr(), int(t.dtype == torch.bfloat16), t.numel()))


def rtn_rows(
    w: torch.Tensor,
    group_size: int,
    bits: int,
    symmetric: bool,
    zero_min: int | None,
    scale_dtype: torch.dtype,
    q: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Min-max RTN of a finite ``(out, in)`` weight in groups of ``group_size`` columns, the
    levels written into int8 ``q`` (same shape): ``(scale, zero)`` ``(out, n_groups)``, the
    scale in ``scale_dtype`` and the zero points int8 — exactly what
    :func:`weightsmith.compress.rtn.group_qparams` and ``quantize_levels`` compute. None when
    the kernels cannot take these tensors (the caller runs the torch code)."""
    lib = quant_kernels()
    if (
        lib is None
        or w.dim() != 2
        or not _cpu_contiguous(w, _STORED)
        or scale_dtype not in _STORED
        or not 1 <= bits <= 8
        or q.shape != w.shape
        or not _cpu_contiguous(q, (torch.int8,))
        or w.shape[1] % group_size
    ):
        return None
    rows, cols = w.shape
    n_groups = cols // group_size
    scale = torch.empty(rows, n_groups, dtype=scale_dtype)
    zero = torch.empty(rows, n_groups, dtype=torch.int8)
    if w.numel() == 0:
        return scale, zero
    qmin = -(1 << (bits - 1))
    lib.ws_rtn_rows(
        w.data_ptr(),
        int(w.dtype == torch.bfloat16),
        rows,
        cols,
        group_size,
        bits,
        int(symmetric),
        zero_min or qmin,  # as group_qparams: a zero_min of 0 or None means the lowest level
        int(scale_dtype == torch.bfloat16),
        scale.data_ptr(),
        zero.data_ptr(),
        q.data_ptr(),
    )
    return scale, zero


def mse_rows(
    w: torch.Tensor,
    bits: int,
    symmetric: bool,
    zero_min: int | None,
    scale_dtype: torch.dtype,
    ratios: list[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The MSE-clipped qparams of each row of float32 ``w`` ``(rows, g)`` (rows may be strided,
    columns contiguous): ``(scale, zero, chosen ratio)``, each float32 ``(rows, 1)``, the same
    as :func:`weightsmith.compress.mse.mse_qparams` computes. None when the kernels cannot
    take these tensors (the caller runs the torch code)."""
    lib = quant_kernels()
    if (
        lib is None
        or w.dim() != 2
        or w.device.type != "cpu"
        or w.dtype != torch.float32
        or (w.shape[1] > 1 and w.stride(1) != 1)
        or scale_dtype not in _STORED
        or not 1 <= bits <= 8
        or not ratios
        or 0 in w.shape
    ):
        return None
    rows, g = w.shape
    out = torch.empty(3, rows, 1)
    r = torch.tensor(ratios, dtype=torch.float32)  # the float32 factors torch multiplies by
    zmin, bf16, f32 = zero_min or -(1 << (bits - 1)), int(scale_dtype == torch.bfloat16), 4

    def part(r0: int, r1: int) -> None:  # rows are independent: any split, the same bits
        lib.ws_mse_rows(
            w.data_ptr() + r0 * w.stride(0) * f32, r1 - r0, g, w.stride(0), bits,
            int(symmetric), zmin, bf16, r.data_ptr(), len(ratios),
            *(o.data_ptr() + r0 * f32 for o in out),
        )  # fmt: skip

    run_rows(part, rows, torch.get_num_threads(), 256)
    return out[0], out[1], out[2]


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor | None:
    """compressed-tensors' dense int32 packing of int8 levels ``(rows, cols)`` along dim 1
    (see :func:`weightsmith.compress.packing.pack_int32`), or None without a kernel."""
    lib = quant_kernels()
    if lib is None or q.dim() != 2 or not _cpu_contiguous(q, (torch.int8,)) or not 1 <= bits <= 8:
        return None
    rows, cols = q.shape
    out = torch.empty(rows, (cols * bits + 31) // 32, dtype=torch.int32)
    if out.numel():
        lib.ws_pack_rows(q.data_ptr(), rows, cols, bits, out.data_ptr())
    return out


class Scratch:
    """Work buffers reused across the tensors of a stream, each grown to the largest request
    and never shrunk: a view handed out is valid until the next :meth:`take` of the same key
    (whoever takes one must be done with the previous view by then)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised ``shape``/``dtype`` tensor living in buffer ``key``."""
        n = 1
        for s in shape:
            n *= s
        nbytes = n * dtype.itemsize
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < nbytes:
            self._buffers.pop(key, None)  # free the old one first: peak = the largest once
            buf = self._buffers[key] = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return buf[:nbytes].view(dtype).view(shape)

    def owns(self, t: torch.Tensor) -> bool:
        """True when ``t`` is a view of one of these buffers."""
        ptr = t.untyped_storage().data_ptr()
        return any(b.untyped_storage().data_ptr() == ptr for b in self._buffers.values())

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self._buffers.values())


def fake_quant_scaled(
    w: torch.Tensor,
    s: torch.Tensor | None,
    group_size: int,
    bits: int,
    symmetric: bool,
    zero_min: int | None,
    scale_dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """AWQ's candidate ``Q(w·s) / s`` (``(out, in)``) of a finite weight and per-input column
    scales ``s`` (float32 or float64; None: ``Q(w)``): ``Q`` the min-max RTN of
    :func:`rtn_rows`, dequantized. The same bits as torch's ``(rtn(w * s).dequantize() / s)``
    (products and quotients in ``s``'s precision, rounded once to float32), as float32, or
    written into ``out`` when given: contiguous float32, or bfloat16 (the float32 result
    rounded as ``copy_`` rounds it), ``w``'s shape, not overlapping ``w``. None when the
    kernels cannot take these tensors."""
    lib = quant_kernels()
    if (
        lib is None
        or w.dim() != 2
        or not _cpu_contiguous(w, _STORED)
        or (s is not None and (s.shape != (w.shape[1],) or s.device.type != "cpu"))
        or (s is not None and s.dtype not in (torch.float32, torch.float64))
        or scale_dtype not in _STORED
        or not 1 <= bits <= 8
        or group_size < 1
        or w.shape[1] % group_size
        or 0 in w.shape
        or (out is not None and (out.shape != w.shape or not _cpu_contiguous(out, _STORED)))
    ):
        return None
    rows, cols = w.shape
    sc = None if s is None else s.contiguous()
    out = torch.empty(rows, cols) if out is None else out
    zmin, bf16, esize = (
        zero_min or -(1 << (bits - 1)),
        int(w.dtype == torch.bfloat16),
        w.element_size(),
    )
    s_f32, osize = int(s is not None and s.dtype == torch.float32), out.element_size()
    failed = []

    def part(r0: int, r1: int) -> None:  # rows are independent: any split, the same bits
        rc = lib.ws_fake_quant_scaled_rows(
            w.data_ptr() + r0 * cols * esize, bf16, None if sc is None else sc.data_ptr(),
            s_f32, r1 - r0, cols, group_size,
            bits, int(symmetric), zmin, int(scale_dtype == torch.bfloat16),
            out.data_ptr() + r0 * cols * osize, int(out.dtype == torch.bfloat16),
        )  # fmt: skip
        if rc:
            failed.append(rc)

    run_rows(part, rows, torch.get_num_threads(), 64)
    return None if failed else out


def squared_error(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """``Σ (a - b)²`` of two same-shape contiguous CPU tensors (float32 or bfloat16 each): the
    differences and squares in float32, summed in double in a fixed order (one pass, no float32
    copies). None when the kernels cannot take them."""
    lib = quant_kernels()
    if (
        lib is None
        or a.shape != b.shape
        or not (_cpu_contiguous(a, _STORED) and _cpu_contiguous(b, _STORED))
    ):
        return None
    bf = torch.bfloat16
    return float(
        lib.ws_sq_err(a.data_ptr(), int(a.dtype == bf), b.data_ptr(), int(b.dtype == bf), a.numel())
    )
