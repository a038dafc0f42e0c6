"""Machine-readable reports (``--report out.json``) and resource figures for them."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

from weightsmith.errors import OutputError


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def write_report(path: str | os.PathLike[str], report: dict) -> None:
    """Write a JSON report atomically (temp file + rename), so CI never reads half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write report {path}: {e.strerror}") from None
