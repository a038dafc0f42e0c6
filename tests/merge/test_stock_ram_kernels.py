"""The native bfloat16 kernels of nearswap, ram, ramplus_tl and model_stock give the bits of
the torch narrow paths (mergekit's ops, checked against mergekit by the parity tests)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from test_narrow_kernels import N, bits, edge_inputs

import weightsmith.kernels as kernels
import weightsmith.merge.methods.base as base_mod
import weightsmith.merge.methods.model_stock as model_stock_mod
import weightsmith.merge.methods.ramplus_tl as ramplus_tl_mod
from weightsmith.core.parallel import compute_pool
from weightsmith.errors import CheckpointError
from weightsmith.kernels import merge as native
from weightsmith.merge.methods.base import TensorChunks, TensorParams, run_method, with_defaults
from weightsmith.merge.methods.model_stock import ModelStock
from weightsmith.merge.methods.nearswap import NearSwap
from weightsmith.merge.methods.ram import Ram
from weightsmith.merge.methods.ramplus_tl import RamPlusTensorLocal

pytestmark = pytest.mark.skipif(kernels.merge_kernels() is None, reason="no C compiler here")

BF16 = torch.bfloat16


def params(method, globals_: dict, k: int) -> TensorParams:
    return with_defaults(method, TensorParams("t", globals_, compute_dtype=BF16), k)


def near_threshold(xs: list[torch.Tensor], eps: float) -> list[torch.Tensor]:
    """Task-vector entries at the bfloat16 values around ``eps`` (where the comparison's
    precision decides), on a zero base, for the first 3·64 entries."""
    e = torch.tensor(eps, dtype=BF16).view(torch.int16)
    around = torch.stack([e - 1, e, e + 1]).view(BF16)
    out = [x.clone() for x in xs]
    out[0][: 3 * 64] = 0.0
    g = torch.Generator().manual_seed(3)
    for x in out[1:]:
        pick = torch.randint(0, 3, (3 * 64,), generator=g)
        x[: 3 * 64] = around[pick] * torch.where(torch.rand(3 * 64, generator=g) < 0.5, -1, 1)
    return out


@pytest.mark.parametrize("t", [0.001, 0.5, 1e-7, 3.0])
@pytest.mark.parametrize("in_dtype", [BF16, torch.float32])
def test_nearswap_kernel_equals_torch_path(t, in_dtype):
    a, b = edge_inputs(2, seed=21, scale=0.01)
    b[:5000] = a[:5000] + torch.randn(5000).to(BF16) * 1e-3  # near: swapped, partly
    xs = [a.to(in_dtype), b.to(in_dtype)]
    want = NearSwap().combine([x.float() for x in xs], None, params(NearSwap(), {"t": t}, 2), 0)
    for out_dtype in (BF16, torch.float32):
        out = torch.empty(N, dtype=out_dtype)
        bad_out, bad_in = native.nearswap(xs[0], xs[1], t, 1e-6, out)
        assert torch.equal(bits(out.to(BF16)), bits(want))
        assert bad_out == int((~torch.isfinite(want)).sum())
        assert bad_in == [int((~torch.isfinite(x)).sum()) for x in xs]
    mid = (want.float() != a.float()) & (want.float() != b.float())
    assert int(mid.sum()) > 100  # partial swaps are exercised


def test_nearswap_kernel_hand_values():
    # |a − b| = 0.5: w = bf16(bf16(1/0.5)·0.25) = 0.5, out = 0.5·1.5 + 0.5·1.0 = 1.25;
    # |a − b| = 0: w = clamp(1/1e-6 · 0.25) = 1 → b; |a − b| = 4: w = 0.0625 → 1 − ... below
    a = torch.tensor([1.0, 2.0, 0.0], dtype=BF16)
    b = torch.tensor([1.5, 2.0, 4.0], dtype=BF16)
    out = torch.empty(3, dtype=BF16)
    native.nearswap(a, b, 0.25, 1e-6, out)
    assert out.tolist() == [1.25, 2.0, 0.25]  # 0.0625·4 + 0.9375·0 = 0.25


@pytest.mark.parametrize("k", [2, 3, 5, 15])
@pytest.mark.parametrize("eps", [1e-5, 0.01, 0.0])
@pytest.mark.parametrize("in_dtype", [BF16, torch.float32])
def test_ram_kernels_equal_torch_paths(k, eps, in_dtype):
    xs = near_threshold(edge_inputs(k, seed=k, scale=0.05), max(eps, 1e-5))
    xs = [x.to(in_dtype) for x in xs]
    flt = [x.float() for x in xs]
    p = params(Ram(), {"epsilon": eps}, k)
    want = Ram().combine(flt, None, p, 0)
    out = torch.empty(N, dtype=BF16)
    bad_out, bad_in, _ = native.ram(xs, eps, native.RAM, out=out)
    assert torch.equal(bits(out), bits(want))
    assert bad_out == int((~torch.isfinite(want)).sum())
    assert bad_in == [int((~torch.isfinite(x)).sum()) for x in xs]
    # RAM+: the counts pass, then the float32 output (mergekit promotes with λ)
    rp = RamPlusTensorLocal()
    pp = params(rp, {"epsilon": eps, "r": 0.4, "alpha": 0.7}, k)
    _, _, counts = native.ram(xs, eps, native.RAMPLUS_COUNTS)
    with torch.no_grad():
        lam = rp.prepare(TensorChunks(flt, "t", chunk_size=7919), pp)
    assert torch.equal(lam, rp.lambdas(torch.tensor(counts).view(-1, 2), pp))
    assert k == 2 or float(lam.min()) > 1.0  # overlaps: every model's unique ones boosted
    want = rp.combine(flt, lam, pp, 0)
    for out_dtype in (BF16, torch.float32):
        out = torch.empty(N, dtype=out_dtype)
        bad_out, _, _ = native.ram(xs, eps, native.RAMPLUS, lam.tolist(), out)
        assert torch.equal(
            torch.nan_to_num(out.float()), torch.nan_to_num(want.to(out_dtype).float())
        )
        assert bad_out == int((~torch.isfinite(want.to(out_dtype))).sum())


def test_ram_kernel_refuses_too_many_models():
    xs = [torch.zeros(4, dtype=BF16)] * (native.RAM_MAX_MODELS + 2)
    assert native.ram(xs, 1e-5, native.RAM, out=torch.empty(4, dtype=BF16)) is None


@pytest.mark.parametrize("k", [3, 4])
@pytest.mark.parametrize("t", [0.3, -2.5, 0.0, 1.0])
@pytest.mark.parametrize("in_dtype", [BF16, torch.float32])
def test_stock_mix_kernel_equals_torch_path(k, t, in_dtype):
    xs = [x.to(in_dtype) for x in edge_inputs(k, seed=40 + k)]
    tt = torch.tensor([t], dtype=BF16)
    p = params(ModelStock(), {}, k)
    want = ModelStock().combine([x.float() for x in xs], (tt, N), p, 0)
    t_rows, u_rows = tt.float(), (1 - tt).float()
    for out_dtype in (BF16, torch.float32):
        out = torch.empty(N - 100, dtype=out_dtype)
        res = native.stock_mix([x[100:] for x in xs], 100, t_rows, u_rows, 0, out)
        assert res is not None
        assert torch.equal(bits(out.to(BF16)), bits(want[100:]))
    # filter-wise: one ratio per row of 1000 entries, the range starting mid-row
    rows = torch.linspace(-1, 2, N // 1000 + 1).to(BF16)
    want = ModelStock().combine([x.float() for x in xs], (rows, 1000), p, 0)
    out = torch.empty(N - 1234, dtype=BF16)
    native.stock_mix([x[1234:] for x in xs], 1234, rows.float(), (1 - rows).float(), 1000, out)
    assert torch.equal(bits(out), bits(want[1234:]))


def test_bf16_sub_kernel():
    x, b = edge_inputs(2, seed=9)
    out = torch.empty(N, dtype=BF16)
    assert native.bf16_sub(x, b, out) == [int((~torch.isfinite(v)).sum()) for v in (x, b)]
    assert torch.equal(bits(out), bits(x - b))
    assert native.bf16_sub(x.float(), b.float(), out) is not None
    assert torch.equal(bits(out), bits(x - b))


class StoredChunks(TensorChunks):
    """In-memory inputs that also offer the stored-tensor path (as the engine's mapped
    safetensors do): ``stored(i)`` is the input as given, flat."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        super().__init__(tensors, "t", chunk_size=30_011)
        self._stored = [t.reshape(-1) for t in tensors]

    def stored(self, i: int):
        return contextlib.nullcontext(self._stored[i])


STORED_CASES = [
    (ModelStock(), {}),
    (NearSwap(), {"t": 0.004}),
    (Ram(), {"epsilon": 1e-3}),
    (RamPlusTensorLocal(), {"epsilon": 1e-3, "r": 0.5, "alpha": 0.6}),
]


@pytest.mark.parametrize("case", range(len(STORED_CASES)))
@pytest.mark.parametrize("in_dtype", [BF16, torch.float32])
def test_stream_stored_equals_the_torch_path(case, in_dtype, monkeypatch):
    """Each method's native path over stored inputs (several output chunks, pieces on a
    compute pool) writes the bits of its torch path (prepare + combine, kernels off)."""
    method, globals_ = STORED_CASES[case]
    for mod in (base_mod, model_stock_mod, ramplus_tl_mod):  # many pieces and output chunks
        monkeypatch.setattr(mod, "NATIVE_PIECE", 1 << 12)
    k = 2 if isinstance(method, NearSwap) else 3
    xs = [x.clamp(-30, 30).to(in_dtype) for x in edge_inputs(k, seed=50 + case, scale=0.02)]
    xs = [x[: 300 * 300].reshape(300, 300) for x in xs]
    p = params(method, globals_, k)
    want = run_method(method, TensorChunks([x.float() for x in xs], "t", 7001), p)
    want = torch.cat(list(want)).to(BF16)
    with compute_pool(2):
        got = method.stream_stored(StoredChunks(xs), p, BF16)
        got = torch.cat([o.reshape(-1) for o in got])
    assert torch.equal(bits(got), bits(want))
    assert int((got.float() != xs[0].reshape(-1).float()).sum()) > 1000  # not the base


def test_stream_stored_names_the_nan_input():
    xs = edge_inputs(3, seed=1, scale=0.01)
    xs = [x.clamp(-1, 1) for x in xs]
    xs[2][77] = float("nan")
    for method, globals_ in STORED_CASES:
        if isinstance(method, NearSwap):
            continue
        p = params(method, globals_, 3)
        with pytest.raises(CheckpointError, match="input 2 holds NaN"):
            list(method.stream_stored(StoredChunks(xs), p, BF16))
