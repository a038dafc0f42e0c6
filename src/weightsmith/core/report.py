"""Machine-readable reports (``--report out.json``) and resource figures for them."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
from pathlib import Path

from weightsmith.errors import OutputError


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far.

    Linux: ``VmHWM`` of /proc/self/status, this program's own high-water mark. ``ru_maxrss``
    is not: Linux keeps it across ``execve``, so a command started by a big parent (a benchmark
    holding a model) would report the parent's peak. Elsewhere ``ru_maxrss`` (macOS: bytes).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def check_report_path(path: str | os.PathLike[str]) -> None:
    """Refuse a report path that cannot be written, before the command does any work: its
    nearest existing folder must be a folder we can create files in."""
    path = Path(path).absolute()
    if path.is_dir():
        raise OutputError(f"cannot write report {path}: it is a directory")
    folder = path.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"cannot write report {path}: {folder} is not a directory")
    probe = folder / f".{path.name}.probe-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"cannot write report {path}: {folder}: {e.strerror}") from None


def write_report(path: str | os.PathLike[str], report: dict) -> None:
    """Write a JSON report atomically (temp file + rename), so CI never reads half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):  # never let cleanup hide the first error
            tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write report {path}: {e.strerror}") from None
