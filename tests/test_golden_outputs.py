"""Refactors keep outputs bit-identical: each data-free command's output tensors hash to the
value recorded before the refactor (``tests/golden/hashes.json``; see
:mod:`weightsmith.testing.golden`). Calibrated and training cases are checked by running
``python -m weightsmith.testing.golden --check tests/golden/hashes.json``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from weightsmith.testing.golden import CASES, run_case, tensor_digest, write_inputs
from weightsmith.testing.shared import shared_dir

HASHES = json.loads((Path(__file__).parent / "golden" / "hashes.json").read_text())
DATA_FREE = [name for name, (data_free, _) in CASES.items() if data_free]


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    shared = shared_dir()
    if shared is None or not (shared / "models" / "stories260K").is_dir():
        pytest.skip("needs ../shared/models/stories260K (set WEIGHTSMITH_SHARED)")
    return write_inputs(shared, tmp_path_factory.mktemp("golden-in"))


def test_every_case_has_a_recorded_hash() -> None:
    assert sorted(HASHES) == sorted(CASES)


def test_digest_sees_one_changed_byte(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file(
        {"a": torch.zeros(4), "b": torch.ones(2, dtype=torch.bfloat16)}, tmp_path / "x.safetensors"
    )
    before = tensor_digest(tmp_path)
    save_file(
        {"a": torch.tensor([0.0, 0, 0, 1e-30]), "b": torch.ones(2, dtype=torch.bfloat16)},
        tmp_path / "x.safetensors",
    )
    assert tensor_digest(tmp_path) != before


@pytest.mark.slow
@pytest.mark.parametrize("name", DATA_FREE)
def test_data_free_output_unchanged(name: str, paths: dict[str, str], tmp_path: Path) -> None:
    assert run_case(name, paths, tmp_path / "out") == HASHES[name]
