"""The native bfloat16 Karcher steps give the bits of mergekit's torch operations (the torch
steps are the reference: they are mergekit's expressions, checked against mergekit itself in
test_mergekit_parity_geometric.py)."""

from __future__ import annotations

import shutil

import pytest
import torch
from merge_testlib import assert_one_line_error, poke, run_cli, tensors

from weightsmith.core.parallel import compute_pool
from weightsmith.kernels import narrow as native
from weightsmith.merge.methods import karcher as karcher_module
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
    assert same_bits(ref.weighted_sum([x, u], [a, 1 - a]), nat.weighted_sum([x, u], [a, 1 - a]))
    terms = [(u, cos, c)]
    assert same_bits(ref.tangents(m, terms, None), nat.tangents(m, terms, t.clone()))
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
        lean = karcher_mean([x.clone() for x in xs], alphas, steps=NativeSteps(lean=True))
        assert same_bits(want, lean)


@pytest.mark.parametrize("lean", [False, True])
def test_pipelined_norms_give_the_stored_tangents_norm(monkeypatch, lean):
    """Tangent and step made span by span (here 1000 entries, so the norm's lane blocks and
    tail cross span ends) with the finished spans fed to the norm in order, on a pool of two;
    lean: the tangent never stored (its norm from span buffers, the step remaking it tile by
    tile). The bits of the whole-tensor torch steps."""
    monkeypatch.setattr(karcher_module, "SPAN", 1000)
    n = 10_013
    m = bf16_vec(n, 7)
    terms = [(bf16_vec(n, 8 + j), torch.tensor(0.25 * (j + 1), dtype=BF16),
              torch.tensor(0.4 - 0.1 * j, dtype=BF16)) for j in range(3)]  # fmt: skip
    ref, nat = TorchSteps(), NativeSteps(lean=lean)
    t_ref, n_ref = ref.tangents_normed(m, terms, None, torch.float32)
    with compute_pool(2):
        t_nat, n_nat = nat.tangents_normed(m, terms, None, torch.float32)
        assert isinstance(t_nat, karcher_module.Remade) == lean
        assert float(n_nat) == float(n_ref)
        step = n_ref * 0.3
        m_ref, s_ref = ref.step_normed(m.clone(), t_ref, step, torch.float32)
        m2 = m.clone()
        t2 = nat.tangents(m2, terms, None)
        m_nat, s_nat = nat.step_normed(m2, t2, step, torch.float32)
    assert same_bits(m_ref, m_nat) and float(s_ref) == float(s_nat)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5])
def test_fused_tangents_match_the_torch_adds(k):
    """All the terms in one native pass (tiles, units inner) give the bits of mergekit's
    zeros_like and k in-place adds, into a reused buffer of stale values; -0 terms too."""
    n = 70_001
    m = bf16_vec(n, 100)
    terms = []
    for j in range(k):
        u = bf16_vec(n, 200 + j)
        u[:50] = m[:50] * 0.5  # u − cos·m is ±0 there with cos = 0.5: signed zeros
        cos = torch.tensor(0.5 if j == 0 else 0.1 * j, dtype=BF16)
        terms.append((u, cos, torch.tensor(0.3 + 0.07 * j, dtype=BF16)))
    stale = bf16_vec(n, 999)
    got = NativeSteps().tangents(m, terms, stale)
    assert got.data_ptr() == stale.data_ptr()
    assert same_bits(TorchSteps().tangents(m, terms, None), got)


def test_norms_and_dots_match_torch_on_long_vectors():
    n = 1_000_003  # past 2^19 entries: oneDNN's K chunks
    m, u = bf16_vec(n, 5), bf16_vec(n, 6)
    ref, nat = TorchSteps(), NativeSteps()
    want, got = ref.norm(m, torch.float32), nat.norm(m, torch.float32)
    assert got.dtype == want.dtype == torch.float32 and float(got) == float(want)
    for div in (None, torch.tensor(1.37)):
        m1, want = ref.dots(m, [u, m], div)
        m2, got = nat.dots(m.clone(), [u, m], div)
        assert same_bits(m1, m2)
        for a, b in zip(want, got, strict=True):
            assert same_bits(a.reshape(1), b.reshape(1))


def test_weighted_sum_matches_the_torch_adds():
    n = 30_011
    units = [bf16_vec(n, 300 + j) for j in range(4)]
    units[1][:40] = -units[0][:40]  # terms that cancel to ±0
    weights = [0.25, 0.25, 1 / 3, 0.1]
    want = TorchSteps().weighted_sum(units, weights)
    assert same_bits(want, NativeSteps().weighted_sum(units, weights))


def test_bfloat16_output_streams_the_result_as_the_float32_output_path(tmp_path, tiny_model):
    """bfloat16 in and out: the result is handed out without reading the inputs again; it has
    the bits of the prepare/combine path (a float32 output holds the same bfloat16 values)."""
    ms = [tiny_model("llama", s, torch.bfloat16) for s in (0, 1, 2)]
    narrow, wide = tmp_path / "bf16", tmp_path / "f32"
    assert run_cli("karcher", *ms, "-o", narrow).exit_code == 0
    assert run_cli("karcher", *ms, "--dtype", "float32", "-o", wide).exit_code == 0
    a, b = tensors(narrow), tensors(wide)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == torch.bfloat16 and b[name].dtype == torch.float32
        assert same_bits(a[name].reshape(-1), b[name].bfloat16().reshape(-1)), name


def test_overflowing_result_is_a_one_line_error(tmp_path, tiny_model):
    """Inputs near the bfloat16 maximum: the norms overflow float32, so the result would hold
    Inf; nothing is written."""
    ms = []
    for s in (0, 1, 2):
        m = tmp_path / f"m{s}"
        shutil.copytree(tiny_model("llama", s, torch.bfloat16), m)
        for i in range(64):
            poke(m, "embed_tokens", 3.0e38, i)
        ms.append(m)
    out = tmp_path / "out"
    assert_one_line_error(run_cli("karcher", *ms, "-o", out), "overflow")
    assert not out.exists()


def test_nan_input_read_from_storage_is_a_one_line_error(tmp_path, tiny_model):
    """Inputs copied straight from storage are checked too: NaN in one model's weight names
    that file and tensor; nothing is written."""
    ms = [tiny_model("llama", s, torch.bfloat16) for s in (0, 1)]
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model("llama", 2, torch.bfloat16), bad)
    name = poke(bad, "mlp.up_proj", float("nan"), 5)
    out = tmp_path / "out"
    assert_one_line_error(run_cli("karcher", *ms, bad, "-o", out), name, "NaN")
    assert not out.exists()
