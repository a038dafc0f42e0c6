"""compressed-tensors and gptq outputs: transformers loads them and the numbers match."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from weightsmith.cli.main import cli
from weightsmith.compress import QuantConfig, quantize_checkpoint
from weightsmith.compress.packing import unpack_int32, unpack_rows_gptq
from weightsmith.compress.rtn import dequantize, rtn_quantize
from weightsmith.io import open_checkpoint

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300, 2]])


def _dequantized_reference(src, cfg: QuantConfig):
    """The original model with every quantized Linear replaced by weightsmith's dequantization."""
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            mod.weight.data = rtn_quantize(mod.weight.data.float(), cfg).dequantize()
    return model


def _stored(out) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(out)
    return {n: ckpt.get_tensor(n) for n in ckpt.tensors}


def test_compressed_tensors_loads_in_transformers_and_matches_reference(tiny_model, tmp_path):
    pytest.importorskip("compressed_tensors")
    src = tiny_model("llama")
    cfg = QuantConfig(bits=4, group_size=32, symmetric=True)
    r = quantize_checkpoint(src, tmp_path / "q", cfg, progress=False)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 32
    assert qc["ignore"] == ["lm_head"]
    assert r.extra["quantized_linears"] == 14
    assert r.extra["output_size"] < 0.5 * r.extra["input_size"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    ref = _dequantized_reference(src, cfg)
    with torch.no_grad():
        got, want = loaded(IDS).logits, ref(IDS).logits
    # same dequantized weights, different matmul order: float32 round-off only
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bits", [3, 8])
def test_asymmetric_tensors_decompress_with_compressed_tensors(tiny_model, tmp_path, bits):
    # transformers + compressed-tensors 0.20 cannot load asymmetric pack-quantized models
    # (its meta-device pass expects unpacked zero points), so check the stored tensors with
    # compressed-tensors' own decompressor instead: it must reproduce our dequantization.
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    src = tiny_model("llama")
    cfg = QuantConfig(bits=bits, group_size=-1 if bits == 8 else 32, symmetric=False)
    quantize_checkpoint(src, tmp_path / "q", cfg, progress=False)
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme(
        targets=["Linear"], weights=QuantizationArgs(**qc["config_groups"]["group_0"]["weights"])
    )
    stored = _stored(tmp_path / "q")
    original = open_checkpoint(src)
    m = "model.layers.1.mlp.down_proj"
    sd = {k.split(".")[-1]: v for k, v in stored.items() if k.startswith(m + ".")}
    assert set(sd) == {"weight_packed", "weight_scale", "weight_zero_point", "weight_shape"}
    dec = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
    mine = rtn_quantize(original.get_tensor(m + ".weight"), cfg).dequantize()
    torch.testing.assert_close(dec.float(), mine, atol=1e-7, rtol=0)
    assert ct is not None


def test_gptq_format_unpacks_to_the_same_weights(tiny_model, tmp_path):
    src = tiny_model("qwen2")
    cfg = QuantConfig(bits=4, group_size=32, symmetric=False, format="gptq")
    quantize_checkpoint(src, tmp_path / "q", cfg, progress=False)
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq"
    stored = _stored(tmp_path / "q")
    original = open_checkpoint(src)
    m = "model.layers.0.self_attn.q_proj"
    qweight, qzeros = stored[m + ".qweight"], stored[m + ".qzeros"]
    scales, g_idx = stored[m + ".scales"], stored[m + ".g_idx"]
    assert (qweight.shape, qzeros.shape, scales.shape) == ((8, 64), (2, 8), (2, 64))
    assert scales.dtype == torch.float16 and g_idx.tolist() == [i // 32 for i in range(64)]
    assert m + ".bias" in stored  # qwen2's q/k/v biases pass through
    # v1: w = scale * (q - (qzeros + 1))
    u = unpack_rows_gptq(qweight, 4, 0)  # (in, out)
    z = unpack_rows_gptq(qzeros, 4, 1) + 1  # (groups, out)
    w = (u - z[g_idx.long()]).float() * scales[g_idx.long()].float()
    ref = rtn_quantize(original.get_tensor(m + ".weight"), cfg, dtype=torch.float16).dequantize()
    torch.testing.assert_close(w.t(), ref, atol=1e-6, rtol=0)


def test_ct_packed_weight_is_our_levels(tiny_model, tmp_path):
    src = tiny_model("llama")
    cfg = QuantConfig(bits=4, group_size=-1, symmetric=True)
    quantize_checkpoint(src, tmp_path / "q", cfg, progress=False)
    stored = _stored(tmp_path / "q")
    m = "model.layers.0.mlp.up_proj"
    q = unpack_int32(stored[m + ".weight_packed"], 4, 64)
    w = open_checkpoint(src).get_tensor(m + ".weight")
    qw = rtn_quantize(w, cfg)
    assert torch.equal(q, qw.q)
    assert stored[m + ".weight_shape"].tolist() == [128, 64]
    assert stored[m + ".weight_scale"].shape == (128, 1)
    torch.testing.assert_close(
        dequantize(q, stored[m + ".weight_scale"], qw.zero, 64), qw.dequantize()
    )


def test_cli_quantize_report_and_errors(tiny_model, tmp_path):
    src = tiny_model("llama")
    runner = CliRunner()
    out, report = tmp_path / "q", tmp_path / "r.json"
    res = runner.invoke(
        cli,
        ["compress", "quantize", str(src), "-o", str(out), "--group-size", "32",
         "--ignore", "mlp.down_proj", "--no-progress", "--report", str(report)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "quantized 12 Linears" in res.output
    rep = json.loads(report.read_text())["result"]["extra"]
    assert rep["kept_linears"] == [
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "lm_head"
    ]  # fmt: skip
    assert 0 < rep["fraction_quantized"] < 1 and rep["output_size"] < rep["input_size"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == rep["kept_linears"]
    stored = open_checkpoint(out).tensors
    assert "model.layers.0.mlp.down_proj.weight" in stored
    assert "model.layers.0.mlp.up_proj.weight_packed" in stored
    prov = json.loads((out / "weightsmith.json").read_text())
    assert prov["config"]["method"] == "rtn" and prov["config"]["rtn"]["version"] == 1
    assert prov["config"]["rtn"]["group_size"] == 32 and prov["config"]["format"] == (
        "compressed-tensors"
    )

    def fails(args, message):
        bad = tmp_path / "bad"
        r = runner.invoke(cli, ["compress", "quantize", str(src), "-o", str(bad), *args])
        assert r.exit_code == 1, r.output
        assert message in r.output and r.output.count("\n") == 1
        assert not bad.exists() and not list(tmp_path.glob(".bad*"))

    fails(["--group-size", "48"], "in_features 64 is not divisible by --group-size 48")
    fails(["--group-size", "32", "--ignore", "nonexistent"], "matches no Linear")
    fails(["--format", "gptq", "--bits", "3"], "--format gptq stores 2, 4 or 8 bits")
    gpt2 = tiny_model("gpt2")
    r = runner.invoke(
        cli, ["compress", "quantize", str(gpt2), "-o", str(tmp_path / "g"), "--group-size", "32"]
    )
    assert r.exit_code == 1 and "Conv1D" in r.output


def test_docs_list_every_registered_method_and_format():
    from pathlib import Path

    from weightsmith.compress.registry import FORMATS, METHODS

    doc = (Path(__file__).resolve().parents[2] / "docs" / "quantize.md").read_text()
    for name in [*METHODS, *FORMATS]:
        assert f"`{name}`" in doc, name
