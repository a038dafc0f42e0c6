"""Hand-computed expectations for every merge formula (tolerances stated per test)."""

from __future__ import annotations

import math

import pytest
import torch

from weightsmith.errors import ConfigError
from weightsmith.merge.methods import (
    MERGE_METHODS,
    TensorParams,
    dare_merge,
    linear_merge,
    merge_tensors,
    slerp_merge,
    task_arithmetic_merge,
    ties_merge,
)
from weightsmith.merge.methods.slerp import slerp_coefficients
from weightsmith.merge.methods.ties import kth_largest, topk_threshold

T = torch.tensor


def test_registry_has_the_mergekit_names():
    assert {"linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties"} <= set(
        MERGE_METHODS
    )


# ---------------------------------------------------------------------- linear
def test_linear_normalized_weighted_mean():
    a, b = T([1.0, 2.0]), T([3.0, 6.0])
    # (1*a + 3*b) / 4 = [10/4, 20/4]
    assert torch.equal(linear_merge([a, b], [1.0, 3.0]), T([2.5, 5.0]))


def test_linear_without_normalize_is_the_weighted_sum():
    a, b = T([1.0, 2.0]), T([3.0, 6.0])
    assert torch.equal(linear_merge([a, b], [0.5, 0.5], normalize=False), T([2.0, 4.0]))
    assert torch.equal(linear_merge([a, b], [2.0, 1.0], normalize=False), T([5.0, 10.0]))


def test_linear_zero_weight_sum_is_an_error():
    with pytest.raises(ConfigError, match="sum to 0"):
        linear_merge([T([1.0]), T([2.0])], [1.0, -1.0])


# ---------------------------------------------------------------------- slerp
def test_slerp_orthogonal_unit_vectors():
    # theta = pi/2: s0 = s1 = sin(pi/4) / 1 at t = 0.5
    out = slerp_merge(T([1.0, 0.0]), T([0.0, 1.0]), 0.5)
    assert torch.allclose(out, T([math.sqrt(0.5)] * 2), atol=1e-7)


def test_slerp_interpolates_the_angle_and_keeps_original_magnitudes():
    # a = [2, 0], b = [0, 1]: the angle comes from the directions, coefficients apply to
    # the original vectors (mergekit): s0 = sin(2/3·π/2), s1 = sin(1/3·π/2) at t = 1/3.
    out = slerp_merge(T([2.0, 0.0]), T([0.0, 1.0]), 1 / 3)
    expected = T([2 * math.sin(math.pi / 3), math.sin(math.pi / 6)])
    assert torch.allclose(out, expected, atol=1e-6)


def test_slerp_endpoints():
    a, b = torch.randn(10, generator=torch.Generator().manual_seed(0)), torch.randn(10)
    assert torch.allclose(slerp_merge(a, b, 0.0), a, atol=1e-6)
    assert torch.allclose(slerp_merge(a, b, 1.0), b, atol=1e-6)


def test_slerp_colinear_falls_back_to_lerp():
    a, b = T([1.0, 2.0]), T([2.0, 4.0])  # cos = 1
    assert torch.equal(slerp_merge(a, b, 0.25), T([1.25, 2.5]))
    c = slerp_coefficients(0.25, dot=10.0, norm_a=math.sqrt(5), norm_b=math.sqrt(20))
    assert c.colinear and (c.s0, c.s1) == (0.75, 0.25)


def test_slerp_opposite_vectors_fall_back_to_lerp():
    a = T([1.0, -3.0])
    assert torch.equal(slerp_merge(a, -a, 0.5), T([0.0, 0.0]))
    assert torch.equal(slerp_merge(a, -2 * a, 0.5), T([-0.5, 1.5]))


def test_slerp_threshold_is_mergekits_0_9995():
    # cos just above 0.9995 -> lerp; just below -> true slerp
    assert slerp_coefficients(0.5, 0.99951, 1.0, 1.0).colinear
    assert not slerp_coefficients(0.5, 0.99949, 1.0, 1.0).colinear


def test_slerp_zero_vector_is_not_normalized():
    # |a| <= eps: mergekit leaves it unnormalized, cos = 0 -> theta = pi/2
    out = slerp_merge(T([0.0, 0.0]), T([0.0, 2.0]), 0.5)
    assert torch.allclose(out, T([0.0, 2 * math.sqrt(0.5)]), atol=1e-6)


def test_slerp_chunked_equals_whole():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    whole = merge_tensors("slerp", [a, b], t=0.3)
    chunked = merge_tensors("slerp", [a, b], t=0.3, chunk_size=37)
    assert torch.allclose(whole, chunked, atol=1e-6)


# ---------------------------------------------------------------------- task arithmetic
def test_task_arithmetic_with_lambda():
    base = T([1.0, 1.0])
    m1, m2 = T([2.0, 1.0]), T([1.0, 4.0])  # deltas [1, 0], [0, 3]
    out = task_arithmetic_merge(base, [m1, m2], [1.0, 0.5], lam=2.0)
    # base + 2 * (1*[1,0] + 0.5*[0,3]) = [3, 4]
    assert torch.equal(out, T([3.0, 4.0]))
    normed = task_arithmetic_merge(base, [m1, m2], [1.0, 0.5], normalize=True)
    # base + (1*[1,0] + 0.5*[0,3]) / 1.5 = [1 + 2/3, 2]
    assert torch.allclose(normed, T([1 + 2 / 3, 2.0]), atol=1e-7)


# ---------------------------------------------------------------------- ties
def test_ties_sign_election_example():
    """The TIES paper's three steps on task vectors of one 4-entry tensor.

    δ1 = [ 1, -2,  3, 0.5]    δ2 = [-3, 1, 1, -1]    (weights 1, density 1: no trimming)
    elected sign = sign(δ1 + δ2) = sign([-2, -1, 4, -0.5]) = [-, -, +, -]
    agreeing entries: [δ2], [δ1], [δ1, δ2], [δ2] -> disjoint means [-3, -2, 2, -1]
    """
    base = torch.zeros(4)
    out = ties_merge(base, [T([1.0, -2, 3, 0.5]), T([-3.0, 1, 1, -1])], [1, 1], 1.0)
    assert torch.equal(out, T([-3.0, -2.0, 2.0, -1.0]))


def test_ties_trims_to_top_density_magnitude_then_elects():
    base = T([10.0, 10, 10, 10])
    # δ1 = [4, -1, 0.5, 2] keeps its top-2 |.|: [4, 0, 0, 2]
    # δ2 = [-1, -3, 0.2, -0.1] keeps [-1, -3, 0, 0]
    # sums: [3, -3, 0, 2] -> signs [+, -, + (tie -> +), +]
    # agree: [4], [-3], none -> 0, [2]
    m1, m2 = base + T([4.0, -1, 0.5, 2]), base + T([-1.0, -3, 0.2, -0.1])
    out = ties_merge(base, [m1, m2], [1, 1], 0.5)
    assert torch.allclose(out, T([14.0, 7.0, 10.0, 12.0]), atol=1e-6)


def test_ties_weights_and_no_normalize():
    base = torch.zeros(2)
    # weighted δ: 2*[1, -1] = [2, -2]; 1*[3, 1] = [3, 1]; sums [5, -1] -> [+, -]
    # normalize: [ (2+3)/(2+1), -2/2 ] = [5/3, -1]; without: [5, -2]
    m1, m2 = T([1.0, -1.0]), T([3.0, 1.0])
    assert torch.allclose(ties_merge(base, [m1, m2], [2, 1], 1.0), T([5 / 3, -1.0]), atol=1e-6)
    assert torch.equal(ties_merge(base, [m1, m2], [2, 1], 1.0, normalize=False), T([5.0, -2.0]))


def test_topk_threshold_keeps_exactly_k_with_ties_in_storage_order():
    mags = T([1.0, 2.0, 2.0, 2.0, 0.5])
    cut = topk_threshold(mags, 3)  # the three 2.0s are exactly the top 3
    assert cut.threshold == 2.0 and cut.last_tie == 5  # n: every tie is kept
    cut = topk_threshold(mags, 2)
    assert cut.threshold == 2.0 and cut.last_tie == 2  # indices 1 and 2
    out = ties_merge(torch.zeros(5), [mags.clone()], [1], 0.4)
    assert torch.equal(out, T([0.0, 2.0, 2.0, 0.0, 0.0]))


def test_ties_chunked_equals_whole_with_ties():
    g = torch.Generator().manual_seed(2)
    base = torch.zeros(1000)
    m = [torch.randint(-3, 4, (1000,), generator=g).float() for _ in range(3)]  # many ties
    params = TensorParams(
        "x", {"normalize": True, "lambda": 1.0}, tuple({"weight": 1.0, "density": 0.3} for _ in m)
    )
    whole = merge_tensors("ties", [base, *m], params)
    chunked = merge_tensors("ties", [base, *m], params, chunk_size=77)
    assert torch.equal(whole, chunked)
    one = TensorParams("x", {}, ({"weight": 1.0, "density": 0.3},))
    kept = [int((merge_tensors("ties", [base, x], one) != 0).sum()) for x in m]
    assert kept == [300, 300, 300]  # exactly int(0.3 * 1000) entries survive


@pytest.mark.parametrize("kind", ["uniform", "halfnormal", "mostly_zero", "few_values"])
def test_kth_largest_is_exact_on_big_tensors(kind, monkeypatch):
    """The sampled band + exact selection equals kthvalue on the whole tensor, including
    distributions where the sample cannot bracket the answer (then it falls back).
    The sample size is shrunk so 200k values already take the sampled path."""
    from weightsmith.merge.methods import ties

    monkeypatch.setattr(ties, "SAMPLE", 1 << 10)
    g = torch.Generator().manual_seed(4)
    n = 200_000
    x = {
        "uniform": lambda: torch.rand(n, generator=g),
        "halfnormal": lambda: torch.randn(n, generator=g).abs(),
        "mostly_zero": lambda: torch.cat([torch.zeros(n - 1000), torch.rand(1000, generator=g)]),
        "few_values": lambda: torch.randint(0, 4, (n,), generator=g).float(),
    }[kind]()
    for k in (1, 999, n // 3, n // 2, n - 1, n):
        assert kth_largest(x, k) == float(torch.kthvalue(x, n - k + 1).values), k


def test_ties_density_out_of_range_is_an_error():
    with pytest.raises(ConfigError, match="density"):
        ties_merge(torch.zeros(3), [torch.ones(3)], [1], 0.0)


# ---------------------------------------------------------------------- dare
def test_dare_keeps_expectation_statistically():
    """E[DARE(δ)] = δ: with density 0.3 over 400k entries the mean of (out − base)/δ is
    1 ± 4σ, σ = sqrt((1−p)/p / n) ≈ 0.0024; the kept fraction is 0.3 ± 4·sqrt(p(1−p)/n)."""
    n, p = 400_000, 0.3
    base = torch.zeros(n)
    delta = torch.full((n,), 0.5)
    out = dare_merge(base, [base + delta], [1.0], p, seed=7)
    ratio = out / delta
    sigma = math.sqrt((1 - p) / p / n)
    assert abs(float(ratio.mean()) - 1.0) < 4 * sigma
    kept = float((out != 0).float().mean())
    assert abs(kept - p) < 4 * math.sqrt(p * (1 - p) / n)
    # kept entries are rescaled by exactly 1/density
    assert torch.allclose(out[out != 0], torch.full_like(out[out != 0], 0.5 / p))


def test_dare_is_reproducible_and_chunking_independent():
    g = torch.Generator().manual_seed(3)
    base, m = torch.randn(5000, generator=g), torch.randn(5000, generator=g)
    params = TensorParams(
        "w",
        {"normalize": False, "rescale": True, "lambda": 1.0, "seed": 5},
        ({"weight": 1.0, "density": 0.5},),
    )
    a = merge_tensors("dare_linear", [base, m], params)
    b = merge_tensors("dare_linear", [base, m], params, chunk_size=333)
    assert torch.equal(a, b)
    other = TensorParams("w", {**params.globals, "seed": 6}, params.models)
    assert not torch.equal(a, merge_tensors("dare_linear", [base, m], other))


def test_dare_ties_elects_signs_on_the_dropped_vectors():
    base = torch.zeros(3)
    m1, m2 = T([1.0, -2.0, 3.0]), T([-3.0, 1.0, 1.0])
    # density 1: no drop, so dare_ties == ties without trimming (normalize off by default)
    out = dare_merge(base, [m1, m2], [1, 1], 1.0, ties=True)
    assert torch.equal(out, T([-3.0, -2.0, 4.0]))
    assert torch.equal(dare_merge(base, [m1, m2], [1, 1], 1.0), T([-2.0, -1.0, 4.0]))


def test_missing_required_parameter_is_an_error():
    with pytest.raises(ConfigError, match="missing required parameter 't'"):
        merge_tensors("slerp", [T([1.0]), T([2.0])])
    with pytest.raises(ConfigError, match="exactly 2"):
        merge_tensors("slerp", [T([1.0]), T([2.0]), T([3.0])], t=0.5)
    with pytest.raises(ConfigError, match="unsupported merge method 'nope'"):
        merge_tensors("nope", [T([1.0])])


def test_docs_table_lists_every_registered_method():
    from pathlib import Path

    docs = (Path(__file__).parents[2] / "docs" / "merge.md").read_text()
    missing = [name for name in MERGE_METHODS if f"`{name}`" not in docs]
    assert not missing, f"docs/merge.md does not mention {missing}"
