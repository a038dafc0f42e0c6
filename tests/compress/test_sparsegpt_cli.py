"""End to end: `compress prune --method sparsegpt` on a tiny seeded Llama. The output loads in
transformers, and every decoder layer equals SparseGPT recomputed here on Hessians collected
with transformers' own forward (layer 1 on the output's pruned layer 0, as the reference
propagates the pruned layer's outputs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from weightsmith.cli.main import cli
from weightsmith.compress.prune import sparsegpt_prune
from weightsmith.core.calibration import load_calibration_text, load_tokenizer, tokenize_windows
from weightsmith.io import open_checkpoint
from weightsmith.testing import build_tiny_model

SAMPLES, SEQ = 8, 64  # 512 tokens: well-conditioned Hessians (ties would flip masks)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("sg") / "m", "llama", seed=0)


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    """The built-in calibration text as a file (varied text; a repetitive one gives rank-
    deficient Hessians where float rounding decides near-ties)."""
    p = tmp_path_factory.mktemp("sg-calib") / "calib.txt"
    p.write_text(load_calibration_text(None).text)
    return p


def _run(model: Path, out: Path, calib: Path, *opts: str) -> dict:
    report = out.parent / f"{out.name}.json"
    args = ["compress", "prune", str(model), "-o", str(out), "--method", "sparsegpt", *opts,
            "--calib", str(calib), "--calib-samples", str(SAMPLES), "--seq-len", str(SEQ),
            "--no-progress", "--report", str(report)]  # fmt: skip
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "pruned with sparsegpt" in r.output
    return json.loads(report.read_text())


def _hessians(model, ids: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
    """H = 2/n Σ x xᵀ (float64) of every Linear of decoder layer ``layer``, all collected in
    one pass over the model as it is."""
    acc: dict[str, list] = {}
    handles = []
    for n, m in model.model.layers[layer].named_modules():
        if n.split(".")[-1] in LINEARS:

            def hook(mod, args, n=n.split(".")[-1]):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                s = acc.setdefault(n, [0, 0])
                s[0] = s[0] + x.t() @ x
                s[1] += x.shape[0]

            handles.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in handles:
        h.remove()
    return {n: 2 / c * s for n, (s, c) in acc.items()}


def _module(model, layer: int, name: str) -> torch.nn.Linear:
    block = model.model.layers[layer]
    return getattr(block.self_attn if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
                   else block.mlp, name)  # fmt: skip


@pytest.mark.parametrize("opts", [("--pattern", "2:4"), ("--sparsity", "0.5")])
def test_layers_match_recomputation(tiny: Path, calib: Path, tmp_path: Path, opts) -> None:
    """Masks identical and weights within 2e-5 (float32 vs the float64 Hessians here; weights
    are ~N(0, 0.02)) of SparseGPT run on transformers-collected Hessians, layer by layer."""
    body = _run(tiny, tmp_path / "out", calib, *opts)
    extra = body["result"]["extra"]
    assert extra["pruned_linears"] == 14 and extra["sparsity"] >= 0.5
    ids = tokenize_windows(load_tokenizer(tiny), calib.read_text(), samples=SAMPLES, seq_len=SEQ)
    ref = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    spec = {"pattern": (2, 4)} if opts[0] == "--pattern" else {"sparsity": 0.5}
    for layer in range(2):
        hs = _hessians(ref, ids, layer)
        assert sorted(hs) == sorted(LINEARS)
        for name, h in hs.items():
            w0 = _module(ref, layer, name).weight.data
            want = sparsegpt_prune(w0, h.float(), **spec).weight
            have = _module(got, layer, name).weight.data
            assert torch.equal(have == 0, want == 0), (layer, name)
            torch.testing.assert_close(have, want, rtol=0, atol=2e-5)
            if "pattern" in spec:
                assert ((have == 0).reshape(have.shape[0], -1, 4).sum(-1) == 2).all()
        for name in LINEARS:  # the next layer calibrates on this pruned layer
            _module(ref, layer, name).weight.data.copy_(_module(got, layer, name).weight.data)
    # everything that is not a decoder-layer Linear is bit-identical
    a, b = open_checkpoint(tiny), open_checkpoint(tmp_path / "out")
    for n in a.tensors:
        if not n.endswith("_proj.weight"):
            assert torch.equal(a.get_tensor(n), b.get_tensor(n)), n
    with torch.no_grad():
        logits = got(ids[:2], use_cache=False).logits
    assert torch.isfinite(logits).all()
    prov = json.loads((tmp_path / "out" / "weightsmith.json").read_text())
    assert "sparsegpt" in json.dumps(prov) and '"damp": 0.1' in json.dumps(prov)


def test_bf16_model_and_refusals(calib: Path, tmp_path: Path) -> None:
    """A bf16 checkpoint stays bf16 with exact 2:4 zeros (the paper's N:M rule on request,
    recorded); --damp is refused for other methods, --nm-select without --pattern."""
    model = build_tiny_model(tmp_path / "bf", "llama", seed=1, dtype=torch.bfloat16)
    _run(model, tmp_path / "out", calib, "--pattern", "2:4", "--nm-select", "score")
    prov = (tmp_path / "out" / "weightsmith.json").read_text()
    assert '"nm_select": "score"' in prov
    ckpt = open_checkpoint(tmp_path / "out")
    for n in ckpt.tensors:
        t = ckpt.get_tensor(n)
        assert t.dtype == torch.bfloat16
        if ".layers." in n and n.endswith("_proj.weight"):
            assert ((t == 0).reshape(t.shape[0], -1, 4).sum(-1) == 2).all()
    refused = {("--method", "wanda", "--damp", "0.2"): "--damp does not apply",
               ("--method", "sparsegpt", "--nm-select", "score"): "--nm-select applies to"}  # fmt: skip
    for opts, message in refused.items():
        args = ["compress", "prune", str(model), "-o", str(tmp_path / "w"), *opts]
        r = CliRunner().invoke(cli, [*args, "--calib", str(calib)])
        assert r.exit_code == 1 and message in r.output, opts
        assert not (tmp_path / "w").exists()
