"""The current dense families, each as a tiny seeded model built from transformers' own config
class: detected by an architecture description (not a name-pattern guess), and RTN
quantization, Wanda pruning and a linear merge give checkpoints that transformers loads in the
same class, with the logits of an in-memory oracle (the same weights edited with torch)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from weightsmith.cli.main import cli
from weightsmith.compress.rtn import RTNConfig, rtn_quantize
from weightsmith.io import open_checkpoint
from weightsmith.testing import build_tiny_model
from weightsmith.testing.tiny import TINY_ARCHS

_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
_IDS = dict(bos_token_id=0, eos_token_id=0, pad_token_id=1)

# name -> (transformers config class, its settings, transformers class, description it uses)
FAMILIES: dict[str, tuple[str, dict, str, str]] = {
    "mistral": ("MistralConfig", dict(_BASE, head_dim=16, tie_word_embeddings=False, **_IDS),
                "MistralForCausalLM", "llama"),
    "qwen2": ("Qwen2Config", dict(_BASE, tie_word_embeddings=True, **_IDS),
              "Qwen2ForCausalLM", "llama"),
    "qwen3": ("Qwen3Config", dict(_BASE, head_dim=16, tie_word_embeddings=False, **_IDS),
              "Qwen3ForCausalLM", "llama"),
    "gemma2": ("Gemma2Config", dict(_BASE, head_dim=16, sliding_window=8, **_IDS),
               "Gemma2ForCausalLM", "llama"),
    "gemma3_text": ("Gemma3TextConfig",
                    dict(_BASE, head_dim=16, sliding_window=8,
                         layer_types=["sliding_attention", "full_attention"], **_IDS),
                    "Gemma3ForCausalLM", "llama"),
    "phi3": ("Phi3Config", dict(_BASE, tie_word_embeddings=False, **_IDS),
             "Phi3ForCausalLM", "phi3"),
    # Phi-4-mini: the Phi-3 class with partial rotary embeddings and tied embeddings
    "phi4_mini": ("Phi3Config",
                  dict(_BASE, partial_rotary_factor=0.75, tie_word_embeddings=True, **_IDS),
                  "Phi3ForCausalLM", "phi3"),
    "olmo2": ("Olmo2Config", dict(_BASE, tie_word_embeddings=False, **_IDS),
              "Olmo2ForCausalLM", "llama"),
    "granite": ("GraniteConfig",
                dict(_BASE, embedding_multiplier=4.0, residual_multiplier=0.5,
                     attention_multiplier=0.25, logits_scaling=2.0, tie_word_embeddings=False,
                     **_IDS),
                "GraniteForCausalLM", "llama"),
}  # fmt: skip

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300, 2, 19, 23, 31, 57]])


@pytest.fixture(scope="module")
def family_model(tmp_path_factory):
    """``family_model(name, seed)`` -> a tiny seeded checkpoint of that family."""
    cache: dict[tuple[str, int], Path] = {}

    def make(name: str, seed: int = 0) -> Path:
        if (name, seed) not in cache:
            cls_name, kwargs, _, _ = FAMILIES[name]
            with pytest.MonkeyPatch.context() as mp:
                mp.setitem(TINY_ARCHS, name, (cls_name, kwargs))
                root = tmp_path_factory.mktemp(f"{name}-{seed}")
                cache[name, seed] = build_tiny_model(root / "m", name, seed=seed)
        return cache[name, seed]

    return make


def _cli(args: list[str]) -> None:
    res = CliRunner().invoke(cli, [*args, "--no-progress"])
    assert res.exit_code == 0, res.output


def _load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _check_oracle(got: torch.Tensor, oracle: torch.Tensor, before: torch.Tensor) -> None:
    """``got`` equals the oracle's logits up to float32 round-off, and the edit being checked
    moved the logits at least 1000 times further than that (tiny seeded weights give logits
    of ~1e-2, so an absolute tolerance alone could not tell an edit from no edit)."""
    moved = (oracle - before).abs().max().item()
    error = (got - oracle).abs().max().item()
    assert moved > 1e-4 * before.abs().max().item(), moved  # the edit changed the model
    assert error <= 1e-3 * moved, (error, moved)


def _target_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n}  # fmt: skip


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_is_described(family_model, name) -> None:
    path = family_model(name)
    model = _load(path)
    assert type(model).__name__ == FAMILIES[name][2]
    with open_checkpoint(path) as ckpt:
        assert ckpt.arch.known and ckpt.arch.name == FAMILIES[name][3]
        layers = {ckpt.arch.layer_of(n) for n in ckpt.tensors}
        assert layers == {0, 1, None}
        state = model.state_dict()
        for tensor in ckpt.tensors:  # every stored tensor reads back as transformers has it
            assert torch.equal(ckpt.get_tensor(tensor), state[tensor]), tensor
        for group in ckpt.arch.sequential_linears:  # every Linear it orders exists
            for linear in group:
                assert f"model.layers.0.{linear}.weight" in ckpt.tensors, linear


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_rtn_output_loads_with_oracle_logits(family_model, tmp_path, name) -> None:
    pytest.importorskip("compressed_tensors")
    src = family_model(name)
    _cli(["compress", "quantize", str(src), "-o", str(tmp_path / "q"), "--method", "rtn",
          "--bits", "4", "--group-size", "32"])  # fmt: skip
    loaded, ref = _load(tmp_path / "q"), _load(src)
    assert type(loaded) is type(ref)
    before = _logits(ref)
    cfg = RTNConfig(bits=4, group_size=32)
    for mod in _target_linears(ref).values():
        mod.weight.data = rtn_quantize(mod.weight.data, cfg).dequantize()
    # the same dequantized weights, another matmul order: float32 round-off only
    _check_oracle(_logits(loaded), _logits(ref), before)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_wanda_output_loads_with_exact_sparsity(family_model, tmp_path, name) -> None:
    src = family_model(name)
    _cli(["compress", "prune", str(src), "-o", str(tmp_path / "p"), "--method", "wanda",
          "--sparsity", "0.5", "--calib-samples", "4", "--seq-len", "32"])  # fmt: skip
    loaded, ref = _load(tmp_path / "p"), _load(src)
    assert type(loaded) is type(ref)
    before = _logits(ref)
    pruned = _target_linears(loaded)
    assert len(pruned) == len(_target_linears(ref)) > 0
    for n, mod in _target_linears(ref).items():
        w, kept = pruned[n].weight.data, pruned[n].weight.data != 0
        # Wanda: exactly half of every row zeroed, the rest unchanged
        assert (kept.sum(dim=1) == w.shape[1] // 2).all(), n
        assert torch.equal(w[kept], mod.weight.data[kept]), n
        mod.weight.data = mod.weight.data * kept
    _check_oracle(_logits(loaded), _logits(ref), before)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_linear_merge_output_loads_with_oracle_logits(family_model, tmp_path, name) -> None:
    a, b = family_model(name, 0), family_model(name, 1)
    _cli(["merge", "linear", str(a), str(b), "--weights", "0.25,0.75", "-o", str(tmp_path / "m")])
    loaded, ref, other = _load(tmp_path / "m"), _load(a), _load(b)
    assert type(loaded) is type(ref)
    before = _logits(ref)
    with torch.no_grad():
        for p, q in zip(ref.parameters(), other.parameters(), strict=True):
            p.copy_(0.25 * p + 0.75 * q)  # the oracle: (0.25·a + 0.75·b) / 1
    _check_oracle(_logits(loaded), _logits(ref), before)


# Mixtral, Qwen3-MoE (tests/test_moe.py) and DeepSeek-V3 (tests/test_moe_deepseek.py) are
# described now; OLMoE is not (its tensor names match llama.json's templates: no guessing).
UNDESCRIBED = {
    "olmoe": ("OlmoeConfig", dict(_BASE, num_experts=4, num_experts_per_tok=2, **_IDS)),
}  # fmt: skip


@pytest.fixture(scope="module")
def undescribed_model(tmp_path_factory):
    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            with pytest.MonkeyPatch.context() as mp:
                mp.setitem(TINY_ARCHS, name, UNDESCRIBED[name])
                root = tmp_path_factory.mktemp(name)
                cache[name] = build_tiny_model(root / "m", name, seed=0)
        return cache[name]

    return make


@pytest.mark.parametrize("name", sorted(UNDESCRIBED))
def test_undescribed_architectures_are_refused(undescribed_model, tmp_path, name) -> None:
    """Today's llama.json templates match Mixtral's tensor names; guessing from them wrote a
    checkpoint transformers cannot load. Every command that needs the layout now refuses."""
    src = undescribed_model(name)
    out = tmp_path / "out"
    commands = [
        ["compress", "quantize", str(src), "-o", str(out), "--method", "rtn", "--group-size", "32"],
        ["compress", "quantize", str(src), "-o", str(out), "--method", "gptq", "--group-size", "32",
         "--calib-samples", "2", "--seq-len", "16"],
        ["compress", "prune", str(src), "-o", str(out), "--method", "wanda"],
        ["compress", "prune", str(src), "-o", str(out), "--method", "layers", "--drop", "1"],
        ["merge", "linear", str(src), str(src), "-o", str(out)],
    ]  # fmt: skip
    for args in commands:
        res = CliRunner().invoke(cli, [*args, "--no-progress"])
        assert res.exit_code == 1, (args, res.output)
        lines = [x for x in res.output.strip().splitlines() if not x.startswith("note:")]
        assert len(lines) == 1 and f"architecture {name} (" in lines[0], res.output
        assert "is not described in weightsmith" in lines[0]
        assert "src/weightsmith/io/architectures/" in lines[0] and not out.exists()
    with open_checkpoint(src) as ckpt:
        assert not ckpt.arch.known
    # reading and copying need no description: convert stays bit-exact
    _cli(["convert", str(src), "-o", str(tmp_path / "copy")])
    with open_checkpoint(src) as a, open_checkpoint(tmp_path / "copy") as b:
        assert all(torch.equal(a.get_tensor(n), b.get_tensor(n)) for n in a.tensors)


def test_multimodal_config_is_not_guessed(family_model, tmp_path) -> None:
    """A Llama text decoder's tensors under a PaliGemma config: the names match llama.json,
    the config says a class no description covers, and quantize refuses. (LLaVA, Gemma 3 and
    Qwen2.5-VL are described: tests/test_multimodal.py.)"""
    import json
    import shutil

    src = tmp_path / "llava"
    shutil.copytree(family_model("mistral"), src)
    config = json.loads((src / "config.json").read_text())
    text = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    (src / "config.json").write_text(json.dumps({
        "model_type": "paligemma", "architectures": ["PaliGemmaForConditionalGeneration"],
        "text_config": {"model_type": "mistral", **text},
    }))  # fmt: skip
    res = CliRunner().invoke(cli, ["compress", "quantize", str(src), "-o", str(tmp_path / "q")])
    assert res.exit_code == 1
    assert "architecture paligemma (PaliGemmaForConditionalGeneration)" in res.output
    assert not (tmp_path / "q").exists()
