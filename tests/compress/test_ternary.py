"""BitNet b1.58 ternary PTQ and the reference BitLinear forward, against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from weightsmith.compress.registry import QuantConfig
from weightsmith.compress.ternary import bitlinear_reference, ternary_quantize
from weightsmith.errors import ConfigError


def test_ternary_hand_example():
    # mean|W| = (0.9 + 0.1 + 0.5 + 0.3 + 0.0 + 1.2) / 6 = 0.5
    # W/γ = [1.8, -0.2, 1.0, -0.6, 0, 2.4] -> round, clip -> [1, 0, 1, -1, 0, 1]
    w = torch.tensor([[0.9, -0.1, 0.5], [-0.3, 0.0, 1.2]])
    qw = ternary_quantize(w, QuantConfig(method="ternary", format="bitnet"))
    assert qw.q.dtype == torch.int8
    assert qw.q.tolist() == [[1, 0, 1], [-1, 0, 1]]
    assert qw.scale.shape == (1, 1) and qw.scale.item() == pytest.approx(0.5)
    assert qw.bits == 2 and qw.group_size == 3 and qw.symmetric
    torch.testing.assert_close(qw.dequantize(), torch.tensor([[0.5, 0, 0.5], [-0.5, 0, 0.5]]))


def test_ternary_all_zero_weight_uses_the_clamped_scale():
    qw = ternary_quantize(torch.zeros(4, 8))
    assert qw.q.abs().sum() == 0 and qw.scale.item() == pytest.approx(1e-5)


def test_ternary_matches_transformers_weight_quant():
    bitnet = pytest.importorskip("transformers.integrations.bitnet")
    torch.manual_seed(0)
    w = torch.randn(16, 32) * 0.02
    qw = ternary_quantize(w)
    with torch._dynamo.config.patch(disable=True):  # its forward is torch.compile'd: eager here
        theirs = bitnet.WeightQuant.forward(None, w)
    torch.testing.assert_close(qw.dequantize(), theirs, atol=1e-7, rtol=1e-6)


def test_bitlinear_reference_hand_example():
    # x = [2, -1, 0.5, 4]: m = 127/4, levels = round(x·m) = [64 (63.5 ties to even), -32, 16, 127]
    x = torch.tensor([[2.0, -1.0, 0.5, 4.0]])
    q = torch.tensor([[1, 0, -1, 1], [0, -1, 1, 0]], dtype=torch.int8)
    y = bitlinear_reference(x, q, 0.25, bias=torch.tensor([1.0, -1.0]))
    # rows: 64 - 16 + 127 = 175; 32 + 16 = 48; y = acc / m · γ + b
    m = 127 / 4
    torch.testing.assert_close(y, torch.tensor([[175 / m * 0.25 + 1, 48 / m * 0.25 - 1]]))


def test_bitlinear_reference_rms_norm_normalises_before_quantizing():
    torch.manual_seed(1)
    x = torch.randn(3, 8)
    q = torch.randint(-1, 2, (4, 8), dtype=torch.int8)
    plain = bitlinear_reference(x * 10, q, 0.1, rms_norm_weight=torch.ones(8), eps=1e-6)
    normed = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    torch.testing.assert_close(plain, bitlinear_reference(normed, q, 0.1), atol=1e-6, rtol=1e-5)


def test_bitlinear_reference_is_close_to_the_float_product():
    # int8 activations: relative error of order 1/127 against x · (q·γ)ᵀ
    torch.manual_seed(2)
    x, q = torch.randn(5, 64), torch.randint(-1, 2, (32, 64), dtype=torch.int8)
    exact = x @ (q.float() * 0.3).t()
    err = (bitlinear_reference(x, q, 0.3) - exact).abs().max()
    assert err < 0.02 * exact.abs().max()


@pytest.mark.parametrize(
    "kwargs", [dict(bits=3), dict(bits=2), dict(group_size=-1), dict(symmetric=False)], ids=str
)
def test_ternary_rejects_bits_group_size_and_asym(kwargs):
    # one scale per tensor: the grid options are not ternary options, whatever their value
    with pytest.raises(ConfigError, match="does not apply to --method ternary"):
        QuantConfig(method="ternary", **kwargs)


def test_ternary_defaults_to_the_bitnet_format():
    cfg = QuantConfig(method="ternary")
    assert cfg.format == "bitnet" and cfg.format_options.linear_class == "bitlinear"
    assert QuantConfig(method="ternary", format="bitnet") == cfg


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="ternary", format="gptq"), "--method ternary writes --format bitnet, not gptq"),
        (dict(method="rtn", format="bitnet"), "--method rtn writes --format compressed-tensors or gptq"),
        (dict(linear_class="autobitlinear"), "--linear-class does not apply to --method rtn"),
        (dict(use_rms_norm=True), "--use-rms-norm does not apply"),
        (dict(method="ternary", linear_class="bitnet"), "--linear-class must be one of"),
        (dict(method="ternary", rms_norm_eps=float("nan")), "--rms-norm-eps must be finite"),
        (dict(method="ternary", rms_norm_eps=float("inf")), "--rms-norm-eps must be finite"),
        (dict(method="ternary", rms_norm_eps=0.0), "--rms-norm-eps must be positive"),
    ],
)  # fmt: skip
def test_method_format_pairing_is_validated(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        QuantConfig(**kwargs).validate()
