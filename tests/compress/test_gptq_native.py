"""GPTQ's native column kernel (``kernels/gptq_kernels.c``) against the eager torch loop: the
same levels, scales, zeros, loss and compensated weights, bit for bit; and the fallback."""

from __future__ import annotations

import pytest
import torch

from weightsmith import kernels
from weightsmith.compress import gptq
from weightsmith.compress.rtn import group_qparams
from weightsmith.kernels.gptq import gptq_columns, gptq_kernels


def _setup(out_f, in_f, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * torch.rand(out_f, 1, generator=g)
    x = torch.randn(2 * in_f, in_f, generator=g) @ torch.randn(in_f, in_f, generator=g)
    return w, x.t() @ x


@pytest.mark.parametrize(
    "out_f,in_f,g,act_order,sym,block",
    [
        (48, 192, 64, False, True, 128),  # dynamic groups, two blocks (the last one short)
        (48, 192, 64, True, True, 128),  # act-order: static groups in permuted order
        (33, 200, 40, False, False, 64),  # asymmetric; groups cross block boundaries
        (20, 96, -1, False, True, 128),  # per channel: one static group
        (20, 96, 32, True, False, 40),
        (150, 192, 64, True, True, 128),  # three row tiles of the kernel, the last one short
        (130, 200, 40, False, False, 64),
    ],
)
def test_native_columns_match_the_eager_loop_bitwise(out_f, in_f, g, act_order, sym, block):
    if gptq_kernels() is None:
        pytest.skip("no native GPTQ kernel here (no C compiler)")
    assert gptq._native_ok()  # the first-use check agrees
    w, h = _setup(out_f, in_f, seed=out_f + in_f)
    gg = in_f if g == -1 else g
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else None
    results = []
    for native in (False, True):
        W = w.clone() if perm is None else w[:, perm].clone()
        Hinv = gptq._inverse_cholesky(h.clone() if perm is None else h[perm][:, perm], 0.01)
        static = (None, None)
        if act_order or g == -1:
            static = group_qparams(w, 4, gg, sym, torch.bfloat16)
        grid = gptq._Grid(4, gg, sym, torch.bfloat16, None, perm)
        out = gptq._quantize_columns(W, Hinv, grid, block, *static, native=native)
        results.append((*out, W))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    assert results[0][0].abs().sum() > 0  # not a degenerate problem


def test_kernel_declines_tensors_it_cannot_take():
    W1 = torch.zeros(4, 8)
    H1 = torch.eye(8)
    sz = torch.ones(4, 1)
    grp = torch.zeros(8, dtype=torch.int64)
    out = torch.empty(4, 8)
    assert not gptq_columns(W1.t(), H1, sz, sz, grp, 0, 8, -8, 7, out, out)  # not contiguous
    assert not gptq_columns(W1.double(), H1, sz, sz, grp, 0, 8, -8, 7, out, out)
    assert not gptq_columns(W1, H1, sz, sz, grp.int(), 0, 8, -8, 7, out, out)


def test_without_kernels_the_eager_loop_gives_the_same_weight(monkeypatch):
    w, h = _setup(40, 192, seed=5)
    kw = dict(bits=4, group_size=64, symmetric=True, dtype=torch.bfloat16)
    a = gptq.gptq_quantize_weight(w, h, **kw)
    monkeypatch.setenv("WEIGHTSMITH_KERNELS", "0")
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setattr(gptq, "_native_checked", None)
    assert not gptq._native_ok()
    b = gptq.gptq_quantize_weight(w, h, **kw)
    assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale)
    assert torch.equal(a.zero, b.zero) and a.info["loss"] == b.info["loss"]


@pytest.fixture
def threads():
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


def test_rows_split_over_threads_give_the_same_bits(threads):
    # the kernel's rows are independent: 1 thread and 3 threads (3 row ranges) agree bitwise
    if gptq_kernels() is None:
        pytest.skip("no native GPTQ kernel here (no C compiler)")
    w, h = _setup(300, 192, seed=11)
    kw = dict(bits=4, group_size=64, symmetric=True, dtype=torch.bfloat16, observer="mse")
    runs = []
    for n in (1, 3):
        threads(n)
        runs.append(gptq.gptq_quantize_weight(w, h.clone(), **kw))
    a, b = runs
    assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale)
    assert a.info["loss"] == b.info["loss"]


@pytest.mark.parametrize("act_order", [False, True])
def test_inverse_factor_against_float64(act_order):
    # U upper triangular with U^T U = (H' + damp·mean(diag H)·I)^-1, H' = H permuted
    _, h = _setup(8, 300, seed=3)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else None
    U = gptq._inverse_cholesky(h.clone(), 0.1, perm)
    assert U.stride() == (1, 300)  # column-major, as the native column loop expects
    hp = h.double() if perm is None else h.double()[perm][:, perm]
    hp = hp + 0.1 * torch.diag(h).double().mean() * torch.eye(300, dtype=torch.float64)
    want = torch.linalg.cholesky(torch.linalg.inv(hp), upper=True)
    assert torch.equal(torch.triu(U), U)
    err = (U.double() - want).abs().max() / want.abs().max()
    assert err < 1e-5, err  # float32 round-off of a well-conditioned 300 x 300 factor


def test_factor_by_halves_above_the_lapack_size():
    # orders above CHOLESKY_BASE are factored by halves with matrix products: the same factor
    # as float64 within float32 round-off, and a matrix with no factor is still refused
    n = gptq.CHOLESKY_BASE * 2 + 37
    _, h = _setup(8, n, seed=9)
    perm = torch.argsort(torch.diag(h), descending=True)
    U = gptq._inverse_cholesky(h.clone(), 0.01, perm)
    assert U.stride() == (1, n) and torch.equal(torch.triu(U), U)
    hp = h.double()[perm][:, perm]
    hp = hp + 0.01 * torch.diag(h).double().mean() * torch.eye(n, dtype=torch.float64)
    want = torch.linalg.cholesky(torch.linalg.inv(hp), upper=True)
    err = (U.double() - want).abs().max() / want.abs().max()
    assert err < 1e-4, err
    bad = torch.eye(n)
    bad[n - 1, n - 1] = -1.0  # indefinite in the second half
    assert not gptq._cholesky_inverse_lower(bad.clone())
    with pytest.raises(gptq.HessianNotPositiveDefinite):
        gptq._inverse_cholesky(-torch.eye(n), 0.0)
