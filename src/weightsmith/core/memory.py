"""Give freed memory back to the operating system between streamed units of work."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
from collections.abc import Iterator


def _load_libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


TRIM_SLACK = 64 << 20  # growth of the resident set past its level at the last trim let be


def resident_bytes() -> int | None:
    """The process's resident set now (Linux ``/proc/self/statm``; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


_trimmed_at: list[int | None] = [None]  # the resident set when the last trim was asked for


def release_freed_memory() -> None:
    """Hand memory freed by the last tensor or layer back to the OS. glibc keeps freed
    multi-MB blocks in its heap, so without this peak RSS creeps up with fragmentation across
    tensors and layers until a streamed run looks as big as the whole model.

    Only when the resident set has grown by more than :data:`TRIM_SLACK` past its level at the
    last trim: the memory a layer freed then serves the next layer (same shapes) instead of
    being handed back and faulted in again page by page (a fifth of the system time of a 135M
    model's GPTQ run), and the creep stays bounded by the slack."""
    if _LIBC is None:
        return
    now, last = resident_bytes(), _trimmed_at[0]
    if now is not None and last is not None and now <= last + TRIM_SLACK:
        return
    _trimmed_at[0] = now
    _LIBC.malloc_trim(0)


M_TRIM_THRESHOLD = -1  # mallopt parameters (glibc malloc.h)
M_MMAP_THRESHOLD = -3


def map_large_blocks(threshold: int = 32 << 20, keep: int = 64 << 20) -> None:
    """Serve every allocation of ``threshold`` bytes or more with its own mmap, so it goes back
    to the OS when freed. glibc otherwise raises its mmap threshold after the first large free
    and keeps later multi-MB chunk buffers in a heap that only :func:`release_freed_memory`
    (a whole-heap walk, tens of ms) shrinks again.

    Smaller blocks (the streams' 16 MB output chunks) stay in the heaps, and up to ``keep``
    bytes freed at a heap's top are kept for the next ones: setting the mmap threshold also
    fixes glibc's trim threshold at 128 KiB, which handed every freed chunk back to the OS, so
    the next was faulted in and zeroed again page by page (a 1.1B nuslerp merge: 0.5 s less
    system time, 50k fewer faults, 30 MB more peak RSS)."""
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(M_MMAP_THRESHOLD, int(threshold))
        _LIBC.mallopt(M_TRIM_THRESHOLD, int(keep))


@contextlib.contextmanager
def frozen_gc() -> Iterator[None]:
    """Keep the cyclic garbage collector off the objects that already exist (torch's modules,
    the plan, the checkpoints' headers) for the duration of a streaming loop. The loop makes
    many short-lived containers, and each full collection would otherwise walk every
    long-lived object again: about a tenth of a 1.1B-parameter SLERP merge's CPU time.
    New objects are still collected; the frozen ones are handed back afterwards."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
