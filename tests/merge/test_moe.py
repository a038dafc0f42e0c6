"""``merge moe``: a Mixtral MoE from dense Llama experts (mergekit-moe's YAML).

Numbers checked: an MoE whose experts are all the base model computes the base model's
logits (the top-k weights sum to 1; 1e-5); cheap_embed router rows equal a hand computation
from the embedding table (1e-6); each expert slot holds its source model's MLP exactly; and
against mergekit-moe 0.1.5 (its venv): every tensor and the config equal (random gates with
the same seed, noise and residual scaling included; cheap_embed; bf16 output; Qwen2-MoE with
a shared expert) within 1e-6; hidden-state rows within cosine 0.999 (mergekit runs bf16).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from merge_testlib import assert_one_line_error, run_cli, tensors

from weightsmith.testing.peers import require_peer

PROMPTS = {
    "story": ["Once upon a time there was a little robot", "Lily and Tom went to the park"],
    "fox": ["The quick brown fox jumps over the lazy dog"],
    "lesson": ["A teacher model shows a small student which words come next"],
}


def _write(tmp: Path, name: str, data: dict) -> Path:
    path = tmp / f"{name}.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def _recipe(base: Path, experts: list[Path], gate_mode: str, **extra) -> dict:
    keys = list(PROMPTS)
    return {
        "base_model": str(base),
        "gate_mode": gate_mode,
        "experts": [
            {"source_model": str(e), "positive_prompts": PROMPTS[keys[i % 3]]}
            for i, e in enumerate(experts)
        ],
        **extra,
    }


def test_identical_experts_compute_the_base_model(tiny_model, tmp_path):
    import transformers

    base = tiny_model("llama", seed=0)
    cfg = _write(tmp_path, "same", {**_recipe(base, [base] * 3, "random"), "experts_per_token": 3})
    r = run_cli("moe", cfg, "-o", tmp_path / "moe", "--seed", 3)
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1].startswith("built Mixtral MoE: 3 experts")
    moe = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert type(moe).__name__ == "MixtralForCausalLM"
    dense = transformers.AutoModelForCausalLM.from_pretrained(base)
    ids = torch.tensor([[1, 7, 42, 99, 250, 3]])
    with torch.no_grad():
        assert torch.allclose(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=0)
    generated = moe.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 10)
    gates = tensors(tmp_path / "moe")["model.layers.0.mlp.gate.weight"]
    torch.manual_seed(3)  # mergekit's --random-seed: torch's global generator
    assert torch.equal(gates, torch.randn(2, 3, 64)[0])


def test_cheap_embed_rows_and_expert_slots(tiny_model, tmp_path):
    import transformers

    base, a, b = (tiny_model("llama", seed=s) for s in (0, 1, 2))
    data = _recipe(base, [a, b], "cheap_embed")
    data["experts"][1]["negative_prompts"] = PROMPTS["lesson"]
    r = run_cli("moe", _write(tmp_path, "ce", data), "-o", tmp_path / "moe")
    assert r.exit_code == 0, r.output
    out, src = tensors(tmp_path / "moe"), {p: tensors(p) for p in (base, a, b)}
    tok = transformers.AutoTokenizer.from_pretrained(base)
    embed = src[base]["model.embed_tokens.weight"]

    def unit_sum(prompts):  # Σ embeddings of BOS + prompt tokens over all prompts, normalised
        v = sum(
            embed[tok(tok.bos_token + p, add_special_tokens=False).input_ids].sum(0)
            for p in prompts
        )
        return v / v.norm()

    want = [unit_sum(PROMPTS["story"]), unit_sum(PROMPTS["fox"]) - unit_sum(PROMPTS["lesson"])]
    want = torch.stack([w / w.norm() for w in want])
    for i in range(2):
        assert torch.allclose(out[f"model.layers.{i}.mlp.gate.weight"], want, atol=1e-6)
        gate_up = out[f"model.layers.{i}.mlp.experts.gate_up_proj"]
        for e, model in enumerate((a, b)):
            mlp = f"model.layers.{i}.mlp."
            assert torch.equal(gate_up[e, :128], src[model][mlp + "gate_proj.weight"])
            assert torch.equal(gate_up[e, 128:], src[model][mlp + "up_proj.weight"])
            down = out[f"{mlp}experts.down_proj"][e]
            assert torch.equal(down, src[model][mlp + "down_proj.weight"])
    assert torch.equal(
        out["model.layers.1.self_attn.q_proj.weight"],
        src[base]["model.layers.1.self_attn.q_proj.weight"],
    )
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["num_local_experts"] == 2 and config["num_experts_per_tok"] == 2


def test_qwen_moe_with_shared_expert_loads_and_generates(tiny_model, tmp_path):
    """One shared expert -> Qwen2MoeForCausalLM that loads and generates; every expert slot
    (shared included) holds its source's MLP exactly; Llama's missing q/k/v biases are zeros."""
    import transformers

    base, a = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    data = _recipe(base, [a, base], "cheap_embed")
    data["shared_experts"] = [{"source_model": str(a), "positive_prompts": PROMPTS["lesson"]}]
    r = run_cli("moe", _write(tmp_path, "q", data), "-o", tmp_path / "moe")
    assert r.exit_code == 0, r.output
    assert "built Qwen2-MoE MoE: 2 experts" in r.output
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    assert model.generate(torch.tensor([[1, 7, 42]]), max_new_tokens=3, do_sample=False).shape == (
        1,
        6,
    )
    out, src_a, src_b = tensors(tmp_path / "moe"), tensors(a), tensors(base)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        dense = f"model.layers.1.mlp.{proj}.weight"
        assert torch.equal(out[f"model.layers.1.mlp.experts.0.{proj}.weight"], src_a[dense])
        assert torch.equal(out[f"model.layers.1.mlp.experts.1.{proj}.weight"], src_b[dense])
        assert torch.equal(out[f"model.layers.1.mlp.shared_expert.{proj}.weight"], src_a[dense])
    assert not out["model.layers.0.self_attn.q_proj.bias"].any()  # Llama has none: zeros
    assert out["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, 64)


def test_bad_configs_write_nothing(tiny_model, tmp_path):
    base, a = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    out = tmp_path / "moe"
    cases = {
        "hidden_avg": (_recipe(base, [a, base], "hidden_avg"), "not implemented yet"),
        "ept": ({**_recipe(base, [a, base], "random"), "experts_per_token": 3}, "at least as many"),
        "same prompts": (
            {
                **_recipe(base, [a, base], "cheap_embed"),
                "experts": [{"source_model": str(m), "positive_prompts": ["x"]} for m in (a, base)],
            },
            "prompts are identical",
        ),
        "same model": (_recipe(base, [a, a], "cheap_embed"), "same model"),
        "unknown": ({**_recipe(base, [a, base], "random"), "gates": 1}, "'gates'"),
        "gpt2": (_recipe(base, [tiny_model("gpt2", seed=1), a], "random"), "Llama or Mistral"),
        "deepseek": (
            {**_recipe(base, [a, base], "random"), "shared_experts": [{"source_model": str(a)}]},
            "DeepSeek",
        ),
        "qwen arch": ({**_recipe(base, [a, base], "random"), "architecture": "qwen"}, "Mixtral"),
    }
    for name, (data, fragment) in cases.items():
        assert_one_line_error(run_cli("moe", _write(tmp_path, name, data), "-o", out), fragment)
    assert not out.exists()


def test_hidden_gates_equal_the_full_model(tiny_model, tmp_path):
    """Layer-streamed rows = transformers' whole-model hidden_states[:-1] at the last token of
    each (BOS +) prompt, averaged, positive minus negative, normalised (float32, 1e-5)."""
    import transformers

    base, a = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    data = _recipe(base, [a, base], "hidden")
    data["experts"][0]["negative_prompts"] = PROMPTS["lesson"]
    r = run_cli("moe", _write(tmp_path, "hidden", data), "-o", tmp_path / "moe")
    assert r.exit_code == 0, r.output
    tok = transformers.AutoTokenizer.from_pretrained(base)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)

    def mean_last(prompts) -> torch.Tensor:  # (layers, hidden)
        rows = []
        for p in prompts:
            ids = torch.tensor([tok(tok.bos_token + p, add_special_tokens=False).input_ids])
            with torch.no_grad():
                hs = model(ids, output_hidden_states=True).hidden_states[:-1]
            rows.append(torch.stack([h[0, -1] for h in hs]))
        return torch.stack(rows).mean(0)

    want = [mean_last(PROMPTS["story"]) - mean_last(PROMPTS["lesson"]), mean_last(PROMPTS["fox"])]
    want = torch.stack([w / w.norm(dim=-1, keepdim=True) for w in want], dim=1)
    out = tensors(tmp_path / "moe")
    for i in range(2):
        assert torch.allclose(out[f"model.layers.{i}.mlp.gate.weight"], want[i], atol=1e-5)


MK_CASES = {
    "random": ("random", {"dtype": "float32", "experts_per_token": 1}, True),
    "cheap_embed": ("cheap_embed", {"dtype": "float32"}, False),
    "bf16": ("cheap_embed", {"dtype": "bfloat16"}, False),
    "uniform": ("uniform_random", {}, False),
    "hidden": ("hidden", {"dtype": "float32"}, False),  # mergekit runs the model in bfloat16
    "qwen_random": ("random", {"dtype": "float32", "experts_per_token": 1}, True),
    "qwen_cheap": ("cheap_embed", {"dtype": "bfloat16"}, False),
}


@pytest.mark.slow
def test_same_tensors_as_mergekit_moe(tiny_model, tmp_path):
    python = require_peer("mergekit")
    base, a, b = (tiny_model("llama", seed=s) for s in (0, 1, 2))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for name, (mode, extra, noise) in MK_CASES.items():
        data = {**_recipe(base, [a, b, base], mode), **extra}
        if noise:  # mergekit draws expert noise after the gates, from the same generator
            data["experts"][0].update(noise_scale=0.01, residual_scale=0.5)
        if name.startswith("qwen"):  # one gated shared expert: Qwen2-MoE output
            shared = {"source_model": str(a), "positive_prompts": ["The robot said hello"]}
            data["shared_experts"] = [{**shared, "noise_scale": 0.02} if noise else shared]
        cfg = _write(tmp_path, name, data)
        mk, ws = tmp_path / f"mk-{name}", tmp_path / f"ws-{name}"
        cmd = [str(python.parent / "mergekit-moe"), str(cfg), str(mk), "--random-seed", "11"]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        r = run_cli("moe", cfg, "-o", ws, "--seed", 11)
        assert r.exit_code == 0, r.output
        tm, tw = tensors(mk), tensors(ws)
        assert tm.keys() == tw.keys(), name
        for k, t in tm.items():
            assert t.dtype == tw[k].dtype, (name, k)
            if name == "hidden" and k.endswith("mlp.gate.weight"):  # bf16 vs float32 forward
                cos = torch.nn.functional.cosine_similarity(t.float(), tw[k].float(), dim=-1)
                assert cos.min() > 0.999, (k, cos)
                continue
            assert torch.allclose(t.float(), tw[k].float(), atol=1e-6, rtol=0), (name, k)
        cm, cw = (json.loads((d / "config.json").read_text()) for d in (mk, ws))
        for c in (cm, cw):  # the version of transformers each venv has, not the model's
            c.pop("transformers_version", None)
        assert cm == cw, name


def test_stories260k_experts(tmp_path):
    """The real pair: hidden gates, unit rows; experts hold each model's MLP; loads and
    generates (greedy) as a Mixtral."""
    import transformers

    from weightsmith.testing import shared_model

    base, ft = shared_model("stories260K"), shared_model("stories260K-shakespeare")
    if base is None or ft is None:
        pytest.skip("../shared/models/stories260K(-shakespeare) not found (WEIGHTSMITH_SHARED)")
    data = {
        "base_model": str(base),
        "experts": [
            {"source_model": str(base), "positive_prompts": ["Once upon a time, Lily"]},
            {"source_model": str(ft), "positive_prompts": ["ROMEO: What light through yonder"]},
        ],
    }  # gate_mode defaults to hidden, as in mergekit
    r = run_cli("moe", _write(tmp_path, "s", data), "-o", tmp_path / "moe")
    assert r.exit_code == 0, r.output
    out, b, f = tensors(tmp_path / "moe"), tensors(base), tensors(ft)
    for i in range(5):
        gate = out[f"model.layers.{i}.mlp.gate.weight"]
        assert torch.allclose(gate.norm(dim=-1), torch.ones(2), atol=1e-5)
        down = out[f"model.layers.{i}.mlp.experts.down_proj"]
        assert torch.equal(down[0], b[f"model.layers.{i}.mlp.down_proj.weight"])
        assert torch.equal(down[1], f[f"model.layers.{i}.mlp.down_proj.weight"])
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    ids = torch.tensor([[1, 403, 407]])
    assert model.generate(ids, max_new_tokens=8, do_sample=False).shape == (1, 11)
