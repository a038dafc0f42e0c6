"""Quantizing MoE models whose experts the output format cannot hold: the Linears are quantized,
the routed experts are kept as stored, listed in ``--report`` (``kept_experts``) with a one-line
note on stderr, and the output loads in transformers' own class (tiny seeded Mixtral,
Qwen3-MoE, DeepSeek-V3-style and gpt-oss models from transformers' own config classes).

- NF4 (bitsandbytes) on all four: bitsandbytes replaces nn.Linear modules and transformers holds
  routed experts as fused 3-D parameters, so its own ``load_in_4bit`` leaves them in float.
  weightsmith's output equals what transformers + bitsandbytes save, tensor for tensor, and
  loads with their logits exactly;
- RTN and GPTQ on gpt-oss (compressed-tensors): transformers has no conversion mapping that
  turns per-expert Linears into gpt-oss's fused experts, so the attention Linears are quantized
  and the fused experts, their biases, routers and sinks are copied byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from weightsmith.cli.main import cli
from weightsmith.compress.rtn import RTNConfig, rtn_quantize
from weightsmith.core.experts import expert_linears, fused_expert_tensors
from weightsmith.io import open_checkpoint
from weightsmith.testing import build_tiny_model
from weightsmith.testing.tiny import TINY_ARCHS

from .test_gptoss import GPT_OSS
from .test_moe import MOE
from .test_moe_deepseek import make_deepseek

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300, 2, 19, 23, 31, 57]])
ARCHS = ("mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss")
CALIB = ["--calib-samples", "4", "--seq-len", "32"]
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            if name == "deepseek_v3":
                cache[name] = make_deepseek(root)
            else:
                spec = ("GptOssConfig", GPT_OSS) if name == "gpt_oss" else MOE[name][:2]
                with pytest.MonkeyPatch.context() as mp:
                    mp.setitem(TINY_ARCHS, name, spec)
                    cache[name] = build_tiny_model(root / "m", name, seed=0)
        return cache[name]

    return make


def _quantize(src: Path, out: Path, *args: str) -> tuple[list[str], dict]:
    """Run ``compress quantize``; its output lines and the report's ``extra``."""
    report = out.parent / (out.name + ".json")
    res = CliRunner().invoke(cli, ["compress", "quantize", str(src), "-o", str(out), *args,
                                   "--report", str(report), "--no-progress"])  # fmt: skip
    assert res.exit_code == 0, res.output
    return res.output.strip().splitlines(), json.loads(report.read_text())["result"]["extra"]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ckpt:
        return {n: ckpt.get_tensor(n) for n in ckpt.tensors}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def _load(path: Path, **kw) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, **(kw or {"dtype": torch.float32})).eval()


def _expert_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if ".mlp.experts." in n}


@pytest.mark.parametrize("name", ARCHS)
def test_nf4_keeps_routed_experts_like_transformers_bnb(moe, tmp_path, name) -> None:
    """``--method nf4`` with no ``--ignore``: every Linear bitsandbytes can replace is NF4, the
    routed experts stay as stored (listed in the report, one note line), and the checkpoint
    equals transformers' own ``BitsAndBytesConfig(load_in_4bit=True)`` save tensor for tensor.
    Loaded: attention is Linear4bit, the experts equal the original's, the logits equal
    transformers' own NF4 model's exactly and are within 5% of the original's largest logit
    (measured 0.3-0.7%: the tiny models' logits are ~1e-2)."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    src = moe(name)
    lines, extra = _quantize(src, tmp_path / "n", "--method", "nf4")
    with open_checkpoint(src) as ckpt:
        fused = fused_expert_tensors(ckpt)
        kept = sorted(fused or [e.module for e in expert_linears(ckpt)])
    assert extra["kept_experts"] == kept and len(kept) in (4, 24, 48)
    notes = [line for line in lines if line.startswith("note: ")]
    assert len(notes) == 1 and f"{len(kept)} " in notes[0] and "kept" in notes[0], lines
    assert ("--method mxfp4" in notes[0]) == (name == "gpt_oss")
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    theirs = AutoModelForCausalLM.from_pretrained(src, quantization_config=bnb, device_map="cpu")
    theirs.save_pretrained(tmp_path / "ref")
    mine, ref = _tensors(tmp_path / "n"), _tensors(tmp_path / "ref")
    assert set(mine) == set(ref)
    assert sum(n.endswith("o_proj.weight.absmax") for n in mine) == len(_load(src).model.layers)
    assert all(torch.equal(mine[n], ref[n]) for n in ref)
    model, original = _load(tmp_path / "n", device_map="cpu"), _load(src)
    assert type(model) is type(original)
    assert type(model.model.layers[-1].self_attn.o_proj).__name__ == "Linear4bit"
    want = _expert_params(original)
    got = _expert_params(model)
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
    logits, before = _logits(model), _logits(original)
    assert torch.equal(logits, _logits(theirs.eval()))
    moved = (logits - before).abs().max().item()
    assert 0 < moved <= 0.05 * before.abs().max().item()


def _gptoss_kept_byte_identical(src: Path, out: Path) -> dict[str, torch.Tensor]:
    """Everything but the attention Linears' weights is copied as stored (fused experts and
    their biases, routers, sinks, attention biases, norms, embeddings, lm_head)."""
    original, stored = _tensors(src), _tensors(out)
    attn = {n for n in original if n.endswith(tuple(f"{a}.weight" for a in ATTN))}
    assert len(attn) == 4 * len(GPT_OSS_LAYERS)
    for n, t in original.items():
        if n not in attn:
            assert torch.equal(stored[n], t), n
        else:
            assert n not in stored and n.replace(".weight", ".weight_packed") in stored
    return original


GPT_OSS_LAYERS = range(GPT_OSS["num_hidden_layers"])
KEPT_FUSED = sorted(f"model.layers.{i}.mlp.experts.{p}" for i in GPT_OSS_LAYERS
                    for p in ("gate_up_proj", "down_proj"))  # fmt: skip


def _check_gptoss_report(lines: list[str], extra: dict) -> None:
    assert extra["quantized_linears"] == 4 * len(GPT_OSS_LAYERS)
    assert extra["kept_experts"] == KEPT_FUSED
    notes = [line for line in lines if line.startswith("note: ") and "kept" in line]
    assert len(notes) == 1 and "4 fused 3-D expert tensors" in notes[0]
    assert "--method mxfp4" in notes[0]


def test_gptoss_rtn_quantizes_attention_and_keeps_fused_experts(moe, tmp_path) -> None:
    """``--method rtn`` (4-bit, groups of 32) on gpt-oss: the output loads in
    ``GptOssForCausalLM`` with the logits of the original model whose q/k/v/o weights were
    fake-quantized with the same RTN in memory, within 1e-3 of how far quantization moved them
    (the fused experts, routers and sinks untouched)."""
    pytest.importorskip("compressed_tensors")
    src = moe("gpt_oss")
    lines, extra = _quantize(src, tmp_path / "q", "--method", "rtn", "--group-size", "32")
    _check_gptoss_report(lines, extra)
    _gptoss_kept_byte_identical(src, tmp_path / "q")
    loaded, ref = _load(tmp_path / "q"), _load(src)
    assert type(loaded).__name__ == "GptOssForCausalLM"
    before = _logits(ref)
    cfg = RTNConfig(bits=4, group_size=32)
    with torch.no_grad():
        for layer in ref.model.layers:
            for a in ATTN:
                w = getattr(layer.self_attn, a).weight
                w.copy_(rtn_quantize(w, cfg).dequantize())
    oracle, got = _logits(ref), _logits(loaded)
    moved = (oracle - before).abs().max().item()
    assert moved > 1e-3 * before.abs().max().item(), moved  # fails on an unquantized copy
    assert (got - oracle).abs().max().item() <= 1e-3 * moved


def test_gptoss_gptq_quantizes_attention_and_keeps_fused_experts(moe, tmp_path) -> None:
    """``--method gptq`` (4-bit, groups of 32) on gpt-oss: the layer stream runs transformers'
    own router and fused experts while GPTQ quantizes q/k/v then o (one loss each); no expert
    is calibrated, so no ``expert_tokens`` are reported. The output loads with the fused
    experts equal to the original's, GPTQ's weights differ from RTN's, and the logits are within
    2% of the original's largest logit (measured 0.16%)."""
    pytest.importorskip("compressed_tensors")
    src = moe("gpt_oss")
    lines, extra = _quantize(src, tmp_path / "g", "--method", "gptq", "--group-size", "32", *CALIB)
    _check_gptoss_report(lines, extra)
    assert len(extra["loss"]) == 4 * len(GPT_OSS_LAYERS) and "expert_tokens" not in extra
    _gptoss_kept_byte_identical(src, tmp_path / "g")
    _quantize(src, tmp_path / "r", "--method", "rtn", "--group-size", "32")
    loaded, rtn, ref = _load(tmp_path / "g"), _load(tmp_path / "r"), _load(src)
    before, logits = _logits(ref), _logits(loaded)  # compressed-tensors decompresses on a forward
    want, got = _expert_params(ref), _expert_params(loaded)
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
    _logits(rtn)
    q = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(loaded.get_parameter(q), rtn.get_parameter(q))
    moved = (logits - before).abs().max().item()
    assert 0 < moved <= 0.02 * before.abs().max().item()
