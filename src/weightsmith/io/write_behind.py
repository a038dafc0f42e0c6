"""Writes that run behind the caller, and kernel-side copies between files."""

from __future__ import annotations

import collections
import contextlib
import errno
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from weightsmith.errors import OutputError
from weightsmith.io.safetensors_format import pwrite_all


class WriteBehind:
    """Tensor writes run on one background thread while the caller produces the next bytes
    (``pwrite`` releases the GIL), across tensor boundaries, with at most ``max_bytes``
    queued. A failed write is raised by the next ``submit`` or by ``drain``, which waits for
    everything queued; the writer drains before closing a file and before committing."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self._pool: ThreadPoolExecutor | None = None
        self._queue: collections.deque[tuple[Future, int]] = collections.deque()
        self._queued = 0

    def submit(self, fn: Callable[[], object], nbytes: int) -> None:
        self._reap(block=False)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weightsmith-write")
        self._queue.append((self._pool.submit(fn), nbytes))
        self._queued += nbytes
        while self._queued > self.max_bytes:
            self._pop()

    def drain(self) -> None:
        error: BaseException | None = None
        while self._queue:
            try:
                self._pop()
            except BaseException as e:  # wait for every queued write, then raise the first
                error = error or e
        if error is not None:
            raise error

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.drain()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _reap(self, block: bool) -> None:
        while self._queue and (block or self._queue[0][0].done()):
            self._pop()

    def _pop(self) -> None:
        fut, n = self._queue.popleft()
        self._queued -= n
        fut.result()


def copy_range(src: Path, src_offset: int, dst_fd: int, dst_offset: int, count: int) -> None:
    """Copy ``count`` bytes between files in the kernel; fall back to read/write if the
    filesystem cannot (``copy_file_range`` fails across some mounts or on old kernels)."""
    with open(src, "rb") as f:
        done = 0
        try:
            while done < count:
                n = os.copy_file_range(
                    f.fileno(), dst_fd, count - done, src_offset + done, dst_offset + done
                )
                if n == 0:
                    raise OutputError(f"{src}: file ended while copying (truncated?)")
                done += n
            return
        except (AttributeError, OSError) as e:
            if isinstance(e, OSError) and e.errno not in _NO_COPY_RANGE:
                raise
        while done < count:
            data = os.pread(f.fileno(), min(64 << 20, count - done), src_offset + done)
            if not data:
                raise OutputError(f"{src}: file ended while copying (truncated?)")
            pwrite_all(dst_fd, data, dst_offset + done)
            done += len(data)


_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}
