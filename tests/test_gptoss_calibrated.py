"""Calibrated pruning of gpt-oss's fused 3-D experts: the layer stream reproduces transformers'
hidden states (sliding and full attention layers get their own masks), and Wanda / N:M prune
every expert slice as its own Linear with exact sparsity, against an independent Wanda written
here on transformers' own model (hooks on the full forward, no weightsmith code)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from weightsmith.cli.main import cli
from weightsmith.core.calibration import LayerStreamer, load_calibration_text, load_tokenizer
from weightsmith.core.calibration_data import tokenize_windows
from weightsmith.io import open_checkpoint
from weightsmith.testing import build_tiny_model
from weightsmith.testing.tiny import TINY_ARCHS

from .test_gptoss import GPT_OSS, _routed

SAMPLES, SEQ = 4, 32  # SEQ > sliding_window (8): the two attention kinds differ
CALIB = ["--calib-samples", str(SAMPLES), "--seq-len", str(SEQ), "--no-progress"]


@pytest.fixture(scope="module")
def routed(tmp_path_factory) -> Path:
    """A tiny gpt-oss whose hand-set routers send every expert tokens (see ``_routed``)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(TINY_ARCHS, "gpt_oss", ("GptOssConfig", GPT_OSS))
        root = tmp_path_factory.mktemp("gptoss-cal")
        src = build_tiny_model(root / "m", "gpt_oss", seed=0)
    return _routed(src, root / "routed")


def _ids(path: Path) -> torch.Tensor:
    text = load_calibration_text(None).text
    return tokenize_windows(load_tokenizer(path), text, samples=SAMPLES, seq_len=SEQ)


def _load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_layer_stream_matches_transformers_sliding_and_full(routed) -> None:
    """Streaming one decoder layer at a time gives the input of the final norm that
    transformers computes (atol 1e-5), with layer 0's sliding-window mask and layer 1's full
    causal mask; layer 1 run with layer 0's mask would differ (checked)."""
    ids = _ids(routed)
    model = _load(routed)
    seen = []
    model.model.norm.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(ids)
    with open_checkpoint(routed) as ckpt:
        streamer = LayerStreamer(ckpt, ids, batch_size=2)
        for _ in streamer.run(lambda cl: None):
            pass
        got = streamer.hidden_states()
    torch.testing.assert_close(got, seen[0], atol=1e-5, rtol=0)
    with torch.no_grad():  # the masks do matter here
        x = model.model.embed_tokens(ids)
        pos = torch.arange(ids.shape[1])[None]
        emb = model.model.rotary_emb(x, pos)
        sliding = model.model.layers[0].self_attn.sliding_window
        keep = (pos <= pos.T) & (pos.T - pos < sliding)
        mask = torch.where(keep, 0.0, float("-inf"))[None, None]
        h0 = model.model.layers[0](x, attention_mask=mask, position_embeddings=emb)
        wrong = model.model.layers[1](h0, attention_mask=mask, position_embeddings=emb)
    assert (wrong - seen[0]).abs().max() > 1e-4  # 10x the tolerance above (measured 7e-4)


def _wanda_oracle(path: Path, ids: torch.Tensor, nm: tuple[int, int] | None) -> dict:
    """Wanda on transformers' model (gpt-oss, or a Qwen3-MoE with fused experts), layer by layer: attention Linears scored on the unpruned
    layer and pruned; then every expert slice (Linear weight = slice transposed) scored on
    the tokens the router sends it -- gate_up on the hidden state, down on the gated
    activation -- and pruned; the next layer sees the pruned one. Half of each row (or 2 of
    every 4 inputs) with the lowest |W|·||X_j|| is zeroed."""
    model = _load(path)

    def prune(w: torch.Tensor, norm: torch.Tensor) -> None:  # w: (out, in) view, in place
        s = w.abs() * norm[None]
        if nm is None:
            drop = s.topk(w.shape[1] // 2, dim=1, largest=False).indices
            w.scatter_(1, drop, 0.0)
        else:
            g = s.reshape(w.shape[0], -1, nm[1])
            drop = g.topk(nm[1] - nm[0], dim=2, largest=False).indices
            w.view(w.shape[0], -1, nm[1]).scatter_(2, drop, 0.0)

    for layer in model.model.layers:
        attn = layer.self_attn
        lins = {n: getattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        sq = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in lins.items()}

        def record(m, a, stat):
            stat += a[0].reshape(-1, a[0].shape[-1]).double().pow(2).sum(0)

        hooks = [m.register_forward_pre_hook(lambda m, a, s=sq[n]: record(m, a, s))
                 for n, m in lins.items()]  # fmt: skip
        with torch.no_grad():
            model(ids)
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for n, m in lins.items():
                prune(m.weight, sq[n].sqrt().float())
        ex = layer.mlp.experts
        gpt_oss = hasattr(ex, "gate_up_proj_bias")
        t = (lambda w: w.t()) if gpt_oss else (lambda w: w)
        gu_sq = torch.zeros(ex.num_experts, t(ex.gate_up_proj[0]).shape[1], dtype=torch.float64)
        dn_sq = torch.zeros(ex.num_experts, t(ex.down_proj[0]).shape[1], dtype=torch.float64)

        def hook(m, a, gu_sq=gu_sq, dn_sq=dn_sq, gpt_oss=gpt_oss):
            x, idx = a[0], a[1]
            for e in range(m.num_experts):
                xe = x[(idx == e).any(-1)]
                if gpt_oss:  # x @ W + b, gate/up interleaved, clamped
                    act = m._apply_gate(xe @ m.gate_up_proj[e] + m.gate_up_proj_bias[e])
                else:  # Qwen3-MoE in memory: W x, [gate; up]
                    gate, up = (xe @ m.gate_up_proj[e].t()).chunk(2, dim=-1)
                    act = m.act_fn(gate) * up
                gu_sq[e] += xe.double().pow(2).sum(0)
                dn_sq[e] += act.double().pow(2).sum(0)

        h = ex.register_forward_pre_hook(hook)
        with torch.no_grad():
            model(ids)
            h.remove()
            for e in range(ex.num_experts):
                prune(t(ex.gate_up_proj[e]), gu_sq[e].sqrt().float())
                prune(t(ex.down_proj[e]), dn_sq[e].sqrt().float())
    return {n: p.detach() for n, p in model.state_dict().items()}


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_wanda_on_fused_experts_matches_oracle(routed, tmp_path, pattern) -> None:
    """Every expert slice has exactly half of each row zeroed (or 2 of every 4 inputs), the
    zeros are where the independent Wanda puts them, the kept weights are bit-identical, and
    the output loads with the oracle's logits (atol 1e-6); no expert falls back (each is
    routed >= 32 tokens by the hand-set router). ``expert_tokens`` are the hand-checked counts:
    even calibration tokens for experts 0 and 2, odd ones for 1 and 3, in both layers."""
    out, report = tmp_path / "w", tmp_path / "r.json"
    extra_args = ["--pattern", "2:4"] if pattern else ["--sparsity", "0.5"]
    res = CliRunner().invoke(cli, ["compress", "prune", str(routed), "-o", str(out), "--method",
                                   "wanda", *extra_args, *CALIB, "--report", str(report)])  # fmt: skip
    assert res.exit_code == 0, res.output
    extra = json.loads(report.read_text())["result"]["extra"]
    assert extra["expert_magnitude_fallbacks"] == []
    ids = _ids(routed)
    even = int((ids % 2 == 0).sum())
    parity = (even, ids.numel() - even)
    assert extra["expert_tokens"] == {f"model.layers.{i}.mlp.experts.{e}": parity[e % 2]
                                      for i in range(2) for e in range(4)}  # fmt: skip
    assert extra["pruned_expert_slices"] == 2 * 2 * 4
    assert set(extra["expert_sparsity"].values()) == {0.5}
    oracle = _wanda_oracle(routed, _ids(routed), pattern)
    with open_checkpoint(out) as got, open_checkpoint(routed) as src:
        for n in got.tensors:
            g, o, s = got.get_tensor(n), oracle[n], src.get_tensor(n)
            assert torch.equal(g == 0, o == 0), n  # the same zeros
            assert torch.equal(g[g != 0], s[g != 0]), n  # the rest as stored
        for e in range(4):
            w = got.get_tensor("model.layers.1.mlp.experts.down_proj")[e].t()  # (out, in)
            zeros = (w == 0).reshape(w.shape[0], -1, 4).sum(-1) if pattern else (w == 0).sum(1)
            assert (zeros == (2 if pattern else w.shape[1] // 2)).all()
    with torch.no_grad():
        ids = _ids(routed)[:1]
        ref = _load(routed)
        ref.load_state_dict(oracle)
        torch.testing.assert_close(_load(out)(ids).logits, ref(ids).logits, atol=1e-6, rtol=0)
