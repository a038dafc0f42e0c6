"""Choosing which modules a method touches: the ``--ignore`` pattern language."""

from __future__ import annotations

import re


def ignore_matches(module: str, pattern: str) -> bool:
    """``--ignore`` patterns: an exact module name, a dotted suffix (``mlp.down_proj``), or
    ``re:<regex>`` matched against the whole module name."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], module) is not None
    return module == pattern or module.endswith("." + pattern)
