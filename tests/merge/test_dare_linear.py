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


def test_bfloat16_arithmetic_is_mergekits_l1_rescale():
    """With bfloat16 arithmetic DARE keeps entries with p = bf16(density) (the same counter
    draws, so the same mask as the float32 path at that density) and rescales them by
    mergekit's L1 factor ‖δ‖₁ / ‖kept δ‖₁ with bfloat16 sums, every op in bfloat16."""
    from weightsmith.merge.methods.base import TensorParams, merge_tensors
    from weightsmith.merge.methods.dare import keep_mask, tensor_seed

    gen = torch.Generator().manual_seed(5)
    base = torch.randn(64, 96, generator=gen).to(torch.bfloat16)
    ft = (base.float() + 0.01 * torch.randn(64, 96, generator=gen)).to(torch.bfloat16)
    params = TensorParams(
        "w", {"seed": 2}, ({"weight": 0.7, "density": 0.3},), compute_dtype=torch.bfloat16
    )
    out = merge_tensors("dare_linear", [base, ft], params)
    assert out.dtype == torch.bfloat16
    p = float(torch.tensor(0.3, dtype=torch.bfloat16))  # 0.30078125
    mask = keep_mask(tensor_seed(2, "w", 0), 0, base.numel(), p).view(64, 96)
    delta = ft - base
    masked = delta * mask.to(torch.bfloat16)
    scale = delta.abs().sum() / masked.abs().sum()
    want = base + (masked * scale) * torch.tensor(0.7, dtype=torch.bfloat16)
    assert torch.equal(out, want)
    assert abs(float(scale) - 1 / 0.3) < 0.25  # ~1/density, but not exactly it
