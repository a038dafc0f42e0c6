"""``MODEL+ADAPTER`` references in ``merge run`` recipes (mergekit's ``model+lora``).

Parity: the same bf16 YAML through mergekit 0.1.5 (with ``--lora-merge-cache``, which it
requires) and weightsmith gives bit-identical tensors, for a model-list method, a base-model
method and slices. Then what a user relies on: the fold is temporary unless a cache is named,
a cache is reused, the recipe on record keeps the references, and bad references fail in one
line with nothing left beside the output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from merge_testlib import assert_one_line_error, poke, run_cli, tensors
from mergekit_oracle import run_both
from test_lora import make_adapter

from weightsmith.testing import build_tiny_model
from weightsmith.testing.peers import require_peer

BF16 = torch.bfloat16
W1 = {"parameters": {"weight": 1.0}}
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """base / ft (bf16, 4 layers) and two adapters trained on base's shapes."""
    root = tmp_path_factory.mktemp("lora-refs") / "models"
    for seed, name in enumerate(("base", "ft")):
        build_tiny_model(root / name, "llama", seed=seed, dtype=BF16, num_hidden_layers=4)
    make_adapter(root / "base", root / "ad1", seed=11, **LORA)
    make_adapter(root / "base", root / "ad2", seed=12, r=2, target_modules=["up_proj"])
    return root


RECIPES = {
    "linear": {
        "merge_method": "linear",
        "models": [
            {"model": "base+ad1", "parameters": {"weight": 0.6}},
            {"model": "ft+ad2", "parameters": {"weight": 0.4}},
        ],
        "dtype": "bfloat16",
    },
    "ties": {
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {"model": "base+ad1", "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": "ft", "parameters": {"weight": 0.5, "density": 0.7}},
        ],
        "dtype": "bfloat16",
    },
    "slerp_slices": {
        "merge_method": "slerp",
        "base_model": "base+ad1",
        "slices": [
            {
                "sources": [
                    {"model": "base+ad1", "layer_range": [0, 4]},
                    {"model": "ft+ad2", "layer_range": [0, 4]},
                ]
            }
        ],
        "parameters": {"t": 0.3},
        "dtype": "bfloat16",
    },
    "ties_union_vocabulary": {  # the tokenizer of base+ad1 is base's
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {"model": "base+ad1", "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": "ft+ad2", "parameters": {"weight": 1.0, "density": 0.5}},
        ],
        "tokenizer_source": "union",
        "chat_template": "chatml",
        "dtype": "bfloat16",
    },
    "passthrough": {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "base", "layer_range": [0, 2]}]},
            {"sources": [{"model": "ft+ad2", "layer_range": [1, 4]}]},
        ],
        "dtype": "bfloat16",
    },
}


@pytest.mark.slow
def test_same_tensors_as_mergekit(models, tmp_path):
    require_peer("mergekit")
    runs = run_both(RECIPES, models, tmp_path)
    for name, (mk, ws) in runs.items():
        a, b = tensors(mk), tensors(ws)
        assert set(a) == set(b), name
        for n in a:
            assert b[n].dtype == a[n].dtype and torch.equal(b[n], a[n]), f"{name}: {n}"
        # the adapters changed something: the fold is not a no-op
        plain = yaml.safe_load((ws / "mergekit_config.yml").read_text())
        assert "+" in json.dumps(plain), name


def _recipe(tmp_path: Path, models: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_fold_equals_merge_lora_and_is_temporary(models, tmp_path):
    recipe = _recipe(tmp_path, models, RECIPES["linear"] | {"models": [W1 | {"model": "base+ad1"}]})
    out = tmp_path / "out"
    r = run_cli("run", recipe, "--models-dir", models, "-o", out, "--report", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert _leftovers(tmp_path) == []  # the folded model was beside OUT, and is gone
    assert run_cli("lora", models / "base", models / "ad1", "-o", tmp_path / "lora").exit_code == 0
    folded, merged = tensors(tmp_path / "lora"), tensors(out)
    changed = [n for n in folded if not torch.equal(folded[n], tensors(models / "base")[n])]
    assert len(changed) == 3 * 4  # q, v, down of 4 layers
    for n in folded:  # linear of one model, weight 1: the folded model itself
        assert torch.equal(merged[n], folded[n]), n
    recorded = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert recorded["models"][0]["model"] == f"{models / 'base'}+{models / 'ad1'}"
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["result"]["extra"]["lora_folds"] == [
        {"model": str(models / "base"), "adapter": str(models / "ad1")}
    ]
    inputs = json.loads((out / "weightsmith.json").read_text())["inputs"]
    assert [i["path"] for i in inputs] == [str(models / "base"), str(models / "ad1")]


def test_cache_keeps_and_reuses_the_fold(models, tmp_path):
    recipe = _recipe(tmp_path, models, RECIPES["ties"])
    cache = tmp_path / "cache"
    outs = []
    for i in range(2):
        out, rep = tmp_path / f"out{i}", tmp_path / f"r{i}.json"
        args = ("--lora-merge-cache", cache, "--report", rep, "--models-dir", models)
        r = run_cli("run", recipe, "-o", out, *args)
        assert r.exit_code == 0, r.output
        outs.append(tensors(out))
        (fold,) = json.loads(rep.read_text())["result"]["extra"]["lora_folds"]
        assert fold["reused"] is (i == 1) and Path(fold["folded"]).parent == cache
    assert len(list(cache.iterdir())) == 1
    assert all(torch.equal(outs[0][n], outs[1][n]) for n in outs[0])


def test_lora_merge_dtype(models, tmp_path):
    recipe = _recipe(tmp_path, models, RECIPES["linear"])
    cache = tmp_path / "cache"
    args = ("--models-dir", models, "--lora-merge-cache", cache, "--lora-merge-dtype", "float32")
    assert run_cli("run", recipe, "-o", tmp_path / "out", *args).exit_code == 0
    for folded in cache.iterdir():
        assert {t.dtype for t in tensors(folded).values()} == {torch.float32}


def test_lora_merge_dtype_without_a_cache_is_temporary(models, tmp_path):
    recipe = _recipe(tmp_path, models, RECIPES["linear"] | {"dtype": "float32"})
    out, args = tmp_path / "out", ("--models-dir", models, "--lora-merge-dtype", "float32")
    assert run_cli("run", recipe, "-o", out, *args).exit_code == 0
    assert _leftovers(tmp_path) == []
    cache = tmp_path / "cache"
    assert (
        run_cli(
            "run", recipe, "-o", tmp_path / "out2", *args, "--lora-merge-cache", cache
        ).exit_code
        == 0
    )
    a, b = tensors(out), tensors(tmp_path / "out2")
    assert all(torch.equal(a[n], b[n]) for n in a)  # the same folded models, kept or not


def test_a_local_path_with_a_plus_is_a_model(models, tmp_path):
    (tmp_path / "a+b").symlink_to(models / "ft")
    recipe = _recipe(
        tmp_path, models, {"merge_method": "linear", "models": [W1 | {"model": "a+b"}]}
    )
    r = run_cli("run", recipe, "--models-dir", tmp_path, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    a, b = tensors(models / "ft"), tensors(tmp_path / "out")
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize(
    "model, fragments",
    [
        ("base+missing", ["adapter 'missing' not found"]),
        ("base+ad1+ad2", ["expected MODEL or MODEL+ADAPTER"]),
        ("base+", ["expected MODEL or MODEL+ADAPTER"]),
        ("base+ft", ["adapter_config.json"]),  # a model is not an adapter
    ],
)
def test_bad_references_fail_in_one_line_and_leave_nothing(models, tmp_path, model, fragments):
    data = {"merge_method": "linear", "models": [W1 | {"model": model}, W1 | {"model": "ft"}]}
    out = tmp_path / "out"
    r = run_cli("run", _recipe(tmp_path, models, data), "--models-dir", models, "-o", out)
    assert_one_line_error(r, *fragments)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_adapter_that_does_not_fit_fails_and_leaves_nothing(models, tmp_path):
    wide = build_tiny_model(tmp_path / "wide", "llama", dtype=BF16, hidden_size=32)
    make_adapter(wide, tmp_path / "wide-ad", **LORA)
    data = {"merge_method": "linear", "models": [W1 | {"model": f"base+{tmp_path / 'wide-ad'}"}]}
    out = tmp_path / "out"
    r = run_cli("run", _recipe(tmp_path, models, data), "--models-dir", models, "-o", out)
    assert_one_line_error(r, "wide-ad")
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["adapter", "model"])
def test_nan_in_the_adapter_or_the_model_is_named(models, tmp_path, where):
    import shutil

    for name in ("base", "ad1"):
        shutil.copytree(models / name, tmp_path / name)
    target = tmp_path / ("ad1" if where == "adapter" else "base")
    tensor = poke(target, "q_proj.lora_B" if where == "adapter" else "q_proj", float("nan"))
    data = {"merge_method": "linear", "models": [W1 | {"model": "base+ad1"}]}
    out = tmp_path / "out"
    r = run_cli("run", _recipe(tmp_path, models, data), "--models-dir", tmp_path, "-o", out)
    assert_one_line_error(r, str(target), tensor, "NaN")
    assert not out.exists() and _leftovers(tmp_path) == []


def test_existing_output_is_refused_before_folding(models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    data = {"merge_method": "linear", "models": [W1 | {"model": "base+ad1"}]}
    r = run_cli("run", _recipe(tmp_path, models, data), "--models-dir", models, "-o", out)
    assert_one_line_error(r, "already exists")
    assert list(out.iterdir()) == [] and _leftovers(tmp_path) == []


def test_float32_fold_equals_peft(tiny_model, tmp_path):
    """In float32 the folded inputs are peft's merge_and_unload within 1e-6 (and each adapted
    tensor is computed apart: none overwrites another's numbers)."""
    from test_lora import peft_merged

    base = tiny_model("llama", 0)
    make_adapter(base, tmp_path / "ad", seed=4, r=4, target_modules="all-linear")
    ref = f"{base}+{tmp_path / 'ad'}"
    data = {"merge_method": "linear", "models": [W1 | {"model": ref}], "dtype": "float32"}
    r = run_cli("run", _recipe(tmp_path, base, data), "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    expected, got = peft_merged(base, tmp_path / "ad"), tensors(tmp_path / "out")
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6, msg=name)
    # read side by side, as a merge's passes and its lookahead do: each stays its own
    from weightsmith.merge.lora_refs import FoldedCheckpoint

    with FoldedCheckpoint(base, tmp_path / "ad") as ck:
        held = []
        for name in ck.tensors:
            with ck.mapped_flat(name) as flat:
                held.append((name, flat))
        for name, flat in held:
            torch.testing.assert_close(
                flat.view(expected[name].shape), expected[name], rtol=0, atol=1e-6, msg=name
            )
