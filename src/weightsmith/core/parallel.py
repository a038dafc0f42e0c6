"""Cache-sized, thread-parallel elementwise work for streaming transforms.

Big elementwise passes over multi-MB chunks are bound by memory bandwidth, and torch's own
intra-op threads spin and wait on a busy machine. :func:`compute_pool` instead runs torch
single-threaded and hands *sub-chunks* of ``SUB_ELEMENTS`` (1 MB of float32, cache-sized) to a
few Python threads: torch kernels release the GIL, each worker chains all of a method's passes
over one sub-chunk while it is in cache, and the split is fixed by element offsets, so results
do not depend on the number of threads.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

from weightsmith.core.memory import map_large_blocks

SUB_ELEMENTS = 1 << 18  # 256k elements per sub-chunk: 1 MB of float32

T = TypeVar("T")
_state = threading.local()
_lock = threading.Lock()


def default_workers() -> int:
    """Worker threads: the CPUs this process may use (``WEIGHTSMITH_THREADS`` overrides)."""
    env = os.environ.get("WEIGHTSMITH_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def compute_pool(workers: int | None = None, *, device: str = "cpu") -> Iterator[None]:
    """Within this block :func:`pmap` runs on ``workers`` threads with torch single-threaded.

    On CUDA the kernels are already parallel: the pool is not used there.
    """
    n = default_workers() if workers is None else workers
    map_large_blocks()
    if n <= 1 or str(device).startswith("cuda") or getattr(_state, "pool", None) is not None:
        yield
        return
    with _lock:
        saved = torch.get_num_threads()
        torch.set_num_threads(1)
    pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="weightsmith")
    helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weightsmith-beside")
    _state.pool, _state.workers, _state.helper = pool, n, helper
    try:
        yield
    finally:
        _state.pool = _state.helper = None
        helper.shutdown(wait=True, cancel_futures=True)
        pool.shutdown(wait=True)
        with _lock:
            torch.set_num_threads(saved)


def pmap(fn: Callable[[T], object], items: Sequence[T]) -> list:
    """``[fn(x) for x in items]``, on the current :func:`compute_pool` when one is active."""
    pool = getattr(_state, "pool", None)
    if pool is None or len(items) <= 1:
        return [fn(x) for x in items]
    return list(pool.map(fn, items))


def beside(fn: Callable[[], T]) -> Future:
    """``fn()`` on the current :func:`compute_pool`'s one helper thread, its :func:`pmap` calls
    on the same workers as the caller's (so its tasks fill the gaps the caller's leave: a
    tensor's statistics beside the previous tensor's output). Outside a pool it runs now, in
    the caller. Callers keep work that depends on torch's thread count on one thread at a
    time."""
    helper = getattr(_state, "helper", None)
    if helper is None:
        done: Future = Future()
        try:
            done.set_result(fn())
        except Exception as e:  # raised by result(), as from the helper
            done.set_exception(e)
        return done
    pool, workers = _state.pool, _state.workers

    def run() -> T:
        _state.pool, _state.workers = pool, workers
        try:
            return fn()
        finally:
            _state.pool = None

    return helper.submit(run)


def pipelined(
    n: int, span: int, fill: Callable[[int, int], object], feed: Callable[[int, int], object]
) -> None:
    """``fill(s, e)`` for the spans of [0, n) on the compute pool, and ``feed(s, e)`` for every
    span in order once it is filled: each round the pool fills the next spans while one task
    feeds the previous round's, so a sequential consumer (a reduction in a fixed order) runs
    beside its parallel producers. At most two rounds (4 × the pool's threads spans) are in
    flight: ``fill`` may reuse a buffer per span number modulo that."""
    per_round = 2 * pool_workers()
    spans = [(s, min(n, s + span)) for s in range(0, n, span)]
    previous: list[tuple[int, int]] = []
    for first in [*range(0, len(spans), per_round), len(spans)]:
        this = spans[first : first + per_round]
        tasks = [(fill, s, e) for s, e in this]
        if previous:
            tasks.insert(0, (_feed_all, feed, previous))
        pmap(lambda t: t[0](t[1], t[2]), tasks)
        previous = this


def _feed_all(feed: Callable[[int, int], object], spans: list[tuple[int, int]]) -> None:
    for s, e in spans:
        feed(s, e)


def pool_workers() -> int:
    """The threads :func:`pmap` runs on here (1 outside a :func:`compute_pool`)."""
    return getattr(_state, "workers", 1) if getattr(_state, "pool", None) is not None else 1


def sub_ranges(start: int, stop: int, size: int = SUB_ELEMENTS) -> list[tuple[int, int]]:
    """``[start, stop)`` cut at the multiples of ``size`` (absolute offsets), so a chunk's
    sub-chunks line up the same way whatever the chunk boundaries are."""
    cuts = [start]
    nxt = (start // size + 1) * size
    while nxt < stop:
        cuts.append(nxt)
        nxt += size
    cuts.append(stop)
    return [(a, b) for a, b in itertools.pairwise(cuts) if b > a]
