"""mergekit's parameter settings: scalars, gradients over depth and per-tensor filters.

A setting is a scalar, a list of numbers (a gradient: interpolated linearly at the layer's
position ``t`` in [0, 1]), or a list of ``{filter, value}`` conditions (the first whose filter is
a substring of the tensor name, or is absent/``*``, gives the value). Lookup order for a
parameter: the model's own settings, the slice's, then the recipe's global ``parameters``.

This module is also the one place where parameter *values* are checked: every method declares
its parameters (:class:`Param`: kind and range), and :func:`check_declared` checks a setting's
every number against the declaration (finite, right kind, in range) when the recipe is built,
before any checkpoint is opened. CLI options go through :func:`finite` and
:func:`check_declared` too, naming the option.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from weightsmith.errors import ConfigError

Scalar = float | int | bool | str
NUMBER, BOOL, INT = "number", "bool", "int"


@dataclass(frozen=True)
class Param:
    """One parameter a method accepts, as mergekit names it (``weight``, ``density``, ``t``).

    ``kind`` is ``number`` (a finite float), ``bool`` or ``int``; numbers may be bounded:
    ``low < value`` (``low_open``) or ``low <= value``, and ``value <= high``.
    """

    name: str
    default: Any = None
    required: bool = False
    help: str = ""
    kind: str = NUMBER
    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def describe_range(self) -> str:
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{lo}, {hi}]"

    def check(self, value: Any, where: str) -> None:
        """Raise a one-line ConfigError naming ``where`` when ``value`` does not fit."""
        if self.kind == BOOL:
            if not isinstance(value, bool) and value not in (0, 1):
                raise ConfigError(f"{where}: {self.name} must be true or false, got {value!r}")
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {self.name} must be a number, got {value!r}")
        if self.kind == INT and not isinstance(value, int):
            raise ConfigError(f"{where}: {self.name} must be an integer, got {value!r}")
        finite(value, where)
        too_low = self.low is not None and (
            value <= self.low if self.low_open else value < self.low
        )
        if too_low or (self.high is not None and value > self.high):
            raise ConfigError(
                f"{where}: {self.name} must be in {self.describe_range()}, got {value!r}"
            )


def finite(value: float, where: str) -> float:
    """``value`` when it is a finite number, else a ConfigError naming ``where``."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value} is not a finite number")
    return value


def setting_values(setting: Any) -> list[Any]:
    """Every leaf value of a checked setting (scalar, gradient, or filter conditions)."""
    if isinstance(setting, list):
        out: list[Any] = []
        for e in setting:
            out += setting_values(e["value"]) if isinstance(e, Mapping) else [e]
        return out
    return [setting]


def check_declared(param: Param, setting: Any, where: str) -> None:
    """Check every value of ``setting`` (as :func:`check_setting` returns it) against ``param``."""
    for value in setting_values(setting):
        param.check(value, where)


def check_setting(setting: Any, where: str) -> Any:
    """Validate a setting's shape (as YAML gives it) and return it as plain data; every number
    must be finite."""
    if isinstance(setting, (bool, int, float, str)):
        return finite(setting, where)
    if isinstance(setting, Mapping):
        return [check_condition(setting, where)]
    if isinstance(setting, (list, tuple)):
        if not setting:
            raise ConfigError(f"{where}: empty list")
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            return [finite(e, where) for e in setting]
        if all(isinstance(e, Mapping) for e in setting):
            return [check_condition(e, where) for e in setting]
        raise ConfigError(f"{where}: mixes numbers and {{filter, value}} entries")
    raise ConfigError(f"{where}: unsupported value {setting!r}")


def check_condition(cond: Mapping, where: str) -> dict:
    unknown = set(cond) - {"filter", "value"}
    if unknown or "value" not in cond:
        raise ConfigError(
            f"{where}: a conditional setting takes 'filter' and 'value' (got {sorted(cond)})"
        )
    value = cond["value"]
    if isinstance(value, (Mapping,)) or (
        isinstance(value, (list, tuple)) and not all(isinstance(e, (int, float)) for e in value)
    ):
        raise ConfigError(f"{where}: a filter's value must be a number or a gradient")
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    for v in values:
        finite(v, where)
    out = {"value": list(value) if isinstance(value, (list, tuple)) else value}
    if cond.get("filter") is not None:
        out["filter"] = str(cond["filter"])
    return out


def evaluate_setting(tensor_name: str, setting: Any, t: float) -> Any:
    """The value of ``setting`` for ``tensor_name`` at depth ``t`` (None when no filter hits)."""
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if not isinstance(setting, list) or not setting:
        return None
    if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        return setting[int(t * (len(setting) - 1))]
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or f in tensor_name:
            return evaluate_setting(tensor_name, cond["value"], t)
    return None


def lookup(
    name: str,
    tensor_name: str,
    t: float,
    *levels: Mapping[str, Any] | None,
) -> Any:
    """The first non-None value of parameter ``name`` across ``levels`` (most specific first)."""
    for level in levels:
        if level and name in level:
            value = evaluate_setting(tensor_name, level[name], t)
            if value is not None:
                return value
    return None
