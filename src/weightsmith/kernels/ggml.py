"""Typed, thread-parallel wrappers around the native GGML block encoders (``ggml_kernels.c``).

Each function returns None when the kernels are unavailable (no compiler, a failed build,
``WEIGHTSMITH_KERNELS=0``); the caller then runs its numpy encoder, which gives the same bytes.
Rows are split over ``threads`` worker threads (ctypes releases the GIL during the C call);
every row encodes independently, so the bytes do not depend on the split.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import torch

from weightsmith.kernels import load_library, run_rows

_SOURCE = Path(__file__).with_name("ggml_kernels.c")
_ABI = 2
_CONVERT_CHUNK = 1 << 20  # values per conversion task
_p, _i64 = ctypes.c_void_p, ctypes.c_int64
SIGNATURES = {
    "ws_ggml_abi_version": ([], ctypes.c_int),
    "ws_quantize_k": ([ctypes.c_int, _p, _i64, _i64, _p, _p], _i64),
    "ws_quantize_q8_0": ([_p, _i64, _p], _i64),
    "ws_to_f32_stats": ([_p, ctypes.c_int, _i64, _p], ctypes.c_uint32),
    "ws_f32_to_f16": ([_p, _i64, _p], None),
}
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
K_CODES = {"Q2_K": 2, "Q3_K": 3, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6}
BLOCK_BYTES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210, "Q8_0": 34}
_MIN_ROWS_PER_TASK = 4


def ggml_kernels() -> ctypes.CDLL | None:
    """The GGML encoder library, built and loaded once per process (None: use numpy)."""
    return load_library("ggml", _SOURCE, SIGNATURES, ("ws_ggml_abi_version", _ABI))


def quantize_k(
    x: np.ndarray, type_name: str, imatrix: np.ndarray | None = None, threads: int = 1
) -> np.ndarray | None:
    """float32 (rows, n), n % 256 == 0 -> uint8 (rows, n // 256 * block bytes), as
    :func:`weightsmith.ggml.kquants.quantize_k` encodes it (None: kernels unavailable)."""
    lib = ggml_kernels()
    if lib is None:
        return None
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.shape
    qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
    out = np.empty((rows, n // 256 * BLOCK_BYTES[type_name]), np.uint8)
    code, qw_ptr = K_CODES[type_name], None if qw is None else qw.ctypes.data
    row_in, row_out = n * 4, out.shape[1]

    def work(a: int, b: int) -> None:
        done = lib.ws_quantize_k(
            code, x.ctypes.data + a * row_in, b - a, n, qw_ptr, out.ctypes.data + a * row_out
        )
        if done != (b - a) * row_out:
            raise AssertionError(f"native {type_name} encoder wrote {done} bytes")

    run_rows(work, rows, threads, _MIN_ROWS_PER_TASK)
    return out


def quantize_q8_0(x: np.ndarray, threads: int = 1) -> np.ndarray | None:
    """float32 (rows, n), n % 32 == 0 -> uint8 (rows, n // 32 * 34), as ``gguf.quants``
    encodes Q8_0 (llama.cpp's ``quantize_row_q8_0_ref``); None: kernels unavailable."""
    lib = ggml_kernels()
    if lib is None:
        return None
    x = np.ascontiguousarray(x, dtype=np.float32)
    x2 = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
    rows, n = x2.shape
    out = np.empty((rows, n // 32 * 34), np.uint8)

    def work(a: int, b: int) -> None:
        lib.ws_quantize_q8_0(
            x2.ctypes.data + a * n * 4, (b - a) * n, out.ctypes.data + a * out.shape[1]
        )

    run_rows(work, rows, threads, _MIN_ROWS_PER_TASK)
    return out.reshape(*x.shape[:-1], n // 32 * 34)


def to_float32(t: torch.Tensor, threads: int = 1) -> tuple[np.ndarray, bool, float] | None:
    """A float32/bfloat16/float16 CPU tensor as a float32 array, in one pass that also finds
    whether any value is NaN/Inf and the largest ``|value|`` (None: kernels unavailable or
    another dtype)."""
    lib = ggml_kernels()
    if lib is None or t.dtype not in _DTYPES or t.device.type != "cpu":
        return None
    t = t.contiguous()
    out = np.empty(tuple(t.shape), np.float32)
    n, code, size = t.numel(), _DTYPES[t.dtype], t.element_size()
    chunks = max(1, -(-n // _CONVERT_CHUNK))
    stats = [0] * chunks  # bits of each chunk's largest |value|
    src, dst = t.data_ptr(), out.ctypes.data

    def work(a: int, b: int) -> None:
        for c in range(a, b):
            lo, hi = c * _CONVERT_CHUNK, min(n, (c + 1) * _CONVERT_CHUNK)
            stats[c] = lib.ws_to_f32_stats(src + lo * size, code, hi - lo, dst + lo * 4)

    run_rows(work, chunks, threads, min_rows=1)
    top = max(stats)
    return out, top < 0x7F800000, float(np.array(top, np.uint32).view(np.float32))


def to_float16(x: np.ndarray, threads: int = 1) -> np.ndarray | None:
    """Finite float32 -> float16, rounded to nearest even as ``astype(np.float16)`` does."""
    lib = ggml_kernels()
    if lib is None:
        return None
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape, np.float16)
    n = x.size
    chunks = max(1, -(-n // _CONVERT_CHUNK))
    src, dst = x.ctypes.data, out.ctypes.data

    def work(a: int, b: int) -> None:
        lo, hi = a * _CONVERT_CHUNK, min(n, b * _CONVERT_CHUNK)
        lib.ws_f32_to_f16(src + lo * 4, hi - lo, dst + lo * 2)

    run_rows(work, chunks, threads, min_rows=1)
    return out
