"""Typed wrappers around ``narrow_kernels.c``: torch's unstable CPU sort replayed only as far as
which entries land in a range of positions (see the C file for why that is exact), and the
elementwise steps of mergekit's bfloat16 Karcher mean.

Each wrapper returns None when the kernels are unavailable or refuse the tensors; callers then
run torch, which gives the same bits.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from weightsmith.kernels import load_library

_SOURCE = Path(__file__).with_name("narrow_kernels.c")
_i64, _i32, _f32, _p = ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_void_p
SIGNATURES = {
    "ws_narrow_abi_version": ([], ctypes.c_int),
    "ws_absdelta_keys": ([_p, _p, _i32, _i64, _i64, _i32, _p, _p, _p], None),
    "ws_sort_select": ([_p, _p, _i64, _i64, _i64, _i64, _p], _i32),
    "ws_bf16_div": ([_p, _i64, _f32, _p], None),
    "ws_bf16_scale": ([_p, _i64, _f32, _p], None),
    "ws_karcher_step": ([_p, _p, _i64, _f32, _f32, _f32], None),
    "ws_karcher_tangents": ([_p, _p, _i32, _p, _i64, _p, _p], None),
    "ws_bf16_wsum": ([_p, _p, _i32, _i64, _p], None),
    "ws_karcher_step_terms": ([_p, _p, _i32, _i64, _p, _p, _f32, _f32, _f32], None),
}
DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # what the kernels read and write directly
MAX_NUMEL = 1 << 32  # sort indices are 32-bit
MAX_MODELS = 32


def library() -> ctypes.CDLL | None:
    return load_library("narrow", _SOURCE, SIGNATURES, ("ws_narrow_abi_version", 1))


def available(numel: int = 0) -> bool:
    return numel < MAX_NUMEL and library() is not None


def _usable(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype in DTYPES and t.is_contiguous() for t in tensors)


class SortKeys:
    """16-bit sort keys and their 32-bit indices for one flat tensor of ``numel`` entries."""

    def __init__(self, numel: int, *, descending: bool) -> None:
        self.numel = numel
        self.descending = descending
        self.keys = torch.empty(numel, dtype=torch.int16)
        self.idx = torch.empty(numel, dtype=torch.int32)

    def fill_absdelta(self, base: torch.Tensor, x: torch.Tensor, offset: int) -> tuple[int, int]:
        """Keys of ``|bf16(x) − bf16(base)|`` (rounded to bfloat16) for a float32 or bfloat16
        range at flat ``offset``; returns the NaN/Inf counts of base and x."""
        lib = library()
        assert lib is not None and _usable(base, x) and base.dtype == x.dtype
        assert base.numel() == x.numel() and offset + base.numel() <= self.numel
        bad = (ctypes.c_int64 * 2)()
        lib.ws_absdelta_keys(
            base.data_ptr(),
            x.data_ptr(),
            DTYPES[base.dtype],
            base.numel(),
            offset,
            int(self.descending),
            self.keys.data_ptr(),
            self.idx.data_ptr(),
            bad,
        )
        return int(bad[0]), int(bad[1])

    def fill_bf16_magnitudes(self, values: torch.Tensor) -> None:
        """Keys of a flat bfloat16 tensor's magnitudes (tests and whole-tensor callers)."""
        bits = values.contiguous().view(torch.int16).to(torch.int32) & 0x7FFF
        if self.descending:
            bits = 0x7FFF - bits
        self.keys.copy_(bits.to(torch.int16))
        torch.arange(self.numel, dtype=torch.int32, out=self.idx)

    def select(self, lo: int, hi: int, max_depth: int = -1) -> torch.Tensor | None:
        """Bool mask of the entries torch's sort (``descending`` as built) puts at positions
        [lo, hi); None when libstdc++ would heap-sort a range that decides it. Consumes the
        keys (they are permuted)."""
        lib = library()
        assert lib is not None
        mask = torch.zeros(self.numel, dtype=torch.bool)
        bad = lib.ws_sort_select(
            self.keys.data_ptr(),
            self.idx.data_ptr(),
            self.numel,
            lo,
            hi,
            max_depth,
            mask.data_ptr(),
        )
        return None if bad else mask


def bf16_call(name: str, *args: torch.Tensor | float) -> None:
    """Call Karcher step ``name`` (``ws_bf16_div``, ``ws_bf16_scale``, ``ws_karcher_step``) on
    same-length contiguous bfloat16 CPU tensors (outputs included, in the C argument order) and
    float scalars; the length is inserted after the last leading tensor."""
    lib = library()
    assert lib is not None
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    assert all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in tensors)
    assert len({t.numel() for t in tensors}) == 1
    n = tensors[0].numel()
    lead = next(i for i, a in enumerate(args) if not isinstance(a, torch.Tensor))
    c_args: list = [t.data_ptr() for t in args[:lead]] + [n]
    c_args += [a.data_ptr() if isinstance(a, torch.Tensor) else float(a) for a in args[lead:]]
    getattr(lib, name)(*c_args)
