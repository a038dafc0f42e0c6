"""Typed wrapper around the native GPTQ column kernel (``gptq_kernels.c``).

:func:`gptq_columns` returns False when the kernel cannot be used (no compiler, kernels
disabled, or tensors that are not contiguous float32 on the CPU); the caller then runs its
eager torch loop. Whether the
kernel gives the eager loop's bits on this machine is checked by the caller on first use
(:mod:`weightsmith.compress.gptq`), since the eager loop lives there.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from weightsmith.kernels import load_library, run_rows

_SOURCE = Path(__file__).with_name("gptq_kernels.c")
_ABI = 2
MIN_ROWS = 64  # rows per thread (torch.get_num_threads() of them at most)
_p, _i64, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
SIGNATURES = {
    "ws_gptq_abi_version": ([], ctypes.c_int),
    "ws_gptq_columns": (
        [_p, _p, _i64, _i64, _i64, _i64, _p, _p, _i64, _p, _f32, _f32, _p, _p],
        ctypes.c_int,
    ),
}


def gptq_kernels() -> ctypes.CDLL | None:
    """The GPTQ kernel library, built and loaded once per process (None: use eager torch)."""
    return load_library("gptq", _SOURCE, SIGNATURES, ("ws_gptq_abi_version", _ABI))


def _usable(*tensors: torch.Tensor) -> bool:
    return all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors
    )


def gptq_columns(
    W1: torch.Tensor,
    H1: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    grp: torch.Tensor,
    c0: int,
    c1: int,
    qmin: int,
    qmax: int,
    Q1: torch.Tensor,
    E1: torch.Tensor,
) -> bool:
    """Quantize columns ``[c0, c1)`` of the block ``W1`` ``(rows, B)`` in place: levels into
    ``Q1``, scaled errors into ``E1`` (both ``(rows, B)``), every later column of the block
    updated. ``H1``: the block's ``(B, B)`` slice of the inverse-Hessian factor; ``scale``,
    ``zero``: ``(rows, G)``; ``grp``: int64 group of each block column. False: not run."""
    lib = gptq_kernels()
    if lib is None or not _usable(W1, H1, scale, zero, Q1, E1):
        return False
    rows, B = W1.shape
    if grp.dtype != torch.int64 or not grp.is_contiguous() or grp.numel() < c1:
        return False
    G, f32 = scale.shape[1], 4
    failed = []

    def part(r0: int, r1: int) -> None:  # rows are independent: any split, the same bits
        rc = lib.ws_gptq_columns(
            W1.data_ptr() + r0 * B * f32, H1.data_ptr(), r1 - r0, B, c0, c1,
            scale.data_ptr() + r0 * G * f32, zero.data_ptr() + r0 * G * f32, G,
            grp.data_ptr(), float(qmin), float(qmax), Q1.data_ptr() + r0 * B * f32,
            E1.data_ptr() + r0 * B * f32,
        )  # fmt: skip
        if rc:
            failed.append(rc)

    run_rows(part, rows, torch.get_num_threads(), MIN_ROWS)
    if failed:
        raise MemoryError("the native GPTQ kernel could not allocate its tile buffer")
    return True
