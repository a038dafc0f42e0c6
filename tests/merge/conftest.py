"""Fixtures for merge tests: a base and two "fine-tunes" of the tiny Llama, and helpers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def trio(tiny_model: Callable[..., Path]) -> tuple[Path, Path, Path]:
    """Three different seeded tiny Llamas (read-only)."""
    return tiny_model("llama", 0), tiny_model("llama", 1), tiny_model("llama", 2)
