"""The native bfloat16 paths of slerp, nuslerp, multislerp and arcee_fusion (read from the stored
inputs) give the bits of the torch narrow path (itself checked against mergekit in the parity
tests), and the torch-reduction facts they rely on hold at several thread counts."""

from __future__ import annotations

import pytest
import torch
from sphere_testlib import native_and_torch

import weightsmith.kernels as kernels
from weightsmith.errors import CheckpointError
from weightsmith.kernels import sphere
from weightsmith.merge.methods import sphere_native
from weightsmith.merge.methods.base import TensorParams
from weightsmith.merge.methods.slerp import MERGEKIT_CHUNK

pytestmark = pytest.mark.skipif(sphere.library() is None, reason="no C compiler here")


def inputs(k: int, n: int, seed: int, shape: tuple[int, ...] | None = None) -> list[torch.Tensor]:
    """k bfloat16 tensors near a common base: exact zeros of both signs, subnormals, repeated
    values, and entries equal to the base (zero task-vector entries)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 0.02
    out = []
    for i in range(k):
        x = base + torch.randn(n, generator=g) * 0.002 * (i + 1) if i else base.clone()
        r = torch.rand(n, generator=g)
        x[r < 0.03] = 0.0
        x[(r >= 0.03) & (r < 0.05)] = -0.0
        x[(r >= 0.05) & (r < 0.06)] = 1e-39 * (i - 1.5)
        x[(r >= 0.06) & (r < 0.08)] = 0.0078125
        if i:
            x[(r >= 0.08) & (r < 0.1)] = base[(r >= 0.08) & (r < 0.1)]
        out.append(x.to(torch.bfloat16).reshape(shape or (n,)))
    return out


def stored_as(xs: list[torch.Tensor], dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """float32 storage holds values between bfloat16 ones (rounded to bfloat16 on load)."""
    if dtype == torch.bfloat16:
        return xs
    g = torch.Generator().manual_seed(seed)
    return [x.float() * (1 + torch.rand(x.shape, generator=g) * 2e-3) for x in xs]


def check(method: str, xs, params: TensorParams, in_dtype: torch.dtype) -> None:
    xs = stored_as(xs, in_dtype, seed=len(xs))
    for out_dtype in (torch.bfloat16, torch.float32):
        native, want = native_and_torch(method, xs, params, out_dtype)
        assert native is not None, "the native path did not run"
        assert native.dtype == want.dtype == out_dtype
        assert torch.equal(native.view(torch.uint8), want.view(torch.uint8)), method


def bf16_params(glob: dict, weights=(), has_base=None) -> TensorParams:
    models = tuple({"weight": w} for w in weights)
    return TensorParams("t", glob, models, has_base=has_base, compute_dtype=torch.bfloat16)


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t", [0.5, 0.3])
@pytest.mark.parametrize("fused_dot", [True, False])
def test_slerp_native_equals_torch_path(in_dtype, t, fused_dot, monkeypatch):
    """The dot's products summed as they are made (native float32 cascade) or stored and summed
    by torch: the torch path's bits either way."""
    if not fused_dot:
        monkeypatch.setattr(sphere_native, "native_float_sums", lambda: False)
    n = 2 * MERGEKIT_CHUNK + 40_003  # several of mergekit's pieces, the last one short
    check("slerp", inputs(2, n, seed=1), bf16_params({"t": t}), in_dtype)


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_base,weights", [(True, (1.0, 1.0)), (False, (0.3, 1.0))])
def test_nuslerp_native_equals_torch_path(in_dtype, with_base, weights):
    xs = inputs(3, 300_007, seed=2)
    check("nuslerp", xs if with_base else xs[1:], bf16_params({}, weights, with_base), in_dtype)


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "with_base,weights", [(True, (1.0, 1.0)), (False, (0.3, 1.0)), (True, (0.2, 0.5, 0.3))]
)
def test_multislerp_native_equals_torch_path(in_dtype, with_base, weights):
    xs = inputs(len(weights) + 1, 300_007, seed=3)
    p = bf16_params({}, weights, with_base)
    check("multislerp", xs if with_base else xs[1:], p, in_dtype)


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(2048,), (300, 2048), (530, 2000)])  # the last one sampled
def test_arcee_fusion_native_equals_torch_path(in_dtype, shape):
    n = 1
    for d in shape:
        n *= d
    check("arcee_fusion", inputs(2, n, seed=4, shape=shape), bf16_params({}), in_dtype)


def test_slerp_of_orthogonal_vectors_by_hand():
    # θ = π/2, t = 0.5: s0 = s1 = sin(π/4) / sin(π/2) = 0.70710677 -> bfloat16 0.70703125
    xs = [torch.tensor([1.0, 0.0], dtype=torch.bfloat16), torch.tensor([0.0, 1.0]).bfloat16()]
    native, _ = native_and_torch("slerp", xs, bf16_params({"t": 0.5}), torch.bfloat16)
    assert native.tolist() == [0.70703125, 0.70703125]


def test_kernels_off_means_torch_path(monkeypatch):
    monkeypatch.setenv("WEIGHTSMITH_KERNELS", "0")
    assert kernels.load_library("sphere", sphere._SOURCE, {}, ("ws_sphere_abi", 1)) is None
    native, want = native_and_torch(
        "nuslerp", inputs(3, 1000, seed=5), bf16_params({}, (1.0, 1.0), True), torch.bfloat16
    )
    assert native is None and want.numel() == 1000


def test_float32_arithmetic_keeps_its_own_path():
    p = TensorParams("t", {}, ({"weight": 1.0}, {"weight": 1.0}), has_base=True)
    native, _ = native_and_torch("multislerp", inputs(3, 1000, seed=6), p, torch.bfloat16)
    assert native is None


@pytest.mark.parametrize("method", ["slerp", "nuslerp", "multislerp", "arcee_fusion"])
def test_nan_input_names_the_input(method):
    xs = inputs(3, 70_000, seed=7)
    xs = xs[:2] if method in ("slerp", "arcee_fusion") else xs
    xs[1][12_345] = float("nan")
    p = bf16_params({"t": 0.5} if method == "slerp" else {}, (1.0, 1.0)[: len(xs) - 1], True)
    if method in ("slerp", "arcee_fusion"):
        p = bf16_params({"t": 0.5} if method == "slerp" else {})
    with pytest.raises(CheckpointError, match="input 1 holds NaN"):
        native_and_torch(method, xs, p, torch.bfloat16)


@pytest.mark.parametrize("threads", [2, 3, 4])
def test_split_sum_is_torchs_multithreaded_sum(monkeypatch, threads):
    """A whole-tensor sum with N torch threads = N single-threaded part sums, summed."""
    monkeypatch.setattr(sphere_native, "TORCH_THREADS", threads)
    saved = torch.get_num_threads()
    g = torch.Generator().manual_seed(threads)
    try:
        for n in (sphere_native.GRAIN - 1, sphere_native.GRAIN * 2 + 5, 3_000_017):
            x = torch.randn(n, generator=g) * 1e-2 + 3e-3
            for t in (x, x.bfloat16()):
                torch.set_num_threads(threads)
                want = t.sum()
                torch.set_num_threads(saved)
                got = sphere_native.split_sum(t)
                assert torch.equal(want.view(-1).view(torch.uint8), got.view(-1).view(torch.uint8))
    finally:
        torch.set_num_threads(saved)


def test_row_reductions_are_the_rows_alone():
    """mergekit's (k, n) norm and sum(-1) at two threads = each row's norm (any threads) and
    single-threaded sum, which the multislerp path computes from one row buffer."""
    saved = torch.get_num_threads()
    g = torch.Generator().manual_seed(8)
    v = (torch.randn(3, 2_000_003, generator=g) * 0.02).bfloat16()
    try:
        torch.set_num_threads(2)
        norms, sums = torch.norm(v, dim=-1, keepdim=True), v.sum(-1, keepdim=True)
        row_norms = [torch.norm(r, dim=-1, keepdim=True) for r in v]
        with sphere_native.single_thread():
            row_sums = [r.sum(-1, keepdim=True) for r in v]
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(norms, torch.stack(row_norms))
    assert torch.equal(sums, torch.stack(row_sums))


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 100_003])
def test_order_stats_are_the_sorted_values(n):
    """The values at arcee_fusion's quantile ranks (and the ends) by counting bit patterns:
    torch.sort's values there, with duplicates, ±0, negatives, tiny and infinite values."""
    if sphere.library() is None:
        pytest.skip("no C compiler here")
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g) * torch.exp2(torch.randint(-20, 20, (n,), generator=g))).to(
        torch.bfloat16
    )
    x[: n // 5] = 0.0
    x[n // 5 : n // 4] = -0.0
    if n > 10:
        x[:3] = torch.tensor([float("inf"), -float("inf"), 1e-40])
        x[5:9] = x[9]  # duplicates
    x = x[torch.randperm(n, generator=g)]
    ranks = sorted({0, n - 1, *(torch.tensor([0.25, 0.5, 0.75]) * (n - 1)).long().tolist()})
    want = torch.sort(x).values[torch.tensor(ranks)]
    got = sphere.order_stats(x, ranks)
    assert torch.equal(got.float(), want.float())  # ±0 may come out either way: equal values
    counts = sphere.bit_counts()  # the same from the counts of three parts, summed
    for part in (x[: n // 3], x[n // 3 : n // 2], x[n // 2 :]):
        sphere.count_into(part, counts)
    assert int(counts.sum()) == n
    assert torch.equal(sphere.counted_ranks(counts, ranks).float(), want.float())


def test_fusion_sampled_is_mergekits_gathered_ops():
    if sphere.library() is None:
        pytest.skip("no C compiler here")
    g = torch.Generator().manual_seed(3)
    rows, cols = 300, 70
    kl = (torch.rand(rows, generator=g) * 0.3).to(torch.bfloat16)
    idx = torch.randint(rows * cols, (5000,), generator=g)
    for dt in (torch.bfloat16, torch.float32):
        b, x = (torch.randn(rows * cols, generator=g).to(dt) for _ in range(2))
        want = (x[idx].to(torch.bfloat16) - b[idx].to(torch.bfloat16)).abs() * kl[idx // cols]
        got = torch.empty(idx.numel(), dtype=torch.bfloat16)
        sphere.fusion_sampled([b, x], idx, cols, kl.float(), got)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), dt


@pytest.mark.parametrize("numel", [1, 70, 65_536, 65_537, 3_000_017])
def test_block_order_is_a_stable_sort_by_block(numel):
    """The same indices, ordered by ``j >> shift`` (at most 2^12 blocks), first order kept
    within a block: a gather over them sees the same multiset, walking memory forward."""
    if sphere.library() is None:
        pytest.skip("no C compiler here")
    g = torch.Generator().manual_seed(numel)
    idx = torch.randint(numel, (20_000,), generator=g)
    got = sphere.block_order(idx, numel)
    shift = max(0, (numel - 1).bit_length() - sphere.BLOCK_BITS)
    assert ((numel - 1) >> shift) < 2**sphere.BLOCK_BITS
    keys = idx >> shift
    want = idx[torch.sort(keys, stable=True).indices]
    assert torch.equal(got, want)
    assert torch.equal(torch.sort(got).values, torch.sort(idx).values)
