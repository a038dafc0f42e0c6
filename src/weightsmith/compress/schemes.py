"""Per-module quantization schemes (mixed precision): ``--scheme-map PATTERN=SCHEME``.

A scheme is the integer grid of one Linear, written ``w<bits>[g<group>][a]``: ``w4g64`` is
4-bit levels with one scale per 64 input columns, ``w8`` one scale per output channel, a
trailing ``a`` an asymmetric grid (with zero points); ``keep`` leaves the Linear unquantized.
A scheme map is an ordered list of ``(pattern, scheme)``: the first pattern that matches a
Linear's name (the ``--ignore`` language: exact name, dotted suffix or ``re:REGEX``) decides its
scheme; a Linear that no pattern matches gets the run's own ``--bits/--group-size/--sym``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from weightsmith.core.targets import ignore_matches
from weightsmith.errors import ConfigError

KEEP = "keep"  # the scheme word that leaves a Linear unquantized
SCALE_BITS = 16  # storage bits of one scale (fp16/bf16) in bits_per_weight
_SCHEME = re.compile(r"w(\d+)(?:g(-?\d+))?(a?)")


@dataclass(frozen=True)
class Scheme:
    """The integer grid of one Linear: ``bits``, ``group_size`` (-1: per output channel) and
    ``symmetric`` (False: a zero point per group)."""

    bits: int
    group_size: int = -1
    symmetric: bool = True

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ConfigError(f"scheme {self}: bits must be between 2 and 8")
        if self.group_size != -1 and self.group_size < 1:
            raise ConfigError(f"scheme {self}: group size must be positive")

    def __str__(self) -> str:
        g = "" if self.group_size == -1 else f"g{self.group_size}"
        return f"w{self.bits}{g}{'' if self.symmetric else 'a'}"

    def apply(self, options: Any) -> Any:
        """``options`` (a grid method's frozen options dataclass) with this scheme's grid."""
        return dataclasses.replace(
            options, bits=self.bits, group_size=self.group_size, symmetric=self.symmetric
        )

    @classmethod
    def of(cls, options: Any) -> Scheme:
        """The scheme of a grid method's options (``bits``/``group_size``/``symmetric``)."""
        return cls(options.bits, options.group_size, options.symmetric)


SchemeMap = tuple[tuple[str, Scheme | None], ...]  # (pattern, scheme; None: keep), in order


def parse_scheme(text: str) -> Scheme:
    """``"w4g64"`` -> ``Scheme(4, 64, True)``; ``"w8"`` per channel; ``"w4g128a"`` asymmetric.
    Anything else is a one-line :class:`ConfigError` naming it."""
    m = _SCHEME.fullmatch(text.strip().lower())
    if m is None:
        raise ConfigError(
            f"bad scheme {text!r}: expected w<bits>[g<group>][a] (e.g. w4g64, w8, w4g128a) or keep"
        )
    bits, group, asym = int(m[1]), int(m[2]) if m[2] is not None else -1, m[3] == "a"
    try:
        return Scheme(bits, group, not asym)
    except ConfigError as e:
        raise ConfigError(f"bad scheme {text!r}: {str(e).split(': ', 1)[1]}") from None


def parse_scheme_value(text: str | Scheme | None) -> Scheme | None:
    """One scheme value: a :class:`Scheme`, ``None``/``"keep"`` (unquantized), or its text."""
    if text is None or isinstance(text, Scheme):
        return text
    if not isinstance(text, str):
        raise ConfigError(f"bad scheme {text!r}: expected a string such as w4g64 or keep")
    return None if text.strip().lower() == KEEP else parse_scheme(text)


def parse_scheme_map(items: Iterable[str]) -> SchemeMap:
    """``["down_proj=w8g128", "re:.*q_proj=keep"]`` -> ``((pattern, Scheme | None), ...)``."""
    out = []
    for item in items:
        pattern, sep, scheme = item.rpartition("=")
        if not sep or not pattern.strip():
            raise ConfigError(
                f"--scheme-map {item!r}: expected PATTERN=SCHEME (e.g. down_proj=w8g128)"
            )
        out.append((pattern.strip(), parse_scheme_value(scheme)))
    return tuple(out)


def as_scheme_map(
    schemes: Iterable[str] | Iterable[tuple[str, Scheme | str | None]] | Mapping[str, Any] | None,
) -> SchemeMap:
    """Any accepted spelling of a scheme map, normalised: ``"PATTERN=SCHEME"`` strings,
    ``(pattern, scheme)`` pairs, or an ordered mapping ``{pattern: scheme}`` (scheme: a
    :class:`Scheme`, its text, ``"keep"`` or ``None``)."""
    if not schemes:
        return ()
    if isinstance(schemes, Mapping):
        schemes = list(schemes.items())
    out = []
    for item in schemes:
        if isinstance(item, str):
            out.extend(parse_scheme_map([item]))
        else:
            pattern, scheme = item
            out.append((str(pattern), parse_scheme_value(scheme)))
    return tuple(out)


def match_scheme(module: str, schemes: SchemeMap) -> tuple[str, Scheme | None] | None:
    """The first ``(pattern, scheme)`` of ``schemes`` whose pattern matches ``module`` (None:
    no pattern matches; the run's own grid applies)."""
    return next(((p, s) for p, s in schemes if ignore_matches(module, p)), None)


def resolve_schemes(
    modules: Iterable[str], schemes: SchemeMap, default: Scheme
) -> dict[str, Scheme | None]:
    """Each module's scheme (first match wins, else ``default``; None: kept unquantized)."""
    out = {}
    for m in modules:
        hit = match_scheme(m, schemes)
        out[m] = default if hit is None else hit[1]
    return out


def bits_per_weight(scheme: Scheme, in_features: int, scale_bits: int = SCALE_BITS) -> float:
    """Storage bits per weight of a Linear with ``in_features`` columns under ``scheme``: the
    level plus one ``scale_bits`` scale per group (and a ``bits``-wide zero point per group when
    asymmetric, as pack-quantized stores it). ``w4g64`` symmetric: ``4 + 16/64 = 4.25``."""
    g = in_features if scheme.group_size == -1 else scheme.group_size
    per_group = scale_bits + (0 if scheme.symmetric else scheme.bits)
    return scheme.bits + per_group / g


def average_bits_per_weight(
    shapes: Iterable[tuple[tuple[int, int], Scheme]], scale_bits: int = SCALE_BITS
) -> float:
    """The weight-count-weighted mean of :func:`bits_per_weight` over ``((out, in), scheme)``."""
    total = n = 0
    for (out_f, in_f), s in shapes:
        total += out_f * in_f * bits_per_weight(s, in_f, scale_bits)
        n += out_f * in_f
    return total / n if n else 0.0


def scheme_summary(targets: Iterable[Any], default: Scheme, *, modules: bool = True) -> dict:
    """The report's view of a run's grids: Linears, weights and bits per weight of each scheme
    and the average bits per weight over every quantized Linear (``targets``: objects with
    ``model_module``, ``shape`` ``(out, in)`` and ``scheme``, None meaning ``default``), plus
    each Linear's scheme when ``modules``."""
    per: dict[str, dict] = {}
    chosen = {}
    for t in targets:
        s = t.scheme or default
        chosen[t.model_module] = str(s)
        row = per.setdefault(str(s), {"linears": 0, "params": 0, "bits": 0.0})
        row["linears"] += 1
        row["params"] += t.shape[0] * t.shape[1]
        row["bits"] += t.shape[0] * t.shape[1] * bits_per_weight(s, t.shape[1])
    total = sum(r["params"] for r in per.values())
    avg = sum(r["bits"] for r in per.values()) / total if total else 0.0
    for r in per.values():
        r["bits_per_weight"] = round(r.pop("bits") / r["params"], 4)
    return {
        "default": str(default),
        "per_scheme": per,
        "average_bits_per_weight": round(avg, 4),
        **({"modules": chosen} if modules else {}),
    }
