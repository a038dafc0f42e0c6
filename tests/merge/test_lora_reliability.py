"""Bad LoRA adapters (issue 16): config types checked, NaN/Inf in adapter tensors refused,
a merged tensor that overflows refused; all one-line errors, exit 1, no output."""

from __future__ import annotations

import json
import shutil

import pytest
from merge_testlib import assert_one_line_error, poke, run_cli
from test_lora import make_adapter


@pytest.fixture
def adapter(tiny_model, tmp_path_factory):
    base = tiny_model("llama", 0)
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    return make_adapter(base, path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lora_alpha", "sixteen", "must be a finite number"),
        ("r", 0, "must be an integer >= 1"),
        ("r", "4", "must be an integer >= 1"),
        ("use_rslora", "yes", "must be true or false"),
        ("target_modules", 5, "must be a name or a list of names"),
        ("alpha_pattern", {"q_proj": "x"}, "mapping of module patterns to finite numbers"),
    ],
)
def test_adapter_config_types_are_checked(tiny_model, adapter, tmp_path, key, value, message):
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg[key] = value
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    r = run_cli("lora", tiny_model("llama", 0), bad, "-o", out)
    assert_one_line_error(r, "adapter_config.json", repr(key), message)
    assert not out.exists()


def test_adapter_config_not_an_object(tiny_model, adapter, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    (bad / "adapter_config.json").write_text("[1, 2]")
    r = run_cli("lora", tiny_model("llama", 0), bad, "-o", tmp_path / "out")
    assert_one_line_error(r, "adapter_config.json", "expected a JSON object")


@pytest.mark.parametrize("factor", ["lora_B", "lora_A"])
def test_nan_in_adapter_factor_is_refused_naming_the_tensor(tiny_model, adapter, tmp_path, factor):
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    name = poke(bad, factor, float("nan"))
    out = tmp_path / "out"
    r = run_cli("lora", tiny_model("llama", 0), bad, "-o", out)
    assert_one_line_error(r, repr(name), "NaN or Inf")
    assert not out.exists()


def test_nan_in_base_is_refused_even_where_the_adapter_does_not_reach(
    tiny_model_copy, adapter, tmp_path
):
    base = tiny_model_copy("llama", 0)
    name = poke(base, "post_attention_layernorm", float("inf"))  # copied, not adapted
    out = tmp_path / "out"
    r = run_cli("lora", base, adapter, "-o", out)
    assert_one_line_error(r, repr(name), "NaN or Inf")
    assert not out.exists()


def test_merged_tensor_that_overflows_is_refused(tiny_model, adapter, tmp_path):
    out = tmp_path / "out"
    r = run_cli("lora", tiny_model("llama", 0), adapter, "--scale", "1e39", "-o", out)
    assert_one_line_error(r, "q_proj.weight", "overflow float32")
    assert not out.exists()
