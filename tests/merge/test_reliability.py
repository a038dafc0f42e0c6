"""Bad input to ``merge`` (issue 16): no non-finite value is written with exit 0, bad options
and recipe values are one-line errors (exit 1) naming the option or key, found before any
tensor is read; layers of different shapes are never stacked."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from merge_testlib import assert_one_line_error, poke, run_cli, tensors

from weightsmith.errors import ConfigError
from weightsmith.merge import load_recipe
from weightsmith.merge.methods import Param
from weightsmith.testing.tiny import build_tiny_model

NAN_INF = ["nan", "inf", "-inf"]


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------------- options, at parse time
@pytest.mark.parametrize("value", NAN_INF)
def test_slerp_t_must_be_finite(trio, tmp_path, value):
    out = tmp_path / "out"
    r = run_cli("slerp", trio[0], trio[1], "--t", value, "-o", out)
    assert_one_line_error(r, "--t", "not a finite number")
    assert not out.exists()


@pytest.mark.parametrize("value", NAN_INF)
def test_task_arithmetic_lambda_must_be_finite(trio, tmp_path, value):
    out = tmp_path / "out"
    r = run_cli("task-arithmetic", trio[1], "--base", trio[0], "--lambda", value, "-o", out)
    assert_one_line_error(r, "--lambda", "not a finite number")
    assert not out.exists()


def test_weights_and_gradients_must_be_finite(trio, tmp_path):
    out = tmp_path / "out"
    r = run_cli("linear", trio[0], trio[1], "--weights", "1,nan", "-o", out)
    assert_one_line_error(r, "--weights", "not a finite number")
    r = run_cli("ties", trio[1], "--base", trio[0], "--density", "mlp=0.5,inf", "-o", out)
    assert_one_line_error(r, "--density", "not a finite number")
    assert not out.exists()


def test_lora_scale_must_be_finite(tiny_model, tmp_path):
    out = tmp_path / "out"
    # checked before the adapter folder is even looked at
    r = run_cli("lora", tiny_model("llama", 0), tmp_path / "none", "--scale", "nan", "-o", out)
    assert_one_line_error(r, "--scale", "not a finite number")
    assert not out.exists()


def test_option_range_errors_come_before_any_tensor_is_read_and_say_it_once(tmp_path):
    # the models do not even exist: the option is refused first, naming the option only
    out = tmp_path / "out"
    r = run_cli("ties", tmp_path / "a", "--base", tmp_path / "b", "--density", "-0.5", "-o", out)
    assert_one_line_error(r, "--density", "must be in (0, 1]", "-0.5")
    assert "tensor" not in r.output
    r = run_cli("dare", tmp_path / "a", "--base", tmp_path / "b", "--density", "mlp=1.5", "-o", out)
    assert_one_line_error(r, "--density", "must be in (0, 1]")
    assert not out.exists()


# ---------------------------------------------------------------------- recipes
@pytest.mark.parametrize(
    "value, message",
    [
        (".nan", "not a finite number"),
        (".inf", "not a finite number"),
        ("heavy", "must be a number, got 'heavy'"),
        ("[0.5, .nan]", "not a finite number"),
        ("[{filter: mlp, value: .nan}, {value: 1}]", "not a finite number"),
    ],
)
def test_recipe_weight_is_checked_naming_file_and_key(trio, tmp_path, value, message):
    recipe = write_recipe(
        tmp_path / "r.yml",
        f"merge_method: linear\nmodels:\n  - model: {trio[0]}\n    parameters: {{weight: 1}}\n"
        f"  - model: {trio[1]}\n    parameters:\n      weight: {value}\n",
    )
    out = tmp_path / "out"
    r = run_cli("run", recipe, "-o", out)
    assert_one_line_error(r, str(recipe), "models[1].parameters.weight", message)
    assert not out.exists()


def test_recipe_values_are_checked_at_load_time(tmp_path):
    bad = {
        "density: -0.5": "must be in (0, 1]",
        "density: 0": "must be in (0, 1]",
        "normalize: maybe": "must be true or false",
        "seed: 1.5": "must be an integer",
        "lambda: .nan": "not a finite number",
    }
    for setting, message in bad.items():
        path = write_recipe(
            tmp_path / "r.yml",
            "merge_method: dare_ties\nbase_model: a\nmodels:\n  - model: b\n"
            f"    parameters: {{weight: 1}}\nparameters:\n  {setting}\n",
        )
        with pytest.raises(ConfigError, match=rf"r\.yml: parameters\.\w+: .*{re.escape(message)}"):
            load_recipe(path)  # no model is opened (they do not exist)


def test_passthrough_scale_must_be_finite(tmp_path):
    path = write_recipe(
        tmp_path / "r.yml",
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n"
        "        layer_range: [0, 1]\n        parameters: {scale: .inf}\n",
    )
    with pytest.raises(ConfigError, match=r"sources\[0\]\.parameters\.scale: inf is not a finite"):
        load_recipe(path)


def test_param_declaration_ranges():
    density = Param("density", low=0.0, low_open=True, high=1.0)
    density.check(1.0, "x")
    density.check(1e-9, "x")
    for bad in (0.0, 1.0000001, -1, math.nan, True, "0.5"):
        with pytest.raises(ConfigError, match=r"^x: "):
            density.check(bad, "x")
    Param("w").check(-1e30, "x")  # unbounded numbers: any finite value
    with pytest.raises(ConfigError, match="x: inf is not a finite number"):
        Param("w").check(math.inf, "x")


# ---------------------------------------------------------------------- results that overflow
def test_task_arithmetic_overflow_is_an_error_naming_the_tensor(trio, tiny_model_copy, tmp_path):
    huge = tiny_model_copy("llama", 1)
    name = poke(huge, "mlp.down_proj", 3e38)  # finite, but 2·(3e38 − base) + base is not
    out = tmp_path / "out"
    r = run_cli("task-arithmetic", huge, "--base", trio[0], "--lambda", "2", "-o", out)
    assert_one_line_error(r, repr(name), "overflow float32")
    assert not out.exists()


@pytest.mark.parametrize("kernels", ["1", "0"])
def test_slerp_overflow_of_the_output_dtype_is_an_error(
    tiny_model_copy, tmp_path, monkeypatch, kernels
):
    """3.4e38 is a finite float32 but rounds to Inf in bfloat16: the storage kernel (lerp2)
    reports what it wrote, the torch path checks the block, both refuse."""
    monkeypatch.setenv("WEIGHTSMITH_KERNELS", kernels)
    a, b = tiny_model_copy("llama", 0), tiny_model_copy("llama", 1)
    name = poke(a, "o_proj", 3.4e38)
    poke(b, "o_proj", 3.4e38)
    out = tmp_path / "out"
    r = run_cli("slerp", a, b, "--t", "0.5", "--dtype", "bfloat16", "-o", out)
    assert_one_line_error(r, repr(name), "overflow bfloat16")
    assert not out.exists()
    r = run_cli("slerp", a, b, "--t", "0.5", "-o", out)  # float32 holds it: fine
    assert r.exit_code == 0, r.output
    assert torch.isfinite(tensors(out)[name]).all()


def test_passthrough_copy_with_nan_is_an_error(tiny_model_copy, tmp_path):
    a = tiny_model_copy("llama", 0)
    name = poke(a, "model.norm.weight", float("nan"))
    out = tmp_path / "out"
    r = run_cli("passthrough", "--slice", f"{a}:0:2", "-o", out)
    assert_one_line_error(r, repr(name), "NaN or Inf")
    assert not out.exists()


# ---------------------------------------------------------------------- shapes (§2)
def test_passthrough_refuses_layers_of_another_shape(tiny_model, tmp_path):
    base = tiny_model("llama", 0)
    narrow = build_tiny_model(tmp_path / "narrow", "llama", seed=1, intermediate_size=96)
    out = tmp_path / "out"
    r = run_cli("passthrough", "--slice", f"{base}:0:2", "--slice", f"{narrow}:1:2", "-o", out)
    assert_one_line_error(r, "'model.layers.2.mlp.", f"(from {narrow})", "96", "128")
    assert not out.exists()
    r = run_cli("passthrough", "--slice", f"{narrow}:0:2", "--slice", f"{base}:1:2", "-o", out)
    assert_one_line_error(r, "'model.layers.2.mlp.", f"(from {base})", "128", "96")
    # same shapes from another model are fine
    r = run_cli(
        "passthrough",
        "--slice",
        f"{base}:0:2",
        "--slice",
        f"{tiny_model('llama', 1)}:1:2",
        "-o",
        out,
    )
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
