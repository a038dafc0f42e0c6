"""GPTQ's factorization cache: a Linear whose Hessian is the very same matrix as the previous
one's (q/k/v, gate/up) reuses its dead columns, act-order permutation and inverse factor; the
result must be bit-identical to factorizing again, and a different Hessian must not hit."""

from __future__ import annotations

import pytest
import torch

from weightsmith.compress import gptq


def _problem(seed: int, in_f: int = 96):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * in_f, in_f, generator=g)
    x[:, 5] = 0  # a dead input
    return x.t() @ x, [torch.randn(24, in_f, generator=g) for _ in range(3)]


@pytest.mark.parametrize("act_order", [False, True])
def test_shared_hessians_factorize_once_with_the_same_bits(monkeypatch, act_order):
    h, ws = _problem(3)
    kw = dict(bits=4, group_size=32, symmetric=True, dtype=torch.bfloat16, act_order=act_order)
    calls = []
    real = gptq._factor
    monkeypatch.setattr(gptq, "_factor", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(gptq, "_FACTORS", gptq._FactorCache())
    cached = [gptq.gptq_quantize_weight(w, h.clone(), overwrite_hessian=True, **kw) for w in ws]
    assert len(calls) == 1  # one factorization for the three copies
    monkeypatch.setattr(gptq._FactorCache, "MAX_BYTES", 0)  # no cache: each factorizes
    monkeypatch.setattr(gptq, "_FACTORS", gptq._FactorCache())
    fresh = [gptq.gptq_quantize_weight(w, h.clone(), **kw) for w in ws]
    assert len(calls) == 4
    for a, b in zip(cached, fresh, strict=True):
        assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale)
        assert a.info["loss"] == b.info["loss"]
    assert torch.all(cached[0].q[:, 5] == 0)  # the dead column was zeroed


def test_a_different_hessian_or_setting_factorizes_again(monkeypatch):
    h, (w, *_) = _problem(4)
    calls = []
    real = gptq._factor
    monkeypatch.setattr(gptq, "_factor", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(gptq, "_FACTORS", gptq._FactorCache())
    kw = dict(bits=4, group_size=32, symmetric=True)
    gptq.gptq_quantize_weight(w, h, **kw)
    h2 = h.clone()
    h2[7, 7] += 1e-3  # one entry differs
    gptq.gptq_quantize_weight(w, h2, **kw)
    gptq.gptq_quantize_weight(w, h2, damp=0.05, **kw)
    gptq.gptq_quantize_weight(w, h2, damp=0.05, act_order=True, **kw)
    assert len(calls) == 4
    gptq.gptq_quantize_weight(w, h2, damp=0.05, act_order=True, **kw)
    assert len(calls) == 4
    assert torch.equal(h2[7], h[7] + torch.eye(96)[7] * 1e-3)  # the caller's copy is kept
