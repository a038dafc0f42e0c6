"""Qwen3-MoE / Mixtral checkpoints with transformers' in-memory fused 3-D experts: they occur
(``save_pretrained`` of a model loaded from fused tensors writes them fused again), load in
transformers, and take the same fused-expert path as gpt-oss (``(experts, out, in)`` layout,
[gate; up] concatenated): experts dropped by slicing, Wanda per expert slice against the
independent oracle; quantization refused in one line (no format transformers loads holds them)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from weightsmith.cli.main import cli
from weightsmith.core.experts_fused import fused_experts
from weightsmith.io import open_checkpoint
from weightsmith.testing import build_tiny_model
from weightsmith.testing.tiny import TINY_ARCHS

from .test_gptoss_calibrated import CALIB, _ids, _wanda_oracle

_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=0,
             pad_token_id=1, tie_word_embeddings=False)  # fmt: skip
MOE = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(_BASE, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32), "num_experts"),
    "mixtral": ("MixtralConfig", dict(_BASE, num_local_experts=4, num_experts_per_tok=2),
                "num_local_experts"),
}  # fmt: skip
D = 7


def _load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        """A tiny ``name`` with hand-set routers (even tokens -> experts {0, 2}, odd -> {1, 3})
        saved with the in-memory (fused) tensor names."""
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            with pytest.MonkeyPatch.context() as mp:
                mp.setitem(TINY_ARCHS, name, MOE[name][:2])
                src = build_tiny_model(root / "m", name, seed=0)
            model = _load(src)
            with torch.no_grad():
                emb = model.model.embed_tokens.weight
                emb[:, D] = torch.where(torch.arange(emb.shape[0]) % 2 == 0, 10.0, -10.0)
                for layer in model.model.layers:
                    layer.post_attention_layernorm.weight[D] = 1.0
                    layer.mlp.gate.weight.zero_()
                    layer.mlp.gate.weight[:, D] = torch.tensor([3.0, -3.0, 1.0, -1.0])
            out = root / "fused"
            out.mkdir()
            state = {k: v.contiguous() for k, v in model.state_dict().items()}
            save_file(state, out / "model.safetensors", metadata={"format": "pt"})
            for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
                shutil.copy(src / f, out / f)
            cache[name] = out
        return cache[name]

    return make


def _run(args: list[str]) -> CliRunner:
    return CliRunner().invoke(cli, [*args, "--no-progress"])


@pytest.mark.parametrize("name", sorted(MOE))
def test_fused_checkpoints_occur_and_are_detected(fused, tmp_path, name) -> None:
    """transformers loads the fused names, and save_pretrained writes them fused again; the
    description is switched to fused storage with the router under ``mlp``."""
    src = fused(name)
    model = _load(src)
    model.save_pretrained(tmp_path / "again")
    with open_checkpoint(tmp_path / "again") as ckpt:
        assert "model.layers.0.mlp.experts.gate_up_proj" in ckpt.tensors
        assert ckpt.arch.experts.storage == "fused" and ckpt.arch.experts.router == "mlp.gate"
        found = fused_experts(ckpt)
        assert len(found) == 4 and all(f.layout == "out_in" for f in found)
    res = _run(["compress", "quantize", str(src), "-o", str(tmp_path / "q"), "--method", "rtn"])
    assert res.exit_code == 1 and "no format transformers loads" in res.output
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("name", sorted(MOE))
def test_fused_drop_experts_loads_with_sliced_oracle(fused, tmp_path, name) -> None:
    """``--keep 2`` slices the 3-D tensors and the router rows: the output loads with 2
    experts and the logits of the original with those experts sliced out (atol 1e-6)."""
    src = fused(name)
    ids = _ids(src)
    even = int((ids % 2 == 0).sum())
    keep = [0, 2] if even > ids.numel() - even else [1, 3]
    report = tmp_path / "r.json"
    res = _run(["compress", "prune", str(src), "-o", str(tmp_path / "p"), "--method", "experts",
                "--keep", "2", *CALIB[:4], "--report", str(report)])  # fmt: skip
    assert res.exit_code == 0, res.output
    extra = json.loads(report.read_text())["result"]["extra"]
    assert extra["kept_experts"] == {"0": keep, "1": keep}
    pruned = _load(tmp_path / "p")
    assert getattr(pruned.config, MOE[name][2]) == 2
    oracle = _load(src)
    with torch.no_grad():
        for layer in oracle.model.layers:
            mlp = layer.mlp
            for p in (mlp.experts.gate_up_proj, mlp.experts.down_proj, mlp.gate.weight):
                p.data = p.data[keep].clone()
            mlp.experts.num_experts = mlp.gate.num_experts = 2
        torch.testing.assert_close(
            pruned(ids[:1]).logits, oracle(ids[:1]).logits, atol=1e-6, rtol=0
        )


def test_fused_qwen3_wanda_matches_oracle(fused, tmp_path) -> None:
    """Wanda on Qwen3-MoE's fused experts ((experts, out, in), act(gate) * up of the halves):
    the zeros are where the independent oracle puts them, the rest as stored."""
    src = fused("qwen3_moe")
    res = _run(["compress", "prune", str(src), "-o", str(tmp_path / "w"), "--method", "wanda",
                *CALIB[:4], "--report", str(tmp_path / "r.json")])  # fmt: skip
    assert res.exit_code == 0, res.output
    extra = json.loads((tmp_path / "r.json").read_text())["result"]["extra"]
    assert extra["expert_magnitude_fallbacks"] == [] and extra["pruned_expert_slices"] == 16
    oracle = _wanda_oracle(src, _ids(src), None)
    with open_checkpoint(tmp_path / "w") as got, open_checkpoint(src) as stored:
        for n in got.tensors:
            g, s = got.get_tensor(n), stored.get_tensor(n)
            assert torch.equal(g == 0, oracle[n] == 0), n
            assert torch.equal(g[g != 0], s[g != 0]), n
