"""QAT/BitNet quantizers: fake-quant equals the real RTN round trip, STE gradients, λ blending."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from weightsmith.compress.qat.fake_quant import (
    WeightSpec,
    fake_quant_activation_ste,
    fake_quant_weight_ste,
    fake_quantize_activation,
    fake_quantize_weight,
    ste,
)
from weightsmith.compress.qat.modules import (
    BitLinearTrain,
    FakeQuantLinear,
    as_bitlinear,
    as_fake_quant,
    lambda_schedule,
    rms_normalize,
    set_lambda,
    swap_linears,
)
from weightsmith.compress.registry import QuantConfig
from weightsmith.compress.rtn import rtn_quantize, zero_min_for


def _spec(cfg: QuantConfig, scale_dtype=torch.float32, store=torch.float32) -> WeightSpec:
    return WeightSpec(
        cfg.bits, cfg.group_size, cfg.symmetric, scale_dtype, store, zero_min_for(cfg)
    )


def test_hand_example_symmetric_4bit():
    # absmax 1.5 -> scale 0.2; levels [-8 (half to even), 4, 2, 0] -> [-1.6, 0.8, 0.4, 0]
    w = torch.tensor([[-1.5, 0.75, 0.3, 0.0]])
    got = fake_quantize_weight(w, WeightSpec(4, -1, True, torch.float32, torch.float32))
    torch.testing.assert_close(got, torch.tensor([[-1.6, 0.8, 0.4, 0.0]]))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 16])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fake_quant_equals_real_quantize_dequantize(bits, group_size, sym, fmt, dtype):
    torch.manual_seed(bits + group_size)
    w = (torch.randn(24, 64) * 0.05).to(dtype)  # as stored in a checkpoint of that dtype
    cfg = QuantConfig(bits=bits, group_size=group_size, symmetric=sym, format=fmt)
    scale_dtype = torch.float16 if fmt == "gptq" else dtype  # what quantize_checkpoint uses
    real = rtn_quantize(w.float(), cfg, dtype=scale_dtype).dequantize()
    # training holds the weight in float32; fake quant rounds it to the stored dtype first
    fake = fake_quantize_weight(w.float() + 0.0, _spec(cfg, scale_dtype, dtype))
    assert torch.equal(fake, real)  # bit-exact


def test_fake_quant_rounds_to_the_storage_dtype_first():
    w = torch.randn(8, 32) * 0.05
    spec = WeightSpec(4, -1, True, torch.bfloat16, torch.bfloat16)
    stored = w.to(torch.bfloat16).float()
    want = rtn_quantize(stored, QuantConfig(bits=4, group_size=-1), dtype=torch.bfloat16)
    assert torch.equal(fake_quantize_weight(w, spec), want.dequantize())


def test_weight_ste_passes_the_gradient_through():
    w = (torch.randn(6, 32) * 0.1).requires_grad_(True)
    spec = WeightSpec(2, 16, False, torch.float32, torch.float32)
    out = fake_quant_weight_ste(w, spec)
    assert torch.equal(out.detach(), fake_quantize_weight(w, spec))
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    # and a non-uniform upstream gradient arrives unchanged
    w.grad = None
    g = torch.randn(6, 32)
    (fake_quant_weight_ste(w, spec) * g).sum().backward()
    assert torch.equal(w.grad, g)


def test_activation_fake_quant_hand_example_and_ste():
    # 8 bit, absmax 1: multiplier 127; 1 -> 127, -0.5 -> -63.5 -> -64 (half to even), 0.25 -> 31.75 -> 32
    x = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0]], requires_grad=True)
    got = fake_quantize_activation(x, 8)
    torch.testing.assert_close(got[0], torch.tensor([1.0, -64 / 127, 32 / 127]))
    assert torch.equal(got[1], torch.zeros(3))  # all-zero token: eps-clamped scale, no NaN
    # 4 bit: qmax 7, per token
    y = torch.tensor([[0.7, 0.35, -0.1]])
    torch.testing.assert_close(fake_quantize_activation(y, 4), torch.tensor([[0.7, 0.4, -0.1]]))
    fake_quant_activation_ste(x, 8).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_lambda_ste_blends_forward_and_keeps_identity_gradient():
    x = torch.tensor([1.0, 2.0, -3.0], requires_grad=True)
    xq = torch.tensor([0.0, 4.0, -3.0])
    torch.testing.assert_close(ste(x, xq, 0.25), torch.tensor([0.75, 2.5, -3.0]))
    assert torch.equal(ste(x, xq, 0.0), x.detach())
    assert torch.equal(ste(x, xq, 1.0), xq)  # exactly the quantized value at λ = 1
    ste(x, xq, 0.5).sum().backward()
    assert torch.equal(x.grad, torch.ones(3))


def test_lambda_schedule():
    assert [lambda_schedule(s, 4) for s in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert lambda_schedule(0, 0) == 1.0  # --lambda-warmup 0: quantized from the start


def test_bitlinear_forward_by_hand():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.3, -0.1, 0.0, 0.05, 0.2, -0.4, 0.01, 0.1]] * 4)
                         * torch.arange(1, 5).unsqueeze(1))  # fmt: skip
    x = torch.randn(2, 3, 8)
    mod = as_bitlinear(False, 1e-6)(lin)
    assert isinstance(mod, BitLinearTrain) and mod.weight is lin.weight
    # by hand: γ = mean|W|, W̃ = clip(round(W/γ)); x̃ = round(127·x/max|x|) per token
    w = lin.weight.detach()
    gamma = w.abs().mean()
    wq = torch.clamp(torch.round(w / gamma), -1, 1) * gamma
    m = 127 / x.abs().amax(-1, keepdim=True)
    xq = torch.clamp(torch.round(x * m), -128, 127) / m
    torch.testing.assert_close(mod(x), F.linear(xq, wq), atol=1e-6, rtol=1e-6)
    # λ = 0 is the plain Linear; with RMSNorm the input is normalized first
    set_lambda([mod], 0.0)
    torch.testing.assert_close(mod(x), lin(x))
    mod.use_rms_norm = True
    xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(mod(x), F.linear(xn, w))
    torch.testing.assert_close(rms_normalize(x, 1e-6), xn)


def test_swap_keeps_parameter_names_and_objects():
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    before = dict(model.named_parameters())
    spec = WeightSpec(4, -1, True, torch.float32, torch.float32)
    swapped = swap_linears(model, ["0", "2"], as_fake_quant(spec, None))
    assert all(isinstance(m, FakeQuantLinear) for m in swapped)
    after = dict(model.named_parameters())
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)
    x = torch.randn(3, 16)
    w0 = fake_quantize_weight(before["0.weight"], spec)
    w2 = fake_quantize_weight(before["2.weight"], spec)
    want = F.linear(torch.relu(F.linear(x, w0, before["0.bias"])), w2, before["2.bias"])
    torch.testing.assert_close(model(x), want)
