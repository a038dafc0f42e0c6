"""Helpers shared by the merge tests (imported as a plain module from this folder)."""

from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner

from weightsmith.cli.main import cli
from weightsmith.io import open_checkpoint


def run_cli(*args: str) -> object:
    result = CliRunner().invoke(cli, ["merge", *map(str, args), "--no-progress"])
    return result


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ck:
        return {n: ck.get_tensor(n) for n in ck.tensors}


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    for f in fragments:
        assert f in lines[0], lines[0]


def poke(model: Path, fragment: str, value: float, index: int = 0) -> str:
    """Set flat element ``index`` of the first tensor whose name contains ``fragment`` (in
    the shard that holds it) to ``value``; returns the tensor's name."""
    from safetensors.torch import load_file, save_file

    for shard in sorted(model.glob("*.safetensors")):
        state = load_file(shard)
        name = next((n for n in sorted(state) if fragment in n), None)
        if name is not None:
            state[name].view(-1)[index] = value
            save_file(state, shard, metadata={"format": "pt"})
            return name
    raise AssertionError(f"no tensor named like {fragment!r} in {model}")
