"""Give freed memory back to the operating system between streamed units of work."""

from __future__ import annotations

import ctypes
import sys


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


def release_freed_memory() -> None:
    """Hand memory freed by the last tensor or layer back to the OS. glibc keeps freed
    multi-MB blocks in its heap, so without this peak RSS creeps up with fragmentation across
    tensors and layers until a streamed run looks as big as the whole model."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
