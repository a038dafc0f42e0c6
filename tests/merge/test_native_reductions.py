"""The native bfloat16 reductions (``kernels/reduce``) give torch's own bits: ``torch.norm`` of a
row and a whole tensor's ``sum()`` at torch thread counts 1, 2 and 3, for many lengths (1 to
65.5M entries) and values (zeros, ties, cancelling pairs), fed in one span or in odd spans; and
the methods that use them (nuslerp, multislerp, model_stock) keep the torch path's bits with
mergekit's default of two threads."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from sphere_testlib import native_and_torch

from weightsmith.kernels import reduce
from weightsmith.merge.methods import base as base_mod
from weightsmith.merge.methods import model_stock as model_stock_mod
from weightsmith.merge.methods import nuslerp as nuslerp_mod
from weightsmith.merge.methods import sphere_native
from weightsmith.merge.methods.base import TensorParams

pytestmark = pytest.mark.skipif(
    not reduce.expected(), reason="no C compiler, or a CPU capability without native reductions"
)


def test_the_layout_is_found_where_expected():
    """A kernel that stops matching torch makes :func:`reduce.layout` None, and every caller
    quietly keeps torch: here that is a failure, not a skip."""
    assert reduce.layout() is not None


LENGTHS = [1, 2, 7, 15, 16, 17, 31, 32, 33, 64, 127, 128, 129, 1000, 4097, 32767, 32768, 32769]
LENGTHS += [65535, 65537, 98321, 262_147, (1 << 20) + 3]


def values(n: int, seed: int) -> torch.Tensor:
    """Small values with exact zeros of both signs, repeated values (ties at rounding
    boundaries), and ± pairs that cancel (the sum is then mostly rounding error)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 2e-3 * torch.exp2(torch.randint(-4, 4, (n,), generator=g))
    r = torch.rand(n, generator=g)
    x[r < 0.05] = 0.0
    x[(r >= 0.05) & (r < 0.08)] = -0.0
    x[(r >= 0.08) & (r < 0.12)] = 0.0078125
    half = n // 2
    x[half : 2 * half] = -x[:half][torch.randperm(half, generator=g)]
    return x.bfloat16()


@contextlib.contextmanager
def torch_threads(n: int):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def torch_result(x: torch.Tensor, threads: int) -> tuple[float, float]:
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return float(torch.norm(x)), float(x.sum())
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_norm_and_sum_are_torchs(threads):
    lanes = reduce.layout()
    for i, n in enumerate(LENGTHS):
        x = values(n, seed=i)
        norm, total = torch_result(x, threads)
        assert reduce.norm_with(x, lanes["norm"]) == norm, n  # a row's norm: one thread
        assert reduce.sum_with(x, threads, lanes["casc"]) == total, (n, threads)


@pytest.mark.parametrize("threads", [1, 2])
def test_embedding_sized_tensors(threads):
    """65.5M entries (the 1.1B model's embedding): long enough that each lane's float sum of
    squares stalls, which is where a wrong lane count first showed."""
    lanes = reduce.layout()
    ramp = ((torch.arange(65_536_001) % 977 - 487) * 1e-4).bfloat16()  # sums to nearly zero
    for x in (torch.full((65_536_000,), 0.01, dtype=torch.bfloat16), ramp):
        norm, total = torch_result(x, threads)
        assert reduce.norm_with(x, lanes["norm"]) == norm
        assert reduce.sum_with(x, threads, lanes["casc"]) == total


def test_spans_of_any_length_give_one_feeds_result():
    lanes = reduce.layout()
    x = values(300_017, seed=3)
    for kind in ("norm", "casc"):
        whole = reduce.Reducer(kind, x.numel(), lanes[kind])
        whole.feed(x)
        pieces = reduce.Reducer(kind, x.numel(), lanes[kind])
        cuts = [0, 1, 5, 38, 39, 1000, 77_777, 150_000, 300_000, 300_017]
        for a, b in itertools.pairwise(cuts):
            pieces.feed(x[a:b])
        assert pieces.result() == whole.result(), kind


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_spans_are_torchs(seed):
    """Spans cut at random (inside vectors, inside cascade groups, across level carries): the
    runs of whole vectors and groups, and the vectors before and after them, give torch's
    bits."""
    lanes = reduce.layout()
    g = torch.Generator().manual_seed(seed)
    x = values(1_000_003, seed=10 + seed)
    norm, total = torch_result(x, 1)
    cuts = sorted({0, x.numel(), *torch.randint(x.numel(), (60,), generator=g).tolist()})
    reds = {kind: reduce.Reducer(kind, x.numel(), lanes[kind]) for kind in ("norm", "casc")}
    for a, b in itertools.pairwise(cuts):
        for red in reds.values():
            red.feed(x[a:b])
    assert reds["norm"].result() == norm
    assert reduce.combine([reds["casc"].result()], 1) == total


@pytest.mark.parametrize("seed", [0, 1])
def test_float32_cascade_is_torchs(seed):
    """The float32 cascade (slerp's dot) fed in random spans: torch's single-threaded float32
    ``sum()`` of the part, for lengths around the vector, group and level boundaries, with
    values whose float sum depends on the order (spread exponents, cancelling pairs)."""
    lanes = reduce.layout()["casc32"]
    g = torch.Generator().manual_seed(seed)
    for n in [1, 3, 7, 8, 9, 31, 32, 33, 127, 129, 4097, 32769, 262_147, (1 << 20) + 3]:
        x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-12, 12, (n,), generator=g))
        x[n // 2 :] -= x[: n - n // 2].flip(0) * (1 - 1e-3)  # near-cancelling pairs
        with torch_threads(1):
            want = x.sum()
        red = reduce.Reducer("casc32", n, lanes)
        cuts = sorted({0, n, *torch.randint(n, (5,), generator=g).tolist()})
        for a, b in itertools.pairwise(cuts):
            red.feed(x[a:b])
        got = torch.zeros((), dtype=torch.float32) + red.result()
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), n


def test_the_layout_check_tells_lane_counts_apart():
    """The samples :func:`reduce.layout` checks fail for the other lane count (so the check
    can fail), and the tie row's norm by hand: 4096² + 2·256² + 16² + 4 = 4112² + 4."""
    xs = reduce.samples()
    lanes = reduce.layout()
    with_threads = [torch_result(x, 1) for x in xs]
    other = {k: 24 - v for k, v in lanes.items()}  # 8 <-> 16
    assert any(
        reduce.norm_with(x, other["norm"]) != n for x, (n, _) in zip(xs, with_threads, strict=True)
    )
    sums = [reduce.combine([reduce.part_sum(x, other["casc"])], 1) for x in xs]
    assert any(s != t for s, (_, t) in zip(sums, with_threads, strict=True))
    assert {reduce.norm_with(reduce.tie_row(), w) for w in (8, 16)} == {4096.0, 4128.0}


def test_parts_are_torchs_parallel_for_split():
    assert reduce.parts(32767, 2) == [(0, 32767)]
    assert reduce.parts(40000, 2) == [(0, 20000), (20000, 40000)]
    assert reduce.parts(40001, 3) == [(0, 20001), (20001, 40001)]  # 2 grains: 2 tasks
    assert reduce.parts(10**6, 1) == [(0, 10**6)]


def test_combine_rounds_each_slot_then_sums():
    # slots hold bfloat16: 1 + 2^-9 rounds to 1 in its slot, so 1 + 1 = 2 (not 2 + 2^-9)
    assert reduce.combine([1.0 + 2**-9, 1.0], 2) == 2.0
    assert reduce.combine([3.0], 2) == 3.0  # one part: a zero slot for the idle thread


def bf16_params(weights=(), has_base=True) -> TensorParams:
    models = tuple({"weight": w} for w in weights)
    return TensorParams("t", {}, models, has_base=has_base, compute_dtype=torch.bfloat16)


@pytest.mark.parametrize("method", ["nuslerp", "multislerp", "model_stock"])
def test_methods_keep_torch_bits_with_two_torch_threads(method, monkeypatch):
    """With mergekit's two threads, the streamed statistics (2 parts per whole-tensor sum) give
    the torch path's bits (whose reductions run with those two threads)."""
    for mod in (base_mod, sphere_native, nuslerp_mod, model_stock_mod):
        monkeypatch.setattr(mod, "TORCH_THREADS", 2)
    monkeypatch.setattr(sphere_native, "SPAN", 4099)  # many spans, not aligned to vectors
    xs = [values(200_003, seed=s) for s in (11, 12, 13)]
    xs = [xs[0], xs[0] + xs[1] * 0.1, xs[0] - xs[2] * 0.1]
    weights = (1.0, 1.0) if method != "model_stock" else ()
    native, want = native_and_torch(method, xs, bf16_params(weights), torch.bfloat16)
    assert native is not None
    assert torch.equal(native.view(torch.int16), want.view(torch.int16)), method
    assert int((native.float() != xs[0].float()).sum()) > 1000  # not the base


@pytest.mark.parametrize("workers", [2, 3])
def test_one_norm_filled_by_the_pool_keeps_the_bits(workers, monkeypatch):
    """multislerp's one-kernel norms (mean, tangent) of a tensor too large to keep its rows run
    with the pool filling spans while one task feeds the previous round in order: the same
    bits as the sequential feed and as the torch path, over many rounds; a NaN input is still
    refused with its input named."""
    from weightsmith.core.parallel import compute_pool
    from weightsmith.errors import CheckpointError

    monkeypatch.setattr(sphere_native, "SPAN", 4099)  # 49 spans: 13 rounds on 2 workers
    monkeypatch.setattr(sphere_native, "ROWS_BYTES", 0)  # no kept rows: the pooled passes
    xs = [values(200_003, seed=s) for s in (21, 22, 23)]
    xs = [xs[0], xs[0] + xs[1] * 0.1, xs[0] - xs[2] * 0.1]
    p = bf16_params((1.0, 2.0))
    sequential, want = native_and_torch("multislerp", xs, p, torch.bfloat16)
    calls = []
    wide = sphere_native.streamed_wide
    monkeypatch.setattr(sphere_native, "streamed_wide", lambda *a: calls.append(1) or wide(*a))
    with compute_pool(workers):
        pooled, _ = native_and_torch("multislerp", xs, p, torch.bfloat16)
    assert len(calls) == 2  # the mean's norm and the tangent's
    assert torch.equal(pooled.view(torch.int16), sequential.view(torch.int16))
    assert torch.equal(pooled.view(torch.int16), want.view(torch.int16))
    xs[2][150_001] = float("nan")  # in a late round
    with compute_pool(workers), pytest.raises(CheckpointError, match="input 2 holds NaN"):
        native_and_torch("multislerp", xs, p, torch.bfloat16)


def test_streamed_wide_is_streamed_and_refuses_nan(monkeypatch):
    """Directly: the pooled feed equals the sequential one for both reductions, over a length
    that leaves a short last span and a short last round; a NaN read in the last round fails
    through the source (the input named)."""
    from sphere_testlib import StoredChunks

    from weightsmith.core.parallel import compute_pool
    from weightsmith.errors import CheckpointError
    from weightsmith.kernels import sphere

    monkeypatch.setattr(sphere_native, "SPAN", 1000)
    g = torch.Generator().manual_seed(43)
    n = 21_017  # exponents over 2^±24: the float sums depend on the order of the spans
    wide = torch.randn(n, generator=g) * torch.exp2(torch.randint(-24, 24, (n,), generator=g))
    xs = [wide.bfloat16(), values(n, seed=42)]
    src = StoredChunks(xs)
    kernel = lambda p, o: sphere.vector(p, False, 0, o)  # noqa: E731
    for kind in ("norm", "casc"):
        one = sphere_native.streamed(src, xs, kernel, kind, 0, src.numel)
        backwards = reduce.Reducer(kind, n, reduce.layout()[kind])
        for s in reversed(range(0, n, 1000)):
            backwards.feed(xs[0][s : s + 1000])
        if kind == "casc":  # (a norm, rounded to bfloat16, rarely shows the order)
            assert backwards.result() != one  # so the test below can tell an order change
        with compute_pool(2):
            assert sphere_native.streamed_wide(src, xs, kernel, kind) == one
    kernel = lambda p, o: sphere.vector(p, True, 1, o)  # noqa: E731
    xs[1][21_000] = float("nan")
    with compute_pool(2), pytest.raises(CheckpointError, match="input 1 holds NaN"):
        sphere_native.streamed_wide(StoredChunks(xs), xs, kernel, "norm")


def _order_sensitive(n: int, seed: int) -> torch.Tensor:
    """bfloat16 values over exponents 2^±24: their float sums depend on the order of the feed."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, generator=g) * torch.exp2(torch.randint(-24, 24, (n,), generator=g))
    ).bfloat16()


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_wide_rows_are_each_rows_streamed_sum(workers, monkeypatch):
    """multislerp's dots: one kernel making two rows per span, the pool filling spans while one
    task per row feeds that row in order: each row's sum is the sequential feed's (and row_sums
    rounds each as torch does), over a length with a short last span and a short last round; a NaN read in the
    last round fails through the source, the input named."""
    from sphere_testlib import StoredChunks

    from weightsmith.core.parallel import compute_pool
    from weightsmith.errors import CheckpointError
    from weightsmith.kernels import sphere

    monkeypatch.setattr(sphere_native, "SPAN", 1000)
    n = 21_017
    xs = [_order_sensitive(n, 44), _order_sensitive(n, 45), values(n, seed=46)]
    src = StoredChunks(xs)
    rows = [lambda p, o, k=k: sphere.vector(p, True, k, o) for k in (1, 2)]

    def both(p, o):  # row k of the span: input k+1 minus the base
        m = p[0].numel()
        return [a + b for a, b in zip(rows[0](p, o[:m]), rows[1](p, o[m:]), strict=True)]

    want = [sphere_native.streamed(src, xs, k, "casc", 0, n) for k in rows]
    assert want[0] != want[1]  # a row mix-up shows
    with compute_pool(workers):
        got = sphere_native.wide_rows(src, xs, both, "casc", 2)
    assert got == want
    with compute_pool(workers):
        fused = sphere_native.row_sums(src, xs, both, 2)
    assert [float(t) for t in fused] == [reduce.combine([v], 1) for v in want]
    xs[2][21_000] = float("nan")
    with compute_pool(workers), pytest.raises(CheckpointError, match="input 2 holds NaN"):
        sphere_native.wide_rows(StoredChunks(xs), xs, both, "casc", 2)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_stock_rows_are_the_vectors_and_unit_products(k):
    """model_stock's one-read kernel stores, row after row, what ws_sph_vector stores for each
    task vector and ws_nus_prod (unit norms) for each pair, to the bit (edge values: zeros,
    subnormals, overflowing products); more than four models are refused."""
    from test_narrow_kernels import edge_inputs

    from weightsmith.kernels import sphere

    xs = edge_inputs(k + 1, seed=50 + k)
    n = xs[0].numel()
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    out = torch.empty((k + len(pairs)) * n, dtype=torch.bfloat16)
    bad = sphere.stock_rows(xs, out)
    want_bad = [int((~torch.isfinite(x)).sum()) for x in xs]
    assert bad == want_bad
    for i in range(k):
        v = torch.empty(n, dtype=torch.bfloat16)
        sphere.vector(xs, True, i + 1, v)
        assert torch.equal(out[i * n : (i + 1) * n].view(torch.int16), v.view(torch.int16))
    for r, (i, j) in enumerate(pairs, start=k):
        p = torch.empty(n, dtype=torch.bfloat16)
        sphere.nus_prod([xs[0], xs[i + 1], xs[j + 1]], True, 1.0, 1.0, p)
        assert torch.equal(out[r * n : (r + 1) * n].view(torch.int16), p.view(torch.int16))
    with pytest.raises(ValueError, match="2 to 5 inputs"):
        sphere.stock_rows(edge_inputs(6, seed=1), torch.empty(20 * n, dtype=torch.bfloat16))


@pytest.mark.parametrize("workers", [2, 3])
def test_row_reductions_feed_each_range_of_a_row(workers, monkeypatch):
    """A row reduced in parts (a sum's per-thread ranges, cut inside spans) gives each part's
    sequential feed, beside a row reduced whole."""
    from sphere_testlib import StoredChunks

    from weightsmith.core.parallel import compute_pool
    from weightsmith.kernels import sphere

    monkeypatch.setattr(sphere_native, "SPAN", 1000)
    n = 21_017
    xs = [_order_sensitive(n, 47), _order_sensitive(n, 48)]
    src = StoredChunks(xs)
    vec = lambda p, o: sphere.vector(p, True, 1, o)  # noqa: E731

    def twice(p, o):
        m = p[0].numel()
        return [a + b for a, b in zip(vec(p, o[:m]), vec(p, o[m:]), strict=True)]

    parts = [(0, 7_777), (7_777, 15_001), (15_001, n)]  # cuts inside spans
    want = [sphere_native.streamed(src, xs, vec, "casc", lo, hi) for lo, hi in parts]
    whole = sphere_native.streamed(src, xs, vec, "norm", 0, n)
    with compute_pool(workers):
        got = sphere_native.row_reductions(src, xs, twice, [("norm", [(0, n)]), ("casc", parts)])
    assert got == [[whole], want]


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_model_stock_on_the_pool_keeps_torch_bits(k, monkeypatch):
    """model_stock's statistics come from one read of the inputs for up to four models (five:
    the per-statistic passes), here on a pool: the torch path's bits at mergekit's two threads."""
    from weightsmith.core.parallel import compute_pool

    for mod in (base_mod, sphere_native, model_stock_mod):
        monkeypatch.setattr(mod, "TORCH_THREADS", 2)
    monkeypatch.setattr(sphere_native, "SPAN", 4099)
    calls = []
    one = model_stock_mod.one_pass_ratio
    monkeypatch.setattr(model_stock_mod, "one_pass_ratio", lambda *a: calls.append(1) or one(*a))
    base = values(100_003, seed=60)
    xs = [base] + [base + values(100_003, seed=61 + i) * 0.1 for i in range(k)]
    _, want = native_and_torch("model_stock", xs, bf16_params(), torch.bfloat16)  # 2 threads
    calls.clear()
    with compute_pool(2):  # (its torch path would run single-threaded in here)
        native, _ = native_and_torch("model_stock", xs, bf16_params(), torch.bfloat16)
    assert native is not None and len(calls) == (k <= 4)
    assert torch.equal(native.view(torch.int16), want.view(torch.int16))
    assert int((native.float() != base.float()).sum()) > 1000  # not the base
