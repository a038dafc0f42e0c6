"""Pruning's pure functions against hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from weightsmith.compress.prune import (
    PruneConfig,
    check_sparsity,
    nm_mask,
    parse_pattern,
    row_mask,
    tensor_mask,
)
from weightsmith.compress.prune.depth import (
    drop_from_config,
    layer_importance,
    least_important,
    renumbering,
)
from weightsmith.compress.prune.magnitude import magnitude_scores
from weightsmith.compress.prune.masks import count_to_prune
from weightsmith.compress.prune.unstructured import linear_mask
from weightsmith.compress.prune.wanda import ColumnNormStat, wanda_scores
from weightsmith.compress.prune.width import channel_importance, channels_to_keep, kept_width
from weightsmith.errors import ConfigError


def test_row_mask_hand_example():
    s = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 0.7, 0.1, 0.9]])
    want = torch.tensor([[False, True, False, True], [True, False, True, False]])
    assert torch.equal(row_mask(s, 0.5), want)


def test_row_mask_exact_count_per_row_with_awkward_ratios():
    s = torch.randn(7, 100, generator=torch.Generator().manual_seed(0))
    for sparsity in (0.29, 0.3, 0.5, 0.7):  # 0.29 * 100 = 28.999999999999996 in floats
        k = round(100 * sparsity)
        m = row_mask(s, sparsity)
        assert m.sum(1).tolist() == [k] * 7
        # the pruned entries are exactly the k smallest of each row
        kth = s.sort(1).values[:, k - 1 : k]
        assert torch.equal(m, s <= kth)


def test_ties_prune_the_lower_index_first():
    s = torch.ones(1, 6)
    assert row_mask(s, 0.5).tolist() == [[True, True, True, False, False, False]]
    assert nm_mask(s, 2, 3).tolist() == [[True, True, False, True, True, False]]
    assert tensor_mask(torch.ones(2, 2), 0.5).tolist() == [[True, True], [False, False]]


def test_tensor_mask_uses_one_threshold_for_the_whole_matrix():
    s = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    # 50% of 6 = 3 smallest overall: the whole first row, none of the second
    assert tensor_mask(s, 0.5).tolist() == [[True, True, True], [False, False, False]]
    assert row_mask(s, 0.5).tolist() == [[True, False, False], [True, False, False]]


def test_nm_mask_hand_example_and_every_block():
    s = torch.tensor([[0.3, 0.1, 0.4, 0.2, 9.0, 8.0, 1.0, 7.0]])
    assert nm_mask(s, 2, 4).tolist() == [[False, True, False, True, False, False, True, True]]
    big = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    for n, m in [(2, 4), (4, 8), (1, 4)]:
        mask = nm_mask(big, n, m).view(16, -1, m)
        assert (mask.sum(-1) == n).all()
        blocks = big.view(16, -1, m)
        # every pruned score is below every kept score of its block
        assert (
            blocks.masked_fill(~mask, -math.inf).amax(-1)
            < blocks.masked_fill(mask, math.inf).amin(-1)
        ).all()
    with pytest.raises(ValueError, match="not divisible"):
        nm_mask(torch.ones(2, 6), 2, 4)


def test_wanda_hand_example_differs_from_magnitude():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    stat = ColumnNormStat(2)
    stat.add(
        torch.tensor([[6.0, 0.6]])
    )  # two batches: column norms sqrt(36+64)=10, sqrt(.36+.64)=1
    stat.add(torch.tensor([[8.0, 0.8]]))
    torch.testing.assert_close(stat.norm(), torch.tensor([10.0, 1.0]))
    scores = wanda_scores(w, stat.norm())
    torch.testing.assert_close(scores, torch.tensor([[10.0, 2.0], [30.0, 0.5]]))
    wanda = PruneConfig(method="wanda", sparsity=0.5)
    assert linear_mask(w, wanda, stat.norm()).tolist() == [[False, True], [False, True]]
    # magnitude compares the whole matrix: prunes |0.5| and |1|
    magnitude = PruneConfig(method="magnitude", sparsity=0.5)
    assert linear_mask(w, magnitude).tolist() == [[True, False], [False, True]]
    assert torch.equal(magnitude_scores(w), w.abs())


def test_wanda_mask_ignores_the_reference_scaling():
    # locuslab/wanda scales by sqrt(sum ||x||^2 / nsamples): a per-matrix constant, same masks.
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(8, 16, generator=g), torch.randn(40, 16, generator=g)
    stat = ColumnNormStat(16)
    stat.add(x)
    ref = w.abs() * torch.sqrt(x.pow(2).sum(0) / 5)[None, :]
    assert torch.equal(row_mask(wanda_scores(w, stat.norm()), 0.5), row_mask(ref, 0.5))
    assert torch.equal(nm_mask(wanda_scores(w, stat.norm()), 2, 4), nm_mask(ref, 2, 4))


def test_check_sparsity():
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 1.0, 1.0, 2.0]])
    assert check_sparsity(w, sparsity=0.25) == 3
    with pytest.raises(ValueError, match="row 1: 1 zeros < 2"):
        check_sparsity(w, sparsity=0.5)
    with pytest.raises(ValueError, match="row 1, block 0"):
        check_sparsity(w, pattern=(2, 4))
    assert check_sparsity(w, sparsity=0.375, compare="tensor") == 3
    with pytest.raises(ValueError):
        check_sparsity(w, sparsity=0.5, compare="tensor")
    assert count_to_prune(100, 0.29) == 29


def test_layer_importance_hand_example():
    h_in = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    assert layer_importance(h_in, torch.tensor([[[0.0, 1.0], [0.0, 3.0]]])) == pytest.approx(1.0)
    assert layer_importance(h_in, torch.tensor([[[2.0, 0.0], [5.0, 0.0]]])) == pytest.approx(0.0)
    # cos = 1/sqrt(2) and 1: 1 - (0.70711 + 1) / 2
    got = layer_importance(h_in, torch.tensor([[[1.0, 1.0], [2.0, 0.0]]]))
    assert got == pytest.approx(1 - (1 / math.sqrt(2) + 1) / 2, abs=1e-12)


def test_depth_helpers():
    assert least_important({0: 0.5, 1: 0.1, 2: 0.3, 3: 0.1}, 2) == [1, 3]
    assert least_important({0: 0.5, 1: 0.1, 2: 0.3, 3: 0.1}, 1) == [3]  # tie: later layer
    assert renumbering([0, 1, 2, 3], {1, 2}) == {0: 0, 3: 1}
    config = {
        "num_hidden_layers": 4,
        "layer_types": ["a", "b", "c", "d"],
        "architectures": ["X"],
        "eos": [1, 2],
    }
    new, edited = drop_from_config(config, "num_hidden_layers", {1})
    assert new == {
        "num_hidden_layers": 3,
        "layer_types": ["a", "c", "d"],
        "architectures": ["X"],
        "eos": [1, 2],
    }
    assert edited == ["num_hidden_layers", "layer_types"]


def test_channel_importance_hand_example():
    norms = torch.tensor([1.0, 2.0, 3.0])
    w_down = torch.tensor([[3.0, 0.0, 0.0], [4.0, 0.0, 1.0]])  # column norms 5, 0, 1
    scores = channel_importance(norms, w_down)
    torch.testing.assert_close(scores, torch.tensor([5.0, 0.0, 3.0]))
    assert channels_to_keep(scores, 2).tolist() == [0, 2]
    assert channels_to_keep(torch.ones(4), 2).tolist() == [0, 1]
    assert (
        kept_width(172, 0.75) == 129 and kept_width(128, 0.75) == 96 and kept_width(10, 0.01) == 1
    )


def test_channel_importance_is_the_exact_output_change():
    # Removing channel j changes the MLP output by x_j w_j^T: Frobenius norm ||x_j|| ||w_j||.
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(50, 6, generator=g), torch.randn(4, 6, generator=g)
    stat = ColumnNormStat(6)
    stat.add(x)
    scores = channel_importance(stat.norm(), w)
    for j in range(6):
        xj = x.clone()
        xj[:, j] = 0
        change = (x @ w.T - xj @ w.T).norm()
        assert scores[j].item() == pytest.approx(change.item(), rel=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="wanda", sparsity=1.0), "--sparsity must be in"),
        (dict(method="wanda", sparsity=0.5, pattern=(2, 4)), "not both"),
        (dict(method="magnitude", drop=2), "--drop does not apply"),
        (dict(method="layers"), "needs --drop N or --layers"),
        (dict(method="layers", drop=1, layers=(1,)), "needs --drop N or --layers"),
        (dict(method="layers", layers=(1, 1)), "distinct"),
        (dict(method="channels"), "needs --mlp-ratio"),
        (dict(method="channels", mlp_ratio=1.5), "--mlp-ratio must be in"),
        (dict(method="channels", mlp_ratio=0.5, ignore=("x",)), "--ignore does not apply"),
        (dict(method="nope"), "unknown method"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PruneConfig(**kwargs).validate()


def test_parse_pattern():
    assert parse_pattern("2:4") == (2, 4)
    for bad in ("2-4", "4:4", "0:4", "a:b"):
        with pytest.raises(ConfigError):
            parse_pattern(bad)
