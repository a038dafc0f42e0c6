"""End to end: `compress prune --method magnitude|wanda` on tiny models."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from weightsmith.cli.main import cli
from weightsmith.compress.prune import PruneConfig, nm_mask, prune_checkpoint, row_mask, tensor_mask
from weightsmith.compress.prune.wanda import wanda_scores
from weightsmith.core.calibration import load_calibration_text, load_tokenizer, tokenize_windows
from weightsmith.io import open_checkpoint

CALIB = dict(calib_samples=4, seq_len=32)
IDS = torch.tensor([[1, 5, 9, 14, 2, 7, 30, 41, 3, 8]])


def _linears(model) -> dict[str, torch.nn.Module]:
    """Decoder-layer Linears (or GPT-2 Conv1Ds) of a transformers model, by module name."""
    return {
        n: m
        for n, m in model.named_modules()
        if re.search(r"\.(layers|h)\.\d+\.", n)
        and (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")
    }


def _out_in(model, m) -> torch.Tensor:
    return m.weight.data.t() if type(m).__name__ == "Conv1D" else m.weight.data


def _calib_ids(path: Path) -> torch.Tensor:
    text = load_calibration_text(None).text
    return tokenize_windows(
        load_tokenizer(path), text, samples=CALIB["calib_samples"], seq_len=CALIB["seq_len"]
    )


def _input_norms(model, ids: torch.Tensor, layer_prefix: str) -> dict[str, torch.Tensor]:
    """||X_j||_2 of every Linear's inputs in one decoder layer, from transformers' own forward."""
    sq: dict[str, torch.Tensor] = {}
    handles = []
    for n, m in model.named_modules():
        if n.startswith(layer_prefix) and n in _linears(model):

            def hook(mod, args, n=n):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sq[n] = sq.get(n, 0) + x.pow(2).sum(0)

            handles.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        for s in range(0, ids.shape[0], 8):
            model(ids[s : s + 8], use_cache=False)
    for h in handles:
        h.remove()
    return {n: v.sqrt().float() for n, v in sq.items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_unstructured_half_exact_sparsity_and_loads(tiny_model, tmp_path, arch, method):
    src = tiny_model(arch)
    r = prune_checkpoint(
        src, tmp_path / "p", PruneConfig(method=method, sparsity=0.5, **CALIB), progress=False
    )
    orig = AutoModelForCausalLM.from_pretrained(src).eval()
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    lin_o, lin_p = _linears(orig), _linears(pruned)
    assert len(lin_p) == r.extra["pruned_linears"] > 0
    for n, m in lin_p.items():
        w, w0 = _out_in(pruned, m), _out_in(orig, lin_o[n])
        zero = w == 0
        if method == "wanda":  # per output row, exactly half
            assert zero.sum(1).tolist() == [w.shape[1] // 2] * w.shape[0], n
        else:  # per matrix, exactly half; the smallest magnitudes
            assert zero.sum().item() == w.numel() // 2, n
            assert w0.abs()[zero].max() <= w0.abs()[~zero].min()
        assert torch.equal(w[~zero], w0[~zero])  # everything else bit-identical
    # embeddings, norms and lm_head untouched
    so, sp = orig.state_dict(), pruned.state_dict()
    for n in so:
        if not any(n.startswith(k + ".") for k in lin_p):
            assert torch.equal(so[n], sp[n]), n
    assert r.extra["sparsity"] == pytest.approx(0.5)
    assert set(r.extra["layer_sparsity"]) == {"0", "1"}
    with torch.no_grad():
        assert torch.isfinite(pruned(IDS).logits).all()


def test_nm_pattern_in_every_block_and_report(tiny_model, tmp_path):
    src = tiny_model("llama")
    report = tmp_path / "r.json"
    res = CliRunner().invoke(
        cli,
        ["compress", "prune", str(src), "-o", str(tmp_path / "p"), "--method", "wanda", "--pattern", "2:4",
         "--calib-samples", "4", "--seq-len", "32", "--no-progress", "--report", str(report)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    for n, m in _linears(model).items():
        blocks = (m.weight == 0).view(m.weight.shape[0], -1, 4).sum(-1)
        assert (blocks == 2).all(), n
    body = json.loads(report.read_text())
    assert body["ok"] and body["result"]["extra"]["target"] == "2:4"
    assert body["result"]["extra"]["layer_sparsity"] == {"0": 0.5, "1": 0.5}
    assert all(v == 0.5 for v in body["result"]["extra"]["tensor_sparsity"].values())
    prov = json.loads((tmp_path / "p" / "weightsmith.json").read_text())
    assert prov["config"]["pattern"] == [2, 4] and prov["config"]["version"] == 1
    assert prov["calibration"]["samples"] == 4


def test_magnitude_nm_is_per_row_blocks(tiny_model, tmp_path):
    src = tiny_model("llama")
    prune_checkpoint(
        src, tmp_path / "p", PruneConfig(method="magnitude", pattern=(4, 8)), progress=False
    )
    out, orig = open_checkpoint(tmp_path / "p"), open_checkpoint(src)
    n = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(out.get_tensor(n) == 0, nm_mask(orig.get_tensor(n).abs(), 4, 8))
    n = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(out.get_tensor(n) == 0, nm_mask(orig.get_tensor(n).abs(), 4, 8))
    assert not torch.equal(
        nm_mask(orig.get_tensor(n).abs(), 4, 8), tensor_mask(orig.get_tensor(n).abs(), 0.5)
    )


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_wanda_masks_match_transformers_activations(tiny_model, tmp_path, pattern):
    # Layer 0: norms from the dense model. Layer 1: norms from the model whose layer 0 is
    # already pruned (the output's layer 0), as the streamed calibration promises.
    src = tiny_model("llama")
    cfg = PruneConfig(method="wanda", sparsity=None if pattern else 0.5, pattern=pattern, **CALIB)
    prune_checkpoint(src, tmp_path / "p", cfg, progress=False)
    ids = _calib_ids(src)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    for layer in (0, 1):
        prefix = f"model.layers.{layer}."
        norms = _input_norms(model, ids, prefix)
        assert len(norms) == 7
        lp = _linears(pruned)
        for n, m in _linears(model).items():
            if not n.startswith(prefix):
                continue
            scores = wanda_scores(m.weight.data, norms[n])
            want = nm_mask(scores, *pattern) if pattern else row_mask(scores, 0.5)
            assert torch.equal(lp[n].weight.data == 0, want), n
        # the next layer sees this layer pruned
        model.model.layers[layer].load_state_dict(pruned.model.layers[layer].state_dict())


def test_ignore_keeps_linears_dense_and_bf16_stays_bf16(tiny_model, tmp_path):
    src = tiny_model("llama", dtype=torch.bfloat16)
    cfg = PruneConfig(method="magnitude", sparsity=0.25, ignore=("mlp.down_proj", "lm_head"))
    r = prune_checkpoint(src, tmp_path / "p", cfg, progress=False)
    assert r.extra["pruned_linears"] == 12
    assert "model.layers.0.mlp.down_proj" in r.extra["kept_linears"]
    assert "lm_head" in r.extra["kept_linears"]
    out, orig = open_checkpoint(tmp_path / "p"), open_checkpoint(src)
    d = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(out.get_tensor(d), orig.get_tensor(d))
    q = out.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert q.dtype == torch.bfloat16 and (q == 0).sum().item() == q.numel() // 4
