"""Tensor data written past the page cache (``O_DIRECT``), for big outputs.

A buffered write of a multi-GB checkpoint makes the kernel allocate and fill one page-cache page
per 4 KiB of output, which costs more CPU than a whole merge's arithmetic (on a VM that hands
freed memory back to the host, every such page is a fresh host fault too), and evicts the
inputs from the cache. :class:`DirectFile` sends the 4 KiB-aligned middle of each write through
a reused, page-aligned staging buffer and an ``O_DIRECT`` descriptor; the unaligned edges go
through the ordinary descriptor. A block is therefore either entirely inside one write (direct)
or shared by two writes or the header (buffered), never both, so the two paths never touch the
same page. Filesystems without ``O_DIRECT`` (tmpfs, some FUSE mounts) fall back to buffered
writes with the same bytes.

A buffer whose address has the same offset within a block as its file offset (see
:func:`aligned_empty`, which producers use with the phase the writer announces through
:func:`set_write_phase`) skips the staging copy: its aligned middle goes to ``O_DIRECT`` as is.

``WEIGHTSMITH_DIRECT_IO=0`` turns it off, ``=1`` uses it for any size; by default outputs of
:data:`AUTO_MIN_BYTES` or more use it.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

import numpy as np
import torch

from weightsmith.io.safetensors_format import pwrite_all

BLOCK = 4096  # alignment of offsets, lengths and memory for O_DIRECT on common filesystems
STAGING_BYTES = 8 << 20  # one reused, page-aligned buffer per open file
AUTO_MIN_BYTES = 256 << 20  # smaller outputs stay buffered: they fit any page cache easily
_UNSUPPORTED = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}
_phase = 0  # offset within a block of the file position the writer fills next


def set_write_phase(offset: int) -> None:
    """Announce the file offset of the next bytes the writer will ask for (the writer calls it
    before pulling each chunk from a producer), so that :func:`aligned_empty` can line buffers
    up with it. Only a hint: any buffer is written correctly."""
    global _phase
    _phase = offset % BLOCK


def aligned_empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised 1-D tensor whose address sits at the announced write phase within a
    block, so that :class:`DirectFile` writes it without the staging copy."""
    nbytes = numel * dtype.itemsize
    raw = torch.empty(nbytes + BLOCK, dtype=torch.uint8)  # torch's allocator: huge pages
    skip = (_phase - raw.data_ptr()) % BLOCK
    skip -= skip % dtype.itemsize  # an odd phase (never in safetensors) just gets staged
    return raw[skip : skip + nbytes].view(dtype)


def direct_io_wanted(total_bytes: int) -> bool:
    """Whether an output of ``total_bytes`` should be written with ``O_DIRECT``."""
    if not hasattr(os, "O_DIRECT"):
        return False
    env = os.environ.get("WEIGHTSMITH_DIRECT_IO", "auto").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    if env in ("1", "true", "yes", "on"):
        return True
    return total_bytes >= AUTO_MIN_BYTES


class DirectFile:
    """``pwrite`` to one file: aligned middles via ``O_DIRECT``, edges via ``fd``.

    ``fd`` (opened for writing, owned by the caller) is always used for the edges and for
    everything once direct writes turn out to be unsupported. Not thread-safe: one writer thread.
    """

    def __init__(self, path: os.PathLike[str] | str, fd: int) -> None:
        self.fd = fd
        self.direct_fd: int | None = None
        self._stage: mmap.mmap | None = None
        self._stage_array: np.ndarray | None = None  # holds the address of the staging buffer
        self.direct_bytes = 0
        try:
            self.direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                raise

    def pwrite(self, data: memoryview | bytes, offset: int) -> None:
        view = memoryview(data).cast("B")
        n = len(view)
        lo = -(-offset // BLOCK) * BLOCK  # first block boundary at or after offset
        hi = (offset + n) // BLOCK * BLOCK  # last block boundary at or before the end
        if self.direct_fd is None or hi - lo < BLOCK:
            pwrite_all(self.fd, view, offset)
            return
        if lo > offset:
            pwrite_all(self.fd, view[: lo - offset], offset)
        middle = view[lo - offset : hi - offset]
        if not self._write_in_place(middle, lo):
            self._write_direct(middle, lo)
        if offset + n > hi:
            pwrite_all(self.fd, view[hi - offset :], hi)

    def _write_in_place(self, view: memoryview, offset: int) -> bool:
        """Write an aligned middle straight from the caller's buffer when its address is
        block-aligned too (True), else leave it to the staging copy (False)."""
        if np.frombuffer(view, dtype=np.uint8).ctypes.data % BLOCK:
            return False
        done = 0
        try:
            while done < len(view):
                n = os.pwrite(self.direct_fd, view[done:], offset + done)
                if n <= 0 or n % BLOCK:  # a short direct write: finish through the staging path
                    break
                done += n
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                raise
        self.direct_bytes += done
        if done < len(view):
            self._write_direct(view[done:], offset + done)
        return True

    def _write_direct(self, view: memoryview, offset: int) -> None:
        if self._stage is None:
            self._stage = mmap.mmap(-1, STAGING_BYTES)  # anonymous maps are page-aligned
            self._stage_array = np.frombuffer(self._stage, dtype=np.uint8)
        stage = self._stage
        addr = int(self._stage_array.ctypes.data)
        src = int(np.frombuffer(view, dtype=np.uint8).ctypes.data)
        done = 0
        while done < len(view):
            n = min(STAGING_BYTES, len(view) - done)
            ctypes.memmove(addr, src + done, n)  # releases the GIL, unlike a slice copy
            try:
                pwrite_all(self.direct_fd, memoryview(stage)[:n], offset + done)
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    raise
                self._disable()  # e.g. a filesystem that accepts the flag but not the write
                pwrite_all(self.fd, view[done:], offset + done)
                return
            self.direct_bytes += n
            done += n

    def _disable(self) -> None:
        if self.direct_fd is not None:
            os.close(self.direct_fd)
            self.direct_fd = None

    def close(self) -> None:
        """Close the direct descriptor and free the staging buffer (``fd`` stays open)."""
        self._disable()
        if self._stage is not None:
            self._stage_array = None  # release the buffer export before closing the map
            self._stage.close()
            self._stage = None
