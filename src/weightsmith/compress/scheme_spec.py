"""Candidate quantization schemes named like ``w4g64`` (4-bit, groups of 64, symmetric) or
``w4g128a`` (asymmetric), and their storage cost in bits per weight."""

from __future__ import annotations

import re
from dataclasses import dataclass

from weightsmith.errors import ConfigError

SCALE_BITS = 16  # size accounting: one 16-bit scale per group (as for a bf16/fp16 model)

_SCHEME = re.compile(r"w([2-8])g(\d+)(a?)")


@dataclass(frozen=True)
class QuantScheme:
    """An integer-grid scheme: ``bits`` per weight, ``group_size`` columns per scale."""

    name: str
    bits: int
    group_size: int
    symmetric: bool

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight: the level, plus a 16-bit scale per group, plus a
        ``bits``-wide zero point per group when asymmetric."""
        per_group = SCALE_BITS + (0 if self.symmetric else self.bits)
        return self.bits + per_group / self.group_size


def parse_scheme(text: str) -> QuantScheme:
    """``w<bits>g<group>[a]`` (bits 2..8, group >= 1; ``a``: asymmetric) as a QuantScheme."""
    m = _SCHEME.fullmatch(text.strip())
    if m is None or int(m.group(2)) < 1:
        raise ConfigError(
            f"unknown scheme {text!r}: expected w<bits>g<group>[a], e.g. w4g64, w8g128, w4g128a"
        )
    return QuantScheme(text.strip(), int(m.group(1)), int(m.group(2)), not m.group(3))


def parse_scheme_list(text: str) -> list[QuantScheme]:
    """A comma-separated list of schemes (duplicates refused)."""
    names = [t for t in (p.strip() for p in text.split(",")) if t]
    if not names:
        raise ConfigError("--schemes is empty")
    if len(set(names)) != len(names):
        raise ConfigError(f"--schemes lists a scheme twice: {text}")
    return [parse_scheme(n) for n in names]
