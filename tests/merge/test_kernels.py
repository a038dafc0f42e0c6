"""The native merge kernels give exactly the eager torch results, and fall back cleanly."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

import weightsmith.kernels as kernels
from weightsmith.kernels import merge as native
from weightsmith.merge.methods.base import TensorChunks, TensorParams, merge_tensors
from weightsmith.merge.methods.dare import keep_mask, splitmix64
from weightsmith.merge.methods.ties import native_topk_cuts, topk_threshold

pytestmark = pytest.mark.skipif(kernels.merge_kernels() is None, reason="no C compiler here")

MASK64 = (1 << 64) - 1


def splitmix64_reference(seed: int, j: int) -> int:
    """SplitMix64 (Steele, Lea, Flood 2014) in plain Python integers: the j-th output."""
    z = (seed + (j + 1) * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def _deltas(n: int, k: int, seed: int = 0) -> list[torch.Tensor]:
    """A base and k models whose deltas include exact zeros, sign mixes and repeated values."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    models = []
    for i in range(k):
        d = torch.randn(n, generator=g) * 0.01
        d[torch.rand(n, generator=g) < 0.1] = 0.0  # untouched entries
        d[torch.rand(n, generator=g) < 0.05] = 0.0078125 * (1 if i % 2 else -1)  # ties
        models.append(base + d)
    return [base, *models]


def test_splitmix64_matches_the_reference_in_torch_and_c():
    seed = 0x0123456789ABCDEF
    js = [0, 1, 2, 3, 1000, 2**31, 2**40 + 7]
    got = splitmix64(seed, torch.tensor(js)).tolist()
    assert [g & MASK64 for g in got] == [splitmix64_reference(seed, j) for j in js]
    # The keep mask uses both halves of each output: check the native one entry by entry.
    cut = round(0.3 * 2**32)
    mask = keep_mask(seed, 5, 8, 0.3)
    for i, kept in zip(range(5, 13), mask.tolist(), strict=True):
        w = splitmix64_reference(seed, i // 2)
        u = (w >> 32) if i % 2 else (w & 0xFFFFFFFF)
        assert kept == (u < cut)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_keep_mask_native_equals_torch(density, monkeypatch):
    fast = keep_mask(42, 123_457, 100_003, density)
    monkeypatch.setattr(native, "merge_kernels", lambda: None)
    slow = keep_mask(42, 123_457, 100_003, density)
    assert torch.equal(fast, slow)
    assert abs(fast.float().mean().item() - density) < 0.01


CASES = list(
    itertools.product(
        ["task_arithmetic", "ties", "dare_linear", "dare_ties"],
        [1, 2, 3],
        [True, False],  # normalize
    )
)


@pytest.mark.parametrize(("method", "k", "normalize"), CASES)
def test_fused_merge_is_bit_identical_to_eager(method, k, normalize, monkeypatch):
    tensors = _deltas(70_001, k, seed=k)
    weights = [1.0, 0.7, -0.3][:k]
    models = tuple(
        {"weight": w, "density": d} for w, d in zip(weights, [0.5, 0.3, 1.0][:k], strict=True)
    )
    params = TensorParams("layers.0.w", {"normalize": normalize, "lambda": 0.9}, models)
    fast = merge_tensors(method, tensors, params, chunk_size=30_000)
    monkeypatch.setattr(native, "merge_kernels", lambda: None)
    slow = merge_tensors(method, tensors, params, chunk_size=30_000)
    assert torch.equal(fast, slow), (fast - slow).abs().max()


def test_fused_dare_without_rescale_is_bit_identical(monkeypatch):
    tensors = _deltas(10_000, 2, seed=9)
    models = ({"weight": 1.0, "density": 0.4}, {"weight": 0.5, "density": 0.6})
    params = TensorParams("t", {"rescale": False, "seed": 3}, models)
    fast = merge_tensors("dare_ties", tensors, params)
    monkeypatch.setattr(native, "merge_kernels", lambda: None)
    assert torch.equal(fast, merge_tensors("dare_ties", tensors, params))


@pytest.mark.parametrize("chunk", [None, 4096, 77_777])
def test_radix_topk_cuts_equal_the_exact_selection(chunk):
    base, *models = _deltas(300_000, 2, seed=5)
    src = TensorChunks([base, *models], chunk_size=chunk)
    n = base.numel()
    # 0.5: the cut falls inside the continuous values; the others land on the tied 2**-7 and
    # 0.0 values, so only some of the ties are kept (in storage order).
    for frac in (0.5, 0.03, 0.1, 0.95):
        keep = {0: max(1, int(frac * n)), 1: max(1, int(frac * n) + 1)}
        cuts = native_topk_cuts(src, keep)
        for k, m in enumerate(models):
            assert cuts[k] == topk_threshold((m - base).abs(), keep[k]), (frac, k)


def test_native_topk_cuts_keep_exactly_k_entries():
    base = torch.zeros(1000)
    x = torch.zeros(1000)
    x[::10] = 1.0  # 100 entries of |δ| = 1, 900 of 0
    src = TensorChunks([base, x], chunk_size=128)
    cut = native_topk_cuts(src, {0: 250})[0]  # all 100 ones plus the first 150 zeros
    assert cut.threshold == 0.0
    kept = (x > 0) | (torch.arange(1000) <= cut.last_tie)
    assert int(kept.sum()) == 250


def test_no_compiler_falls_back_to_torch_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("WEIGHTSMITH_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_loaded", {})
    with pytest.warns(UserWarning, match="native merge kernels unavailable"):
        assert kernels.merge_kernels() is None
    assert kernels.merge_kernels() is None  # remembered: no second build attempt
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setenv("WEIGHTSMITH_KERNELS", "0")
    assert kernels.merge_kernels() is None


def test_kernels_are_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("WEIGHTSMITH_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_loaded", {})
    assert kernels.merge_kernels() is not None
    built = list((tmp_path / "kernels").glob("*.so"))
    assert len(built) == 1
    monkeypatch.setattr(kernels, "_loaded", {})
    assert kernels.merge_kernels() is not None
    assert list((tmp_path / "kernels").glob("*.so")) == built


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_conversion_is_exact_and_counts_nan_inf(dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(10_000, generator=g) * 1e-38).to(dtype)  # subnormals included
    x[3], x[70], x[9_999] = float("nan"), float("inf"), float("-inf")
    out = torch.empty(10_000)
    assert native.to_float32(x, out, check=True) == 3
    assert torch.equal(out.view(torch.int32), x.float().view(torch.int32))  # bit for bit
    assert native.to_float32(x[:3], torch.empty(3), check=True) == 0
    assert native.to_float32(x, out, check=False) == 0
    assert native.to_float32(x.half(), out, check=True) is None  # not a kernel dtype: torch


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_tiny_and_empty_tensors_merge_the_same_with_and_without_kernels(n, monkeypatch):
    tensors = [torch.arange(n, dtype=torch.float32) * s for s in (1.0, 2.0, -1.0)]
    models = ({"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5})
    params = TensorParams("t", {}, models)
    fast = {m: merge_tensors(m, tensors, params) for m in ("ties", "dare_ties")}
    monkeypatch.setattr(native, "merge_kernels", lambda: None)
    for m, out in fast.items():
        assert torch.equal(out, merge_tensors(m, tensors, params)), m
        assert out.shape == (n,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 100_003])
def test_slerp_dots_are_exact_float64_sums_and_count_nan_inf(dtype, n):
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    dot, aa, bb, bad_a, bad_b = native.slerp_dots(a, b)
    x, y = a.double(), b.double()
    # products are exact in float64; only the order of the float64 sums differs from torch's
    for got, ref in ((dot, x @ y), (aa, x @ x), (bb, y @ y)):
        assert got == pytest.approx(float(ref), rel=1e-12, abs=1e-12)
    assert (bad_a, bad_b) == (0, 0)
    a[n // 2] = float("nan")
    b[0], b[n - 1] = float("inf"), float("-inf")
    assert native.slerp_dots(a, b)[3:] == (1, 1 if n == 1 else 2)
    assert native.slerp_dots(a, b.half() if dtype == torch.float32 else b.float()) is None


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_lerp2_equals_torch_mul_add_bit_for_bit(in_dtype, out_dtype):
    n = 100_003  # not a multiple of the vector width: the tail is covered too
    g = torch.Generator().manual_seed(3)
    a = (torch.randn(n, generator=g) * 0.02).to(in_dtype)
    b = (torch.randn(n, generator=g) * 0.02).to(in_dtype)
    s0, s1 = 0.6180339887, 0.4142135623
    out = torch.empty(n, dtype=out_dtype)
    assert native.lerp2(a, b, s0, s1, out) == 0  # no NaN/Inf written
    # the eager torch path of Slerp.combine: a·s0 rounded, then fma(b, s1, ·) (vector loop)
    eager = a.float().mul(s0).add_(b.float(), alpha=s1).to(out_dtype)
    assert torch.equal(eager.view(torch.uint8), out.view(torch.uint8))
    assert native.lerp2(a, b.half(), s0, s1, out) is None
    over = [0, 65535, 65536, n - 1]  # overflows at the edges of the kernel's count blocks
    a[over], b[over] = 3e38, 3e38
    assert native.lerp2(a, b, 1.0, 1.0, out) == len(over)


def test_bfloat16_rounding_is_nearest_even_like_torch():
    # float32 values exactly between two bfloat16 neighbours, both parities, and overflow
    bits = torch.tensor(
        [0x3F808000, 0x3F818000, 0x3F80C000, 0x7F7FFFFF, 0xFF7F8000, 0x00008000, 0x00018000],
        dtype=torch.int64,
    ).to(torch.int32)
    x = bits.view(torch.float32)
    out = torch.empty(len(x), dtype=torch.bfloat16)
    assert native.lerp2(x, torch.zeros_like(x), 1.0, 0.0, out) == 2  # two overflow to ±Inf
    assert torch.equal(out.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))


def test_build_key_covers_the_shared_header() -> None:
    """Every kernel source that includes bf16.h names it, so an edit to the header rebuilds
    each library (the header's bytes are part of the build key)."""
    root = Path(kernels.__file__).parent
    for name in ("merge", "narrow", "quant", "reduce", "sphere"):
        src = (root / f"{name}_kernels.c").read_bytes()
        assert kernels.local_includes(src) == ["bf16.h"], name
