"""``merge lora`` equals peft's ``merge_and_unload()`` (float32, max abs diff <= 1e-6)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from merge_testlib import assert_one_line_error, run_cli, tensors

from weightsmith.merge.lora import lora_delta, pattern_value
from weightsmith.testing import shared_model


def make_adapter(base: Path, out: Path, seed: int = 0, **lora_kwargs) -> Path:
    """A peft LoRA on ``base`` with random (non-zero) A and B, saved as peft saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.save_pretrained(out)
    return out


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


def assert_equal_to_peft(base: Path, adapter: Path, out: Path, atol: float = 1e-6) -> None:
    expected = peft_merged(base, adapter)
    got = tensors(out)
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=atol, msg=name)


def test_lora_delta_layouts():
    a, b = torch.randn(2, 5), torch.randn(3, 2)  # r=2, in=5, out=3
    assert torch.allclose(lora_delta(a, b, 2.0), 2 * b @ a)
    assert lora_delta(a, b, 1.0, fan_in_fan_out=True).shape == (5, 3)
    ea, eb = torch.randn(2, 7), torch.randn(4, 2)  # vocab 7, dim 4
    assert torch.allclose(lora_delta(ea, eb, 0.5, embedding=True), 0.5 * (eb @ ea).T)


def test_pattern_matches_peft_suffix_rule():
    patterns = {"layers.1.self_attn.q_proj": 16, "v_proj": 4}
    assert pattern_value(patterns, "model.layers.1.self_attn.q_proj", 8) == 16
    assert pattern_value(patterns, "model.layers.11.self_attn.q_proj", 8) == 8
    assert pattern_value(patterns, "model.layers.0.self_attn.v_proj", 8) == 4


def test_lora_equals_peft_with_patterns_embedding_and_modules_to_save(tiny_model, tmp_path):
    base = tiny_model("llama", 0)
    adapter = make_adapter(
        base,
        tmp_path / "adapter",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"layers.1.self_attn.q_proj": 16},
    )
    out = tmp_path / "out"
    r = run_cli("lora", base, adapter, "-o", out, "--report", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert_equal_to_peft(base, adapter, out)
    assert not torch.equal(tensors(out)["lm_head.weight"], tensors(base)["lm_head.weight"])


def test_lora_rslora_equals_peft(tiny_model, tmp_path):
    base = tiny_model("llama", 0)
    adapter = make_adapter(
        base, tmp_path / "adapter", r=8, lora_alpha=4, use_rslora=True, target_modules="all-linear"
    )
    out = tmp_path / "out"
    assert run_cli("lora", base, adapter, "-o", out).exit_code == 0
    assert_equal_to_peft(base, adapter, out)


def test_lora_fan_in_fan_out_gpt2_equals_peft(tiny_model, tmp_path):
    base = tiny_model("gpt2", 0)
    adapter = make_adapter(
        base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
        fan_in_fan_out=True,
    )  # fmt: skip
    out = tmp_path / "out"
    r = run_cli("lora", base, adapter, "-o", out)
    assert r.exit_code == 0, r.output
    assert_equal_to_peft(base, adapter, out)


def test_lora_scale_override(tiny_model, tmp_path):
    base = tiny_model("llama", 0)
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    out = tmp_path / "out"
    assert run_cli("lora", base, adapter, "-o", out, "--scale", "0.5").exit_code == 0
    from safetensors.torch import load_file

    ad = load_file(adapter / "adapter_model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    a = ad[f"base_model.model.{q[:-7]}.lora_A.weight"]
    b = ad[f"base_model.model.{q[:-7]}.lora_B.weight"]
    expected = tensors(base)[q] + 0.5 * b @ a
    torch.testing.assert_close(tensors(out)[q], expected, rtol=0, atol=1e-6)


def test_lora_errors(tiny_model, tmp_path):
    base = tiny_model("llama", 0)
    r = run_cli("lora", base, tmp_path, "-o", tmp_path / "out")
    assert_one_line_error(r, "adapter_config.json")
    other = tiny_model("gpt2", 0)
    adapter = make_adapter(base, tmp_path / "adapter", r=4, target_modules=["q_proj"])
    r = run_cli("lora", other, adapter, "-o", tmp_path / "out")
    assert_one_line_error(r, "adapter targets", "q_proj")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_real_shakespeare_adapter_equals_peft(stories260k, tmp_path):
    adapter = shared_model("stories260K-lora-shakespeare")
    if adapter is None:
        pytest.skip("../shared/models/stories260K-lora-shakespeare not found")
    out = tmp_path / "out"
    r = run_cli("lora", stories260k, adapter, "-o", out)
    assert r.exit_code == 0, r.output
    assert_equal_to_peft(stories260k, adapter, out)
