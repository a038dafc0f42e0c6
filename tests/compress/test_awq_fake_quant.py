"""AWQ's fused candidate weight ``Q(w·s) / s`` (``ws_fake_quant_scaled_rows``) gives the bits of
the torch expression it replaces, for the scales' dtypes the search produces."""

from __future__ import annotations

import pytest
import torch

import weightsmith.compress.rtn as rtn
from weightsmith.compress.awq import AWQConfig
from weightsmith.compress.awq_search import candidate_scales, scaled_candidate, weight_mean
from weightsmith.compress.rtn import RTNConfig, rtn_quantize, rtn_scaled_dequantized
from weightsmith.kernels.quant import fake_quant_scaled, quant_kernels

pytestmark = pytest.mark.skipif(quant_kernels() is None, reason="no C compiler for the kernels")


def _torch(w, s, cfg, dtype, zero_min):
    """The expression the AWQ search evaluated before the kernel (RTN's torch code path)."""
    ws = (w * s).float()
    g = ws.shape[1] if cfg.group_size == -1 else cfg.group_size
    scale, zero = rtn.group_qparams(ws, cfg.bits, g, cfg.symmetric, dtype, zero_min)
    idx = torch.arange(ws.shape[1]) // g
    q = rtn.quantize_levels(ws, scale[:, idx], zero[:, idx], cfg.bits)
    deq = (q.float() - zero[:, idx].float()) * scale[:, idx].float()
    return (deq / s).float()


def _case(rows, cols, seed, wdtype):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=gen) * 0.05).to(wdtype)
    w[0] = 0  # an all-zero row: scale 1
    x_mean = torch.rand(cols, generator=gen) * 3 + 1e-3
    x_mean[:3] = torch.tensor([1e-7, 40.0, 0.0])  # the clamp at 1e-4, an outlier channel
    return w, x_mean


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group_size", [32, -1])
def test_native_candidate_equals_the_torch_expression(
    bits, symmetric, scale_dtype, wdtype, group_size
):
    w, x_mean = _case(203, 128, bits * 7 + group_size, wdtype)
    cfg = AWQConfig(bits=bits, group_size=group_size, symmetric=symmetric)
    zero_min = None if symmetric else -(1 << (bits - 1)) + 1
    w_mean = weight_mean([w.float()], 128 if group_size == -1 else group_size)
    checked = 0
    for ratio, duo in [(0.0, False), (0.35, True), (1.0, True), (0.5, False)]:
        s = candidate_scales(x_mean, w_mean, ratio, duo)
        assert s.dtype == torch.float32
        g = 128 if group_size == -1 else group_size
        got = fake_quant_scaled(w, s, g, bits, symmetric, zero_min, scale_dtype)
        want = _torch(w, s, cfg, scale_dtype, zero_min)
        assert got is not None and got.dtype == torch.float32
        assert torch.equal(got, want), (ratio, duo, (got - want).abs().max())
        s64 = s.double() * (1 + 1e-9)  # not a float32 value: the float64 path
        got64 = fake_quant_scaled(w, s64, g, bits, symmetric, zero_min, scale_dtype)
        assert torch.equal(got64, _torch(w, s64, cfg, scale_dtype, zero_min))
        checked += 1
    assert checked == 4


def test_rows_split_over_threads_give_the_same_bits():
    w, x_mean = _case(1000, 64, 3, torch.float32)
    s = candidate_scales(x_mean, weight_mean([w], 32), 0.4, True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fake_quant_scaled(w, s, 32, 4, False, None, torch.float32)
        torch.set_num_threads(4)
        four = fake_quant_scaled(w, s, 32, 4, False, None, torch.float32)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, four)


def test_search_helper_uses_the_fused_pass_or_the_plain_quantizer():
    w, x_mean = _case(64, 64, 5, torch.float32)
    s = candidate_scales(x_mean, weight_mean([w], 32), 0.6, True)
    cfg = AWQConfig(bits=4, group_size=32)

    def plain(v):
        return rtn_quantize(v, cfg, dtype=torch.float32).dequantize()

    fused = rtn_scaled_dequantized(w, s, cfg, dtype=torch.float32)
    assert torch.equal(scaled_candidate(plain, w, s), fused)


def test_declines_what_it_cannot_take():
    w = torch.randn(8, 48)
    s = torch.ones(48)
    assert fake_quant_scaled(w, s, 32, 4, True, None, torch.float32) is None  # 48 % 32
    assert fake_quant_scaled(w.t(), s[:8], 4, 4, True, None, torch.float32) is None  # strided
    assert fake_quant_scaled(w.half(), s, 16, 4, True, None, torch.float32) is None
    assert fake_quant_scaled(w, s[:4], 16, 4, True, None, torch.float32) is None
    # HQQ is not min-max: the torch code runs (and differs from plain RTN)
    hqq = RTNConfig(bits=4, group_size=16, hqq=True)
    got = rtn_scaled_dequantized(w, s, hqq, dtype=torch.float32)
    plain = rtn_scaled_dequantized(w, s, RTNConfig(bits=4, group_size=16), dtype=torch.float32)
    assert got.shape == w.shape and not torch.equal(got, plain)


def test_writes_into_a_given_float32_buffer():
    w, x_mean = _case(96, 64, 9, torch.float32)
    s = candidate_scales(x_mean, weight_mean([w], 32), 0.7, True)
    want = fake_quant_scaled(w, s, 32, 4, True, None, torch.bfloat16)
    buf = torch.full_like(w, float("nan"))
    got = fake_quant_scaled(w, s, 32, 4, True, None, torch.bfloat16, out=buf)
    assert got is buf and torch.equal(buf, want)
    assert fake_quant_scaled(w, s, 32, 4, True, None, torch.bfloat16, out=buf.t()) is None


@pytest.mark.parametrize("symmetric", [True, False])
def test_without_scales_it_is_the_dequantized_rtn_weight(symmetric):
    w, _ = _case(130, 96, 11, torch.bfloat16)
    cfg = AWQConfig(bits=4, group_size=32, symmetric=symmetric)
    want = rtn_quantize(w.float(), cfg, dtype=torch.bfloat16).dequantize()
    got = fake_quant_scaled(w, None, 32, 4, symmetric, None, torch.bfloat16)
    assert torch.equal(got, want)
    assert torch.equal(rtn_scaled_dequantized(w, None, cfg, dtype=torch.bfloat16), want)


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sdtype", [torch.float32, torch.float64])
def test_writes_bfloat16_as_copy_rounds_the_float32_result(wdtype, sdtype):
    # the shadow search model's weight is written in place: the float32 candidate's bits,
    # rounded to bfloat16 as torch's copy_ rounds them
    w, x_mean = _case(150, 64, 13, wdtype)
    s = candidate_scales(x_mean, weight_mean([w.float()], 32), 0.45, True).to(sdtype)
    want = fake_quant_scaled(w, s, 32, 4, True, None, torch.bfloat16)
    buf = torch.full(w.shape, float("nan"), dtype=torch.bfloat16)
    got = fake_quant_scaled(w, s, 32, 4, True, None, torch.bfloat16, out=buf)
    assert got is buf and torch.equal(buf, want.to(torch.bfloat16))


def test_squared_error_sums_the_float32_squares_in_double():
    from weightsmith.compress.awq_search import output_mse
    from weightsmith.kernels.quant import squared_error

    gen = torch.Generator().manual_seed(4)
    a = torch.randn(37, 53, generator=gen)  # 1961 values: 122 full lanes of 16 and a tail
    b = (a + 0.01 * torch.randn(37, 53, generator=gen)).to(torch.bfloat16)
    d = (a - b.float()).square()  # float32 differences and squares
    want = float(d.double().sum())
    assert squared_error(a, b) == pytest.approx(want, rel=1e-14)
    assert squared_error(b, a) == pytest.approx(want, rel=1e-14)
    assert squared_error(a, a) == 0.0
    assert squared_error(a, b[:, :5].contiguous()) is None  # shapes differ
    ref = float(torch.nn.functional.mse_loss(a, b.float(), reduction="sum"))
    assert output_mse([a, a], [b, b]) == pytest.approx(ref / a.numel(), rel=1e-6)
