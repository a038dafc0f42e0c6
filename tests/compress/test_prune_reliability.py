"""Bad input to ``compress prune`` (issue 16): every prune method checks the tensors it reads,
pruned or copied, and refuses NaN/Inf with one line naming the tensor (exit 1, no output)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from weightsmith.cli.main import cli
from weightsmith.core import transform
from weightsmith.core.transform import all_finite
from weightsmith.errors import CheckpointError
from weightsmith.io import open_checkpoint

FAST_CALIB = ["--calib-samples", "2", "--seq-len", "16"]
METHODS = {
    "magnitude": ["--method", "magnitude", "--sparsity", "0.5"],
    "magnitude-2:4": ["--method", "magnitude", "--pattern", "2:4"],
    "wanda": ["--method", "wanda", "--sparsity", "0.5", *FAST_CALIB],
    "sparsegpt-2:4": ["--method", "sparsegpt", "--pattern", "2:4", *FAST_CALIB],
    "layers-explicit": ["--method", "layers", "--layers", "0"],
    "layers-drop": ["--method", "layers", "--drop", "1", *FAST_CALIB],
    "channels": ["--method", "channels", "--mlp-ratio", "0.5", *FAST_CALIB],
}


def _poke(model: Path, fragment: str, value: float) -> str:
    """Set one element of the first tensor named like ``fragment`` to ``value``."""
    for shard in sorted(model.glob("*.safetensors")):
        state = load_file(shard)
        name = next((n for n in sorted(state) if fragment in n), None)
        if name is not None:
            state[name].view(-1)[3] = value
            save_file(state, shard, metadata={"format": "pt"})
            return name
    raise AssertionError(fragment)


def _prune(model: Path, out: Path, method: str):
    args = ["compress", "prune", str(model), "-o", str(out), *METHODS[method], "--no-progress"]
    return CliRunner().invoke(cli, args)


def _assert_refused(res, out: Path, name: str) -> None:
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.output
    assert repr(name) in lines[0] and "NaN or Inf" in lines[0], lines[0]
    assert not out.exists()


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize(
    "fragment, value",
    [
        ("layers.1.self_attn.q_proj.weight", float("nan")),  # a pruned Linear (of a kept layer)
        ("layers.1.post_attention_layernorm", float("inf")),  # copied unchanged
        ("model.norm.weight", float("nan")),  # copied unchanged, outside the layers
    ],
)
def test_non_finite_input_is_refused_naming_the_tensor(
    tiny_model_copy, tmp_path, method, fragment, value
):
    model = tiny_model_copy("llama", 0)
    name = _poke(model, fragment, value)
    out = tmp_path / "out"
    _assert_refused(_prune(model, out, method), out, name)


def test_a_dropped_layer_is_checked_when_it_is_scored(tiny_model_copy, tmp_path):
    """--drop reads every layer to score it: a NaN there makes the scores meaningless, even
    when that very layer is the one dropped."""
    model = tiny_model_copy("llama", 0)
    name = _poke(model, "layers.0.mlp.up_proj", float("nan"))
    out = tmp_path / "out"
    _assert_refused(_prune(model, out, "layers-drop"), out, name)


def test_a_layer_dropped_by_name_is_not_read(tiny_model_copy, tmp_path):
    model = tiny_model_copy("llama", 0)
    _poke(model, "layers.0.mlp.up_proj", float("nan"))
    res = _prune(model, tmp_path / "out", "layers-explicit")  # drops layer 0 unread
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn]
)
def test_all_finite_is_exact_per_dtype(dtype):
    x = torch.full((1000,), torch.finfo(dtype).max, dtype=dtype)  # finite, sum overflows
    assert all_finite(x)
    has_inf = dtype != torch.float8_e4m3fn  # float8 e4m3fn has NaN but no Inf
    for bad in [float("nan"), *([float("inf"), float("-inf")] if has_inf else [])]:
        y = x.float()
        y[500] = bad
        assert not all_finite(y.to(dtype)), (dtype, bad)
    assert all_finite(torch.arange(5))  # not floating: nothing to check


def test_checked_copy_is_bit_exact_and_checks_every_chunk(tiny_model_copy, monkeypatch):
    monkeypatch.setattr(transform, "CHECK_CHUNK_BYTES", 12)  # many chunks of 3 floats
    model = tiny_model_copy("llama", 0)
    with open_checkpoint(model) as ck:
        name = "model.norm.weight"
        assert b"".join(transform.checked_chunks(ck, name)) == b"".join(ck.raw_chunks(name))
    _poke(model, name, float("nan"))  # element 3: the second chunk
    with open_checkpoint(model) as ck, pytest.raises(CheckpointError, match=repr(name)):
        list(transform.checked_chunks(ck, name))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_all_finite_finds_one_bad_value_at_any_position(dtype):
    """The min/max check sees a single NaN/±Inf wherever it sits: in every vector lane, in the
    scalar tail, in the first and last element (sizes around the SIMD widths)."""
    g = torch.Generator().manual_seed(0)
    for n in [1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 129]:
        base = torch.randn(n, generator=g).to(dtype)
        assert all_finite(base)
        for pos in range(n):
            for bad in [float("nan"), float("inf"), float("-inf")]:
                y = base.clone()
                y[pos] = bad
                assert not all_finite(y), (n, pos, bad)
