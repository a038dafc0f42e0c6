"""SCE (mergekit 0.1.5's ``sce``): hand-computed select / calculate / erase (exact up to the
float32 weights), streaming independence, CLI and bad input."""

from __future__ import annotations

import pytest
import torch
from merge_testlib import assert_one_line_error, run_cli, tensors

from weightsmith.errors import ConfigError
from weightsmith.merge.methods import merge_tensors, sce_merge

T = torch.tensor


def test_weights_by_energy_and_erases_sign_conflicts():
    base = torch.zeros(4)
    m1, m2 = T([1.0, -2.0, 3.0, 0.5]), T([-3.0, 1.0, 1.0, -1.0])
    # mean δ²: 14.25/4 = 3.5625 and 12/4 = 3 -> w = 3.5625/6.5625, 3/6.5625
    # Σδ = [-2, -1, 4, -0.5]: only entry 2 has two agreeing models
    w1, w2 = 3.5625 / 6.5625, 3 / 6.5625
    expected = T([-3.0, -2.0, (3 * w1 + w2) / (w1 + w2), -1.0])
    torch.testing.assert_close(sce_merge(base, [m1, m2]), expected, rtol=0, atol=1e-6)


def test_select_topk_keeps_the_highest_variance_entries():
    base = torch.ones(4)
    m1, m2 = base + T([1.0, -2.0, 3.0, 0.5]), base + T([-3.0, 1.0, 1.0, -1.0])
    # variances ((a−b)/2)² = [4, 2.25, 1, 0.5625]; top int(4·0.5) = 2 -> entries 0 and 1
    # selected δ: [1, -2, 0, 0] and [-3, 1, 0, 0]; weights 1.25 : 2.5; Σ = [-2, -1, 0, 0]
    # entries 2, 3: every δ is 0 -> erased -> base
    out = sce_merge(base, [m1, m2], select_topk=0.5)
    torch.testing.assert_close(out, T([-2.0, -1.0, 1.0, 1.0]), rtol=0, atol=1e-6)


def test_tiny_task_vectors_get_uniform_weights():
    base = torch.zeros(2)
    m1, m2 = T([1e-4, 1e-4]), T([3e-4, -1e-4])
    # Σ mean δ² = 6e-8 < 1e-6 -> weights 1/2 each (by energy it would be 1:5 -> 2.67e-4)
    out = sce_merge(base, [m1, m2])
    torch.testing.assert_close(out, T([2e-4, 1e-4]), rtol=1e-6, atol=0)


def test_no_selected_entry_gives_the_base():
    base = T([1.0, 2.0])
    out = sce_merge(base, [base + 1, base + 1], select_topk=0.5)  # zero variance everywhere
    assert torch.equal(out, base)


def test_chunked_equals_whole():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3001, generator=g)
    models = [base + torch.randn(3001, generator=g) for _ in range(3)]
    for frac in (0.3, 1.0):
        whole = merge_tensors("sce", [base, *models], select_topk=frac)
        chunked = merge_tensors("sce", [base, *models], select_topk=frac, chunk_size=101)
        assert torch.equal(whole, chunked)


def test_bad_select_topk_is_an_error():
    with pytest.raises(ConfigError, match="select_topk must be in"):
        sce_merge(torch.zeros(2), [torch.ones(2)], select_topk=0.0)


def test_cli_equals_the_tensor_function(trio, tmp_path):
    a, b, c = trio
    r = run_cli("sce", "--base", a, b, c, "--select-topk", "0.4", "-o", tmp_path / "sce")
    assert r.exit_code == 0, r.output
    ta, tb, tc, got = tensors(a), tensors(b), tensors(c), tensors(tmp_path / "sce")
    for n in ta:
        assert torch.equal(got[n], sce_merge(ta[n], [tb[n], tc[n]], 0.4)), n


def test_cli_bad_select_topk_is_a_one_line_error(trio, tmp_path):
    a, b, _ = trio
    r = run_cli("sce", "--base", a, b, "--select-topk", "2", "-o", tmp_path / "x")
    assert_one_line_error(r, "--select-topk", "select_topk must be in (0, 1]")


@pytest.mark.parametrize("n_models", [2, 3, 5])
def test_variance_is_bit_identical_to_torch_var(n_models):
    """mergekit ranks by torch.var(unbiased=False) in float32: the same bits, so the same
    entries are selected (checked on 200k entries of mixed scales)."""
    from weightsmith.merge.methods.sce import population_variance

    g = torch.Generator().manual_seed(n_models)
    tvs = [torch.randn(200_000, generator=g) * 10.0 ** (k - 2) for k in range(n_models)]
    want = torch.var(torch.stack(tvs), dim=0, unbiased=False)
    got = population_variance([t.to(torch.float64) for t in tvs]).to(torch.float32)
    assert torch.equal(got, want)
