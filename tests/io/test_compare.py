"""``compare``: per-tensor difference statistics against hand-computed values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import weightsmith.compare as compare_mod
from weightsmith.cli.main import cli
from weightsmith.compare import compare_checkpoints, tensor_diff


def test_tensor_diff_hand_computed() -> None:
    a = torch.tensor([3.0, 4.0])  # ||a|| = 5
    b = torch.tensor([3.0, 0.0])  # b - a = (0, -4): ||d|| = 4; <a,b> = 9, ||b|| = 3
    d = tensor_diff(a, b)
    assert d.rel_l2 == pytest.approx(4 / 5, abs=1e-12)
    assert d.cosine == pytest.approx(9 / 15, abs=1e-12)
    assert d.max_abs == 4.0 and not d.equal
    same = tensor_diff(a, a.clone())
    assert same.equal and same.rel_l2 == 0.0 and same.cosine == pytest.approx(1.0)
    zero = tensor_diff(torch.zeros(2), torch.tensor([0.0, 1.0]))
    assert math.isinf(zero.rel_l2) and zero.cosine == 0.0


def test_blockwise_equals_whole(tmp_path: Path, monkeypatch) -> None:
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(37, 11, generator=g), "s": torch.tensor(2.0), "only_a": torch.ones(1)}
    b = {"w": a["w"] + 0.1 * torch.randn(37, 11, generator=g), "s": torch.tensor(2.0),
         "only_b": torch.ones(2)}  # fmt: skip
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    monkeypatch.setattr(compare_mod, "_BLOCK_ELEMENTS", 50)  # force many row blocks
    result = compare_checkpoints(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    by_name = {d["name"]: d for d in result["tensors"]}
    whole = tensor_diff(a["w"], b["w"])
    assert by_name["w"]["rel_l2"] == pytest.approx(whole.rel_l2, rel=1e-12)
    assert by_name["w"]["cosine"] == pytest.approx(whole.cosine, rel=1e-12)
    assert by_name["s"]["equal"] is True
    assert result["only_in_a"] == ["only_a"] and result["only_in_b"] == ["only_b"]


def test_compare_cli(tiny_model) -> None:
    runner = CliRunner()
    text = runner.invoke(cli, ["compare", str(tiny_model("llama", 0)), str(tiny_model("llama", 1))])
    assert text.exit_code == 0 and "tensors compared, 0 identical" in text.output
    same = runner.invoke(
        cli, ["compare", str(tiny_model("llama", 0)), str(tiny_model("llama", 0)), "--json"]
    )
    data = json.loads(same.output)
    assert data["identical"] == data["compared"] > 0


@pytest.mark.parametrize("linear_class", ["bitlinear", "autobitlinear"])
def test_bitnet_outputs_are_decoded_by_the_format_registry(tiny_model, tmp_path, linear_class):
    # compare has no decoder list of its own: the bitnet format's decoder serves it
    from weightsmith.compress import QuantConfig, quantize_checkpoint
    from weightsmith.compress.ternary import ternary_quantize
    from weightsmith.io import open_checkpoint

    src = tiny_model("llama")
    cfg = QuantConfig("ternary", linear_class=linear_class)
    quantize_checkpoint(src, tmp_path / "q", cfg, progress=False)
    result = compare_checkpoints(src, tmp_path / "q")
    assert result["quantization"]["b"] == "bitnet"
    assert result["dequantized"] == 14 and result["only_in_b"] == []
    ckpt = open_checkpoint(src)
    for t in result["tensors"]:
        if not t["dequantized"]:
            assert t["equal"], t["name"]
            continue
        w = ckpt.get_tensor(t["name"])
        want = tensor_diff(w, ternary_quantize(w).dequantize())  # q · γ, γ as float32
        # γ is stored as float32 (1/γ for bitlinear: one more rounding)
        assert t["rel_l2"] == pytest.approx(want.rel_l2, rel=1e-5), t["name"]
        assert t["zeros_b"] == want.zeros_b
