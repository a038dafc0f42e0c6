"""``--method w8a8``: int8 per-channel weights + dynamic per-token int8 activations
(compressed-tensors ``int-quantized``), data-free or with ``--smoothquant``. Bit-identity of the
data-free path with llm-compressor is in test_w8a8_parity.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from weightsmith.compress import QuantConfig, quantize_checkpoint
from weightsmith.compress.smoothquant import smooth, smoothing_scales
from weightsmith.compress.w8a8 import W8A8Config, w8a8_quantize
from weightsmith.core.calibration import LayerStreamer
from weightsmith.errors import ConfigError
from weightsmith.io import open_checkpoint

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300, 2]])


def test_hand_example():
    # max|w| = 1.275 -> scale 1.275 / 127.5 = 0.01; w/s = [127.5, -50, 1.4] -> clamp to 127,
    # round: [127, -50, 1]. All-zero row: scale = float32 eps, levels 0.
    w = torch.tensor([[1.275, -0.5, 0.014], [0.0, 0.0, 0.0]])
    qw = w8a8_quantize(w, W8A8Config())
    assert qw.q.dtype == torch.int8 and qw.q.tolist() == [[127, -50, 1], [0, 0, 0]]
    assert qw.scale[0, 0].item() == pytest.approx(0.01, rel=1e-7)
    assert qw.scale[1, 0].item() == torch.finfo(torch.float32).eps


def test_smoothing_scales_hand_example():
    # r = [4, 1, 3]; column max |W| over both balance weights = [0.5, 2, 0] -> m = [1, 4, 0]
    # alpha 0.5: s = [sqrt(4)/sqrt(1), sqrt(1)/sqrt(4), r (m = 0)] = [2, 0.5, 3]
    r = torch.tensor([4.0, 1.0, 3.0])
    w1, w2 = torch.tensor([[0.5, -1.0, 0.0]]), torch.tensor([[0.1, 2.0, 0.0]])
    torch.testing.assert_close(smoothing_scales(r, [w1, w2], 0.5), torch.tensor([2.0, 0.5, 3.0]))
    # alpha 1: s = r; alpha 0: s = 1 / m (then at least 1e-5)
    torch.testing.assert_close(smoothing_scales(r, [w1, w2], 1.0), r)
    torch.testing.assert_close(
        smoothing_scales(torch.zeros(3), [w1, w2], 0.5)[2], torch.tensor(1e-5)
    )


@pytest.fixture
def outlier_model(tiny_model_copy):
    """The tiny Llama with a few norm channels x30: activation outliers, as in real LLMs."""
    src = tiny_model_copy("llama")
    for f in src.glob("*.safetensors"):
        t = load_file(f)
        for name in t:
            if name.endswith("layernorm.weight"):
                t[name] = torch.ones_like(t[name])
                t[name][[3, 17, 40]] = 30.0
        save_file(t, f, metadata={"format": "pt"})
    return src


def test_smoothing_is_a_no_op_before_quantization(outlier_model):
    ids = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    tensors, spreads = {}, []
    with open_checkpoint(outlier_model) as ckpt:
        streamer = LayerStreamer(ckpt, ids)
        for i in streamer.layers():

            def step(cl):
                spreads.extend((s.max() / s.min()).item() for s in smooth(cl, 0.5).values())
                return cl.state_dict()

            tensors.update(streamer.run_layer(i, step))
    assert min(spreads) > 5  # the scales really move the outliers
    ref = AutoModelForCausalLM.from_pretrained(outlier_model).eval()
    smoothed = AutoModelForCausalLM.from_pretrained(outlier_model).eval()
    missing = smoothed.load_state_dict(tensors, strict=False).unexpected_keys
    assert not missing
    changed = ref.state_dict()["model.layers.0.input_layernorm.weight"]
    assert not torch.equal(changed, smoothed.state_dict()["model.layers.0.input_layernorm.weight"])
    with torch.no_grad():
        a, b = ref(IDS).logits, smoothed(IDS).logits
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def _int8_activations(mod, args):
    """compressed-tensors' dynamic per-token int8: scale max|x| / 127.5, round(clamp(x/s))·s."""
    x = args[0]
    scale = x.abs().amax(-1, keepdim=True) / 127.5
    scale = torch.where(scale == 0, torch.finfo(x.dtype).eps, scale)
    return (torch.round((x / scale).clamp(-128, 127)) * scale,)


def test_loads_in_transformers_with_logits_close(tiny_model, tmp_path):
    pytest.importorskip("compressed_tensors")
    src, out = tiny_model("llama"), tmp_path / "q"
    r = quantize_checkpoint(src, out, QuantConfig("w8a8"), progress=False)
    assert r.extra["quantized_linears"] == 14 and r.extra["smoothquant"] is False
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "int-quantized" and list(qc["config_groups"]) == ["W8A8"]
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    deq = AutoModelForCausalLM.from_pretrained(src).eval()
    for name, mod in deq.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            mod.weight.data = w8a8_quantize(mod.weight.data, W8A8Config()).dequantize()
            mod.register_forward_pre_hook(_int8_activations)
    with torch.no_grad():
        got, fp32, want = loaded(IDS).logits, ref(IDS).logits, deq(IDS).logits
    # the same int8 weights and int8 per-token activations as the oracle (float32 round-off),
    # and within 2% of the fp32 logits
    torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-4)
    assert ((got - fp32).norm() / fp32.norm()).item() < 0.02


def _logit_error(model_dir, ref) -> float:
    loaded = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.randint(0, 320, (4, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = loaded(ids).logits, ref(ids).logits
    return ((got - want).norm() / want.norm()).item()


def test_smoothquant_beats_plain_w8a8_on_activation_outliers(outlier_model, tmp_path):
    pytest.importorskip("compressed_tensors")
    ref = AutoModelForCausalLM.from_pretrained(outlier_model).eval()
    plain, sq = tmp_path / "plain", tmp_path / "sq"
    quantize_checkpoint(outlier_model, plain, QuantConfig("w8a8"), progress=False)
    cfg = QuantConfig("w8a8", smoothquant=True, calib_samples=8, seq_len=64)
    r = quantize_checkpoint(outlier_model, sq, cfg, progress=False)
    assert r.extra["calibration"]["samples"] == 8 and r.extra["alpha"] == 0.5
    e_plain, e_sq = _logit_error(plain, ref), _logit_error(sq, ref)
    assert e_sq < 0.8 * e_plain, (e_sq, e_plain)  # measured: 0.028 vs 0.046


def test_smoothquant_keeps_an_ignored_balance_linear_smoothed(outlier_model, tmp_path):
    out = tmp_path / "q"
    cfg = QuantConfig("w8a8", ignore=["self_attn.k_proj"], smoothquant=True, calib_samples=4,
                      seq_len=32)  # fmt: skip
    quantize_checkpoint(outlier_model, out, cfg, progress=False)
    with open_checkpoint(outlier_model) as a, open_checkpoint(out) as b:
        for i in range(2):
            p = f"model.layers.{i}."
            s = a.get_tensor(p + "input_layernorm.weight") / b.get_tensor(
                p + "input_layernorm.weight"
            )
            assert s.max() / s.min() > 5
            k = p + "self_attn.k_proj.weight"
            torch.testing.assert_close(b.get_tensor(k), a.get_tensor(k) * s, rtol=1e-6, atol=0)


def test_options_are_checked():
    for bad, match in [({"alpha": 1.5, "smoothquant": True}, "--alpha must be between"),
                       ({"calib": "x.txt"}, "with --smoothquant"),
                       ({"alpha": 0.8}, "with --smoothquant")]:  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            QuantConfig("w8a8", **bad).validate()
