"""Calibrated methods on mixture-of-experts models: tokens are routed as the model routes them
(transformers' own router), per-expert token counts are reported, starved experts fall back to
data-free methods, Wanda keeps exact sparsity per expert, and GPTQ outputs load in
transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from weightsmith.cli.main import cli
from weightsmith.core.calibration import load_calibration_text, load_tokenizer, tokenize_windows
from weightsmith.testing import build_tiny_model
from weightsmith.testing.tiny import TINY_ARCHS

_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=0,
             pad_token_id=1, tie_word_embeddings=False)  # fmt: skip
MOE = {
    "mixtral": ("MixtralConfig", dict(_BASE, num_local_experts=4, num_experts_per_tok=2),
                "block_sparse_moe.experts", ("w1", "w3", "w2")),
    "qwen3_moe": ("Qwen3MoeConfig", dict(_BASE, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32),
                  "mlp.experts", ("gate_proj", "up_proj", "down_proj")),
}  # fmt: skip
SAMPLES, SEQ = 4, 32
CALIB = ["--calib-samples", str(SAMPLES), "--seq-len", str(SEQ), "--no-progress"]
IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300, 2, 19, 23, 31, 57]])
D = 7  # the hidden dimension the hand-set routers read


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            cls_name, kwargs, _, _ = MOE[name]
            with pytest.MonkeyPatch.context() as mp:
                mp.setitem(TINY_ARCHS, name, (cls_name, kwargs))
                cache[name] = build_tiny_model(tmp_path_factory.mktemp(name) / "m", name, seed=0)
        return cache[name]

    return make


def _run(args: list[str], tmp_path: Path) -> dict:
    report = tmp_path / f"r{len(list(tmp_path.iterdir()))}.json"
    res = CliRunner().invoke(cli, [*args, "--report", str(report)])
    assert res.exit_code == 0, res.output
    return json.loads(report.read_text())["result"]["extra"]


def _load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _routed(src: Path, out: Path, name: str) -> Path:
    """``src`` with routers set by hand: embedding column D is +10 for even token ids and -10
    for odd ones (attention adds ~1e-2, so its sign survives the residual stream), and every
    router row e reads only dimension D with weight (3, -3, 1, -1)[e]: even tokens go to
    experts {0, 2}, odd tokens to {1, 3}, in every layer."""
    model = _load(src)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, D] = torch.where(torch.arange(emb.shape[0]) % 2 == 0, 10.0, -10.0)
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight[D] = 1.0  # the router sees x_D's sign
            layer.mlp.gate.weight.zero_()
            layer.mlp.gate.weight[:, D] = torch.tensor([3.0, -3.0, 1.0, -1.0])
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, out / f)
    return out


def _calibration_ids(path: Path) -> torch.Tensor:
    text = load_calibration_text(None).text
    return tokenize_windows(load_tokenizer(path), text, samples=SAMPLES, seq_len=SEQ)


@pytest.mark.parametrize("name", sorted(MOE))
def test_expert_token_counts_and_fallbacks_hand_checked(moe_model, tmp_path, name) -> None:
    src = _routed(moe_model(name), tmp_path / "routed", name)
    ids = _calibration_ids(src)
    even = int((ids % 2 == 0).sum())
    odd = ids.numel() - even
    assert 0 < even < ids.numel()
    _, _, experts, linears = MOE[name]
    want = {f"model.layers.{i}.{experts}.{e}": (even if e in (0, 2) else odd)
            for i in range(2) for e in range(4)}  # fmt: skip
    few = (0, 2) if even < odd else (1, 3)  # the experts of the rarer parity
    threshold = min(even, odd) + 1
    extra = _run(["compress", "quantize", str(src), "-o", str(tmp_path / "g"), "--method", "gptq",
                  "--group-size", "32", "--min-expert-tokens", str(threshold), *CALIB], tmp_path)  # fmt: skip
    assert extra["expert_tokens"] == want
    fell = {f"model.layers.{i}.{experts}.{e}.{n}" for i in range(2) for e in few for n in linears}
    assert set(extra["expert_rtn_fallbacks"]) == fell
    # every expert fed every token: the router counts are the same, nothing falls back
    extra = _run(["compress", "prune", str(src), "-o", str(tmp_path / "w"), "--method", "wanda",
                  "--min-expert-tokens", str(threshold), "--calibrate-all-experts", *CALIB],
                 tmp_path)  # fmt: skip
    assert extra["expert_tokens"] == want and extra["expert_magnitude_fallbacks"] == []
    extra = _run(["compress", "prune", str(src), "-o", str(tmp_path / "w2"), "--method", "wanda",
                  "--min-expert-tokens", str(threshold), *CALIB], tmp_path)  # fmt: skip
    assert set(extra["expert_magnitude_fallbacks"]) == fell


def _experts_from(model: torch.nn.Module) -> dict[tuple[int, int], list[torch.Tensor]]:
    """(layer, expert) -> [gate, up, down] weights, split out of transformers' fused params."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        ex = layer.mlp.experts
        half = ex.gate_up_proj.shape[1] // 2
        for e in range(ex.gate_up_proj.shape[0]):
            gu = ex.gate_up_proj[e].detach()
            out[i, e] = [gu[:half], gu[half:], ex.down_proj[e].detach()]
    return out


@pytest.mark.parametrize("name", sorted(MOE))
def test_wanda_keeps_exact_sparsity_per_expert(moe_model, tmp_path, name) -> None:
    src = moe_model(name)
    extra = _run(["compress", "prune", str(src), "-o", str(tmp_path / "p"), "--method", "wanda",
                  "--sparsity", "0.5", *CALIB], tmp_path)  # fmt: skip
    assert extra["pruned_linears"] == 2 * (4 + 3 * 4)
    loaded, ref = _load(tmp_path / "p"), _load(src)
    got, orig = _experts_from(loaded), _experts_from(ref)
    assert len(got) == 8
    for key, ws in got.items():
        for w, w0 in zip(ws, orig[key], strict=True):
            kept = w != 0
            assert (kept.sum(dim=1) == w.shape[1] // 2).all(), key  # half of every row
            assert torch.equal(w[kept], w0[kept]), key  # the rest unchanged
    with torch.no_grad():  # the oracle: the original model with the same zeros
        for key, (g, u, d) in got.items():
            ex = ref.model.layers[key[0]].mlp.experts
            ex.gate_up_proj[key[1]] *= torch.cat([g != 0, u != 0])
            ex.down_proj[key[1]] *= d != 0
        for n, mod in ref.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in n:
                mod.weight *= loaded.get_submodule(n).weight != 0
        assert torch.allclose(loaded(IDS).logits, ref(IDS).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MOE))
def test_gptq_output_loads_with_close_logits(moe_model, tmp_path, name) -> None:
    pytest.importorskip("compressed_tensors")
    src = moe_model(name)
    extra = _run(["compress", "quantize", str(src), "-o", str(tmp_path / "g"), "--method", "gptq",
                  "--bits", "8", "--group-size", "32", "--min-expert-tokens", "0", *CALIB],
                 tmp_path)  # fmt: skip
    assert extra["quantized_linears"] == 2 * (4 + 3 * 4) and extra["expert_rtn_fallbacks"] == []
    assert sum(extra["expert_tokens"].values()) == 2 * 2 * SAMPLES * SEQ  # top-2, 2 layers
    loaded, ref = _load(tmp_path / "g"), _load(src)
    with torch.no_grad():
        got, want = loaded(IDS).logits, ref(IDS).logits
    # 8-bit: every weight within half a step (max|w_group| / 127 / 2) of the original, so the
    # tiny model's logits (|logit| ~ 1e-2) move by ~1% of their range at most
    assert (got - want).abs().max() <= 0.02 * want.abs().max()
    # every expert was loaded (a re-initialised one would be ~100% off): 8-bit GPTQ moves each
    # weight by about a grid step plus its error compensation, well under 5% in norm
    for key, ws in _experts_from(loaded).items():
        for w, w0 in zip(ws, _experts_from(ref)[key], strict=True):
            assert 0 < (w - w0).norm() <= 0.05 * w0.norm(), key


@pytest.mark.parametrize("name", sorted(MOE))
def test_expert_pruning_keeps_the_most_routed_experts(moe_model, tmp_path, name) -> None:
    """Hand-set routers: experts 0 and 2 get the even tokens, 1 and 3 the odd ones. --keep 2
    keeps the pair of the commoner parity; the output loads with 2 experts per layer and the
    logits of the original model with those experts' weights and router rows sliced out."""
    src = _routed(moe_model(name), tmp_path / "routed", name)
    ids = _calibration_ids(src)
    even = int((ids % 2 == 0).sum())
    keep = [0, 2] if even > ids.numel() - even else [1, 3]
    extra = _run(["compress", "prune", str(src), "-o", str(tmp_path / "e"), "--method", "experts",
                  "--keep", "2", *CALIB], tmp_path)  # fmt: skip
    assert extra["kept_experts"] == {"0": keep, "1": keep}
    assert extra["experts_before"] == 4 and extra["experts_after"] == 2
    loaded = _load(tmp_path / "e")
    ref = _load(src)
    assert loaded.config.num_experts_per_tok == 2
    for layer in loaded.model.layers:
        assert layer.mlp.experts.gate_up_proj.shape[0] == 2 and layer.mlp.gate.weight.shape[0] == 2
    oracle = type(ref)(loaded.config).eval()  # the same class with 2 experts, weights sliced
    state = ref.state_dict()
    with torch.no_grad():
        for k, v in oracle.state_dict().items():
            w = state[k]
            v.copy_(w[keep] if w.dim() >= 2 and w.shape[0] == 4 and v.shape[0] == 2 else w)
        assert torch.allclose(loaded(IDS).logits, oracle(IDS).logits, rtol=0, atol=1e-6)
    params = sum(p.numel() for p in loaded.parameters())
    assert extra["params_after"] == params


def test_expert_pruning_refuses_bad_keep(moe_model, tmp_path) -> None:
    src = moe_model("mixtral")
    res = CliRunner().invoke(cli, ["compress", "prune", str(src), "-o", str(tmp_path / "x"),
                                   "--method", "channels", "--mlp-ratio", "0.5", *CALIB])  # fmt: skip
    assert res.exit_code == 1 and "does not slice MoE experts" in res.output, res.output
    for keep in ("1", "4"):  # below top-k (2), or not fewer than the 4 experts
        res = CliRunner().invoke(cli, ["compress", "prune", str(src), "-o", str(tmp_path / "x"),
                                       "--method", "experts", "--keep", keep, *CALIB])  # fmt: skip
        assert res.exit_code == 1 and "--keep must be between" in res.output, res.output
        assert not (tmp_path / "x").exists()


def test_sparsegpt_refuses_experts(moe_model, tmp_path) -> None:
    """SparseGPT does not route calibration tokens to experts yet: one line, nothing written."""
    src = moe_model("mixtral")
    res = CliRunner().invoke(cli, ["compress", "prune", str(src), "-o", str(tmp_path / "x"),
                                   "--method", "sparsegpt", "--pattern", "2:4", *CALIB])  # fmt: skip
    assert res.exit_code == 1 and "sparsegpt does not handle MoE experts" in res.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", sorted(MOE))
def test_layer_stream_matches_transformers(moe_model, name) -> None:
    """One decoder layer at a time with one Linear per expert (ExpertLinears) gives
    transformers' own final hidden states (same ops in the same order: atol 1e-6)."""
    from weightsmith.core.calibration import LayerStreamer
    from weightsmith.io import open_checkpoint

    src = moe_model(name)
    ids = torch.randint(2, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    with open_checkpoint(src) as ckpt:
        streamer = LayerStreamer(ckpt, ids)
        for layer in streamer.layers():
            streamer.run_layer(layer, lambda cl: None)
        hidden = streamer.hidden_states()
    model = _load(src)
    with torch.no_grad():
        want = model(ids, output_hidden_states=True).hidden_states[-1]
        got = model.model.norm(hidden)
    assert want.abs().max() > 0.1
    assert torch.allclose(got, want, rtol=0, atol=1e-6)
