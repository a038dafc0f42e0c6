"""The same recipe through mergekit 0.1.5 (its peer venv) and ``weightsmith merge run`` gives
the same tensors: model_stock, nuslerp, multislerp, karcher, arcee_fusion and ram on tiny
seeded models and on stories260K + its Shakespeare fine-tune (float32: every tensor within
1e-6), and mergekit's dtype semantics (``dtype`` is the arithmetic's dtype): with bfloat16
arithmetic every method, linear/slerp/task_arithmetic/ties included, gives mergekit's bits.

Slow; skipped without the mergekit venv (MERGEKIT_VENV, see .ci/peers.sh), a failure under
WEIGHTSMITH_REQUIRE_PEERS=1.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mergekit_oracle_b import (
    CLASSIC,
    GEOMETRIC,
    compare,
    perturbed,
    run_both,
    tiny_models,
    with_dtype,
)

from weightsmith.testing.peers import require_peer
from weightsmith.testing.shared import shared_dir

pytestmark = pytest.mark.slow
EXAMPLE_METHODS = ["nuslerp", "multislerp", "karcher", "arcee_fusion", "ram"]
EXAMPLES = [Path(__file__).parents[2] / "examples" / "merge" / f"{m}.yaml" for m in EXAMPLE_METHODS]
ALL = {**GEOMETRIC, **CLASSIC}
CAST = ["linear", "slerp", "task_arithmetic", "ties", "model_stock", "nuslerp", "karcher", "ram"]


@pytest.fixture(scope="module", autouse=True)
def _mergekit() -> None:
    require_peer("mergekit")


@pytest.fixture(scope="module")
def float32_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("geo-f32")
    return run_both(root, GEOMETRIC, tiny_models(root / "models", torch.float32))


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory):
    """bfloat16 models: every recipe with ``dtype: bfloat16``; ties and model_stock also with
    no dtype (mergekit then computes in the inputs' dtype)."""
    root = tmp_path_factory.mktemp("geo-bf16")
    recipes = with_dtype(ALL, "bfloat16")
    recipes |= {f"{n}_no_dtype": ALL[n] for n in ("ties", "model_stock", "task_arithmetic")}
    return run_both(root, recipes, tiny_models(root / "models", torch.bfloat16))


@pytest.fixture(scope="module")
def cast_runs(tmp_path_factory):
    """float32 models, ``dtype: bfloat16`` (inputs rounded on load), ``out_dtype: float32``."""
    root = tmp_path_factory.mktemp("geo-cast")
    recipes = with_dtype({n: ALL[n] for n in CAST}, "bfloat16", "float32")
    return run_both(root, recipes, tiny_models(root / "models", torch.float32))


@pytest.fixture(scope="module")
def stories_runs(tmp_path_factory):
    shared = shared_dir()
    sh = shared / "models" if shared else None
    if sh is None or not (sh / "stories260K-shakespeare").is_dir():
        pytest.skip("needs ../shared/models/stories260K(-shakespeare) (set WEIGHTSMITH_SHARED)")
    root = tmp_path_factory.mktemp("geo-stories")
    ft = sh / "stories260K-shakespeare"
    models = {
        "base": sh / "stories260K",
        "ft1": ft,
        "ft2": perturbed(ft, root / "ft2", seed=1),
        "ft3": perturbed(ft, root / "ft3", seed=2),
    }
    return run_both(root, GEOMETRIC, models)


@pytest.fixture(scope="module")
def example_runs(tmp_path_factory):
    """examples/merge/*.yaml of these methods, on tiny stand-ins of the ../shared models."""
    import yaml

    root = tmp_path_factory.mktemp("geo-examples")
    models = {
        "stories260K": tiny_models(root / "m0", torch.float32)["base"],
        "stories260K-shakespeare": tiny_models(root / "m1", torch.float32)["ft1"],
    }
    recipes = {p.stem: yaml.safe_load(p.read_text()) for p in EXAMPLES}
    assert {r["merge_method"] for r in recipes.values()} >= set(EXAMPLE_METHODS)
    return run_both(root, recipes, models)


@pytest.mark.parametrize("name", EXAMPLE_METHODS)
def test_examples_within_1e6(example_runs, name):
    compare(*example_runs[name], atol=1e-6)


@pytest.mark.parametrize("name", sorted(GEOMETRIC))
def test_float32_within_1e6(float32_runs, name):
    compare(*float32_runs[name], atol=1e-6)


@pytest.mark.parametrize("name", sorted(GEOMETRIC))
def test_stories260k_within_1e6(stories_runs, name):
    compare(*stories_runs[name], atol=1e-6)


@pytest.mark.parametrize(
    "name", sorted([*ALL, "ties_no_dtype", "model_stock_no_dtype", "task_arithmetic_no_dtype"])
)
def test_bfloat16_arithmetic_bit_identical(bf16_runs, name):
    compare(*bf16_runs[name], atol=0)


@pytest.mark.parametrize("name", CAST)
def test_dtype_then_out_dtype_bit_identical(cast_runs, name):
    compare(*cast_runs[name], atol=0)
