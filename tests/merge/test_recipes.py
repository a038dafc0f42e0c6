"""mergekit YAML recipes: every shipped example parses and runs; bad recipes are clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from merge_testlib import assert_one_line_error, run_cli, tensors

from weightsmith.errors import ConfigError
from weightsmith.merge import load_recipe, recipe_from_dict
from weightsmith.merge.params import evaluate_setting
from weightsmith.testing import build_tiny_model

EXAMPLES = sorted((Path(__file__).parents[2] / "examples" / "merge").glob("*.yaml"))


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """Tiny 5-layer stand-ins named like the ../shared models the examples use."""
    root = tmp_path_factory.mktemp("models")
    build_tiny_model(root / "stories260K", "llama", seed=0, num_hidden_layers=5)
    build_tiny_model(root / "stories260K-shakespeare", "llama", seed=1, num_hidden_layers=5)
    return root


def test_there_are_examples_for_every_command():
    methods = {load_recipe(p).merge_method for p in EXAMPLES}
    assert {"linear", "slerp", "task_arithmetic", "ties", "dare_ties", "passthrough"} <= methods


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_and_loads(example, models_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    r = run_cli("run", example, "-o", out, "--models-dir", models_dir)
    assert r.exit_code == 0, r.output
    AutoModelForCausalLM.from_pretrained(out)
    # the resolved recipe beside the weights parses again and names absolute paths
    again = load_recipe(out / "mergekit_config.yml")
    assert all(Path(m).is_absolute() for m in again.referenced_models())


def test_slerp_example_values_follow_gradients(models_dir, tmp_path):
    from weightsmith.merge.methods import merge_tensors

    out = tmp_path / "out"
    example = next(p for p in EXAMPLES if p.stem == "slerp")
    assert run_cli("run", example, "-o", out, "--models-dir", models_dir).exit_code == 0
    a, b = tensors(models_dir / "stories260K"), tensors(models_dir / "stories260K-shakespeare")
    got = tensors(out)
    setting = load_recipe(example).parameters["t"]
    for n in ["model.layers.2.self_attn.k_proj.weight", "model.layers.3.mlp.up_proj.weight"]:
        layer = int(n.split(".")[2])
        t = evaluate_setting(n, setting, layer / 4)
        assert t == 0.3  # layer 2 self_attn: point 2 of 5 = 0.3; layer 3 mlp: point 3 = 0.3
        torch.testing.assert_close(got[n], merge_tensors("slerp", [a[n], b[n]], t=t), rtol=0, atol=1e-6)  # fmt: skip


def test_passthrough_renumbers_layers_and_updates_config(models_dir, tmp_path):
    src = models_dir / "stories260K"
    cfg = json.loads((src / "config.json").read_text())
    out = tmp_path / "out"
    r = run_cli(
        "passthrough", "--slice", f"{src}:0:3", "--slice",
        f"{models_dir / 'stories260K-shakespeare'}:1:5", "-o", out,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    new = json.loads((out / "config.json").read_text())
    assert new["num_hidden_layers"] == 7
    if isinstance(cfg.get("layer_types"), list):
        assert len(new["layer_types"]) == 7
    got, a = tensors(out), tensors(src)
    b = tensors(models_dir / "stories260K-shakespeare")
    assert torch.equal(got["model.layers.2.mlp.up_proj.weight"], a["model.layers.2.mlp.up_proj.weight"])  # fmt: skip
    assert torch.equal(got["model.layers.3.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])  # fmt: skip
    assert torch.equal(got["model.layers.6.input_layernorm.weight"], b["model.layers.4.input_layernorm.weight"])  # fmt: skip
    # norm and lm_head come from the first source unless --final-from says otherwise
    assert torch.equal(got["lm_head.weight"], a["lm_head.weight"])
    assert not any(".layers.7." in n for n in got)


def test_passthrough_repeats_layers_and_final_from(models_dir, tmp_path):
    a_dir, b_dir = models_dir / "stories260K", models_dir / "stories260K-shakespeare"
    out = tmp_path / "out"
    r = run_cli(
        "passthrough", "--slice", f"{a_dir}:0:2", "--slice", f"{a_dir}:1:2",
        "--final-from", b_dir, "-o", out,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    got, a, b = tensors(out), tensors(a_dir), tensors(b_dir)
    q = "self_attn.q_proj.weight"
    assert torch.equal(got[f"model.layers.2.{q}"], a[f"model.layers.1.{q}"])
    assert torch.equal(got["model.norm.weight"], b["model.norm.weight"])
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])


def test_passthrough_layer_range_past_the_end(models_dir, tmp_path):
    r = run_cli("passthrough", "--slice", f"{models_dir / 'stories260K'}:3:9", "-o", tmp_path / "o")
    assert_one_line_error(r, "past the 5 layers")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("merge_method: ties\nmodels: [{model: a}]\nfoo: 1\n", "unknown key(s) foo"),
        ("merge_method: task_swap\nmodels: [{model: a}]\n", "unsupported merge method 'task_swap'"),
        ("merge_method: ties\nbase_model: a\nmodels: [{model: b, parameters: {wieght: 1}}]\n",
         "unknown parameter(s) wieght"),
        ("merge_method: linear\nmodels: [{model: a, extra: 1}]\n", "unknown key(s) extra"),
        ("merge_method: linear\nmodules: {}\n", "'modules'"),
        ("merge_method: linear\nmodels: [{model: a}]\ntokenizer_source: union\ntokenizer: {}\n",
         "not both"),
        ("merge_method: linear\nmodels: [{model: a}]\nchat_template: nope\n", "neither a built-in"),
        ("merge_method: linear\nmodels: [{model: a}]\ntokenizer: {tokens: {x: {source: {kind: odd}}}}\n",
         "expected a model"),
        ("merge_method: linear\nmodels: [{model: a}]\nslices: [{sources: [{model: a, layer_range: [0, 1]}]}]\n",
         "exactly one of"),
        ("merge_method: slerp\nmodels: [{model: a}]\nparameters: {t: [{filter: x}]}\n", "'filter' and 'value'"),
        ("merge_method: [oops\n", "invalid YAML"),
        ("merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [0, 2]}, {model: b, layer_range: [0, 2]}]}]\n",
         "exactly one source"),
        ("merge_method: linear\nmodels: [{model: a+lora+b}]\n", "expected MODEL or MODEL+ADAPTER"),
        ("merge_method: ties\nbase_model: a+\nmodels: [{model: b}]\n", "reference 'a+': expected"),
        ("merge_method: linear\nmodels: [{model: a}]\ndtype: int8\n", "dtype 'int8'"),
    ],
)  # fmt: skip
def test_bad_recipes_are_clear_errors(text, fragment, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_recipe(path)
    assert fragment in str(e.value)
    r = run_cli("run", path, "-o", tmp_path / "out")
    assert_one_line_error(r, fragment)
    assert not (tmp_path / "out").exists()


def test_missing_models_and_missing_params_are_errors(models_dir, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("merge_method: linear\nmodels: [{model: nowhere}]\n")
    assert_one_line_error(run_cli("run", path, "-o", tmp_path / "o"), "model 'nowhere' not found")
    path.write_text(
        "merge_method: ties\nbase_model: stories260K\nmodels: [{model: stories260K-shakespeare}]\n"
    )
    r = run_cli("run", path, "-o", tmp_path / "o", "--models-dir", models_dir)
    assert_one_line_error(r, "missing parameter 'weight'")
    path.write_text("merge_method: ties\nmodels: [{model: stories260K}]\n")
    r = run_cli("run", path, "-o", tmp_path / "o", "--models-dir", models_dir)
    assert_one_line_error(r, "needs a base model")
    assert not (tmp_path / "o").exists()


def test_parameter_lookup_order_and_gradients():
    r = recipe_from_dict(
        {
            "merge_method": "ties",
            "base_model": "a",
            "models": [{"model": "b", "parameters": {"density": 0.2, "weight": [0, 1]}}],
            "parameters": {"density": 0.9, "weight": {"filter": "mlp", "value": 3}},
        }
    )
    assert evaluate_setting("x.mlp.w", r.models[0].parameters["weight"], 0.25) == 0.25
    assert evaluate_setting("x.mlp.w", r.parameters["weight"], 0.0) == 3
    assert evaluate_setting("x.attn.w", r.parameters["weight"], 0.0) is None
    # a gradient of 3 points at t = 0.75: between points 1 and 2, 50 % of the way
    assert evaluate_setting("n", [0.0, 1.0, 0.0], 0.75) == pytest.approx(0.5)


def test_passthrough_scale_parameter(models_dir, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "merge_method: passthrough\n"
        "slices:\n"
        "  - sources: [{model: stories260K, layer_range: [0, 2]}]\n"
        "parameters:\n"
        "  scale: [{filter: o_proj, value: 0.0}, {filter: down_proj, value: 2.0}, {value: 1.0}]\n"
    )
    out = tmp_path / "out"
    assert run_cli("run", path, "-o", out, "--models-dir", models_dir).exit_code == 0
    got, src = tensors(out), tensors(models_dir / "stories260K")
    o, d, q = (f"model.layers.1.{m}.weight" for m in ("self_attn.o_proj", "mlp.down_proj", "self_attn.q_proj"))  # fmt: skip
    assert torch.equal(got[o], torch.zeros_like(src[o]))
    assert torch.equal(got[d], 2 * src[d])
    assert torch.equal(got[q], src[q])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
