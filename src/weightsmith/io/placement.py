"""Putting a finished output in place: temporary names, the no-replace rename, stale cleanup.

A writer works in ``.OUT.weightsmith-tmp-<owner>-<token>`` beside OUT. The owner part names
the writing process (pid, its start time, the boot and the host), so a later run can tell a
temporary left by a killed run (its process provably gone) from one still being written, and
remove only the former. Without ``--force`` the final rename refuses an OUT that appeared
while the run was writing (``renameat2(RENAME_NOREPLACE)`` where the kernel has it, else a
lock directory), so two writers to one OUT never silently replace each other.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import time
from functools import cache
from pathlib import Path

from weightsmith.errors import OutputError

_RENAME_NOREPLACE = 1
_TEMP = re.compile(
    r"^\.(?P<out>.+)\.weightsmith-(?:tmp|old)-(?P<pid>\d+)-(?P<start>\d+)-(?P<boot>[0-9a-f]{8})"
    r"-(?P<host>[0-9a-f]{6})-[0-9a-f]{8}$"
)


def temp_path(out: Path, kind: str = "tmp") -> Path:
    """A fresh hidden name beside ``out`` that records who owns it (``kind``: tmp or old)."""
    pid = os.getpid()
    owner = f"{pid}-{_start_time(pid) or 0}-{_boot_id()}-{_host_id()}"
    return out.parent / f".{out.name}.weightsmith-{kind}-{owner}-{secrets.token_hex(4)}"


def clean_stale_temporaries(folder: Path) -> list[Path]:
    """Remove weightsmith temporaries in ``folder`` whose writing process is provably dead
    (same host, and a reboot since, or no process with that pid and start time); returns
    what was removed. Anything else, including temporaries of other hosts, is kept."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m is None or not entry.is_dir(follow_symlinks=False) or not _owner_dead(m):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        if not os.path.lexists(entry.path):
            removed.append(Path(entry.path))
    return removed


def _owner_dead(m: re.Match[str]) -> bool:
    if m["host"] != _host_id():
        return False  # another machine's run (shared filesystem): cannot tell
    if m["boot"] != _boot_id() and m["boot"] != "00000000":
        return True  # this machine rebooted since: every process of that boot is gone
    pid, start = int(m["pid"]), int(m["start"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists but is not ours (EPERM): check its start time below
        pass
    now = _start_time(pid)
    return start != 0 and now is not None and now != start  # the pid was reused


def move_into_place(tmp: Path, out: Path, force: bool) -> None:
    """Rename ``tmp`` to ``out``. Without ``force`` an ``out`` that exists now (another run
    finished first) is refused; with it the old ``out`` is replaced, atomically at the end."""
    if not force:
        try:
            _rename_noreplace(tmp, out)
        except FileExistsError:
            raise OutputError(
                f"output {out} appeared while this run was writing (another run?); it was "
                "not replaced (use --force to replace it)"
            ) from None
        except OSError as e:
            raise OutputError(f"cannot move output into place at {out}: {e.strerror}") from None
        return
    old = None
    try:
        if out.exists():
            old = temp_path(out, "old")
            os.rename(out, old)
        os.rename(tmp, out)
    except OSError as e:
        if old is not None and not out.exists():
            os.rename(old, out)
        raise OutputError(f"cannot move output into place at {out}: {e.strerror}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _rename_noreplace(src: Path, dst: Path) -> None:
    """``rename`` that fails with FileExistsError when ``dst`` exists, atomically where the
    kernel supports ``RENAME_NOREPLACE``; else under a lock directory shared by weightsmith
    runs (mkdir is atomic), which guards against other weightsmith writers."""
    renameat2 = _renameat2()
    if renameat2 is not None:
        rc = renameat2(-100, os.fsencode(src), -100, os.fsencode(dst), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(dst))
    lock = dst.parent / f".{dst.name}.weightsmith-lock"
    with contextlib.suppress(OSError):  # held for milliseconds: an old one is a killed run's
        if time.time() - os.stat(lock).st_mtime > 60:
            os.rmdir(lock)
    os.mkdir(lock)  # FileExistsError while another run is placing the same OUT
    try:
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "exists", str(dst))
        os.rename(src, dst)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(lock)


@cache
def _renameat2():
    with contextlib.suppress(OSError, AttributeError):
        fn = ctypes.CDLL(None, use_errno=True).renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        return fn
    return None


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


@cache
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip().replace("-", "")[:8]
    except OSError:
        return "00000000"  # unknown: then only a missing pid proves a run dead


@cache
def _host_id() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
