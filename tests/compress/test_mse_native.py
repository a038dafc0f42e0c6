"""The native MSE clipping search (``ws_mse_rows``) chooses exactly what the torch code does."""

from __future__ import annotations

import pytest
import torch

import weightsmith.compress.mse as mse
from weightsmith.compress.mse import MSEConfig, clip_ratios, mse_qparams
from weightsmith.kernels.quant import mse_rows, quant_kernels

pytestmark = pytest.mark.skipif(quant_kernels() is None, reason="no C compiler for the kernels")


def _torch_only(monkeypatch) -> None:
    monkeypatch.setattr(mse, "mse_rows", lambda *a, **k: None)


def _weights(rows: int, g: int, seed: int) -> torch.Tensor:
    """Rows as real weights look: small, a few outliers, stored in bfloat16; plus the corner
    cases (all zero, constant, one-signed)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, g, generator=gen) * 0.03
    w[torch.rand(rows, g, generator=gen) < 0.02] *= 8
    w = w.bfloat16().float()
    w[0] = 0
    w[1] = 0.0625
    w[2] = w[2].abs()
    w[3] = -w[3].abs()
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("g", [64, 13])
def test_native_choices_equal_the_torch_code(monkeypatch, bits, symmetric, dtype, g):
    w = _weights(2000, g, seed=bits * 31 + g)
    ratios = clip_ratios(MSEConfig())
    zero_min = None if symmetric else -(1 << (bits - 1)) + 1  # the gptq format's floor too
    got = mse_rows(w, bits, symmetric, zero_min, dtype, ratios)
    assert got is not None
    _torch_only(monkeypatch)
    want = mse_qparams(w, bits, symmetric, dtype, zero_min, ratios)
    for a, b, what in zip(got, want, ("scale", "zero", "ratio"), strict=True):
        assert a.dtype == b.dtype == torch.float32, what
        assert torch.equal(a, b), (what, (a != b).sum().item())
    # the search is not trivial here: many rows choose a clipped range (at 8 bits few gain)
    assert bits == 8 or (got[2] < 1).float().mean() > 0.2


def test_strided_rows_as_gptq_passes_them(monkeypatch):
    # GPTQ hands the kernel a group's columns of a wider matrix (row stride > g)
    W = _weights(300, 256, seed=5)
    cur = W[:, 64:128]
    assert cur.stride() == (256, 1)
    ratios = clip_ratios(MSEConfig(grid=50, max_shrink=0.4))
    got = mse_rows(cur, 4, True, None, torch.bfloat16, ratios)
    _torch_only(monkeypatch)
    want = mse_qparams(cur.contiguous(), 4, True, torch.bfloat16, None, ratios)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_hand_example_through_the_kernel():
    # the 2-bit example of test_quant_mse: ratios 1, 0.75, 0.5 -> 0.75 wins (err 0.07 vs
    # 0.0811 and 0.1144), scale 0.25
    w = torch.tensor([[0.2, 0.2, 0.2, 0.5]])
    scale, zero, chosen = mse_rows(w, 2, True, None, torch.float32, [1.0, 0.75, 0.5])
    assert scale.item() == 0.25 and zero.item() == 0 and chosen.item() == 0.75


def test_kernel_declines_what_it_cannot_take():
    w = torch.randn(4, 8)
    assert mse_rows(w.double(), 4, True, None, torch.float32, [1.0]) is None
    assert mse_rows(w.t(), 4, True, None, torch.float32, [1.0]) is None  # strided columns
    assert mse_rows(w, 4, True, None, torch.float16, [1.0]) is None  # float16 scales: torch


def test_rows_split_over_threads_give_the_same_choices():
    w = _weights(3000, 64, seed=9)
    ratios = clip_ratios(MSEConfig())
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mse_rows(w, 3, False, None, torch.bfloat16, ratios)
        torch.set_num_threads(4)
        four = mse_rows(w, 3, False, None, torch.bfloat16, ratios)
    finally:
        torch.set_num_threads(saved)
    assert all(torch.equal(a, b) for a, b in zip(one, four, strict=True))
