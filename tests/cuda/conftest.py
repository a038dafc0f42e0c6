"""CUDA paths against the CPU result: every test here runs the same command with ``--device cpu``
and ``--device cuda`` and compares. Skipped (with that reason) on a machine without CUDA; run
them on a GPU machine with ``python -m pytest tests/cuda``. ``WEIGHTSMITH_TEST_DEVICE=cpu`` runs
the second side on the CPU too (a dry run of the tests' own logic)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.cuda.cuda_testlib import OTHER
from weightsmith.core.calibration_data import load_calibration_text
from weightsmith.testing import build_tiny_model


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or not OTHER.startswith("cuda"):
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: this machine has none")
    for item in items:
        if "tests/cuda/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def llama(tmp_path_factory) -> Path:
    """A tiny seeded Llama (2 layers, hidden 64) with its tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("cuda-src") / "m", "llama", seed=0)


@pytest.fixture(scope="session")
def calib(tmp_path_factory) -> Path:
    """The built-in calibration mix as a file (varied text: well-conditioned Hessians)."""
    p = tmp_path_factory.mktemp("cuda-calib") / "calib.txt"
    p.write_text(load_calibration_text(None).text)
    return p
