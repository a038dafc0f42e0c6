"""Fixtures shared by the compress tests."""

from __future__ import annotations

import pytest
import torch

QAT_TEXT = (
    "the cat sat on the mat. the dog sat on the log. a bird sang in the tree. "
    "the cat saw the bird and the dog saw the cat. "
) * 12


@pytest.fixture
def one_thread():
    """Tiny matmuls gain nothing from threads, and lose a lot on a shared, loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def data(tmp_path):
    """A small training text file for QAT / BitNet runs."""
    p = tmp_path / "train.txt"
    p.write_text(QAT_TEXT)
    return p
