"""multislerp's kept rows (``sphere_native.RowCache``): the first statistics pass keeps each task
vector, the mean's pass replaces it by its unit vector, and the later passes and the output read
those rows instead of the inputs. The kernel that reads them (``ws_ms_rows``) gives
``ws_ms_pass``'s bits stage by stage (edge values included), and the method gives the same bits
with and without the rows, and the torch path's."""

from __future__ import annotations

import pytest
import torch
from sphere_testlib import native_and_torch
from test_narrow_kernels import bits, edge_inputs

from weightsmith.kernels import reduce, sphere
from weightsmith.merge.methods import sphere_native
from weightsmith.merge.methods.base import TensorParams

pytestmark = pytest.mark.skipif(
    sphere.library() is None or not reduce.expected(), reason="no C compiler for the kernels"
)

STATS = {  # bfloat16 values, as the statistics are
    "mn": 0.75,
    "c1": 0.9921875,
    "c2": 0.98046875,
    "avg": 1.5,
}


def stats_for(k: int) -> dict:
    ne = [float(torch.tensor(30.0 + 7 * i).bfloat16()) for i in range(k)]
    w = [float(torch.tensor(1.0 / (i + 2)).bfloat16()) for i in range(k)]
    dots = [float(torch.tensor(0.5 + 0.1 * i).bfloat16()) for i in range(k)]
    return {"ne": ne, "w": w, "dots": dots, **STATS}


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("has_base", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rows_kernel_gives_each_stage_of_the_pass_kernel(k, has_base, dtype):
    """From the task vectors (``sph_vector``'s rows), stage after stage on the same k + 1 rows:
    the mean, every product, the tangent and the output (the base added) are ms_pass's, to the
    bit, on zeros, subnormals and overflows; each stage leaves what the next one reads (the
    unit vectors and the mean, then the direction, then the tangent)."""
    xs = [x.to(dtype) for x in edge_inputs(k + int(has_base), seed=5 + k)]
    n, f, stats = xs[0].numel(), int(has_base), stats_for(k)
    rows = [torch.empty(n, dtype=torch.bfloat16) for _ in range(k + 1)]
    for i in range(k):
        sphere.vector(xs, has_base, f + i, rows[i])
    units = [(r.float() / ne).bfloat16() for r, ne in zip(rows[:k], stats["ne"], strict=True)]
    base = xs[0] if has_base else None
    stages = [(sphere.MEAN, torch.bfloat16, 1), (sphere.UNIT_DOT, torch.bfloat16, k)]
    stages += [(sphere.TANGENT, torch.bfloat16, 1), (sphere.OUTPUT, torch.bfloat16, 1)]
    kept = {}
    for mode, out_dtype, count in stages:
        want, got = (torch.empty(count * n, dtype=out_dtype) for _ in range(2))
        n_want, bad_want = sphere.ms_pass(xs, has_base, mode, stats, want, -1)
        if mode == sphere.OUTPUT:  # float32 too, from a copy of the rows (OUTPUT reads them)
            want32, got32 = (torch.empty(n, dtype=torch.float32) for _ in range(2))
            sphere.ms_pass(xs, has_base, mode, stats, want32)
            sphere.ms_rows([r.clone() for r in rows], base, mode, stats, got32)
            assert torch.equal(bits(got32.bfloat16()), bits(want32.bfloat16()))
            assert torch.equal(got32.isnan(), want32.isnan())
        n_got, bad_got = sphere.ms_rows(rows, base, mode, stats, got)
        assert torch.equal(bits(got), bits(want)), mode
        assert n_got == n_want
        if mode == sphere.OUTPUT and has_base:
            assert bad_got == bad_want[:1]  # the base's NaN/Inf, counted as ms_pass does
        kept[mode] = [bits(r) for r in rows]
    for i in range(k):  # the mean's stage replaced the task vectors by the unit vectors
        assert torch.equal(kept[sphere.MEAN][i], bits(units[i]))
    one = torch.empty(n, dtype=torch.bfloat16)
    sphere.ms_pass(xs, has_base, sphere.MEAN, stats, one)
    assert torch.equal(kept[sphere.MEAN][k], bits(one))  # and kept the mean
    direction = (one.float() / stats["mn"]).bfloat16()
    assert torch.equal(kept[sphere.UNIT_DOT][k], bits(direction))  # then the direction
    sphere.ms_pass(xs, has_base, sphere.TANGENT, stats, one)
    assert torch.equal(kept[sphere.TANGENT][0], bits(one))  # then the tangent
    assert int(torch.isfinite(got).sum()) > n // 2  # not all overflowed


def params(weights) -> TensorParams:
    models = tuple({"weight": w} for w in weights)
    return TensorParams("t", {}, models, has_base=True, compute_dtype=torch.bfloat16)


def inputs(k: int, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 0.02
    return [base.bfloat16()] + [
        (base + torch.randn(n, generator=g) * 0.002 * (i + 1)).bfloat16() for i in range(k)
    ]


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("workers", [1, 2])
def test_multislerp_with_and_without_rows_gives_the_same_bits(k, workers, monkeypatch):
    """The method's native path keeps its rows where they fit ``ROWS_BYTES`` and reads the
    inputs again where they do not: the same bits either way, and the torch path's; a NaN is
    refused with its input named."""
    from weightsmith.core.parallel import compute_pool
    from weightsmith.errors import CheckpointError

    monkeypatch.setattr(sphere_native, "SPAN", 4099)  # many spans and rounds
    made = []
    cache = sphere_native.RowCache
    monkeypatch.setattr(sphere_native, "RowCache", type("Counted", (cache,), {}))
    counted = sphere_native.RowCache
    monkeypatch.setattr(counted, "__init__", lambda s, *a: made.append(a) or cache.__init__(s, *a))
    xs, p = inputs(k, 60_013, seed=k), params([1.0, 2.0, 0.5][:k])
    with compute_pool(workers):
        kept, want = native_and_torch("multislerp", xs, p, torch.bfloat16)
    assert made == [(k + 1, 60_013)]
    monkeypatch.setattr(sphere_native, "ROWS_BYTES", (k + 1) * 60_013 * 2 - 1)  # 1 entry short
    with compute_pool(workers):
        again, _ = native_and_torch("multislerp", xs, p, torch.bfloat16)
    assert len(made) == 1  # not kept this time
    assert torch.equal(kept.view(torch.int16), want.view(torch.int16))
    assert torch.equal(again.view(torch.int16), want.view(torch.int16))
    assert int((kept.float() != xs[0].float()).sum()) > 10_000  # not the base
    monkeypatch.setattr(sphere_native, "ROWS_BYTES", 72 << 20)
    xs[k][59_000] = float("nan")
    with compute_pool(workers), pytest.raises(CheckpointError, match=f"input {k} holds NaN"):
        native_and_torch("multislerp", xs, p, torch.bfloat16)


def test_row_cache_buffers_come_back_to_the_pool():
    """Two caches in use hold two buffers; one collected hands its buffer (its pages faulted in
    already) to the next; rows of a size that does not fit are not offered."""
    cache = sphere_native.RowCache
    assert cache.fits(2, 1000) and not cache.fits(2, sphere_native.ROWS_BYTES // 2)
    assert not cache.fits(0, 1000)
    a, b = cache(2, 1000), cache(3, 500)
    pa, pb = a.rows[0].data_ptr(), b.rows[0].data_ptr()
    assert pa != pb and len(b.rows) == 3 and b.rows[2].numel() == 500
    assert b.rows[1].data_ptr() == pb + 1000  # rows back to back
    del a
    c = cache(2, 1000)
    assert c.rows[0].data_ptr() == pa


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("step", [1000, 4099])
def test_stock_reduce_feeds_the_rows_of_stock_rows(k, step):
    """model_stock's fused statistics: each span's rows fed to the reductions at once give what
    the whole rows fed in one piece give (norms of the task vectors, the pair sums' two parts
    split mid-span); the kept mean makes stock_out's output stock_mix's, to the bit."""
    from weightsmith.kernels import merge as native

    xs = inputs(k, 30_011, seed=40 + k)  # finite statistics (edge values: the output below)
    n, pairs = xs[0].numel(), k * (k - 1) // 2
    rows = torch.empty((k + pairs) * n, dtype=torch.bfloat16)
    sphere.stock_rows(xs, rows)
    lay = reduce.layout()
    parts = reduce.parts(n, 2)
    spec = [("norm", [(0, n)])] * k + [("casc", parts)] * pairs
    want = []
    for r, (kind, ranges) in enumerate(spec):
        row = rows[r * n : (r + 1) * n]
        got_row = []
        for lo, hi in ranges:
            red = reduce.Reducer(kind, hi - lo, lay[kind])
            red.feed(row[lo:hi])
            got_row.append(red.result())
        want.append(got_row)
    avg = torch.empty(n, dtype=torch.bfloat16)

    def run(feeds, scratch, _step):
        assert sphere.stock_reduce(xs, feeds, scratch, step, avg) == [0] * (k + 1)

    monkey_step = sphere_native.FUSED_STEP
    try:
        sphere_native.FUSED_STEP = step
        got = sphere_native.fused_reductions(spec, run)
    finally:
        sphere_native.FUSED_STEP = monkey_step
    assert got == want
    xs = edge_inputs(k + 1, seed=40 + k)  # zeros, subnormals, overflows
    n = xs[0].numel()
    avg = torch.empty(n, dtype=torch.bfloat16)
    sphere.stock_rows(xs, torch.empty((k + pairs) * n, dtype=torch.bfloat16), avg)
    t = float(torch.tensor(0.6171875).bfloat16())
    u = float(torch.tensor(1 - t).bfloat16())
    want_out, got_out = torch.empty(n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.bfloat16)
    native.stock_mix(xs, 0, torch.tensor([t]), torch.tensor([u]), 0, want_out)
    sphere.stock_out(avg, xs[0], t, u, got_out)
    assert torch.equal(bits(got_out), bits(want_out))
    assert int(torch.isfinite(got_out).sum()) > n // 2


@pytest.mark.parametrize("k", [2, 4, 5])
def test_model_stock_with_and_without_the_kept_mean_gives_the_same_bits(k, monkeypatch):
    """model_stock keeps the models' mean where it fits and reads every input again where it
    does not (or past four models, the pairwise passes): the same bits either way, and the
    torch path's (whose statistics take mergekit's two threads inside the pool too); an Inf is
    refused with its input named."""
    from weightsmith.core.parallel import compute_pool
    from weightsmith.errors import CheckpointError

    xs = inputs(k, 70_001, seed=50 + k)
    p = TensorParams(
        "t", {"filter_wise": False}, ({},) * k, has_base=True, compute_dtype=torch.bfloat16
    )
    with compute_pool(2):
        kept, want = native_and_torch("model_stock", xs, p, torch.bfloat16)
        monkeypatch.setattr(sphere_native, "ROWS_BYTES", 0)
        again, _ = native_and_torch("model_stock", xs, p, torch.bfloat16)
    assert torch.equal(kept.view(torch.int16), want.view(torch.int16))
    assert torch.equal(again.view(torch.int16), want.view(torch.int16))
    assert int((kept.float() != xs[0].float()).sum()) > 1_000  # not the base (t is small)
    monkeypatch.setattr(sphere_native, "ROWS_BYTES", 72 << 20)
    xs[1][69_000] = float("inf")
    with compute_pool(2), pytest.raises(CheckpointError, match="input 1 holds"):
        native_and_torch("model_stock", xs, p, torch.bfloat16)
