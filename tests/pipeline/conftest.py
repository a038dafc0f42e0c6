"""Fixtures of the recipe tests: a models folder with two tiny seeded Llamas and some text."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from weightsmith.testing.tiny import TOKENIZER_CORPUS


@pytest.fixture
def models(tmp_path: Path, tiny_model) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    shutil.copytree(tiny_model("llama", 0), root / "a")
    shutil.copytree(tiny_model("llama", 1), root / "b")
    (root / "text.txt").write_text(" ".join(TOKENIZER_CORPUS))
    return root
