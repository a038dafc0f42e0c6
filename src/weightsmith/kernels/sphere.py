"""Typed wrappers around the native kernels of the bfloat16 (mergekit-exact) spherical merges
and arcee_fusion (``sphere_kernels.c``).

Inputs are flat contiguous CPU tensors of one storage dtype, float32 or bfloat16 (float32 is
rounded to bfloat16 first, as mergekit's load cast does). Every function returns None when the
kernels are unavailable (no compiler, ``WEIGHTSMITH_KERNELS=0``) or cannot take the tensors;
callers then run their torch code, which gives the same bits (the tests compare both).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path

import torch

from weightsmith.kernels import load_library

_SOURCE = Path(__file__).with_name("sphere_kernels.c")
_i64, _i32, _f32, _p = ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_void_p
_SIGNATURES = {
    "ws_sphere_abi": ([], ctypes.c_int),
    "ws_sphere_max_models": ([], ctypes.c_int),
    "ws_sph_vector": ([_p, _i32, _i32, _i32, _i64, _p, _i32, _p], None),
    "ws_nus_prod": ([_p, _i32, _i32, _i64, _f32, _f32, _p], None),
    "ws_stock_rows": ([_p, _i32, _i32, _i64, _p, _p, _p], _i32),
    "ws_stock_reduce": ([_p, _i32, _i32, _i64, _i64, _p, _p, _p, _i32, _p], _i32),
    "ws_ms_reduce": ([_p, _i32, _i64, _i32, _p, _p, _f32, _p, _i64, _p, _p, _i32], _i64),
    "ws_stock_out": ([_p, _p, _i32, _i64, _f32, _f32, _p, _i32, _p], _i64),
    "ws_nus_out": (
        [_p, _i32, _i32, _i64, _f32, _f32, _f32, _i32, _f32, _f32, _p, _i32, _p],
        _i64,
    ),
    "ws_ms_pass": (
        [_p, _i32, _i32, _i32, _i64, _i32, _i32, _p, _p, _f32, _p, *[_f32] * 3, _p, _i32, _p],
        _i64,
    ),
    "ws_ms_rows": (
        [_p, _i32, _p, _i32, _i64, _i32, _p, _p, _f32, _p, *[_f32] * 3, _p, _i32, _p],
        _i64,
    ),
    "ws_slerp_pass": ([_p, _i32, _i64, _i32, _f32, _f32, _f32, _f32, _p, _i32, _p], _i64),
    "ws_fusion_out": ([_p, _i32, _i64, _i64, _i64, _p, _f32, _p, _i32, _p], _i64),
    "ws_fusion_sampled": ([_p, _i32, _p, _i64, _i64, _p, _p], None),
    "ws_block_order": ([_p, _i64, _i64, _i32, _p], _i32),
    "ws_bf16_count": ([_p, _i64, _p], None),
    "ws_count_ranks": ([_p, _p, _i32, _p], None),
}
_DT = {torch.float32: 0, torch.bfloat16: 1}
BLOCK_BITS = 12  # block_order's blocks: at most 2^12
MEAN, UNIT_DOT, TANGENT, OUTPUT = 0, 1, 2, 3  # ws_ms_pass's stages
PRODUCTS, MIX = 0, 1  # ws_slerp_pass's modes


def library() -> ctypes.CDLL | None:
    return load_library("sphere", _SOURCE, _SIGNATURES, ("ws_sphere_abi", 4))


def usable(inputs: Sequence[torch.Tensor], *outs: torch.Tensor) -> bool:
    """Kernels loaded; inputs of one storage dtype and outputs float32/bfloat16, all flat,
    contiguous, on the CPU and of one length."""
    ts = [*inputs, *outs]
    return (
        library() is not None
        and bool(inputs)
        and len(inputs) <= library().ws_sphere_max_models() + 1
        and len({t.dtype for t in inputs}) == 1
        and all(t.device.type == "cpu" and t.dtype in _DT and t.is_contiguous() for t in ts)
        and len({t.numel() for t in ts}) == 1
    )


def _ptrs(xs: Sequence[torch.Tensor]):
    return (ctypes.c_void_p * len(xs))(*[t.data_ptr() for t in xs])


def _bad(k: int):
    return (ctypes.c_int64 * k)()


def vector(xs: Sequence[torch.Tensor], has_base: bool, k: int, out: torch.Tensor) -> list[int]:
    """``out`` = input ``k`` as bfloat16 values (``x_k − x_0`` rounded with ``has_base``), in
    ``out``'s dtype; the NaN/Inf count of each input read."""
    bad = _bad(len(xs))
    library().ws_sph_vector(
        _ptrs(xs), int(has_base), k, _DT[xs[0].dtype], out.numel(), out.data_ptr(),
        _DT[out.dtype], bad,
    )  # fmt: skip
    return list(bad)


def nus_prod(xs: Sequence[torch.Tensor], has_base: bool, n1: float, n2: float, out: torch.Tensor):
    """nuslerp's product of the two unit task vectors, into bfloat16 ``out``."""
    library().ws_nus_prod(
        _ptrs(xs), int(has_base), _DT[xs[0].dtype], out.numel(), n1, n2, out.data_ptr()
    )


STOCK_MAX_MODELS = 4  # ws_stock_rows' STOCK_MAXM


def stock_rows(
    xs: Sequence[torch.Tensor], out: torch.Tensor, avg: torch.Tensor | None = None
) -> list[int]:
    """model_stock's task vectors of a range (``xs[0]`` the base) and each pair's product, row
    after row in bfloat16 ``out`` (k + k(k−1)/2 rows of the range's length), and with ``avg``
    (bfloat16, the range's length) the models' mean for :func:`stock_out`; the NaN/Inf count
    of each input read."""
    bad = _bad(len(xs))
    n = xs[0].numel()
    mean = None if avg is None else avg.data_ptr()
    if library().ws_stock_rows(_ptrs(xs), len(xs), _DT[xs[0].dtype], n, out.data_ptr(), mean, bad):
        raise ValueError(f"stock_rows takes 2 to {STOCK_MAX_MODELS + 1} inputs")
    return list(bad)


class Feed(ctypes.Structure):
    """One reduction a kernel feeds (``feed_t``): entries [lo, hi) of row ``row`` of each span
    it writes, to ``state`` by ``feed`` (:meth:`reduce.Reducer.native`)."""

    _fields_ = [("row", _i64), ("lo", _i64), ("hi", _i64), ("state", _p), ("feed", _p)]


def stock_reduce(
    xs: Sequence[torch.Tensor],
    feeds: Sequence[Feed],
    scratch: torch.Tensor,
    step: int,
    avg: torch.Tensor | None = None,
) -> list[int]:
    """:func:`stock_rows` over the whole tensors ``xs`` (flat, base first) in spans of ``step``
    entries into ``scratch`` (bfloat16, its rows' entries for one span), each span's rows fed
    to ``feeds`` at once, in order; with ``avg``, the models' mean kept there. The NaN/Inf
    count of each input."""
    bad = _bad(len(xs))
    arr = (Feed * len(feeds))(*feeds)
    mean = None if avg is None else avg.data_ptr()
    if library().ws_stock_reduce(
        _ptrs(xs), len(xs), _DT[xs[0].dtype], xs[0].numel(), step, scratch.data_ptr(), mean,
        arr, len(feeds), bad,
    ):  # fmt: skip
        raise ValueError(f"stock_reduce takes 2 to {STOCK_MAX_MODELS + 1} inputs")
    return list(bad)


def stock_out(
    avg: torch.Tensor, base: torch.Tensor, t: float, u: float, out: torch.Tensor
) -> tuple[int, list[int]]:
    """Model Stock's output ``r(r(t·avg) + r(u·base))`` from :func:`stock_rows`' mean ``avg``
    and the stored base, in ``out``'s dtype: (NaN/Inf outputs, [NaN/Inf of the base])."""
    bad = _bad(1)
    n_out = library().ws_stock_out(
        avg.data_ptr(), base.data_ptr(), _DT[base.dtype], out.numel(), t, u, out.data_ptr(),
        _DT[out.dtype], bad,
    )  # fmt: skip
    return int(n_out), list(bad)


def nus_out(
    xs: Sequence[torch.Tensor], has_base: bool, coef: tuple, t: float, out: torch.Tensor
) -> tuple[int, list[int]]:
    """nuslerp's output from ``coef`` = (A, B, S, colinear): (NaN/Inf outputs, per input)."""
    a, b, s, colinear = coef
    bad = _bad(len(xs))
    n_out = library().ws_nus_out(
        _ptrs(xs), int(has_base), _DT[xs[0].dtype], out.numel(), a, b, s, int(colinear),
        1.0 - t, t, out.data_ptr(), _DT[out.dtype], bad,
    )  # fmt: skip
    return int(n_out), list(bad)


def _stage_stats(stats: dict, k: int) -> tuple:
    """multislerp's statistics known so far as the kernels take them: ne, w, mn, dots (then
    c1, c2, avg, for ``ws_ms_pass``/``ws_ms_rows``)."""
    f32 = ctypes.c_float * k
    dots = f32(*stats.get("dots", [0.0] * k))
    return f32(*stats["ne"]), f32(*stats["w"]), stats.get("mn", 1.0), dots


def _stage_tail(stats: dict) -> tuple:
    return stats.get("c1", 0.0), stats.get("c2", 0.0), stats.get("avg", 0.0)


def _checked(n_out: int) -> int:
    if n_out < 0:
        raise RuntimeError("multislerp kernel: too many models")
    return int(n_out)


def ms_pass(
    xs: Sequence[torch.Tensor],
    has_base: bool,
    mode: int,
    stats: dict,
    out: torch.Tensor,
    which: int = 0,
) -> tuple[int, list[int]]:
    """One multislerp stage (``MEAN`` … ``OUTPUT``) with the statistics known so far
    (``stats``: ne, w, and later mn, dots, c1, c2, avg as floats). ``UNIT_DOT`` with ``which``
    < 0 writes every task vector's product: row k of ``out`` (k rows of the pieces' length)."""
    k = len(xs) - int(has_base)
    bad = _bad(len(xs))
    n = out.numel() // k if mode == UNIT_DOT and which < 0 else out.numel()
    n_out = library().ws_ms_pass(
        _ptrs(xs), k, int(has_base), _DT[xs[0].dtype], n, mode, which,
        *_stage_stats(stats, k), *_stage_tail(stats), out.data_ptr(), _DT[out.dtype], bad,
    )  # fmt: skip
    return _checked(n_out), list(bad)


def ms_rows(
    rows: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    mode: int,
    stats: dict,
    out: torch.Tensor,
) -> tuple[int, list[int]]:
    """:func:`ms_pass` (``UNIT_DOT``: every task vector's row) from k + 1 kept bfloat16 rows of
    the pieces' length instead of the inputs, each stage leaving in them what the next reads:
    ``MEAN`` takes the task vectors (rows 0…k−1; row k is written), the later stages what the
    one before left. ``base`` (the stored base's piece, or None) is read by ``OUTPUT`` only;
    its NaN/Inf count is returned."""
    k = len(rows) - 1
    bad = _bad(1)
    n = out.numel() // k if mode == UNIT_DOT else out.numel()
    n_out = library().ws_ms_rows(
        _ptrs(rows), k, None if base is None else base.data_ptr(),
        _DT[rows[0].dtype if base is None else base.dtype], n, mode,
        *_stage_stats(stats, k), *_stage_tail(stats), out.data_ptr(), _DT[out.dtype], bad,
    )  # fmt: skip
    return _checked(n_out), list(bad)


def ms_reduce(
    rows: Sequence[torch.Tensor],
    mode: int,
    stats: dict,
    feeds: Sequence[Feed],
    scratch: torch.Tensor,
    step: int,
) -> None:
    """:func:`ms_rows` (``MEAN``, ``UNIT_DOT``, ``TANGENT``) over the whole kept rows in spans
    of ``step`` entries into ``scratch``, each span's values fed to ``feeds`` at once, in
    order (see :func:`stock_reduce`)."""
    k = len(rows) - 1
    arr = (Feed * len(feeds))(*feeds)
    err = library().ws_ms_reduce(
        _ptrs(rows), k, rows[0].numel(), mode, *_stage_stats(stats, k), step, scratch.data_ptr(),
        arr, len(feeds),
    )  # fmt: skip
    _checked(err)


def slerp_pass(
    xs: Sequence[torch.Tensor], mode: int, coef: tuple[float, float], out: torch.Tensor
) -> tuple[int, list[int]]:
    """mergekit's slerp pieces: ``PRODUCTS`` (coef = the norms) into float32 ``out``, or
    ``MIX`` (coef = s0, s1) into ``out``'s dtype."""
    bad = _bad(2)
    na, nb = coef if mode == PRODUCTS else (1.0, 1.0)
    s0, s1 = coef if mode == MIX else (0.0, 0.0)
    n_out = library().ws_slerp_pass(
        _ptrs(xs), _DT[xs[0].dtype], out.numel(), mode, na, nb, s0, s1, out.data_ptr(),
        _DT[out.dtype], bad,
    )  # fmt: skip
    return int(n_out), list(bad)


def fusion_out(
    xs: Sequence[torch.Tensor],
    offset: int,
    cols: int,
    kl: torch.Tensor,
    threshold: float,
    out: torch.Tensor,
) -> tuple[int, list[int]]:
    """arcee_fusion's output for entries ``[offset, offset + n)`` (``kl``: float32 per row)."""
    bad = _bad(2)
    n_out = library().ws_fusion_out(
        _ptrs(xs), _DT[xs[0].dtype], out.numel(), offset, cols, kl.data_ptr(), threshold,
        out.data_ptr(), _DT[out.dtype], bad,
    )  # fmt: skip
    return int(n_out), list(bad)


def fusion_sampled(
    xs: Sequence[torch.Tensor], idx: torch.Tensor, cols: int, kl: torch.Tensor, out: torch.Tensor
) -> None:
    """arcee_fusion's bfloat16 importances at the flat entries ``idx`` (contiguous int64) of the
    stored base and model ``xs`` (``kl``: float32 per row), into ``out``."""
    library().ws_fusion_sampled(
        _ptrs(xs), _DT[xs[0].dtype], idx.data_ptr(), idx.numel(), cols, kl.data_ptr(),
        out.data_ptr(),
    )  # fmt: skip


def block_order(idx: torch.Tensor, numel: int) -> torch.Tensor:
    """The flat indices ``idx`` (contiguous int64, each below ``numel``) reordered so that a
    gather walks memory forward: a counting sort into at most 2^12 blocks (few enough that the
    sort's write streams stay in cache). The same multiset, so statistics that ignore order
    (quantiles) come out the same."""
    shift = max(0, (max(numel, 1) - 1).bit_length() - BLOCK_BITS)
    out = torch.empty_like(idx)
    if library().ws_block_order(idx.data_ptr(), idx.numel(), numel, shift, out.data_ptr()):
        raise MemoryError("ws_block_order: cannot allocate the block counts")
    return out


def order_stats(x: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """The values at 0-based ``ranks`` of a flat contiguous bfloat16 tensor sorted ascending
    (what ``torch.sort(x).values[ranks]`` holds), by counting, in one pass."""
    counts = bit_counts()
    count_into(x, counts)
    return counted_ranks(counts, ranks)


def bit_counts() -> torch.Tensor:
    """An empty count of the 65536 bfloat16 bit patterns, for :func:`count_into`."""
    return torch.zeros(1 << 16, dtype=torch.int64)


def count_into(x: torch.Tensor, counts: torch.Tensor) -> None:
    """Adds the flat contiguous bfloat16 ``x`` to ``counts`` (:func:`bit_counts`): counts of
    parts, summed, give the order statistics of the whole (:func:`counted_ranks`)."""
    library().ws_bf16_count(x.data_ptr(), x.numel(), counts.data_ptr())


def counted_ranks(counts: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """The values at 0-based ``ranks`` of the values counted in ``counts``, sorted ascending."""
    r = torch.tensor(list(ranks), dtype=torch.int64)
    out = torch.empty(len(ranks), dtype=torch.int16)
    library().ws_count_ranks(counts.data_ptr(), r.data_ptr(), len(ranks), out.data_ptr())
    return out.view(torch.bfloat16)
