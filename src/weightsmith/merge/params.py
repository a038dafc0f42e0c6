"""mergekit's parameter settings: scalars, gradients over depth and per-tensor filters.

A setting is a scalar, a list of numbers (a gradient: interpolated linearly at the layer's
position ``t`` in [0, 1]), or a list of ``{filter, value}`` conditions (the first whose filter is
a substring of the tensor name, or is absent/``*``, gives the value). Lookup order for a
parameter: the model's own settings, the slice's, then the recipe's global ``parameters``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from weightsmith.errors import ConfigError

Scalar = float | int | bool | str


def check_setting(setting: Any, where: str) -> Any:
    """Validate a setting's shape (as YAML gives it) and return it as plain data."""
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, Mapping):
        return [check_condition(setting, where)]
    if isinstance(setting, (list, tuple)):
        if not setting:
            raise ConfigError(f"{where}: empty list")
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            return list(setting)
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
