"""``ramplus_tl`` (mergekit 0.1.5's RAM+ tensor-local): hand-computed cases, chunked streaming,
the CLI subcommand, and parity with mergekit (its peer venv) on tiny Llamas whose fine-tunes
change different subsets of entries (so entries are unique to one model, shared, or unchanged):
float32 within 1e-6, bfloat16 arithmetic (``dtype: bfloat16``, ``out_dtype`` pinned) to the bit.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from merge_testlib import assert_one_line_error, run_cli, tensors
from safetensors.torch import load_file, save_file

from weightsmith.merge.methods.ramplus_tl import ramplus_tl

T = torch.tensor


def test_unique_entries_scaled_by_the_shared_to_unique_ratio():
    base = torch.full((6,), 0.5)
    m1 = base + T([1.0, 1.0, 0.0, 0.0, 2.0, 0.0])
    m2 = base + T([1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    # model 1: changed {0, 1, 4}, shared {0}, unique {1, 4}: ρ = 1/2, λ = 1 + 0.5·0.5 = 1.25
    # model 2: changed {0, 2}, shared {0}, unique {2}: ρ = 1, λ = 1 + 0.5·1 = 1.5
    # entry 0: the mean (1 + 1) / 2; unique ones: λ·δ; unchanged: the base
    out = ramplus_tl(base, [m1, m2], r=0.5, alpha=1.0)
    expected = base + T([1.0, 1.25, 1.5, 0.0, 2.5, 0.0])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # α clamps ρ: λ = 1 + 0.5·0.6 = 1.3 for model 2 (ρ = 1), 1.25 for model 1 (ρ = 0.5)
    out = ramplus_tl(base, [m1, m2], r=0.5, alpha=0.6)
    torch.testing.assert_close(out, base + T([1.0, 1.25, 1.3, 0.0, 2.5, 0.0]), rtol=0, atol=1e-6)


def test_no_unique_entries_is_ram_and_epsilon_decides_what_changed():
    base = torch.zeros(4)
    m1, m2 = T([1.0, 2.0, 1e-6, 0.0]), T([3.0, 4.0, 0.0, 0.0])
    # every change is shared: ρ = shared / ε is clamped to α, but no entry is unique
    torch.testing.assert_close(
        ramplus_tl(base, [m1, m2]), T([2.0, 3.0, 0.0, 0.0]), rtol=0, atol=1e-6
    )
    # ε = 1e-7: entry 2 (δ = 1e-6) is now model 1's unique change, ρ₁ = 2/1 → λ₁ = 1 + 0.1·0.2
    out = ramplus_tl(base, [m1, m2], epsilon=1e-7)
    torch.testing.assert_close(out, T([2.0, 3.0, 1.02e-6, 0.0]), rtol=0, atol=1e-12)


def test_counts_over_chunks_equal_the_whole_tensor():
    from weightsmith.merge.methods import merge_tensors

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(1000, generator=gen)
    models = []
    for k in range(3):
        keep = torch.rand(1000, generator=gen) < 0.3 + 0.2 * k
        models.append(base + torch.randn(1000, generator=gen) * keep)
    whole = merge_tensors("ramplus_tl", [base, *models], r=0.7, alpha=3.0)
    chunked = merge_tensors("ramplus_tl", [base, *models], chunk_size=37, r=0.7, alpha=3.0)
    assert torch.equal(whole, chunked)


def _sparse_finetune(src: Path, out: Path, seed: int, fraction: float) -> Path:
    """A copy of ``src`` with N(0, 0.02²) changes on a seeded ``fraction`` of every tensor's
    entries (the rest bit-identical)."""
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    for shard in sorted(src.glob("*.safetensors")):
        state = load_file(shard)
        for name in sorted(state):
            t = state[name]
            noise = torch.randn(t.shape, generator=gen) * 0.02
            keep = torch.rand(t.shape, generator=gen) < fraction
            state[name] = (t.float() + noise * keep).to(t.dtype)
        save_file(state, out / shard.name, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def sparse_models(tmp_path_factory) -> dict[str, dict[str, Path]]:
    from weightsmith.testing import build_tiny_model

    root = tmp_path_factory.mktemp("ramplus")
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        d = root / str(dtype).removeprefix("torch.")
        base = build_tiny_model(d / "base", "llama", seed=0, dtype=dtype, num_hidden_layers=3)
        out[str(dtype)] = {
            "base": base,
            "ft1": _sparse_finetune(base, d / "ft1", seed=1, fraction=0.3),
            "ft2": _sparse_finetune(base, d / "ft2", seed=2, fraction=0.6),
        }
    return out


def test_cli_subcommand_is_the_recipe(sparse_models, tmp_path):
    m = sparse_models[str(torch.float32)]
    r = run_cli("ramplus-tl", "--base", m["base"], m["ft1"], m["ft2"], "--r", "0.5",
                "--alpha", "2", "-o", tmp_path / "cmd")  # fmt: skip
    assert r.exit_code == 0, r.output
    recipe = {"merge_method": "ramplus_tl", "base_model": str(m["base"]),
              "models": [{"model": str(m["ft1"])}, {"model": str(m["ft2"])}],
              "parameters": {"r": 0.5, "alpha": 2.0}}  # fmt: skip
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    assert run_cli("run", tmp_path / "r.yml", "-o", tmp_path / "run").exit_code == 0
    a, b = tensors(tmp_path / "cmd"), tensors(tmp_path / "run")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    base, ft1 = tensors(m["base"]), tensors(m["ft1"])
    n = "model.layers.0.mlp.down_proj.weight"
    only1 = (ft1[n] != base[n]) & (tensors(m["ft2"])[n] == base[n])
    ratio = (a[n] - base[n])[only1] / (ft1[n] - base[n])[only1]
    assert 1.0 < float(ratio.mean()) < 2.0  # ft1's unique entries are boosted (λ > 1)


def test_bad_parameter_is_a_one_line_error(sparse_models, tmp_path):
    m = sparse_models[str(torch.float32)]
    r = run_cli("ramplus-tl", "--base", m["base"], m["ft1"], "--epsilon", "-1", "-o",
                tmp_path / "o")  # fmt: skip
    assert_one_line_error(r, "--epsilon")
    assert not (tmp_path / "o").exists()


RECIPES = {
    "defaults": {},
    "strong": {"r": 0.5, "alpha": 2.0},
    "epsilon": {"r": 1.0, "alpha": 0.5, "epsilon": 0.01},
}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_same_tensors_as_mergekit(sparse_models, tmp_path, dtype):
    from mergekit_oracle_b import compare, run_both

    from weightsmith.testing.peers import require_peer

    require_peer("mergekit")
    models = sparse_models[f"torch.{dtype}"]
    recipes = {
        # mergekit's λ is float32, so with bfloat16 arithmetic it returns float32 (as for
        # arcee_fusion) and writes that without out_dtype; weightsmith writes the dtype asked
        name: {"merge_method": "ramplus_tl", "base_model": "base", "dtype": dtype,
               "out_dtype": dtype,
               "models": [{"model": "ft1"}, {"model": "ft2"}],
               **({"parameters": params} if params else {})}
        for name, params in RECIPES.items()
    }  # fmt: skip
    runs = run_both(tmp_path, recipes, models)
    for name in RECIPES:
        compare(*runs[name], atol=1e-6 if dtype == "float32" else 0)
