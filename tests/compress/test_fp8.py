"""``--method fp8``: FP8-E4M3 weights per channel (FP8_DYNAMIC) or per 128x128 block
(FP8_BLOCK), compressed-tensors ``float-quantized``. Bit-identity with llm-compressor is in
test_fp8_parity.py; here: hand-computed values, the transformers round trip, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from weightsmith.cli.main import cli
from weightsmith.compare import packed_weights
from weightsmith.compress import QuantConfig, quantize_checkpoint
from weightsmith.compress.fp8 import FP8Config, fp8_quantize
from weightsmith.compress.scaled import FP8
from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.io import open_checkpoint
from weightsmith.testing import build_tiny_model

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300, 2]])


@pytest.fixture(scope="module")
def model128(tmp_path_factory):
    """hidden 128, intermediate 256: every in_features a multiple of the 128-column block;
    k/v_proj have 64 rows (half a block: padded, as compressed-tensors does)."""
    root = tmp_path_factory.mktemp("fp8")
    return build_tiny_model(root / "m", "llama", seed=3, hidden_size=128, intermediate_size=256)


def test_hand_example_per_channel():
    # row 0: max|w| = 4.48 -> scale 0.01; w/s = [448, -99, 3.3] -> fp8 [448, -96 (grid 8 in
    #   [64, 128): -96 is 3 away, -104 is 5), 3.25 (grid 0.25 in [2, 4))]
    # row 1: all zero -> scale = float32 eps (compressed-tensors' rule), levels 0
    w = torch.tensor([[4.48, -0.99, 0.033], [0.0, 0.0, 0.0]])
    qw = fp8_quantize(w, FP8Config())
    assert qw.q.dtype == FP8 and qw.scale.shape == (2, 1)
    assert qw.scale[0, 0].item() == pytest.approx(0.01, rel=1e-7)
    assert qw.scale[1, 0].item() == torch.finfo(torch.float32).eps
    assert qw.q.float().tolist() == [[448.0, -96.0, 3.25], [0.0, 0.0, 0.0]]
    torch.testing.assert_close(qw.dequantize()[0], torch.tensor([4.48, -0.96, 0.0325]))


def test_hand_example_blocks_pad_rows():
    # 130 x 256 weight: 2 x 2 blocks of 128 (the second block row holds 2 real rows, zero-
    # padded). Each block's scale is its own max|w| / 448.
    w = torch.zeros(130, 256)
    w[0, 0], w[5, 200], w[129, 3], w[128, 255] = 8.96, -4.48, 0.448, -1.0
    qw = fp8_quantize(w, FP8Config(scheme="block"))
    assert qw.scale.shape == (2, 2) and qw.q.shape == (130, 256)
    torch.testing.assert_close(qw.scale, torch.tensor([[0.02, 0.01], [0.001, 1 / 448]]))
    assert qw.q[0, 0].float() == 448 and qw.q[5, 200].float() == -448
    assert qw.q[129, 3].float() == 448 and qw.q[128, 255].float() == -448
    torch.testing.assert_close(qw.dequantize(), w)


@pytest.mark.parametrize("scheme", ["dynamic", "block"])
def test_loads_in_transformers_with_logits_close(model128, tmp_path, scheme):
    pytest.importorskip("compressed_tensors")
    out = tmp_path / "q"
    r = quantize_checkpoint(model128, out, QuantConfig("fp8", scheme=scheme), progress=False)
    assert r.extra["quantized_linears"] == 14 and r.extra["kept_linears"] == ["lm_head"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    group = "FP8_DYNAMIC" if scheme == "dynamic" else "FP8_BLOCK"
    assert qc["format"] == "float-quantized" and list(qc["config_groups"]) == [group]
    assert qc["ignore"] == ["lm_head"]
    ref = AutoModelForCausalLM.from_pretrained(model128).eval()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with open_checkpoint(out) as ckpt:  # weightsmith's decoder (compare, --plots)
        decoded = {n: p.decode(ckpt) for n, p in packed_weights(ckpt).items()}
    assert len(decoded) == 14
    deq = AutoModelForCausalLM.from_pretrained(model128).eval()
    for name, mod in deq.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            qw = fp8_quantize(mod.weight.data, FP8Config(scheme=scheme))
            torch.testing.assert_close(decoded[f"{name}.weight"], qw.dequantize(), rtol=0, atol=0)
            mod.weight.data = qw.dequantize()
            mod.register_forward_pre_hook(_fp8_activations(128 if scheme == "block" else None))
    with torch.no_grad():
        got, fp32, want = loaded(IDS).logits, ref(IDS).logits, deq(IDS).logits
    # transformers (compressed-tensors, CPU) runs our dequantized weights on FP8 activations
    # (dynamic scales per token, or per 128 channels of a token): the same as the hand-written
    # oracle up to float32 round-off; and FP8 (3 mantissa bits) keeps the logits within 2%
    torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-4)
    assert ((got - fp32).norm() / fp32.norm()).item() < 0.02


def _fp8_activations(group: int | None):
    """Forward pre-hook: FP8 fake quantization of a Linear's input, absmax / 448 per token
    (or per ``group`` channels of a token), as compressed-tensors' dynamic activations."""

    def hook(mod, args):
        x = args[0]
        g = x.unflatten(-1, (-1, group or x.shape[-1]))
        scale = g.abs().amax(-1, keepdim=True) / 448
        scale = torch.where(scale == 0, torch.finfo(x.dtype).eps, scale)
        q = (g / scale).clamp(-448, 448).to(FP8).to(x.dtype) * scale
        return (q.flatten(-2),)

    return hook


def test_block_scheme_refuses_partial_column_blocks(tiny_model, tmp_path):
    # hidden 64: q_proj has 64 input columns, half a block
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.self_attn\.q_proj: in_features 64"):
        quantize_checkpoint(tiny_model("llama"), tmp_path / "q", QuantConfig("fp8", scheme="block"),
                            progress=False)  # fmt: skip
    assert not (tmp_path / "q").exists()


def test_non_float_weight_is_refused_naming_it(tiny_model_copy, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tiny_model_copy("llama")
    name = "model.layers.1.mlp.up_proj.weight"
    for f in src.glob("*.safetensors"):
        t = load_file(f)
        if name in t:
            t[name] = torch.ones_like(t[name], dtype=torch.int8)
            save_file(t, f, metadata={"format": "pt"})
    with pytest.raises((CheckpointError, ConfigError), match=r"up_proj"):
        quantize_checkpoint(src, tmp_path / "q", QuantConfig("fp8"), progress=False)


def test_fp8_input_is_refused_naming_it(tiny_model, tmp_path):
    src = quantize_checkpoint(
        tiny_model("llama"), tmp_path / "a", QuantConfig("fp8"), progress=False
    )
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg.pop("quantization_config")
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"layers\.0\.mlp\.down_proj: weight is float8_e4m3fn"):
        quantize_checkpoint(src.out, tmp_path / "b", QuantConfig("fp8"), progress=False)


def test_cli_options(tiny_model, tmp_path):
    runner = CliRunner()
    src = str(tiny_model("llama"))
    r = runner.invoke(cli, ["compress", "quantize", src, "-o", str(tmp_path / "q"), "--method",
                            "fp8", "--no-progress", "--report", str(tmp_path / "r.json")])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "with fp8 8-bit into float-quantized" in r.output
    rep = json.loads((tmp_path / "r.json").read_text())["result"]
    assert rep["extra"]["scheme"] == "dynamic"
    bad = runner.invoke(cli, ["compress", "quantize", src, "-o", str(tmp_path / "x"),
                              "--method", "fp8", "--bits", "4"])  # fmt: skip
    assert bad.exit_code == 1 and "--bits does not apply to --method fp8" in bad.output
    bad = runner.invoke(cli, ["compress", "quantize", src, "-o", str(tmp_path / "x"),
                              "--method", "rtn", "--scheme", "block"])  # fmt: skip
    assert bad.exit_code == 1 and "--scheme does not apply to --method rtn" in bad.output
