"""Mixture-of-experts checkpoints (tiny seeded Mixtral and Qwen3-MoE from transformers' own
config classes): described as data (experts, routers), and data-free quantization with expert
Linears as targets writes compressed-tensors checkpoints transformers loads, with the logits of
an in-memory oracle (transformers' fused 3-D experts fake-quantized with torch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from weightsmith.cli.main import cli
from weightsmith.compress.rtn import RTNConfig, rtn_quantize
from weightsmith.core.experts import expert_linears, fused_expert_tensors, is_router
from weightsmith.io import open_checkpoint
from weightsmith.testing import build_tiny_model
from weightsmith.testing.tiny import TINY_ARCHS

_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=0,
             pad_token_id=1, tie_word_embeddings=False)  # fmt: skip

# name -> (config class, settings, per-expert Linears in stored order (gate, up, down), router)
MOE: dict[str, tuple[str, dict, tuple[str, str, str], str]] = {
    "mixtral": ("MixtralConfig", dict(_BASE, num_local_experts=4, num_experts_per_tok=2),
                ("w1", "w3", "w2"), "block_sparse_moe.gate"),
    "qwen3_moe": ("Qwen3MoeConfig", dict(_BASE, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32),
                  ("gate_proj", "up_proj", "down_proj"), "mlp.gate"),
}  # fmt: skip
EXPERTS, LAYERS = 4, 2
IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300, 2, 19, 23, 31, 57]])


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    cache: dict[tuple[str, int], Path] = {}

    def make(name: str, seed: int = 0) -> Path:
        if (name, seed) not in cache:
            cls_name, kwargs, _, _ = MOE[name]
            with pytest.MonkeyPatch.context() as mp:
                mp.setitem(TINY_ARCHS, name, (cls_name, kwargs))
                root = tmp_path_factory.mktemp(f"{name}-{seed}")
                cache[name, seed] = build_tiny_model(root / "m", name, seed=seed)
        return cache[name, seed]

    return make


def _cli(args: list[str], progress_flag: bool = True) -> str:
    res = CliRunner().invoke(cli, [*args, *(["--no-progress"] if progress_flag else [])])
    assert res.exit_code == 0, res.output
    return res.output


def _load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _check_oracle(got: torch.Tensor, oracle: torch.Tensor, before: torch.Tensor) -> None:
    """float32 round-off between ``got`` and the oracle (1e-3 of how far the edit moved the
    logits), and the edit moved them (the check would fail on an unquantized copy)."""
    moved = (oracle - before).abs().max().item()
    error = (got - oracle).abs().max().item()
    assert moved > 1e-3 * before.abs().max().item(), moved
    assert error <= 1e-3 * moved, (error, moved)


@pytest.mark.parametrize("name", sorted(MOE))
def test_moe_is_described(moe_model, tmp_path, name) -> None:
    """transformers 5.24 saves one Linear per expert (it fuses them to 3-D on load): every
    expert Linear and router is named by the description, and convert round-trips bit-exact."""
    src = moe_model(name)
    _, _, linears, router = MOE[name]
    with open_checkpoint(src) as ckpt:
        assert ckpt.arch.known and ckpt.arch.name == name
        assert ckpt.arch.experts.num_experts(ckpt.config) == EXPERTS
        found = {(e.layer, e.expert, e.linear) for e in expert_linears(ckpt)}
        assert found == {(i, e, n) for i in range(LAYERS) for e in range(EXPERTS) for n in linears}
        routers = [n for n in ckpt.tensors if is_router(ckpt.arch, n)]
        assert sorted(routers) == [f"model.layers.{i}.{router}.weight" for i in range(LAYERS)]
        assert fused_expert_tensors(ckpt) == []
        original = {n: ckpt.get_tensor(n) for n in ckpt.tensors}
    shown = _cli(["inspect", str(src)], progress_flag=False)
    assert "family: " + name in shown
    assert "experts          4 per layer, top-2 (one Linear per expert)" in shown
    _cli(["convert", str(src), "-o", str(tmp_path / "c"), "--max-shard-size", "100KB"])
    with open_checkpoint(tmp_path / "c") as out:
        assert set(out.tensors) == set(original)
        for n, t in original.items():
            assert torch.equal(out.get_tensor(n), t), n
    ref, back = _load(src), _load(tmp_path / "c")
    assert torch.equal(_logits(ref), _logits(back))


def _fake_quant_experts(model: torch.nn.Module, cfg: RTNConfig) -> None:
    """The oracle: every decoder Linear and every expert's gate/up/down fake-quantized in
    transformers' fused 3-D parameters (gate_up_proj = [gate; up] per expert); routers kept."""
    q = lambda w: rtn_quantize(w, cfg).dequantize()  # noqa: E731
    with torch.no_grad():
        for n, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in n:
                mod.weight.copy_(q(mod.weight))
            if hasattr(mod, "gate_up_proj") and mod.gate_up_proj.dim() == 3:
                half = mod.gate_up_proj.shape[1] // 2
                for e in range(mod.gate_up_proj.shape[0]):
                    gu = mod.gate_up_proj[e]
                    mod.gate_up_proj[e] = torch.cat([q(gu[:half]), q(gu[half:])])
                    mod.down_proj[e] = q(mod.down_proj[e])


@pytest.mark.parametrize("name", sorted(MOE))
def test_rtn_moe_loads_with_oracle_logits(moe_model, tmp_path, name) -> None:
    pytest.importorskip("compressed_tensors")
    src = moe_model(name)
    _cli(["compress", "quantize", str(src), "-o", str(tmp_path / "q"), "--method", "rtn",
          "--bits", "4", "--group-size", "32", "--report", str(tmp_path / "r.json")])  # fmt: skip
    report = json.loads((tmp_path / "r.json").read_text())
    extra = report["result"]["extra"]
    assert extra["quantized_linears"] == LAYERS * (4 + 3 * EXPERTS)  # q/k/v/o + 3 per expert
    with open_checkpoint(tmp_path / "q") as out:  # routers stay float, as stored
        routers = [n for n in out.tensors if is_router(out.arch, n)]
        assert len(routers) == LAYERS
        assert all(out.info(n).torch_dtype == torch.float32 for n in routers)
    loaded, ref = _load(tmp_path / "q"), _load(src)
    assert type(loaded) is type(ref)
    before = _logits(ref)
    _fake_quant_experts(ref, RTNConfig(bits=4, group_size=32))
    _check_oracle(_logits(loaded), _logits(ref), before)


@pytest.mark.parametrize("name", sorted(MOE))
def test_gptq_format_refuses_experts(moe_model, tmp_path, name) -> None:
    """The GPTQ format replaces nn.Linear modules only: quantized experts would not load, so it
    refuses them with one line (NF4 keeps them as stored instead, like transformers' own
    load_in_4bit: tests/test_moe_keep_experts.py)."""
    src = moe_model(name)
    res = CliRunner().invoke(cli, ["compress", "quantize", str(src), "-o", str(tmp_path / "n"),
                                   "--method", "rtn", "--format", "gptq", "--group-size", "32",
                                   "--no-progress"])  # fmt: skip
    assert res.exit_code == 1 and "cannot hold quantized MoE experts" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "n").exists()


@pytest.mark.parametrize("name", sorted(MOE))
def test_fused_expert_layout_is_described_and_refused(moe_model, tmp_path, name) -> None:
    """A checkpoint saved with transformers' in-memory names (fused 3-D experts) is
    recognised; quantizing it is refused with one line (no loadable quantized form)."""
    src = moe_model(name)
    model = _load(src)
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(fused / "model.safetensors"), metadata={"format": "pt"})  # fmt: skip
    (fused / "config.json").write_text((src / "config.json").read_text())
    with open_checkpoint(fused) as ckpt:
        assert ckpt.arch.name == name
        assert len(fused_expert_tensors(ckpt)) == 2 * LAYERS
        assert expert_linears(ckpt) == []
    assert torch.equal(_logits(_load(fused)), _logits(model))  # transformers loads it too
    res = CliRunner().invoke(cli, ["compress", "quantize", str(fused), "-o", str(tmp_path / "q"),
                                   "--method", "rtn", "--no-progress"])  # fmt: skip
    assert res.exit_code == 1 and "fused 3-D experts" in res.output


def test_qat_refuses_experts(moe_model, tmp_path) -> None:
    """QAT swaps nn.Linear modules of transformers' model; its experts are fused 3-D params."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a few words to train on"}\n')
    res = CliRunner().invoke(cli, ["compress", "qat", str(moe_model("mixtral")), "-o",
                                   str(tmp_path / "q"), "--data", str(data), "--no-progress"])  # fmt: skip
    assert res.exit_code == 1 and "does not train MoE experts" in res.output, res.output
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("name", sorted(MOE))
def test_linear_merge_merges_experts_and_routers(moe_model, tmp_path, name) -> None:
    """Experts and routers merge tensor-wise: the output loads with the logits of the oracle
    (every parameter 0.25·a + 0.75·b, fused experts included)."""
    a, b = moe_model(name, 0), moe_model(name, 1)
    _cli(["merge", "linear", str(a), str(b), "--weights", "0.25,0.75", "-o", str(tmp_path / "m")])
    loaded, ref, other = _load(tmp_path / "m"), _load(a), _load(b)
    before = _logits(ref)
    with torch.no_grad():
        for p, q in zip(ref.parameters(), other.parameters(), strict=True):
            p.copy_(0.25 * p + 0.75 * q)
    _check_oracle(_logits(loaded), _logits(ref), before)
