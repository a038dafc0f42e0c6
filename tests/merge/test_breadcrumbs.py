"""Model Breadcrumbs (mergekit 0.1.5's ``breadcrumbs`` / ``breadcrumbs_ties``): hand-computed
masks and merges (exact), streaming independence, CLI and bad input."""

from __future__ import annotations

import pytest
import torch
from merge_testlib import assert_one_line_error, run_cli, tensors

from weightsmith.errors import ConfigError
from weightsmith.merge.methods import TensorParams, breadcrumbs_merge, merge_tensors
from weightsmith.merge.methods.breadcrumbs import band_counts

T = torch.tensor


def test_band_counts_follow_mergekits_index_ranges():
    # n = 10, density 0.5, gamma 0.2: keep ascending ranks [3, 8) -> top 7 minus top 2
    assert band_counts(10, 0.5, 0.2) == (7, 2)
    # density + gamma > 1: fewer outliers dropped (n_bot = 0): top 10 minus top 2
    assert band_counts(10, 0.8, 0.5) == (10, 2)
    assert band_counts(10, 0.5, 0.0) == (5, 0)  # no outliers: plain top-k


def test_drops_outliers_and_smallest():
    delta = torch.arange(1.0, 11.0) * T([1, -1] * 5)
    out = breadcrumbs_merge(torch.zeros(10), [delta], [1.0], density=0.5, gamma=0.2)
    assert torch.equal(out, T([0, 0, 0, -4, 5, -6, 7, -8, 0, 0.0]))


def test_density_plus_gamma_over_one_keeps_the_smallest():
    delta = torch.arange(1.0, 11.0)
    out = breadcrumbs_merge(torch.ones(10), [1 + delta], [1.0], density=0.8, gamma=0.5)
    assert torch.equal(out, 1 + T([1, 2, 3, 4, 5, 6, 7, 8, 0, 0.0]))


def test_density_one_keeps_everything_even_with_gamma():
    delta = torch.arange(1.0, 11.0)
    assert torch.equal(breadcrumbs_merge(torch.zeros(10), [delta], [1.0], 1.0, 0.3), delta)


def test_density_below_one_entry_drops_the_task_vector():
    base = T([0.5, -0.5, 1.0, 2.0])
    # int(0.2 · 4) = 0 entries kept: mergekit's mask is empty, the output is the base
    assert torch.equal(breadcrumbs_merge(base, [base + 1], [1.0], 0.2, 0.0), base)


def test_rescale_matches_the_l1_norm():
    delta = torch.arange(1.0, 11.0)
    out = breadcrumbs_merge(torch.zeros(10), [delta], [1.0], 0.5, 0.2, rescale=True)
    # kept 4..8 (L1 30) of an L1 of 55: factor 55/30 (float32)
    factor = float(torch.tensor(55 / 30, dtype=torch.float32))
    expected = T([0, 0, 0, 4, 5, 6, 7, 8, 0, 0.0]) * factor
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_breadcrumbs_ties_elects_signs_on_the_trimmed_vectors():
    base = torch.zeros(4)
    m1, m2 = T([1.0, -2.0, 3.0, 4.0]), T([-3.0, 1.0, 1.0, -0.5])
    # density 0.75, gamma 0.25 on 4 entries: each drops its largest |δ| (4 and -3)
    # -> [1, -2, 3, 0] and [0, 1, 1, -0.5]; Σ = [1, -1, 4, -0.5]
    lin = breadcrumbs_merge(base, [m1, m2], [1, 1], 0.75, 0.25)
    assert torch.equal(lin, T([1.0, -1.0, 4.0, -0.5]))
    ties = breadcrumbs_merge(base, [m1, m2], [1, 1], 0.75, 0.25, ties=True)
    assert torch.equal(ties, T([1.0, -2.0, 4.0, -0.5]))  # 1 of m2 at index 1 disagrees
    norm = breadcrumbs_merge(base, [m1, m2], [1, 1], 0.75, 0.25, ties=True, normalize=True)
    assert torch.equal(norm, T([1.0, -2.0, 2.0, -0.5]))  # index 2: two agreeing weights


def test_ties_at_the_cuts_keep_exactly_the_target_count():
    delta = T([1.0, 1, 1, 1, 2, 2, 2, 2])
    out = breadcrumbs_merge(torch.zeros(8), [delta], [1.0], 0.5, 0.25)
    assert int((out != 0).sum()) == 4  # int(0.5 · 8)
    assert torch.equal(out, T([1.0, 1, 0, 0, 0, 0, 2, 2]))  # ties cut in storage order


def test_chunked_equals_whole():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3001, generator=g)
    models = [base + torch.randn(3001, generator=g).round(decimals=1) for _ in range(2)]
    params = TensorParams(
        "w",
        {"normalize": True, "rescale": True, "lambda": 0.7},
        (
            {"weight": 1.0, "density": 0.4, "gamma": 0.05},
            {"weight": 0.3, "density": 0.7, "gamma": 0.1},
        ),
    )
    for method in ("breadcrumbs", "breadcrumbs_ties"):
        whole = merge_tensors(method, [base, *models], params)
        assert torch.equal(whole, merge_tensors(method, [base, *models], params, chunk_size=77))


def test_torch_cuts_equal_the_native_radix_selection(monkeypatch):
    """Without the native kernels the cuts come from topk_threshold on |δ|: same output."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(5000, generator=g)
    models = [base + torch.randn(5000, generator=g).round(decimals=1) for _ in range(2)]
    native = breadcrumbs_merge(base, models, [1.0, 0.5], 0.3, 0.05, rescale=True)
    monkeypatch.setenv("WEIGHTSMITH_KERNELS", "0")
    assert torch.equal(breadcrumbs_merge(base, models, [1.0, 0.5], 0.3, 0.05, rescale=True), native)


def test_bad_parameters_are_errors():
    with pytest.raises(ConfigError, match="density must be in"):
        breadcrumbs_merge(torch.zeros(3), [torch.ones(3)], [1.0], 0.0)
    with pytest.raises(ConfigError, match="gamma must be in"):
        breadcrumbs_merge(torch.zeros(3), [torch.ones(3)], [1.0], 0.5, gamma=-0.1)


def test_cli_equals_the_tensor_function(trio, tmp_path):
    a, b, c = trio
    out = tmp_path / "bc"
    r = run_cli("breadcrumbs", "--base", a, b, c, "--density", "0.5", "--gamma", "0.1",
                "--weights", "1,0.5", "--ties", "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    ta, tb, tc, got = tensors(a), tensors(b), tensors(c), tensors(out)
    for n in ta:
        want = breadcrumbs_merge(ta[n], [tb[n], tc[n]], [1.0, 0.5], 0.5, 0.1, ties=True)
        assert torch.equal(got[n], want), n


def test_cli_bad_density_is_a_one_line_error(trio, tmp_path):
    a, b, _ = trio
    r = run_cli("breadcrumbs", "--base", a, b, "--density", "1.5", "-o", tmp_path / "x")
    assert_one_line_error(r, "--density", "density must be in (0, 1]")
    assert not (tmp_path / "x").exists()
