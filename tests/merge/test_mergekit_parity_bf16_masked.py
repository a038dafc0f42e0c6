"""mergekit 0.1.5's dtype semantics for the masked task-vector methods and NearSwap.

With bfloat16 arithmetic (a recipe's ``dtype: bfloat16``, or no ``dtype`` on bfloat16 models)
breadcrumbs, breadcrumbs_ties, sce and nearswap give mergekit's bits: the same torch ops in the
same dtype and order, with mergekit's whole-tensor sort / topk picking among equal magnitudes
(common in bfloat16). Also on float32 models with ``dtype: bfloat16, out_dtype: float32``.
The randomised methods (della, della_linear, dare_linear) draw other masks than mergekit, so
in bfloat16 they are compared by distribution (kept fraction, rescale factor, within 3 %) and
must give the same bytes for the same seed.

Slow; skipped without the mergekit venv (MERGEKIT_VENV, see .ci/peers.sh), a failure under
WEIGHTSMITH_REQUIRE_PEERS=1.
"""

from __future__ import annotations

import pytest
import torch
from merge_testlib import run_cli, tensors
from mergekit_oracle import run_both
from mergekit_oracle_b import compare, tiny_models
from test_mergekit_parity_more import EXACT_RECIPES, RANDOM_RECIPES, _kept_stats

from weightsmith.merge.methods.base import TensorParams, merge_tensors
from weightsmith.testing.peers import require_peer

pytestmark = pytest.mark.slow


def _dtype(recipes: dict, dtype: str | None, out_dtype: str | None = None) -> dict:
    """The recipes with ``dtype`` (None: no ``dtype`` key) and ``out_dtype`` set."""
    out = {}
    for name, r in recipes.items():
        r = {k: v for k, v in r.items() if k != "dtype"}
        if dtype:
            r["dtype"] = dtype
        if out_dtype:
            r["out_dtype"] = out_dtype
        out[name] = r
    return out


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory):
    """bfloat16 models: every recipe with ``dtype: bfloat16`` and with no ``dtype``."""
    require_peer("mergekit")
    root = tmp_path_factory.mktemp("masked-bf16")
    models = tiny_models(root / "models", torch.bfloat16)
    recipes = {f"{n}_bf16": r for n, r in _dtype(EXACT_RECIPES, "bfloat16").items()}
    recipes |= {f"{n}_no_dtype": r for n, r in _dtype(EXACT_RECIPES, None).items()}
    recipes |= {f"{n}_bf16": r for n, r in _dtype(RANDOM_RECIPES, "bfloat16").items()}
    return run_both(recipes, root / "models", root), models


@pytest.fixture(scope="module")
def cast_runs(tmp_path_factory):
    """float32 models, ``dtype: bfloat16`` (inputs rounded on load), ``out_dtype: float32``."""
    require_peer("mergekit")
    root = tmp_path_factory.mktemp("masked-cast")
    tiny_models(root / "models", torch.float32)
    return run_both(_dtype(EXACT_RECIPES, "bfloat16", "float32"), root / "models", root)


@pytest.mark.parametrize("name", sorted(EXACT_RECIPES))
@pytest.mark.parametrize("variant", ["bf16", "no_dtype"])
def test_bfloat16_arithmetic_bit_identical(bf16_runs, name, variant):
    compare(*bf16_runs[0][f"{name}_{variant}"], atol=0)


@pytest.mark.parametrize("name", sorted(EXACT_RECIPES))
def test_dtype_then_out_dtype_bit_identical(cast_runs, name):
    compare(*cast_runs[name], atol=0)


def test_compute_dtype_float32_keeps_float32_arithmetic(bf16_runs, tmp_path):
    """``--compute-dtype float32`` on the bfloat16 recipe: weightsmith's float32 formula
    (merge_tensors without a compute dtype), rounded once to bfloat16, not mergekit's bits."""
    runs, models = bf16_runs
    mk, ws = runs["breadcrumbs_rescale_bf16"]
    cfg = ws.parent / "breadcrumbs_rescale_bf16.yml"
    assert run_cli("run", cfg, "-o", tmp_path / "f32", "--compute-dtype", "float32").exit_code == 0
    a, b = tensors(mk), tensors(tmp_path / "f32")
    inputs = [tensors(models[m]) for m in ("base", "ft1", "ft2")]
    recipe = EXACT_RECIPES["breadcrumbs_rescale"]
    params = TensorParams(
        "t", recipe["parameters"], tuple(m["parameters"] for m in recipe["models"])
    )
    for n in a:
        want = merge_tensors("breadcrumbs", [t[n] for t in inputs], params).to(torch.bfloat16)
        assert torch.equal(b[n], want), n
    assert any(not torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("name", sorted(RANDOM_RECIPES))
def test_bfloat16_same_distribution_as_mergekit(bf16_runs, name):
    runs, models = bf16_runs
    mk, ws = runs[f"{name}_bf16"]
    base = {n: t.float() for n, t in tensors(models["base"]).items()}
    ft = {n: t.float() for n, t in tensors(models["ft1"]).items()}
    out_mk = {n: t.float() for n, t in tensors(mk).items()}
    out_ws = {n: t.float() for n, t in tensors(ws).items()}
    assert all(t.dtype == torch.bfloat16 for t in tensors(ws).values())
    a, b = _kept_stats(out_mk, base, ft), _kept_stats(out_ws, base, ft)
    density = RANDOM_RECIPES[name]["models"][0]["parameters"]["density"]
    assert abs(b["kept"] - density) < 0.02 * density, b
    for key in a:
        assert abs(b[key] / a[key] - 1) < 0.03, (key, a, b)


@pytest.mark.parametrize("name", sorted(RANDOM_RECIPES))
def test_bfloat16_randomised_methods_are_deterministic_for_a_seed(bf16_runs, tmp_path, name):
    _, ws = bf16_runs[0][f"{name}_bf16"]
    first = tensors(ws)
    cfg = tmp_path / "r.yml"
    cfg.write_text((ws.parent / f"{name}_bf16.yml").read_text())
    assert run_cli("run", cfg, "-o", tmp_path / "again").exit_code == 0
    again = tensors(tmp_path / "again")
    assert all(torch.equal(first[n], again[n]) for n in first)
    seeded = tmp_path / "seeded.yml"
    seeded.write_text(cfg.read_text() + "parameters:\n  seed: 1\n")
    assert run_cli("run", seeded, "-o", tmp_path / "seed1").exit_code == 0
    other = tensors(tmp_path / "seed1")
    assert any(not torch.equal(first[n], other[n]) for n in first)
