"""Shared fixtures: tiny seeded checkpoints (built once per session) and the real models."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from weightsmith.testing import build_tiny_model, shared_model, shared_text


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny_model("llama", seed=0, dtype=torch.float32)`` -> a sharded checkpoint dir.

    Built once per (arch, seed, dtype) and shared: tests must not modify it (copy it with
    ``tiny_model_copy`` when they need to).
    """
    cache: dict[tuple, Path] = {}

    def make(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
        key = (arch, seed, dtype)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"tiny-{arch}-{seed}")
            cache[key] = build_tiny_model(root / "model", arch, seed=seed, dtype=dtype)
        return cache[key]

    return make


@pytest.fixture
def tiny_model_copy(tiny_model: Callable[..., Path], tmp_path: Path) -> Callable[..., Path]:
    """A private copy of a tiny model that the test may modify or corrupt."""

    def make(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
        dst = tmp_path / f"copy-{arch}-{seed}"
        shutil.copytree(tiny_model(arch, seed, dtype), dst)
        return dst

    return make


@pytest.fixture
def stories260k() -> Path:
    """The real 260K-parameter Llama from ../shared (skips when ../shared is absent)."""
    path = shared_model("stories260K")
    if path is None:
        pytest.skip("../shared/models/stories260K not found (set WEIGHTSMITH_SHARED)")
    return path


@pytest.fixture
def tinystories_valid() -> Path:
    path = shared_text("tinystories_valid.txt")
    if path is None:
        pytest.skip("../shared/data/tinystories_valid.txt not found (set WEIGHTSMITH_SHARED)")
    return path
