"""NearSwap (mergekit 0.1.5's ``nearswap``): hand-computed values (float32), CLI, bad input."""

from __future__ import annotations

import pytest
import torch
from merge_testlib import assert_one_line_error, run_cli, tensors

from weightsmith.errors import ConfigError
from weightsmith.merge.methods import merge_tensors, nearswap_merge

T = torch.tensor


def test_takes_the_other_value_where_it_is_near():
    a, b = T([0.0, 1.0, 2.0, 3.0]), T([0.05, 1.5, 2.2, 0.0])
    # |a − b| = [0.05, 0.5, 0.2, 3]; w = min(1, 0.1/|a − b|) = [1, 0.2, 0.5, 1/30]
    expected = T([0.05, 0.2 * 1.5 + 0.8 * 1.0, 0.5 * 2.2 + 0.5 * 2.0, 3.0 * 29 / 30])
    torch.testing.assert_close(nearswap_merge(a, b, 0.1), expected, rtol=0, atol=1e-6)


def test_equal_entries_and_zero_t():
    a = T([1.0, -2.0])
    assert torch.equal(nearswap_merge(a, a.clone(), 0.5), a)  # |a − b| clamped to 1e-6: w = 1
    b = T([1.5, 0.0])
    assert torch.equal(nearswap_merge(a, b, 0.0), a)  # t = 0: w = 0, the base


def test_exactly_two_inputs_and_t_required():
    with pytest.raises(ConfigError, match="exactly 2"):
        merge_tensors("nearswap", [T([1.0])] * 3, t=0.1)
    with pytest.raises(ConfigError, match="missing required parameter 't'"):
        merge_tensors("nearswap", [T([1.0]), T([2.0])])


def test_cli_equals_the_tensor_function(trio, tmp_path):
    a, b, _ = trio
    r = run_cli("nearswap", a, b, "--t", "0.01", "-o", tmp_path / "ns")
    assert r.exit_code == 0, r.output
    ta, tb, got = tensors(a), tensors(b), tensors(tmp_path / "ns")
    for n in ta:
        assert torch.equal(got[n], nearswap_merge(ta[n], tb[n], 0.01)), n


def test_cli_bad_t_is_a_one_line_error(trio, tmp_path):
    a, b, _ = trio
    r = run_cli("nearswap", a, b, "--t", "nan", "-o", tmp_path / "x")
    assert_one_line_error(r, "--t")
