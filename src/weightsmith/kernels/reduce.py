"""torch's CPU reductions of bfloat16 tensors with torch's bits, natively (``reduce_kernels.c``).

* :func:`norm` — ``torch.norm`` of a flat contiguous bfloat16 tensor (one row: the vectorized
  last-dimension loop, the same on any thread count).
* :func:`tensor_sum` — ``x.sum()`` of a flat contiguous bfloat16 tensor as torch computes it
  with ``threads`` threads: ``parallel_for``'s split into one part per thread, each part's float
  cascade sum rounded into a bfloat16 slot, the slots summed.

Both depend on the float lane count of the kernel torch runs (16 for AVX512, 8 for AVX2; the
norm runs AVX2's kernel even where torch reports AVX512), so :func:`layout` gives the counts
that reproduce torch here (checked once per process against torch); None (no kernels, another
capability, or no match) means callers keep torch.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from weightsmith.kernels import load_library

_SOURCE = Path(__file__).with_name("reduce_kernels.c")
_i64, _i32, _f32, _p = ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_void_p
_SIGNATURES = {
    "ws_reduce_abi": ([], ctypes.c_int),
    **{f"ws_{k}_state_size": ([], _i64) for k in ("norm", "casc", "casc32")},
    **{f"ws_{k}_start": ([_p, _i64, _i32], None) for k in ("norm", "casc", "casc32")},
    **{f"ws_{k}_feed": ([_p, _p, _i64], None) for k in ("norm", "casc", "casc32")},
    **{f"ws_{k}_end": ([_p], _f32) for k in ("norm", "casc", "casc32")},
    "ws_bf16_combine": ([_p, _i32], _f32),
}
GRAIN = 32768  # torch's GRAIN_SIZE: a shorter reduction runs on one thread
_LANES = {"AVX512": 16, "AVX2": 8}  # torch's capabilities with x86 float vectors


def library() -> ctypes.CDLL | None:
    return load_library("reduce", _SOURCE, _SIGNATURES, ("ws_reduce_abi", 1))


def parts(n: int, threads: int) -> list[tuple[int, int]]:
    """torch's per-thread ranges of a whole-tensor reduction of ``n`` entries (one range when
    it runs on one thread)."""
    if threads <= 1 or n < GRAIN:
        return [(0, n)]
    tasks = min(threads, -(-n // GRAIN))
    step = -(-n // tasks)
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def _check(x: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> None:
    if x.dtype != dtype or x.device.type != "cpu" or not x.is_contiguous():
        raise ValueError(f"this native reduction takes contiguous CPU {dtype} tensors")


class Reducer:
    """One streaming reduction of ``n`` values fed in order (in spans of any length): ``kind``
    "norm" (torch.norm of a bfloat16 row, bfloat16 result), "casc" (one part's float cascade
    sum of bfloat16 values, unrounded) or "casc32" (the same of float32 values)."""

    def __init__(self, kind: str, n: int, lanes: int) -> None:
        if lanes not in (8, 16) or kind not in ("norm", "casc", "casc32"):
            raise ValueError(f"no native {kind} reduction with {lanes} lanes")
        lib = library()
        self._feed, self._end = getattr(lib, f"ws_{kind}_feed"), getattr(lib, f"ws_{kind}_end")
        self._state = ctypes.create_string_buffer(getattr(lib, f"ws_{kind}_state_size")())
        self._dtype = torch.float32 if kind == "casc32" else torch.bfloat16
        getattr(lib, f"ws_{kind}_start")(self._state, n, lanes)

    def feed(self, x: torch.Tensor) -> None:
        _check(x, self._dtype)
        self._feed(self._state, x.data_ptr(), x.numel())

    def result(self) -> float:
        return self._end(self._state)

    def native(self) -> tuple[int, int]:
        """(its state's address, its feed function's address), for a kernel that feeds it the
        values it makes (``feed(state, values, count)``); keep this Reducer while it does."""
        return ctypes.addressof(self._state), ctypes.cast(self._feed, ctypes.c_void_p).value


def norm_with(x: torch.Tensor, lanes: int) -> float:
    r = Reducer("norm", x.numel(), lanes)
    r.feed(x)
    return r.result()


def part_sum(x: torch.Tensor, lanes: int) -> float:
    """The float cascade sum of one part (not rounded)."""
    r = Reducer("casc", x.numel(), lanes)
    r.feed(x)
    return r.result()


def part_sum32(x: torch.Tensor, lanes: int) -> float:
    """The float cascade sum of one part of float32 values, as torch's single-threaded
    ``x.sum()`` computes it before adding it to its zeroed output."""
    r = Reducer("casc32", x.numel(), lanes)
    r.feed(x)
    return r.result()


def combine(sums: Sequence[float], threads: int) -> float:
    """torch's bfloat16 result from the parts' float sums (one slot per thread, unused slots
    zero; one part on one thread: that part rounded)."""
    slots = [*sums] + [0.0] * (max(threads, len(sums)) - len(sums))
    if len(sums) == 1:
        slots = slots[:1]
    buf = (ctypes.c_float * len(slots))(*slots)
    return library().ws_bf16_combine(buf, len(slots))


def sum_with(
    x: torch.Tensor, threads: int, lanes: int, run: Callable = lambda f, xs: list(map(f, xs))
) -> float:
    """``x.sum()`` of torch with ``threads`` threads; ``run(f, ranges)`` maps the parts (e.g. on a
    thread pool: each part is independent)."""
    _check(x)
    flat = x.reshape(-1)
    sums = run(lambda r: part_sum(flat[r[0] : r[1]], lanes), parts(flat.numel(), threads))
    return combine(sums, threads)


def tie_row() -> torch.Tensor:
    """A row whose torch norm tells the lane counts apart: 4096² + 2·256² + 16² is 4112², a
    bfloat16 tie, and the four 1s at 8, 24, 40 and 56 push the float sum of squares past it
    (by 4: 2 ulps) only when they share a lane (16 lanes; with 8 each is lost against 2²⁴ in
    lane 0)."""
    x = torch.zeros(64, dtype=torch.bfloat16)
    x[:4] = torch.tensor([4096.0, 256.0, 256.0, 16.0])
    x[8::16] = 1.0
    return x


def samples(count: int = 8) -> list[torch.Tensor]:
    """Awkward lengths, and rows whose bfloat16 sum or norm depends on the order of the float
    additions: ± pairs that cancel with small noise (the sum is then its rounding errors), and
    :func:`tie_row`."""
    g = torch.Generator().manual_seed(1)
    lengths = [1, 7, 31, 32, 33, 127, 1000, 4097, GRAIN - 1, GRAIN + 5, 3 * GRAIN + 17]
    xs = [(torch.randn(n, generator=g) * 3e-3).bfloat16() for n in lengths]
    for _ in range(count):
        n = int(torch.randint(40, 3000, (1,), generator=g))
        scale = torch.exp2(torch.randint(-6, 6, (n,), generator=g).float())
        a = (torch.randn(n, generator=g) * scale).bfloat16()
        noise = (torch.randn(n // 4 + 1, generator=g) * 1e-5).bfloat16()
        x = torch.cat([a, -a[torch.randperm(n, generator=g)], noise])
        xs.append(x[torch.randperm(x.numel(), generator=g)].contiguous())
    return [*xs, tie_row(), torch.cat([tie_row(), tie_row()[:5]])]


def expected() -> bool:
    """Whether :func:`layout` should find torch's lane counts here: the kernels build and torch
    runs at a capability they know (AVX2, AVX512). Tests fail, rather than skip, when it does
    not."""
    return library() is not None and torch.backends.cpu.get_cpu_capability() in _LANES


@functools.cache
def layout() -> dict[str, int] | None:
    """The lane counts ({"norm": …, "casc": …}) that reproduce torch's norms and sums here, or
    None (keep torch). torch may run a kernel at a lower capability than it reports (its
    AVX512 build registers no AVX512 norm: the norm has AVX2's 8 lanes)."""
    if not expected():
        return None
    xs = samples()
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = {
            "norm": [float(torch.norm(x)) for x in xs],
            "casc": [float(x.sum()) for x in xs],
            "casc32": [float(x.float().sum()) for x in xs],
        }
    finally:
        torch.set_num_threads(saved)
    got = {
        "norm": lambda x, w: norm_with(x, w),
        "casc": lambda x, w: combine([part_sum(x, w)], 1),
        "casc32": lambda x, w: float(torch.tensor(part_sum32(x.float(), w)) + 0.0),
    }
    found = {}
    for kind, fn in got.items():
        lanes = [
            w for w in (16, 8) if all(fn(x, w) == v for x, v in zip(xs, want[kind], strict=True))
        ]
        if not lanes:
            return None
        found[kind] = lanes[0]
    return found
