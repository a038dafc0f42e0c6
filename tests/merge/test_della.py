"""DELLA / MagPrune (mergekit 0.1.5's ``della`` / ``della_linear``): hand-computed keep
probabilities, mask and L1 rescale against a direct reference (mergekit's formula written out), statistics of the keep
decisions (4σ bounds), reproducibility, CLI and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from merge_testlib import assert_one_line_error, run_cli, tensors

from weightsmith.errors import ConfigError
from weightsmith.merge.methods import TensorParams, della_merge, merge_tensors
from weightsmith.merge.methods.dare import tensor_seed
from weightsmith.merge.methods.della import block_seed, magprune_mask, rank_probabilities

T = torch.tensor


def test_keep_probabilities_rise_linearly_with_rank():
    # ranks 1..3 -> (r − 1)/2; p = 0.5 − 0.1 + 0.2 · (r − 1)/2
    expected = T([0.4, 0.5, 0.6], dtype=torch.float64)
    torch.testing.assert_close(rank_probabilities(3, 0.5, 0.1), expected, rtol=0, atol=1e-7)
    assert float(rank_probabilities(1, 0.3, 0.2)[0]) == pytest.approx(0.3)  # one entry: density


def _reference_mask(
    rows: torch.Tensor, density: float, eps: float, seed: int, first_row: int = 0
) -> torch.Tensor:
    """mergekit's della_magprune written out for one block of rows: each entry's rank (argsort
    of the argsort) picks its probability and its draw (draws are consumed in sorted order)."""
    ranks = rows.abs().argsort(dim=1, stable=True).argsort(dim=1)
    lo_hi = torch.arange(1, rows.shape[1] + 1, dtype=torch.float32)
    probs = ((density - eps) + ((lo_hi - 1) / (lo_hi[-1] - 1)).clamp(0, 1) * 2 * eps).double()
    draws = torch.rand(
        rows.shape,
        generator=torch.Generator().manual_seed(block_seed(seed, first_row)),
        dtype=torch.float64,
    )
    return torch.gather(draws, 1, ranks) < probs[ranks]


def test_della_linear_equals_the_reference_with_rescale():
    g = torch.Generator().manual_seed(1)
    base, ft = torch.randn(40, 50, generator=g), torch.randn(40, 50, generator=g)
    out = della_merge(base, [ft], [1.0], 0.4, 0.2, linear=True, seed=3, name="w")
    delta = ft - base
    mask = _reference_mask(delta, 0.4, 0.2, tensor_seed(3, "w", 0))
    scale = float(
        delta.abs().sum(dtype=torch.float64) / (delta * mask).abs().sum(dtype=torch.float64)
    )
    want = base + delta * mask * torch.tensor(scale, dtype=torch.float32)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


def test_rows_run_along_dim_one_for_1d_and_3d_tensors():
    g = torch.Generator().manual_seed(2)
    delta = torch.randn(3, 5, 4, generator=g)
    mask = magprune_mask(delta.reshape(-1), (3, 5, 4), 0.5, 0.3, seed=9)
    moved = _reference_mask(delta.movedim(1, -1).reshape(-1, 5), 0.5, 0.3, 9)
    assert torch.equal(mask, moved.view(3, 4, 5).movedim(-1, 1).reshape(-1))
    flat = torch.randn(30, generator=g)
    want = _reference_mask(flat.view(1, -1), 0.5, 0.3, 9).view(-1)
    assert torch.equal(magprune_mask(flat, (30,), 0.5, 0.3, seed=9), want)


def test_keep_rate_follows_the_magnitude_rank():
    """density 0.5, epsilon 0.3 on 400 rows of 1000: the lowest tenth of each row is kept
    with p ≈ 0.23, the highest with ≈ 0.77 (each ± 4σ over 40k draws), 0.5 overall."""
    g = torch.Generator().manual_seed(4)
    delta = torch.randn(400, 1000, generator=g)
    keep = magprune_mask(delta.reshape(-1), (400, 1000), 0.5, 0.3, seed=11).view(400, 1000)
    rank = delta.abs().argsort(dim=1).argsort(dim=1)
    for lo, expected in ((0, 0.2 + 0.6 * 49.5 / 999), (900, 0.2 + 0.6 * 949.5 / 999)):
        sel = keep[(rank >= lo) & (rank < lo + 100)].float()
        assert abs(float(sel.mean()) - expected) < 4 * math.sqrt(0.25 / sel.numel())
    assert abs(float(keep.float().mean()) - 0.5) < 4 * math.sqrt(0.25 / keep.numel())


def test_della_elects_signs_and_normalizes():
    base = torch.zeros(2, 3)
    m1, m2 = T([[1.0, -2.0, 3.0], [1, 1, 1]]), T([[-3.0, 1.0, 1.0], [2, 2, 2]])
    # density 1: no pruning, so della is TIES without trimming (normalize on by default)
    assert torch.equal(della_merge(base, [m1, m2], [1, 1], 1.0),
                       T([[-3.0, -2.0, 2.0], [1.5, 1.5, 1.5]]))  # fmt: skip
    lin = della_merge(base, [m1, m2], [1, 1], 1.0, linear=True)
    assert torch.equal(lin, T([[-2.0, -1.0, 4.0], [3, 3, 3]]))  # normalize off


def test_reproducible_and_independent_of_chunking():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(30, 70, generator=g)
    models = [torch.randn(30, 70, generator=g) for _ in range(2)]
    params = TensorParams(
        "w",
        {"normalize": True, "rescale": True, "lambda": 1.0, "seed": 2},
        ({"weight": 1.0, "density": 0.3, "epsilon": 0.1},) * 2,
    )
    whole = merge_tensors("della", [base, *models], params)
    assert torch.equal(whole, merge_tensors("della", [base, *models], params, chunk_size=97))
    other = TensorParams("w", {**params.globals, "seed": 3}, params.models)
    assert not torch.equal(whole, merge_tensors("della", [base, *models], other))


def test_epsilon_outside_the_unit_interval_is_an_error_naming_the_model():
    params = TensorParams(
        "w",
        {"seed": 0},
        (
            {"weight": 1.0, "density": 0.5, "epsilon": 0.1},
            {"weight": 1.0, "density": 0.9, "epsilon": 0.15},
        ),
        ("ft-a", "ft-b"),
    )
    with pytest.raises(ConfigError, match=r"epsilon 0.15 with density 0.9 for ft-b"):
        merge_tensors("della", [torch.zeros(3)] * 3, params)
    # density 1 prunes nothing, so any epsilon is fine (as mergekit)
    assert torch.equal(della_merge(torch.zeros(2), [torch.ones(2)], [1.0], 1.0, 0.9), torch.ones(2))
    with pytest.raises(ConfigError, match="density must be in"):
        della_merge(torch.zeros(2), [torch.ones(2)], [1.0], 0.0)


def test_cli_equals_the_tensor_function(trio, tmp_path):
    a, b, c = trio
    out = tmp_path / "della"
    r = run_cli("della", "--base", a, b, c, "--density", "0.6", "--epsilon", "0.2",
                "--seed", "4", "--linear", "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    ta, tb, tc, got = tensors(a), tensors(b), tensors(c), tensors(out)
    for n in ta:
        want = della_merge(ta[n], [tb[n], tc[n]], [1.0, 1.0], 0.6, 0.2, linear=True, seed=4, name=n)
        assert torch.equal(got[n], want), n


def test_cli_bad_epsilon_is_a_one_line_error(trio, tmp_path):
    a, b, _ = trio
    r = run_cli(
        "della", "--base", a, b, "--density", "0.5", "--epsilon", "0.6", "-o", tmp_path / "x"
    )
    assert_one_line_error(r, "epsilon 0.6 with density 0.5", str(b))
    assert not (tmp_path / "x").exists()


def test_recipe_with_bad_epsilon_is_a_one_line_error(trio, tmp_path):
    import yaml

    a, b, _ = trio
    recipe = {
        "merge_method": "della_linear",
        "base_model": str(a),
        "models": [{"model": str(b), "parameters": {"weight": 1.0, "density": [0.2, 0.5]}}],
        "parameters": {"epsilon": 0.25},
    }
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    r = run_cli("run", tmp_path / "r.yml", "-o", tmp_path / "x")
    assert_one_line_error(r, "della_linear: epsilon 0.25 with density 0.2", str(b))
    assert not (tmp_path / "x").exists()


def test_blocks_give_the_same_mask_on_any_number_of_threads(monkeypatch):
    from weightsmith.core.parallel import compute_pool
    from weightsmith.merge.methods import della as della_module

    monkeypatch.setattr(della_module, "BLOCK", 64)  # 32 blocks of 2 rows of 32
    delta = torch.randn(64, 32, generator=torch.Generator().manual_seed(6)).reshape(-1)
    serial = magprune_mask(delta, (64, 32), 0.5, 0.2, seed=1)
    with compute_pool(3):
        assert torch.equal(magprune_mask(delta, (64, 32), 0.5, 0.2, seed=1), serial)
    # the second block draws from its own generator (block_seed(1, 2))
    want = _reference_mask(delta.view(64, 32)[2:4], 0.5, 0.2, 1, first_row=2)
    assert torch.equal(serial.view(64, 32)[2:4], want)


def test_shared_vocabulary_rows_with_tokenizer_source_base(trio, tmp_path):
    """Rows are mapped by token first (both tokenizers have the same 300 tokens; the base's
    padding rows past them are dropped, as mergekit does), then ranked whole."""
    from weightsmith.testing import build_tiny_model

    a = trio[0]
    small = build_tiny_model(tmp_path / "small", "llama", seed=1, vocab_size=300)
    out = tmp_path / "out"
    r = run_cli("della", "--base", a, small, "--density", "0.5", "--epsilon", "0.2",
                "--tokenizer-source", "base", "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    ta, ts, to = tensors(a), tensors(small), tensors(out)
    for n in ("lm_head.weight", "model.embed_tokens.weight"):
        want = della_merge(ta[n][:300], [ts[n]], [1.0], 0.5, 0.2, name=n)
        assert torch.equal(to[n], want), n


@pytest.mark.parametrize("shape", [(50, 300), (7000,)])
def test_streamed_rows_equal_the_whole_tensor(shape, monkeypatch):
    """Chunks that cut rows (97 elements) are carried over: same mask and rescale factor as
    ranking the whole task vector, with several blocks."""
    from weightsmith.merge.methods import della as della_module
    from weightsmith.merge.methods.base import TensorChunks

    monkeypatch.setattr(della_module, "BLOCK", 1000)
    g = torch.Generator().manual_seed(7)
    base, ft = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    cols = shape[-1]
    src = TensorChunks([base, ft], "w", chunk_size=97)
    mask, scale = della_module.magprune_stream(src, 0, cols, 0.4, 0.2, seed=5)
    assert torch.equal(mask, magprune_mask((ft - base).reshape(-1), shape, 0.4, 0.2, seed=5))
    whole = della_module._magprune_memory((ft - base).reshape(-1), shape, 0.4, 0.2, 5)[1]
    assert scale == whole
