"""``dare_linear`` (mergekit 0.1.5's name) through ``merge dare`` and ``merge run``: the same
tensors as the tensor function (exact), the recipe records the mergekit name, bad density is a
one-line error. Its statistics are in test_methods.py, mergekit parity in
test_mergekit_parity_more.py."""

from __future__ import annotations

import torch
import yaml
from merge_testlib import assert_one_line_error, run_cli, tensors

from weightsmith.merge.methods import dare_merge


def test_cli_and_recipe_equal_the_tensor_function(trio, tmp_path):
    a, b, c = trio
    r = run_cli("dare", "--base", a, b, c, "--density", "0.4", "--weights", "1,0.5",
                "--seed", "3", "-o", tmp_path / "cli")  # fmt: skip
    assert r.exit_code == 0, r.output
    recorded = yaml.safe_load((tmp_path / "cli" / "mergekit_config.yml").read_text())
    assert recorded["merge_method"] == "dare_linear"
    recipe = {
        "merge_method": "dare_linear",
        "base_model": str(a),
        "models": [
            {"model": str(b), "parameters": {"weight": 1.0, "density": 0.4}},
            {"model": str(c), "parameters": {"weight": 0.5, "density": 0.4}},
        ],
        "parameters": {"seed": 3},
    }
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    assert run_cli("run", tmp_path / "r.yml", "-o", tmp_path / "run").exit_code == 0
    ta, tb, tc = tensors(a), tensors(b), tensors(c)
    cli, run = tensors(tmp_path / "cli"), tensors(tmp_path / "run")
    for n in ta:
        want = dare_merge(ta[n], [tb[n], tc[n]], [1.0, 0.5], 0.4, seed=3, name=n)
        assert torch.equal(cli[n], want), n
        assert torch.equal(run[n], want), n


def test_bad_density_in_a_recipe_is_a_one_line_error(trio, tmp_path):
    a, b, _ = trio
    recipe = {
        "merge_method": "dare_linear",
        "base_model": str(a),
        "models": [{"model": str(b), "parameters": {"weight": 1.0, "density": 1.2}}],
    }
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    r = run_cli("run", tmp_path / "r.yml", "-o", tmp_path / "x")
    assert_one_line_error(r, "models[0].parameters.density", "density must be in (0, 1]")
    assert not (tmp_path / "x").exists()
