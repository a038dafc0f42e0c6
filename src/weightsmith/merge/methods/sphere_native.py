"""Shared steps of the native bfloat16 (mergekit-exact) paths of slerp, nuslerp, multislerp and
arcee_fusion (kernels: :mod:`weightsmith.kernels.sphere`).

mergekit reduces whole tensors with torch's bfloat16 ops. Those reductions stay torch calls,
made on the one tensor torch reduces (written by a native kernel, in parallel pieces, straight
from the stored inputs) and with the threads mergekit has where the result depends on them:

* ``torch.norm`` of a contiguous last dimension is one vectorized loop per output, whatever the
  thread count (and a row of a 2-D norm is the norm of that row alone);
* ``sum`` of a whole tensor splits it among torch's threads (partial sums in the tensor's dtype),
  so it runs with mergekit's threads (:func:`mergekit_threads`);
* ``sum(-1)`` of a 2-D tensor gives each row to one thread: each row is that row's
  single-threaded sum (:func:`single_thread`).

The tests compare these with mergekit's whole-tensor expressions at two threads.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch

from weightsmith.core.parallel import pmap, pool_workers, sub_ranges
from weightsmith.kernels import reduce, sphere
from weightsmith.merge.methods.base import (
    NATIVE_PIECE,
    TORCH_THREADS,
    ChunkSource,
    TensorParams,
    mergekit_threads,
    stored_inputs,
    stream_native,
)


def applies(src: ChunkSource, params: TensorParams, out_dtype: torch.dtype) -> bool:
    """The native narrow path can run: bfloat16 arithmetic, kernels loaded, a float32/bfloat16
    output (the engine only offers stored float32/bfloat16 inputs of one dtype)."""
    return (
        params.dtype == torch.bfloat16
        and out_dtype in (torch.float32, torch.bfloat16)
        and src.num_inputs <= 16
        and sphere.library() is not None
    )


def fill(
    src: ChunkSource,
    xs: Sequence[torch.Tensor],
    out: torch.Tensor,
    kernel: Callable[[list[torch.Tensor], torch.Tensor], Sequence[int] | None],
) -> torch.Tensor:
    """``out`` written piece by piece on the compute pool by ``kernel(input pieces, out piece)``
    (which returns NaN/Inf counts per input, or None when it does not count); a NaN/Inf input
    raises its input's error. Returns ``out``."""

    def one(r: tuple[int, int]) -> Sequence[int] | None:
        return kernel([x[r[0] : r[1]] for x in xs], out[r[0] : r[1]])

    for bad in pmap(one, sub_ranges(0, out.numel(), NATIVE_PIECE)):
        refuse_nonfinite(src, bad)
    return out


def refuse_nonfinite(src: ChunkSource, bad: Sequence[int] | None) -> None:
    """Raise the error of the first input a kernel counted NaN/Inf in (``bad``: per input)."""
    for i, b in enumerate(bad or ()):
        if b:
            src.fail_nonfinite(i)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """torch single-threaded inside the block (a row's sum, as a 2-D ``sum(-1)`` makes it)."""
    saved = torch.get_num_threads()
    if saved != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if saved != 1:
            torch.set_num_threads(saved)


GRAIN = 32768  # torch's internal GRAIN_SIZE: below it a reduction runs on one thread


def split_sum(x: torch.Tensor) -> torch.Tensor:
    """torch's ``x.sum()`` of a flat contiguous tensor as mergekit's ``TORCH_THREADS`` threads
    compute it, from single-threaded sums (so it can run on the compute pool, and without
    torch's thread hand-offs): the tensor split into one part per thread (``parallel_for``'s
    split), each part summed into a slot of the tensor's dtype, the slots summed. Callers check
    :func:`split_sum_matches` first."""
    n, threads = x.numel(), TORCH_THREADS
    with single_thread():
        if threads == 1 or n < GRAIN:
            return x.sum()
        tasks = min(threads, -(-n // GRAIN))
        step = -(-n // tasks)
        parts = [x[i : i + step].sum() for i in range(0, n, step)]
        parts += [torch.zeros((), dtype=x.dtype)] * (threads - len(parts))
        return torch.stack(parts).sum()


@functools.cache
def split_sum_matches() -> bool:
    """Whether :func:`split_sum` gives torch's own multi-threaded sums here (checked once, on
    float32 and bfloat16 tensors of several lengths)."""
    g = torch.Generator().manual_seed(0)
    for n in (GRAIN * 3 + 17, (1 << 20) + 3, 1 << 20):
        x = torch.randn(n, generator=g) * 1e-3 + 1e-4
        for t in (x, x.bfloat16()):
            with mergekit_threads():
                want = t.sum()
            if not torch.equal(
                want.view(-1).view(torch.uint8), split_sum(t).view(-1).view(torch.uint8)
            ):
                return False
    return True


def sum_parts(n: int) -> list[tuple[int, int]]:
    """:func:`split_sum`'s parts of an ``n``-entry tensor (one per thread it uses)."""
    threads = TORCH_THREADS
    if threads == 1 or n < GRAIN:
        return [(0, n)]
    step = -(-n // min(threads, -(-n // GRAIN)))
    return [(i, min(n, i + step)) for i in range(0, n, step)]


def split_sum_of(part_sums: Sequence[float], n: int) -> torch.Tensor:
    """:func:`split_sum`'s float32 result from its parts' float cascade sums (each, as torch's
    ``sum()`` of the part, added to a zeroed float32 output first)."""
    parts = [torch.zeros((), dtype=torch.float32) + v for v in part_sums]
    if TORCH_THREADS == 1 or n < GRAIN:
        return parts[0]
    parts += [torch.zeros((), dtype=torch.float32)] * (TORCH_THREADS - len(parts))
    with single_thread():
        return torch.stack(parts).sum()


def native_float_sums() -> bool:
    """torch's float32 cascade sums can be reproduced natively here (:func:`float_sum`)."""
    lanes = reduce.layout()
    return lanes is not None and "casc32" in lanes


def float_sum(n: int) -> reduce.Reducer:
    """A streaming float cascade sum of ``n`` float32 values (one part of :func:`split_sum`)."""
    return reduce.Reducer("casc32", n, reduce.layout()["casc32"])


SPAN = 1 << 19  # entries a kernel writes per call into a reused buffer that a reduction reads

_local = threading.local()


def span_buffers(
    use: str, count: int, numel: int, dtype: torch.dtype = torch.bfloat16
) -> list[torch.Tensor]:
    """``count`` buffers of ``numel`` entries of ``dtype``, this thread's for ``use``, allocated
    once at the largest size asked and kept: a freed multi-MB buffer goes back to the OS and
    the next tensor's would be faulted in again page by page (up to 0.4M faults and 2 s of
    system time in one multislerp run)."""
    cache = _local.__dict__.setdefault("spans", {})
    have = cache.get((use, dtype), [])
    if len(have) < count or (have and have[0].numel() < numel):
        size = max(numel, have[0].numel() if have else 0)
        have = [torch.empty(size, dtype=dtype) for _ in range(max(count, len(have)))]
        cache[use, dtype] = have
    return [b[:numel] for b in have[:count]]


def release_buffers() -> None:
    """Hand back what a merge run kept for its tensors: the :class:`RowCache` pool and this
    thread's span buffers (the pool's threads' go with the pool). A process that goes on after
    the merge (a library caller) keeps neither."""
    with RowCache._lock:
        RowCache._pool.clear()
    _local.__dict__.pop("spans", None)


def native_reductions() -> bool:
    """torch's bfloat16 norms and sums can be reproduced natively here (:mod:`reduce`)."""
    lanes = reduce.layout()
    return lanes is not None and 2 * lanes["casc"] > TORCH_THREADS


def streamed(
    src: ChunkSource,
    xs: Sequence[torch.Tensor],
    kernel,
    kind: str,
    lo: int,
    hi: int,
    into: torch.Tensor | None = None,
):
    """The ``kind`` reduction (:class:`reduce.Reducer`) of the bfloat16 values ``kernel`` (a
    :func:`fill` kernel) makes for entries ``[lo, hi)``, a span at a time into one small buffer
    (the tensor torch would reduce is never stored), or into ``into[lo:hi]`` to keep them."""
    red = reduce.Reducer(kind, hi - lo, reduce.layout()[kind])
    (buf,) = span_buffers("streamed", 1, max(1, min(SPAN, hi - lo))) if into is None else (into,)
    for s in range(lo, hi, SPAN):
        e = min(hi, s + SPAN)
        out = buf[: e - s] if into is None else into[s:e]
        refuse_nonfinite(src, kernel([x[s:e] for x in xs], out))
        red.feed(out)
    return red.result()


def streamed_wide(src: ChunkSource, xs: Sequence[torch.Tensor], kernel, kind: str) -> float:
    """:func:`streamed` over the whole tensor with the compute pool's threads (see
    :func:`wide_rows`)."""
    return wide_rows(src, xs, kernel, kind, 1)[0]


def wide_rows(
    src: ChunkSource, xs: Sequence[torch.Tensor], kernel, kind: str, rows: int
) -> list[float]:
    """The ``kind`` reduction of each of the ``rows`` rows ``kernel`` makes at once (row r of a
    span of m entries at ``out[r·m : (r+1)·m]``), over the whole tensor (see
    :func:`row_reductions`)."""
    whole = [(kind, [(0, src.numel)])] * rows
    return [parts[0] for parts in row_reductions(src, xs, kernel, whole)]


def reducers(rows: Sequence[tuple[str, list]]) -> list[list[tuple[int, int, reduce.Reducer]]]:
    """For each row's (kind, ranges): (lo, hi, the ``kind`` reduction of [lo, hi)) per range."""
    layout = reduce.layout()
    return [[(lo, hi, reduce.Reducer(kind, hi - lo, layout[kind])) for lo, hi in ranges]
            for kind, ranges in rows]  # fmt: skip


def row_reductions(
    src: ChunkSource, xs: Sequence[torch.Tensor], kernel, rows: Sequence[tuple[str, list]]
) -> list[list[float]]:
    """For each row ``kernel`` makes (row r of a span of m entries at ``out[r·m : (r+1)·m]``),
    ``rows[r]`` = (kind, ranges): the ``kind`` reduction (:class:`reduce.Reducer`) of each of
    its ranges [lo, hi), over the whole tensor with the compute pool's threads: each round,
    the pool fills the next spans into one set of buffers while one task per row feeds the
    previous round's set to that row's reductions, in order (so the same values in the same
    order: the same bits)."""
    n, per_round = src.numel, 2 * pool_workers()
    reds = reducers(rows)
    bufs = span_buffers("wide_rows", 2 * per_round, len(rows) * min(SPAN, n))
    sets = [bufs[:per_round], bufs[per_round:]]
    spans = [(s, min(n, s + SPAN)) for s in range(0, n, SPAN)]
    rounds = [spans[i : i + per_round] for i in range(0, len(spans), per_round)]

    def fill(task: tuple) -> Sequence[int] | None:
        (s, e), buf = task
        return kernel([x[s:e] for x in xs], buf[: len(rows) * (e - s)])

    def feed(task: tuple) -> None:
        r, filled = task
        for (s, e), buf in filled:
            row = buf[r * (e - s) : (r + 1) * (e - s)]
            for lo, hi, red in reds[r]:
                a, b = max(s, lo), min(e, hi)
                if a < b:
                    red.feed(row[a - s : b - s])

    previous: list = []
    for j, spans_j in enumerate([*rounds, []]):
        filled = list(zip(spans_j, sets[j % 2], strict=False))
        tasks = [(feed, (r, previous)) for r in range(len(rows))] if previous else []
        tasks += [(fill, t) for t in filled]
        for bad in pmap(lambda task: task[0](task[1]), tasks):
            refuse_nonfinite(src, bad)
        previous = filled
    return [[red.result() for _, _, red in row] for row in reds]


FUSED_STEP = 1 << 14  # entries per span a fused kernel writes, then feeds while in cache


def fused_reductions(rows: Sequence[tuple[str, list]], run) -> list[list[float]]:
    """:func:`row_reductions` by one kernel that feeds the reductions itself, on this thread:
    ``run(feeds, scratch, step)`` writes each span of ``step`` entries' rows into ``scratch``
    (row r of a span of m entries at ``scratch[r·m : (r+1)·m]``) and feeds them to ``feeds``
    (one :class:`sphere.Feed` per range of ``rows[r]`` = (kind, ranges)) before the next span:
    the same values in the same order, each row read back from the cache instead of from
    buffers of the pool's rounds (one thread ran 11.5M-entry model_stock statistics in 1.04 ns
    an entry, the pool's two in 1.7), leaving the pool to the previous tensor's output."""
    reds = reducers(rows)
    feeds = [
        sphere.Feed(r, lo, hi, *red.native()) for r, row in enumerate(reds) for lo, hi, red in row
    ]
    (scratch,) = span_buffers("fused", 1, len(rows) * FUSED_STEP)
    run(feeds, scratch, FUSED_STEP)
    return [[red.result() for _, _, red in row] for row in reds]


def norms(
    src: ChunkSource, xs: Sequence[torch.Tensor], kernels: Sequence, into: Sequence | None = None
) -> list[torch.Tensor]:
    """``torch.norm`` (bfloat16, 0-dim) of each kernel's values, the kernels on the compute
    pool at once (a norm is one sequential loop, the same on any thread count); one kernel on
    a pool of several threads: its values made in parallel (:func:`streamed_wide`). ``into``:
    one row per kernel that keeps its values (the kernels then run one per thread)."""
    if len(kernels) == 1 and pool_workers() > 1 and into is None:
        vals = [streamed_wide(src, xs, kernels[0], "norm")]
    else:
        rows = [None] * len(kernels) if into is None else list(into)
        jobs = list(zip(kernels, rows, strict=True))
        vals = pmap(lambda j: streamed(src, xs, j[0], "norm", 0, src.numel, j[1]), jobs)
    return [torch.tensor(v, dtype=torch.bfloat16) for v in vals]


ROWS_BYTES = 72 << 20  # a RowCache buffer: 3 rows of a 1.1B Llama's MLP weights (66 MiB) fit


class RowCache:
    """``count`` bfloat16 rows of ``numel`` entries (``rows``) in a ``ROWS_BYTES`` buffer from a
    pool, handed back when this object is collected: a statistics pass keeps the values it
    made for the next pass, and the next tensor reuses the buffer, whose pages are already
    faulted in (at most two are in use: one tensor's output while the next one's statistics
    run ahead). Use the rows only while this object is referenced."""

    _pool: ClassVar[list[torch.Tensor]] = []
    _lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def fits(cls, count: int, numel: int) -> bool:
        return 0 < count * numel * 2 <= ROWS_BYTES

    def __init__(self, count: int, numel: int) -> None:
        with self._lock:
            buf = self._pool.pop() if self._pool else None
        self._buf = torch.empty(ROWS_BYTES // 2, dtype=torch.bfloat16) if buf is None else buf
        self.rows = list(self._buf[: count * numel].view(count, numel).unbind(0))

    def __del__(self) -> None:
        with self._lock:
            self._pool.append(self._buf)


def tensor_sum(src: ChunkSource, xs: Sequence[torch.Tensor], kernel, threads: int):
    """``sum()`` (bfloat16, 0-dim) of the kernel's values as torch with ``threads`` threads: its
    per-thread parts reduced on the compute pool, then combined as torch does."""
    ranges = reduce.parts(src.numel, threads)
    sums = pmap(lambda r: streamed(src, xs, kernel, "casc", r[0], r[1]), ranges)
    return torch.tensor(reduce.combine(sums, threads), dtype=torch.bfloat16)


def row_sums(src: ChunkSource, xs: Sequence[torch.Tensor], kernel, rows: int) -> list:
    """The sums of the ``rows`` rows one kernel makes at once, each summed as one row of a 2-D
    ``sum(-1)`` (one thread per row: one part; :func:`wide_rows`): the values made once, on the
    pool's threads, each row fed in order; bfloat16 0-dim tensors."""
    sums = wide_rows(src, xs, kernel, "casc", rows)
    return [torch.tensor(reduce.combine([v], 1), dtype=torch.bfloat16) for v in sums]


class _Mapped(ChunkSource):
    """``src`` whose inputs are already mapped (``xs``): the output pass reuses the mappings
    (and their resident pages) of the statistics passes."""

    def __init__(self, src: ChunkSource, xs: list[torch.Tensor]) -> None:
        self.src, self.xs = src, xs
        self.name, self.numel, self.shape = src.name, src.numel, src.shape
        self.num_inputs = src.num_inputs

    def stored(self, i: int) -> contextlib.AbstractContextManager[torch.Tensor]:
        return contextlib.nullcontext(self.xs[i])

    def fail_nonfinite(self, i: int) -> None:
        self.src.fail_nonfinite(i)


def stream_mapped(
    src: ChunkSource,
    out_dtype: torch.dtype,
    prepare: Callable[[list[torch.Tensor]], Any],
    kernel: Callable[[Any], Callable[..., Any]],
    *,
    offsets: bool = False,
) -> Iterator[torch.Tensor] | None:
    """The inputs mapped once: ``prepare(stored inputs)`` now (its state, or None for the torch
    path, which is returned as None), then the output chunks of ``kernel(state)`` (a
    :func:`~weightsmith.merge.methods.base.stream_native` kernel) as they are consumed."""
    stack = contextlib.ExitStack()
    try:
        xs = stack.enter_context(stored_inputs(src))
        state = prepare(xs)
    except BaseException:
        stack.close()
        raise
    if state is None:
        stack.close()
        return None

    def chunks() -> Iterator[torch.Tensor]:
        with stack:
            yield from stream_native(_Mapped(src, xs), out_dtype, kernel(state), offsets=offsets)

    return _Stream(chunks(), stack)


class _Stream:
    """The output chunks of :func:`stream_mapped`; :meth:`close` also unmaps the inputs of a
    stream that was never read (a generator not started does not run its ``with`` block)."""

    def __init__(self, chunks: Iterator[torch.Tensor], stack: contextlib.ExitStack) -> None:
        self._chunks, self._stack = chunks, stack

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self._chunks

    def __next__(self) -> torch.Tensor:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()
        self._stack.close()
