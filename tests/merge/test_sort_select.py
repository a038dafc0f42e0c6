"""The native sort selection picks exactly the entries torch's default CPU sort puts at a range
of positions (mergekit's TIES / breadcrumbs masks in bfloat16), ties included.

The reference is torch itself: ``torch.sort(w, descending=...)`` (stable=False), whose pick
among equal values the selection must reproduce entry for entry.
"""

from __future__ import annotations

import pytest
import torch

from weightsmith.kernels import narrow as native_select
from weightsmith.merge.methods import sortmask
from weightsmith.merge.methods.base import TensorChunks

pytestmark = pytest.mark.skipif(not native_select.available(), reason="no C compiler here")


def torch_mask(w: torch.Tensor, lo: int, hi: int, descending: bool) -> torch.Tensor:
    order = torch.sort(w, descending=descending).indices
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    mask[order[lo:hi]] = True
    return mask


def bf16_values(n: int, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "few":  # three distinct magnitudes: almost everything ties
        return (torch.randint(-2, 3, (n,), generator=g) * 0.5).bfloat16()
    if kind == "tiny":  # subnormal and zero magnitudes
        return (torch.randn(n, generator=g) * 1e-39).bfloat16()
    return (torch.randn(n, generator=g) * 0.002).bfloat16()  # a task vector's scale


SIZES = [1, 2, 3, 16, 17, 18, 31, 100, 1000, 4097, 65_537, 1_000_003]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["normal", "few", "tiny"])
@pytest.mark.parametrize("descending", [True, False])
def test_select_matches_torch_sort(n, kind, descending):
    x = bf16_values(n, kind, seed=n)
    w = x.abs().float()
    for lo, hi in [(0, max(1, n // 2)), (n // 3, n - n // 10), (0, n), (n - 1, n), (0, 1)]:
        if lo >= hi:
            continue
        keys = native_select.SortKeys(n, descending=descending)
        keys.fill_bf16_magnitudes(x)
        got = keys.select(lo, hi)
        assert got is not None
        assert torch.equal(got, torch_mask(w, lo, hi, descending)), (lo, hi)
        assert int(got.sum()) == hi - lo


def test_hand_case_descending_ties():
    """Hand-traced std::sort on 20 entries (> 16, so one partition runs): magnitudes
    [1]*10 + [2]*10, reversed pairs; the top 15 are all the 2s and five of the 1s — which five
    is std::sort's choice, checked against torch, and the count is checked by hand."""
    x = torch.tensor([1.0, 2.0] * 10).bfloat16()
    keys = native_select.SortKeys(20, descending=True)
    keys.fill_bf16_magnitudes(x)
    got = keys.select(0, 15)
    assert got is not None
    assert bool(got[1::2].all())  # every 2 is kept
    assert int(got[0::2].sum()) == 5  # and exactly five of the ten 1s
    assert torch.equal(got, torch_mask(x.float(), 0, 15, True))


def test_depth_limit_reports_fallback():
    """Where libstdc++ would heap-sort a deciding range, the kernel says so instead."""
    x = bf16_values(1000, "normal", seed=1)
    keys = native_select.SortKeys(1000, descending=True)
    keys.fill_bf16_magnitudes(x)
    assert keys.select(0, 500, max_depth=0) is None


def test_fallback_gives_the_same_mask(monkeypatch):
    """sort_range_mask without the native path (torch sorts the whole δ) = with it."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(50_000, generator=g)
    x = base + torch.randn(50_000, generator=g) * 0.003
    src = TensorChunks([base, x], chunk_size=7_001)
    fast = sortmask.sort_range_mask(src, 0, torch.bfloat16, 0, 20_000, descending=True)
    monkeypatch.setattr(native_select.SortKeys, "select", lambda self, lo, hi: None)
    slow = sortmask.sort_range_mask(src, 0, torch.bfloat16, 0, 20_000, descending=True)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("descending", [True, False])
def test_chunked_float32_inputs_round_like_mergekit(descending):
    """float32 inputs (not bfloat16 values) in uneven chunks: δ = bf16(x) − bf16(base),
    rounded; includes a difference that overflows bfloat16 to Inf."""
    g = torch.Generator().manual_seed(4)
    n = 30_011
    base = torch.randn(n, generator=g)
    x = base + torch.randn(n, generator=g) * 0.01
    base[5], x[5] = -3.0e38, 3.0e38  # x − base overflows to +Inf in bfloat16
    src = TensorChunks([base, x], chunk_size=4_099)
    got = sortmask.sort_range_mask(src, 0, torch.bfloat16, 1_000, 21_000, descending=descending)
    w = (x.bfloat16() - base.bfloat16()).abs().float()
    assert torch.isinf(w[5])
    assert torch.equal(got, torch_mask(w, 1_000, 21_000, descending))


@pytest.mark.parametrize("seed", range(6))
def test_random_ranges_and_value_spreads(seed):
    """Many random ranges on inputs with 2 to 2000 distinct magnitudes (the block partition's
    stopper lists and the scalar tail in every combination)."""
    g = torch.Generator().manual_seed(100 + seed)
    n = int(torch.randint(1_000, 300_000, (1,), generator=g))
    levels = [2, 7, 40, 2000, 65_000, 300][seed]
    x = (torch.randint(0, levels, (n,), generator=g).float() * 1e-3).bfloat16()
    w = x.abs().float()
    for _ in range(8):
        lo, hi = sorted(int(v) for v in torch.randint(0, n + 1, (2,), generator=g))
        if lo == hi:
            continue
        descending = bool(torch.randint(0, 2, (1,), generator=g))
        keys = native_select.SortKeys(n, descending=descending)
        keys.fill_bf16_magnitudes(x)
        assert torch.equal(keys.select(lo, hi), torch_mask(w, lo, hi, descending)), (lo, hi)
