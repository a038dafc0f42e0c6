"""Human byte sizes: parse ``2GB``/``500MiB`` and print ``1.23 GB``."""

from __future__ import annotations

import re

from weightsmith.errors import ConfigError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
}  # fmt: skip


def parse_size(text: str | int) -> int:
    """``"2GB"`` -> 2_000_000_000 (decimal units as transformers uses; ``GiB`` for binary)."""
    if isinstance(text, int):
        size = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
        unit = m.group(2).lower() if m else None
        if not m or unit not in _UNITS:
            raise ConfigError(f"cannot read size {text!r} (examples: 2GB, 500MB, 4GiB)")
        size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"size must be positive, got {text!r}")
    return size


def format_size(n: int | float) -> str:
    """1234567 -> '1.23 MB'."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
