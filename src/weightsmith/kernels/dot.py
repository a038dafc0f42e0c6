"""``torch.dot`` and ``torch.linalg.vector_norm(x.to(float32))`` of bfloat16 vectors with torch's
bits, natively (``dot_kernels.c``; the C file states both orders).

torch's bfloat16 dot of more than 4096 entries is a oneDNN matmul; on an AMX machine its
order is a chain of 32-entry tile sums cut into K chunks whose length oneDNN picks per length
from its cache heuristics. :func:`chunk_groups` measures that length for each vector length
with probes (±2⁴⁰ pairs that cancel, and ones that survive only outside the partial sum where
the pair met), then checks the whole order against torch on two vectors whose exact dot is
zero (so the result is nothing but rounding: any other order shows). Lengths where that check
fails, other machines, and short vectors keep torch.
"""

from __future__ import annotations

import ctypes
import functools
import math
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from weightsmith.kernels import load_library
from weightsmith.kernels.reduce import samples

_SOURCE = Path(__file__).with_name("dot_kernels.c")
_i64, _i32, _f32, _p = ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_void_p
_SIGNATURES = {
    "ws_dot_abi": ([], ctypes.c_int),
    "ws_dot_max_units": ([], ctypes.c_int),
    "ws_dot_has_ftz": ([], ctypes.c_int),
    "ws_dot_chunks": ([_p, _p, _i32, _i64, _i64, _i64, _i64, _f32, _p, _i64], None),
    "ws_dot_total": ([_p, _i64], _f32),
    "ws_dot_norm_f32": ([_p, _i64, _i32], _f32),
    "ws_dot_norm_state_size": ([], _i64),
    "ws_dot_norm_start": ([_p, _i64, _i32], _i32),
    "ws_dot_norm_feed": ([_p, _p, _i64], None),
    "ws_dot_norm_end": ([_p], _f32),
}
GROUP = 32  # entries per tile row
ONEDNN_MIN = 4097  # torch.dot of fewer bfloat16 entries does not call oneDNN
_BIG = 2.0**40  # a probe's ± pair: ulp(2⁴⁰) in float32 is 2¹⁷, so up to 255 ones vanish in it
_ONES = 255  # ones per probe: their count is exact in a bfloat16 result
_PIECE = 1 << 13  # groups per parallel piece
_lock = threading.Lock()
_chunks: dict[tuple[int, int], int | None] = {}
Run = Callable[
    [Callable, Sequence], list
]  # run(f, items) -> [f(x) for x in items], maybe on a pool


def _serial(f: Callable, items: Sequence) -> list:
    return [f(x) for x in items]


def library() -> ctypes.CDLL | None:
    return load_library("dot", _SOURCE, _SIGNATURES, ("ws_dot_abi", 1))


def usable(*tensors: torch.Tensor) -> bool:
    """Flat contiguous CPU bfloat16 tensors of one length (at most the kernel's unit count)."""
    lib = library()
    return (
        lib is not None
        and len(tensors) <= lib.ws_dot_max_units() + 1
        and all(
            t.device.type == "cpu" and t.dtype == torch.bfloat16 and t.is_contiguous()
            for t in tensors
        )
        and len({t.numel() for t in tensors}) == 1
    )


# ---------------------------------------------------------------------------------- norm


def _norm_with(x: torch.Tensor, lanes: int) -> float:
    return float(library().ws_dot_norm_f32(x.data_ptr(), x.numel(), lanes))


@functools.cache
def norm_lanes() -> int | None:
    """The float lane count (8 or 16) with which :func:`norm` gives torch's float32 norms here,
    or None (keep torch)."""
    if library() is None:
        return None
    g = torch.Generator().manual_seed(5)
    xs = [*samples(), *[(torch.randn(n, generator=g) * 0.02).bfloat16() for n in (4099, 100_003)]]
    want = [float(torch.linalg.vector_norm(x.to(torch.float32))) for x in xs]
    for lanes in (8, 16):
        if all(_norm_with(x, lanes) == w for x, w in zip(xs, want, strict=True)):
            return lanes
    return None


def norm(x: torch.Tensor) -> float | None:
    """``torch.linalg.vector_norm(x.to(torch.float32))`` of a flat bfloat16 tensor, as a float
    (the float32 value); None when it cannot be reproduced here."""
    lanes = norm_lanes()
    return None if lanes is None or not usable(x) else _norm_with(x, lanes)


class NormFeed:
    """:func:`norm` of an ``n``-entry bfloat16 vector fed in order, in spans of any length (for
    values made span by span and never stored whole). Needs :func:`norm_lanes`."""

    def __init__(self, n: int) -> None:
        lib, lanes = library(), norm_lanes()
        assert lib is not None and lanes is not None
        self._lib, self._state = lib, ctypes.create_string_buffer(lib.ws_dot_norm_state_size())
        lib.ws_dot_norm_start(self._state, n, lanes)

    def feed(self, x: torch.Tensor) -> None:
        assert usable(x)
        self._lib.ws_dot_norm_feed(self._state, x.data_ptr(), x.numel())

    def result(self) -> float:
        return float(self._lib.ws_dot_norm_end(self._state))


# ---------------------------------------------------------------------------------- dot


def dots(
    x: torch.Tensor, units: Sequence[torch.Tensor], div: float = 0.0, run: Run = _serial
) -> list[torch.Tensor] | None:
    """``[torch.dot(x, u) for u in units]`` (0-dim bfloat16 tensors, torch's bits), after
    ``x = (x / div).to(bfloat16)`` in place when ``div`` > 0 (``div`` the float32 value); None,
    with x untouched, when torch's order for this length is not known here (then call torch).
    ``run(f, pieces)`` maps the independent pieces (e.g. on a thread pool)."""
    if not units or not usable(x, *units):
        return None
    cg = chunk_groups(x.numel())
    if cg is None:
        return None
    return dots_with(x, units, cg, div, run)


def dots_with(
    x: torch.Tensor, units: Sequence[torch.Tensor], cg: int, div: float = 0.0, run: Run = _serial
) -> list[torch.Tensor]:
    """The dots in this order with chunks of ``cg`` groups (whatever torch's chunk here)."""
    return [_to_bf16(s) for s in _chunked_totals(x, units, cg, div, run)]


def _to_bf16(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32).to(torch.bfloat16)


def _chunked_totals(
    x: torch.Tensor, units: Sequence[torch.Tensor], cg: int, div: float, run: Run
) -> list[float]:
    """The float32 totals of x·u for each unit with chunks of ``cg`` groups: the chunk sums made
    in parallel pieces of whole chunks, then added in order (one float per chunk is stored)."""
    n, lib = x.numel(), library()
    groups = -(-n // GROUP)
    chunks = -(-groups // cg)
    out = torch.empty((len(units), chunks), dtype=torch.float32)
    ptrs = (ctypes.c_void_p * len(units))(*[u.data_ptr() for u in units])
    per = max(1, _PIECE // cg)

    def piece(c0: int) -> None:
        c1, dst = min(chunks, c0 + per), out.data_ptr() + 4 * c0
        lib.ws_dot_chunks(x.data_ptr(), ptrs, len(units), n, cg, c0, c1, div, dst, chunks)

    run(piece, range(0, chunks, per))
    return [lib.ws_dot_total(row.data_ptr(), chunks) for row in out]


def chunk_groups(n: int) -> int | None:
    """oneDNN's K chunk (in 32-entry groups) for torch.dot of n-entry bfloat16 vectors with
    torch's current thread count, measured once per process; None: keep torch (short vectors,
    no kernels, no flush-to-zero control, or no order found that gives torch's bits)."""
    key = (n, torch.get_num_threads())
    with _lock:
        if key not in _chunks:
            _chunks[key] = _calibrate(n)
        return _chunks[key]


def _calibrate(n: int) -> int | None:
    lib = library()
    if n < ONEDNN_MIN or lib is None or not lib.ws_dot_has_ftz() or norm_lanes() is None:
        return None
    guess = onednn_chunk_groups(n)
    if _boundary_holds(n, guess) and _verified(n, [guess], pairs=1):
        return guess
    groups = -(-n // GROUP)
    last = _chunk_start(_prober(n), groups - 2) if groups >= 3 else 0
    candidates = [groups] if last == 0 else _equal_chunkings(n, last)
    return _verified(n, candidates)


def onednn_chunk_groups(n: int) -> int:
    """oneDNN 3.12's usual K chunk for these dots (in groups): the whole vector up to 2¹⁹
    entries, else K split evenly into ⌈K / 2¹⁸⌉ chunks rounded up to whole groups (what the
    probes found for most lengths; :func:`chunk_groups` checks it and measures otherwise)."""
    if n <= 1 << 19:
        return -(-n // GROUP)
    chunks = math.ceil(n / (1 << 18))
    return math.ceil(math.ceil(n / chunks) / GROUP)


def _boundary_holds(n: int, cg: int) -> bool:
    """One probe: the chunk holding the last two groups (or the two before the last chunk
    when that chunk is one group) starts where chunks of ``cg`` groups put it."""
    groups = -(-n // GROUP)
    start = (groups - 1) // cg * cg
    x = groups - 2
    if groups - start < 2:
        start, x = start - cg, start - 2
    if start < 1 or x < start:
        return start == 0  # one chunk: the adversarial check decides
    return _prober(n)(x, [start - 1, start]) == 1  # the one at start - 1 outside, start inside


def _prober(n: int) -> Callable[[int, Sequence[int]], int]:
    """probe(x, ones): with +2⁴⁰ opening group x and −2⁴⁰ opening group x + 1, and 1 opening
    each group in ``ones`` (all before x), the number of those ones that torch's dot loses
    (those summed into the partial sum that held ±2⁴⁰: the chunk's, when x and x + 1 share it)."""
    a = torch.ones(n, dtype=torch.bfloat16)
    b = torch.zeros(n, dtype=torch.bfloat16)

    def probe(x: int, ones: Sequence[int]) -> int:
        at = torch.tensor([GROUP * g for g in ones], dtype=torch.long)
        b[at] = 1.0
        b[GROUP * x], b[GROUP * (x + 1)] = _BIG, -_BIG
        try:
            return len(ones) - int(float(torch.dot(a, b)))
        finally:
            b[at] = 0.0
            b[GROUP * x] = b[GROUP * (x + 1)] = 0.0

    return probe


def _chunk_start(probe: Callable[[int, Sequence[int]], int], x: int) -> int:
    """The first group of the chunk that holds groups x and x + 1: narrowed 255-fold a probe."""
    lo, hi = 0, x  # the start is in [lo, hi]
    while hi > lo:
        count = min(_ONES, hi - lo)
        ones = sorted({lo + round(i * (hi - 1 - lo) / max(count - 1, 1)) for i in range(count)})
        kept = len(ones) - probe(x, ones)  # the ones before the start
        lo = lo if kept == 0 else ones[kept - 1] + 1
        hi = hi if kept == len(ones) else ones[kept]
    return lo


def _equal_chunkings(n: int, last: int) -> list[int]:
    """Chunk lengths (groups) whose last chunk starts at group ``last``: m chunks of cg before
    it and at most cg after; oneDNN's own split (K over c chunks, rounded up to whole groups)
    first."""
    groups = -(-n // GROUP)
    tail = groups - last
    out = [last // m for m in range(1, last // tail + 1) if last % m == 0 and last // m >= tail]
    split = {cg for cg in out if math.ceil(math.ceil(n / (last // cg + 1)) / GROUP) == cg}
    return sorted(out, key=lambda cg: (cg not in split, -cg))


def _verified(n: int, candidates: Sequence[int], pairs: int = 2) -> int | None:
    """The first candidate that gives torch's bits on ``pairs`` adversarial pairs, or None."""
    keep = list(candidates)
    for seed in range(1, pairs + 1):
        if not keep:
            return None
        x, y = adversarial_pair(n, seed)
        want = float(torch.dot(x, y))
        keep = [cg for cg in keep if float(dots_with(x, [y], cg)[0]) == want]
    return keep[0] if keep else None


def adversarial_pair(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two bfloat16 vectors whose exact dot is zero (the second half cancels the first, in
    reverse order) with products of magnitudes 2⁻⁴…2¹⁴: the float32 result is nothing but
    rounding errors, which any other summation order changes."""
    g = torch.Generator().manual_seed(seed)
    h, step = n // 2, 1 << 20
    x, y = torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16)
    for s in range(0, h, step):
        m = min(h, s + step) - s
        scale = torch.exp2(torch.randint(0, 14, (m,), generator=g, dtype=torch.int16).float())
        x[s : s + m] = torch.randn(m, generator=g) * scale
        y[s : s + m] = torch.randn(m, generator=g)
    x[h : 2 * h] = x[:h].flip(0)
    y[h : 2 * h] = -y[:h].flip(0)
    return x, y
