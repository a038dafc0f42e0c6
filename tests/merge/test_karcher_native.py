"""The native bfloat16 Karcher steps give the bits of mergekit's torch operations (the torch
steps are the reference: they are mergekit's expressions, checked against mergekit itself in
test_mergekit_parity_geometric.py)."""

from __future__ import annotations

import pytest
import torch

from weightsmith.kernels import narrow as native
from weightsmith.merge.methods.karcher import NativeSteps, TorchSteps, karcher_mean

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler here")

BF16 = torch.bfloat16


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.int16), b.view(torch.int16))


def bf16_vec(n: int, seed: int, scale: float = 0.02) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * scale).to(BF16)


@pytest.mark.parametrize("seed", range(5))
def test_each_step_matches_torch(seed):
    n = 300_007
    g = torch.Generator().manual_seed(seed)
    x, u, m, t = (bf16_vec(n, seed * 4 + i) for i in range(4))
    s = torch.rand(1, generator=g).squeeze() * 3 + 1e-3  # 0-dim float32
    a = float(torch.rand(1, generator=g)) / 3
    cos = torch.clamp(torch.dot(m, u), -1.0, 1.0)
    c = a * (torch.arccos(cos) / torch.sin(torch.arccos(cos)))
    ref, nat = TorchSteps(), NativeSteps()
    assert same_bits(ref.div(x, s), nat.div(x.clone(), s))
    y1, y2 = t.clone(), t.clone()
    ref.axpy(y1, x, a)
    nat.axpy(y2, x, a)
    assert same_bits(y1, y2)
    t1, t2 = t.clone(), t.clone()
    ref.tangent(t1, u, m, cos, c)
    nat.tangent(t2, u, m, cos, c)
    assert same_bits(t1, t2)
    assert same_bits(ref.step(m, t, s), nat.step(m.clone(), t, s))
    assert same_bits(ref.scale(x, s * 0.37), nat.scale(x.clone(), s * 0.37))


@pytest.mark.parametrize("spread", [0.002, 0.05, 1.0])
def test_karcher_mean_native_equals_torch(spread):
    """Whole runs: close inputs (few iterations), far-apart ones (all ten), three and four
    inputs, one input of zeros (excluded by tol)."""
    n = 100_003
    base = bf16_vec(n, 1).float()
    for k in (3, 4):
        xs = [(base + bf16_vec(n, 10 + i).float() * spread / 0.02).to(BF16) for i in range(k)]
        if k == 4:
            xs[2] = torch.zeros(n, dtype=BF16)
        alphas = [1.0 / k] * k
        want = karcher_mean([x.clone() for x in xs], alphas)
        got = karcher_mean([x.clone() for x in xs], alphas, steps=NativeSteps())
        assert same_bits(want, got)
