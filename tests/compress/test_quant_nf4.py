"""NF4 output: byte-identical to what transformers + bitsandbytes save, and it reloads."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from weightsmith.cli.main import cli
from weightsmith.io import open_checkpoint

pytest.importorskip("bitsandbytes")


def test_nf4_matches_transformers_bnb_save_and_generates(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    src = tiny_model("llama")
    out = tmp_path / "nf4"
    r = CliRunner().invoke(
        cli, ["compress", "quantize", str(src), "-o", str(out), "--method", "nf4", "--no-progress"]
    )
    assert r.exit_code == 0, r.output
    assert "with nf4 4-bit into bnb" in r.output

    # transformers' own NF4 of the same weights, saved the usual way
    ref_dir = tmp_path / "ref"
    ref = AutoModelForCausalLM.from_pretrained(
        src,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
        device_map="cpu",
    )
    ref.save_pretrained(ref_dir)
    mine, theirs = open_checkpoint(out), open_checkpoint(ref_dir)
    assert set(mine.tensors) == set(theirs.tensors)
    for name in theirs.tensors:
        assert torch.equal(mine.get_tensor(name), theirs.get_tensor(name)), name
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["bnb_4bit_quant_type"] == "nf4"

    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    tok = AutoTokenizer.from_pretrained(out)
    inputs = tok("Once upon a time", return_tensors="pt")
    got = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    want = ref.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert got.tolist() == want.tolist() and got.shape[1] == inputs["input_ids"].shape[1] + 6


def test_nf4_only_with_bnb_format(tiny_model, tmp_path):
    r = CliRunner().invoke(
        cli,
        ["compress", "quantize", str(tiny_model("llama")), "-o", str(tmp_path / "x"),
         "--method", "nf4", "--format", "gptq"],
    )  # fmt: skip
    assert r.exit_code == 1 and "--method nf4 writes --format bnb, not gptq" in r.output
    assert not (tmp_path / "x").exists()


def test_nf4_tensor_function_double_quant_round_trip():
    from weightsmith.compress.nf4 import nf4_dequantize, nf4_quantize_tensor

    torch.manual_seed(0)
    w = torch.randn(64, 128)
    single = nf4_quantize_tensor(w)
    double = nf4_quantize_tensor(w, double_quant=True)
    assert single["weight"].shape == (64 * 128 // 2, 1) and single["weight"].dtype == torch.uint8
    assert single["weight.absmax"].shape == (64 * 128 // 64,)
    assert "weight.nested_absmax" in double and double["weight.absmax"].dtype == torch.uint8
    for t in (single, double):
        deq = nf4_dequantize(t)
        # NF4 on Gaussian weights: relative RMS error about 0.1 (SQNR about 20 dB)
        rel = ((deq - w).pow(2).mean() / w.pow(2).mean()).sqrt().item()
        assert 0.05 < rel < 0.15
