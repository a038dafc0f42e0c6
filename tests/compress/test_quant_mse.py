"""``--method mse``: RTN with the per-group clipping range that minimises the squared error."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from weightsmith.compress import QuantConfig, quantize_checkpoint
from weightsmith.compress.mse import MSEConfig, clip_ratios, mse_quantize
from weightsmith.compress.rtn import RTNConfig, rtn_quantize
from weightsmith.errors import ConfigError


def test_hand_example_picks_the_clipped_range():
    # 2-bit symmetric: levels {-2, -1, 0, 1}, scale = p·max|w| / 1.5. Ratios tried: 1, 0.75, 0.5.
    #   p = 1:    scale 1/3, w/s = [.6 .6 .6 1.5] -> q [1 1 1 1] (1.5 -> 2 clamps to 1)
    #             err = 3·(0.2 - 1/3)² + (0.5 - 1/3)² = 12/225 + 1/36 = 0.08111
    #   p = 0.75: scale 1/4, w/s = [.8 .8 .8 2]   -> q [1 1 1 1], err = 3·0.05² + 0.25² = 0.07
    #   p = 0.5:  scale 1/6, w/s = [1.2 ×3, 3]   -> q [1 1 1 1], err = 3·(1/30)² + (1/3)² = 0.1144
    w = torch.tensor([[0.2, 0.2, 0.2, 0.5]])
    cfg = MSEConfig(bits=2, group_size=4, grid=4, max_shrink=0.5)
    assert clip_ratios(cfg) == [1.0, 0.75, 0.5]
    qw = mse_quantize(w, cfg)
    assert qw.scale.item() == pytest.approx(0.25) and qw.q.tolist() == [[1, 1, 1, 1]]
    assert (qw.dequantize() - w).pow(2).sum().item() == pytest.approx(0.07, abs=1e-6)
    rtn = rtn_quantize(w, RTNConfig(bits=2, group_size=4))
    assert rtn.scale.item() == pytest.approx(1 / 3)
    assert (rtn.dequantize() - w).pow(2).sum().item() == pytest.approx(12 / 225 + 1 / 36, abs=1e-6)
    assert qw.info["mean_clip_ratio"] == 0.75


@pytest.mark.parametrize("bits, sym, gain", [(3, True, 0.9), (4, True, 0.9), (4, False, 0.97)])
def test_lower_error_than_rtn_on_a_seeded_matrix(bits, sym, gain):
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.05
    w[::7, ::11] *= 6  # a few outliers, as in real weights
    mse = mse_quantize(w, MSEConfig(bits=bits, group_size=32, symmetric=sym))
    rtn = rtn_quantize(w, RTNConfig(bits=bits, group_size=32, symmetric=sym))
    e_mse = (mse.dequantize() - w).pow(2).reshape(64, 8, 32).sum(-1)
    e_rtn = (rtn.dequantize() - w).pow(2).reshape(64, 8, 32).sum(-1)
    assert (e_mse <= e_rtn + 1e-7).all()  # p = 1 is tried: no group gets worse
    assert e_mse.sum() < gain * e_rtn.sum(), (e_mse.sum(), e_rtn.sum())
    assert mse.q.min() >= -(1 << (bits - 1)) and mse.q.max() <= (1 << (bits - 1)) - 1


def test_options_are_checked():
    for bad, match in [({"max_shrink": 1.0}, "--max-shrink"), ({"grid": 0}, "--grid"),
                       ({"max_shrink": float("nan")}, "finite")]:  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            QuantConfig("mse", **bad).validate()


def test_compressed_tensors_output_loads_in_transformers(tiny_model, tmp_path):
    pytest.importorskip("compressed_tensors")
    src = tiny_model("llama")
    cfg = QuantConfig("mse", bits=4, group_size=32)
    r = quantize_checkpoint(src, tmp_path / "q", cfg, progress=False)
    assert r.extra["method"] == "mse" and r.extra["quantized_linears"] == 14
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["observer"] == "mse"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    for name, mod in ref.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            mod.weight.data = mse_quantize(mod.weight.data, cfg.options).dequantize()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300, 2]])
    with torch.no_grad():
        got, want = loaded(ids).logits, ref(ids).logits
    # the same dequantized weights, a different matmul order: float32 round-off only
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
