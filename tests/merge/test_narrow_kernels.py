"""The native bfloat16 linear / task-arithmetic kernel gives the torch narrow path's bits."""

from __future__ import annotations

import pytest
import torch

import weightsmith.kernels as kernels
from weightsmith.kernels import merge as native
from weightsmith.merge.methods.base import TensorChunks, TensorParams, with_defaults
from weightsmith.merge.methods.linear import Linear, mergekit_linear
from weightsmith.merge.methods.multislerp import MultiSlerp
from weightsmith.merge.methods.nuslerp import NuSlerp, vectors
from weightsmith.merge.methods.slerp import (
    MERGEKIT_CHUNK,
    mergekit_coefficients,
    streamed_mergekit_coefficients,
)
from weightsmith.merge.methods.task_arithmetic import TaskArithmetic, narrow_task_arithmetic_args

pytestmark = pytest.mark.skipif(kernels.merge_kernels() is None, reason="no C compiler here")

N = 100_003  # not a multiple of any vector width: torch's scalar tails are covered too


def edge_inputs(k: int, seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    """k bfloat16 tensors: normal values near each other (cancellation), exact zeros of both
    signs, subnormals, large values whose sums and products overflow, repeated values."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(N, generator=g) * scale
    out = []
    for i in range(k):
        x = base + torch.randn(N, generator=g) * 0.01 * (i + 1)
        r = torch.rand(N, generator=g)
        x[r < 0.05] = 0.0
        x[(r >= 0.05) & (r < 0.08)] = -0.0
        x[(r >= 0.08) & (r < 0.10)] = 1e-39 * (i - 1.5)  # subnormal in float32 and bfloat16
        x[(r >= 0.10) & (r < 0.11)] = 3e38 * (1 if i % 2 else -1)  # near bfloat16's max
        x[(r >= 0.11) & (r < 0.13)] = 0.0078125
        out.append(x.to(torch.bfloat16))
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bfloat16 bit patterns, every NaN as one pattern (a NaN output is an overflow error:
    nothing is written, and torch's NaN sign bits differ between its code paths)."""
    b = t.contiguous().view(torch.int16).clone()
    b[torch.isnan(t)] = 0x7FC0
    return b


def params(globals_: dict, weights: list[float], method, k: int) -> TensorParams:
    p = TensorParams(
        "t", globals_, tuple({"weight": w} for w in weights), compute_dtype=torch.bfloat16
    )
    return with_defaults(method, p, k)


WEIGHTS = [[1.0, 1.0], [0.3, 0.7], [-1.7, 2.9, 0.001], [0.5, 0.25, 0.125, 3.0, -0.6], [1e-9, 1]]


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
def test_linear_kernel_equals_mergekit_linear(weights, normalize, in_dtype):
    xs = [x.to(in_dtype) for x in edge_inputs(len(weights), seed=len(weights))]
    if in_dtype == torch.float32:  # float32 inputs are rounded to bfloat16 first
        xs = [x + torch.randn(N) * 1e-4 for x in xs]
    p = params({"normalize": normalize}, weights, Linear(), len(weights))
    want = mergekit_linear([x.float() for x in xs], weights, p)
    for out_dtype in (torch.bfloat16, torch.float32):
        out = torch.empty(N, dtype=out_dtype)
        w32 = torch.tensor(weights, dtype=torch.float32)
        div = float(w32.sum()) if normalize else None
        res = native.narrow_mix(xs, native.LINEAR, w32.tolist(), div, None, out)
        assert res is not None
        bad_out, bad_in = res
        exact = torch.nan_to_num(out.to(torch.bfloat16).float())
        assert torch.equal(torch.nan_to_num(out.float()), exact)  # float32 out: bfloat16 values
        assert torch.equal(bits(out.to(torch.bfloat16)), bits(want))
        assert bad_out == int((~torch.isfinite(want)).sum())
        assert bad_in == [int((~torch.isfinite(x)).sum()) for x in xs]


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("lam", [1.0, 0.3, 1.7])
def test_task_arithmetic_kernel_equals_torch_narrow_path(weights, normalize, lam):
    xs = edge_inputs(len(weights) + 1, seed=7 * len(weights))
    p = params({"normalize": normalize, "lambda": lam}, weights, TaskArithmetic(), len(xs))
    want = TaskArithmetic().combine([x.float() for x in xs], None, p, 0)
    w, div, scale = narrow_task_arithmetic_args(p)
    out = torch.empty(N, dtype=torch.bfloat16)
    res = native.narrow_mix(xs, native.TASK_ARITHMETIC, w, div, scale, out)
    assert res is not None
    assert torch.equal(bits(out), bits(want))
    assert res[0] == int((~torch.isfinite(want)).sum()) > 0


def test_kernel_refuses_mixed_dtypes_and_counts_nan_inputs():
    a = torch.tensor([1.0, float("nan"), 2.0], dtype=torch.bfloat16)
    b = torch.tensor([float("inf"), 1.0, float("-inf")], dtype=torch.bfloat16)
    out = torch.empty(3, dtype=torch.bfloat16)
    assert native.narrow_mix([a, b.float()], native.LINEAR, [1.0, 1.0], None, None, out) is None
    bad_out, bad_in = native.narrow_mix([a, b], native.LINEAR, [1.0, 1.0], None, None, out)
    assert bad_in == [1, 2] and bad_out == 3
    # hand-computed: 0.5·3 + 0.25·(−2) = 1.0, divided by 0.75 = 1.3333 → bfloat16 1.3359375
    x, y = torch.tensor([3.0], dtype=torch.bfloat16), torch.tensor([-2.0], dtype=torch.bfloat16)
    for dtype in (torch.float32, torch.bfloat16):
        one = torch.empty(1, dtype=dtype)
        native.narrow_mix([x, y], native.LINEAR, [0.5, 0.25], 0.75, None, one)
        assert one.item() == 1.3359375


@pytest.mark.parametrize("chunk", [None, 1 << 20, 3 << 19, 4 << 20])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_streamed_slerp_statistics_equal_the_whole_tensor_ones(chunk, dtype):
    """mergekit's norms and dot from 1M-element pieces, streamed from chunks of any size (also
    not a multiple of the piece), give the bits of the whole-tensor computation."""
    n = 3 * MERGEKIT_CHUNK + 12_345
    g = torch.Generator().manual_seed(5)
    a = (torch.randn(n, generator=g) * 3).to(dtype)
    b = (a.float() * 0.8 + torch.randn(n, generator=g)).to(dtype)
    whole_ab = [x.to(torch.bfloat16).float() for x in (a, b)]
    for t in (0.3, 0.5):
        want = mergekit_coefficients(*whole_ab, t)
        got = streamed_mergekit_coefficients(TensorChunks([a, b], "t", chunk), torch.bfloat16, t)
        for w, x in zip(want, got, strict=True):
            assert torch.equal(w.view(torch.int32), x.view(torch.int32))
        assert 0.0 < float(got[0]) < 1.0 and not torch.equal(got[0], torch.tensor(1 - t))


def _old_nuslerp(v0: torch.Tensor, v1: torch.Tensor, t: float) -> tuple:
    """nuslerp's statistics as mergekit writes them (out of place), the reference."""

    def unit(x):
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(colinear, 0, cos))
    return torch.sin((1 - t) * theta), torch.sin(t * theta), torch.sin(theta), colinear


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.int8), b.reshape(-1).view(torch.int8)
    )


@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_statistics_in_place_keep_mergekit_bits(flatten, row_wise, with_base):
    """Task vectors subtracted chunk by chunk and the unit vectors written in place give the
    bits of mergekit's whole-tensor expressions (chunks not aligned to rows)."""
    xs = edge_inputs(3, seed=11, scale=0.1)  # no overflow: NaN-free statistics to compare
    xs = [x.clamp(-1e3, 1e3)[: 263 * 380].reshape(263, 380) for x in xs]
    shape = tuple(xs[0].shape)
    p = TensorParams(
        "t",
        {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise},
        ({"weight": 0.3}, {"weight": 0.6}),
        has_base=with_base,
        compute_dtype=torch.bfloat16,
    )
    inputs = xs if with_base else xs[1:]
    got = NuSlerp().prepare(TensorChunks(inputs, "t", chunk_size=10_007), p)
    v0, v1 = (x - xs[0] for x in xs[1:]) if with_base else xs[1:]
    v0, mode, _ = vectors(v0, shape, flatten, row_wise)
    v1, _, _ = vectors(v1, shape, flatten, row_wise)
    want = _old_nuslerp(v0, v1, 2 / 3)
    if mode == "mod":
        want = tuple(c.transpose(0, -1) for c in want)
    for w, g in zip(want, (got.a, got.b, got.sin, got.colinear), strict=True):
        assert _same(w.reshape(-1), g)
    assert float(got.sin.float().abs().max()) > 0.01  # not all colinear


def _old_sphere_stats(v: torch.Tensor, weights: torch.Tensor, eps: float) -> tuple:
    """multislerp's statistics as mergekit writes them (out of place), the reference."""
    w = weights.view(-1, 1)
    norms = torch.norm(v, dim=-1, keepdim=True)
    unit = v / (norms + eps)
    mean = (unit * w).sum(0)
    mean_norm = torch.norm(mean)
    mean = mean / mean_norm
    dots = (unit * mean).sum(-1, keepdim=True)
    tangent = ((unit - dots * mean) * w).sum(0)
    return norms, mean_norm, dots, torch.norm(tangent) + eps, (norms.squeeze(-1) * weights).sum()


@pytest.mark.parametrize("with_base", [True, False])
def test_multislerp_statistics_in_one_buffer_keep_mergekit_bits(with_base):
    xs = [x.clamp(-1e3, 1e3) for x in edge_inputs(4, seed=13, scale=0.1)]
    weights = [0.2, 0.5, 0.3]
    p = TensorParams(
        "t",
        {"normalize_weights": True, "eps": 1e-8},
        tuple({"weight": w} for w in weights),
        has_base=with_base,
        compute_dtype=torch.bfloat16,
    )
    inputs = xs if with_base else xs[1:]
    got = MultiSlerp().prepare(TensorChunks(inputs, "t", chunk_size=30_011), p)
    v = torch.stack(xs[1:])
    if with_base:
        v = v - xs[0]
    w = torch.tensor(weights, dtype=torch.bfloat16)
    want = _old_sphere_stats(v, w / w.sum(), 1e-8)
    fields = (got.norms, got.mean_norm, got.dots, got.tangent_norm, got.avg_norm)
    for a, b in zip(want, fields, strict=True):
        assert _same(a, b)
    assert 0.0 < float(got.mean_norm) < 1.0
