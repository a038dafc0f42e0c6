"""HQQ-style refinement of RTN (``--method rtn --hqq``): the solver's steps by hand, its gain
over min-max RTN on real weights (weight error and perplexity), and its compressed-tensors
output against an in-memory dequantized oracle."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from weightsmith.compress import QuantConfig, quantize_checkpoint
from weightsmith.compress.hqq import HQQParams, hqq_qparams, hqq_step, lp_error, shrink_lp
from weightsmith.compress.rtn import RTNConfig, group_qparams, rtn_quantize
from weightsmith.errors import ConfigError

SHARED = Path(os.environ.get("WEIGHTSMITH_SHARED", "/work/shared"))
STORIES = SHARED / "models" / "stories260K"
VALID = SHARED / "data" / "tinystories_valid.txt"


def test_shrink_lp_hand_values():
    x = torch.tensor([2.0, -0.5, 0.0, 0.05])
    # p = 0.7, beta = 10: |x| - |x|^-0.3 / 10, floored at 0
    # 2^-0.3 = 0.812252, 0.5^-0.3 = 1.231144, 0.05^-0.3 = 2.456460 (> 0.05: shrunk to 0)
    want = torch.tensor([2.0 - 0.0812252, -(0.5 - 0.1231144), 0.0, 0.0])
    torch.testing.assert_close(shrink_lp(x, 10.0, 0.7), want, atol=1e-6, rtol=0)
    # p = 1: plain soft threshold at 1 / beta
    torch.testing.assert_close(
        shrink_lp(x, 10.0, 1.0), torch.tensor([1.9, -0.4, 0.0, 0.0]), atol=1e-6, rtol=0
    )


def test_one_asymmetric_step_by_hand():
    # one group of 2-bit levels [-2, 1]: min-max scale (10 - 0) / 3, zero round(-2 - 0) = -2
    w = torch.tensor([[0.0, 1.0, 5.5, 10.0]])
    s0, z0 = group_qparams(w, 2, 4, False, torch.float32)
    assert float(s0) == pytest.approx(10 / 3) and float(z0) == -2
    q0 = torch.clamp(torch.round(w / s0) + z0, -2, 1)
    s, z = hqq_step(w, (q0 - z0) * s0, q0, s0, z0, 10.0, 0.7, False, torch.float32, (-2, 1))
    # by hand: w / s = [0, .3, 1.65, 3] -> q = [-2, -2, 0, 1]; W_r = (q + 2)·10/3 = [0, 0, 6.667, 10]
    # W - W_r = [0, 1, -1.16667, 0]; shrink (p 0.7, beta 10): |x| - |x|^-0.3 / 10:
    # 1 -> 0.9; 1.16667 -> 1.16667 - 0.0954808 = 1.071186
    w_e = torch.tensor([0.0, 0.9, -1.071186, 0.0])
    q = torch.tensor([-2.0, -2.0, 0.0, 1.0])
    t = w[0] - w_e  # [0, 0.1, 6.571186, 10]
    z_cont = (q - t * 0.3).mean()  # HQQ's zero step, mean(q - (W - W_e) / s) = -2.000339
    assert float(z_cont) == pytest.approx(-2.000339, abs=1e-5)
    assert float(z) == -2  # rounded to the integer grid
    # least-squares scale for that zero: d = q - z = [0, 0, 2, 3]; (2·6.571186 + 3·10) / 13
    assert float(s) == pytest.approx(3.318644, rel=1e-6)
    # that step raises the l_p error of this group (1 + 1.137^.7 + 0.044^.7 > 1 + 1.167^.7):
    # the solver keeps the min-max qparams
    s1, z1, info = hqq_qparams(w, s0, z0, 2, False, dtype=torch.float32, params=HQQParams(iters=1))
    assert float(s1) == pytest.approx(10 / 3) and float(z1) == -2
    assert (
        info["lp_error"]
        == pytest.approx(info["lp_error_rtn"])
        == pytest.approx(1 + 1.16667**0.7, rel=1e-4)
    )


def test_symmetric_keeps_zero_and_never_worsens_a_group():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    w[::7, ::13] *= 8  # outliers, where the l_p fit helps most
    s0, z0 = group_qparams(w, 3, 32, True, torch.float16)
    rows = w.reshape(-1, 32)
    s, z, info = hqq_qparams(rows, s0.reshape(-1, 1), z0.reshape(-1, 1), 3, True,
                             dtype=torch.float16)  # fmt: skip
    assert torch.equal(z, torch.zeros_like(z))
    assert torch.equal(s, s.half().float())  # scales exactly as stored in fp16

    def err(sc, zc):
        q = torch.clamp(torch.round(rows / sc) + zc, -4, 3)
        return lp_error(rows, (q - zc) * sc, 0.7)

    assert (err(s, z) <= err(s0.reshape(-1, 1), z0.reshape(-1, 1)) + 1e-6).all()
    assert info["lp_error"] < 0.97 * info["lp_error_rtn"]


def test_options_are_checked():
    with pytest.raises(ConfigError, match="--hqq-iters"):
        RTNConfig(hqq=True, hqq_iters=0).validate()


def _stories_linears():
    from safetensors.torch import load_file

    sd = load_file(STORIES / "model.safetensors")
    return {k: v for k, v in sd.items() if v.ndim == 2 and "_proj" in k and "down_proj" not in k}


@pytest.mark.skipif(not STORIES.exists(), reason="stories260K not in WEIGHTSMITH_SHARED")
@pytest.mark.parametrize(
    ("bits", "sym", "lp_gain", "mse_gain"),
    # measured: lp -3.4 / -5.5 / -5.9 / -8.8 %, MSE -6.8 / -10.3 / -12.3 / -17.7 %
    [(4, False, 0.98, 0.95), (3, False, 0.97, 0.93), (4, True, 0.97, 0.92), (3, True, 0.95, 0.88)],
)
def test_lower_weight_error_than_rtn_on_stories260k(bits, sym, lp_gain, mse_gain):
    sums = torch.zeros(2, 2)  # [rtn, hqq] x [lp, squared]
    for w in _stories_linears().values():
        for i, hqq in enumerate((False, True)):
            cfg = RTNConfig(bits=bits, group_size=32, symmetric=sym, hqq=hqq)
            e = w.float() - rtn_quantize(w, cfg).dequantize()
            sums[i] += torch.stack([e.abs().pow(0.7).sum(), e.pow(2).sum()])
    assert sums[1, 0] < lp_gain * sums[0, 0]
    assert sums[1, 1] < mse_gain * sums[0, 1]


def _ppl(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.exp(model(ids, labels=ids).loss))


def _quantized_in_memory(cfg: RTNConfig):
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "_proj" in name and "down_proj" not in name:
            mod.weight.data = rtn_quantize(mod.weight.data, cfg).dequantize()
    return model


@pytest.mark.skipif(not (STORIES.exists() and VALID.exists()), reason="stories260K not shared")
@pytest.mark.parametrize(
    ("bits", "sym", "gain"),
    # measured on these 8192 tokens (fp32 4.0791), RTN -> HQQ: w4 sym 4.4357 -> 4.3929,
    # w3 sym 7.4458 -> 6.4891, w4 asym 4.3569 -> 4.3229, w3 asym 5.8370 -> 5.6125
    [(4, True, 0.995), (3, True, 0.95), (4, False, 0.995), (3, False, 0.97)],
)
def test_lower_perplexity_than_rtn_on_stories260k(bits, sym, gain, one_thread):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(STORIES)
    ids = torch.tensor(tok(VALID.read_text()[:40000])["input_ids"][: 32 * 256]).view(32, 256)
    ppl = {
        hqq: _ppl(
            _quantized_in_memory(RTNConfig(bits=bits, group_size=32, symmetric=sym, hqq=hqq)), ids
        )
        for hqq in (False, True)
    }
    assert ppl[True] < gain * ppl[False], ppl


def test_compressed_tensors_output_loads_in_transformers(tiny_model, tmp_path):
    pytest.importorskip("compressed_tensors")
    src = tiny_model("llama")
    cfg = QuantConfig("rtn", bits=4, group_size=32, hqq=True, hqq_iters=10)
    r = quantize_checkpoint(src, tmp_path / "q", cfg, progress=False)
    assert r.extra["quantized_linears"] == 14
    rec = json.loads((tmp_path / "q" / "weightsmith.json").read_text())
    assert "hqq" in json.dumps(rec)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    plain = AutoModelForCausalLM.from_pretrained(src).eval()
    changed = 0
    for (name, mod), pmod in zip(ref.named_modules(), plain.modules(), strict=True):
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            mod.weight.data = rtn_quantize(mod.weight.data, cfg.options).dequantize()
            pmod.weight.data = rtn_quantize(pmod.weight.data, RTNConfig(group_size=32)).dequantize()
            changed += not torch.equal(mod.weight, pmod.weight)
    assert changed >= 10  # the refinement did move the qparams of (almost) every Linear
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300, 2]])
    with torch.no_grad():
        got, want = loaded(ids).logits, ref(ids).logits
    # the same dequantized weights, a different matmul order: float32 round-off only
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_zero_points_stay_storable_for_the_gptq_format():
    # gptq v1 cannot store the lowest level as zero: every refined zero must be >= zero_min
    torch.manual_seed(1)
    w = torch.rand(32, 64) + 0.5  # all-positive groups: min-max puts the zero at the bottom
    cfg = RTNConfig(bits=4, group_size=16, symmetric=False, hqq=True)
    qw = rtn_quantize(w, cfg, zero_min=-7)
    assert int(qw.zero.min()) >= -7 and int(qw.zero.max()) <= 7
    assert qw.info["lp_error"] <= qw.info["lp_error_rtn"]
