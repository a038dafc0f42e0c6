"""Calibrated methods on a DeepSeek-V3-style MoE (tiny seeded ``DeepseekV3ForCausalLM``):
tokens go where transformers' own grouped sigmoid router (with e_score_correction_bias and
routed_scaling_factor) sends them, shared experts see every token, per-expert token counts
are hand-checked, Wanda keeps exact sparsity per expert, GPTQ loads, and expert pruning keeps
``N / n_group`` experts per router group and loads with the promised count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tests.test_moe_deepseek import EXPERTS, MOE_LAYERS, load, logits, make_deepseek
from weightsmith.cli.main import cli
from weightsmith.core.calibration import (
    LayerStreamer,
    load_calibration_text,
    load_tokenizer,
    tokenize_windows,
)
from weightsmith.io import open_checkpoint

SAMPLES, SEQ = 4, 32
CALIB = ["--calib-samples", str(SAMPLES), "--seq-len", str(SEQ), "--no-progress"]
D = 7  # the hidden dimension the hand-set routers read
LINEARS = ("gate_proj", "up_proj", "down_proj")
# Hand-set routers (every MoE layer): row e reads only dimension D, with weight 2·W[e]; x_D is
# about +8 for even token ids and -8 for odd ones after the norm, so sigmoid(2·W[e]·x_D) is
# 1, 0 or (W[e] = 0) exactly 0.5. Plus the correction bias B, the choice scores are
#   even: [1, 1, 0, 0 | 1, 0, 1.2, 0.8]   odd: [0, 0, 1, 1 | 0, 1, 1.2, 0.8]
# A group scores the sum of its top 2: group 0 = 2.0, group 1 = 2.2, so topk_group=1 keeps
# group 1 for every token (without the bias group 0 would win: 2.0 > 1.5), and the top 2 in it
# are {4, 6} for even tokens and {5, 6} for odd ones.
W = [1.0, 1.0, -1.0, -1.0, 1.0, -1.0, 0.0, 0.0]
B = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.7, 0.3]


@pytest.fixture(scope="module")
def routed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ds-routed")
    src = make_deepseek(root / "plain")
    model = load(src)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, D] = torch.where(torch.arange(emb.shape[0]) % 2 == 0, 10.0, -10.0)
        for i, layer in enumerate(model.model.layers):
            layer.post_attention_layernorm.weight[D] = 1.0  # the router sees x_D's sign
            if i in MOE_LAYERS:
                layer.mlp.gate.weight.zero_()
                layer.mlp.gate.weight[:, D] = 2 * torch.tensor(W)
                layer.mlp.gate.e_score_correction_bias.copy_(torch.tensor(B))
    model.save_pretrained(root / "m")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (root / "m" / f).write_bytes((src / f).read_bytes())
    return root / "m"


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    return make_deepseek(tmp_path_factory.mktemp("ds-plain"))


def _run(args: list[str], tmp_path: Path) -> dict:
    report = tmp_path / f"r{len(list(tmp_path.iterdir()))}.json"
    res = CliRunner().invoke(cli, [*args, "--report", str(report)])
    assert res.exit_code == 0, res.output
    return json.loads(report.read_text())["result"]["extra"]


def _parities(path: Path) -> tuple[torch.Tensor, int, int]:
    text = load_calibration_text(None).text
    ids = tokenize_windows(load_tokenizer(path), text, samples=SAMPLES, seq_len=SEQ)
    even = int((ids % 2 == 0).sum())
    assert 0 < even < ids.numel()
    return ids, even, ids.numel() - even


def _want(even: int, odd: int) -> dict[str, int]:
    per = {4: even, 5: odd, 6: even + odd}
    return {f"model.layers.{i}.mlp.experts.{e}": per.get(e, 0)
            for i in MOE_LAYERS for e in range(EXPERTS)}  # fmt: skip


def test_routed_and_shared_experts_see_the_right_tokens(routed) -> None:
    """The layer stream's Linear hooks: each routed expert's gate_proj sees exactly the
    tokens the router sends it (hand-computed from the token parities), the shared expert's
    sees every token, and transformers' forward of the hand-set model routes the same way."""
    ids, even, odd = _parities(routed)
    want = _want(even, odd)
    seen: dict[str, int] = {}
    with open_checkpoint(routed) as ckpt:
        streamer = LayerStreamer(ckpt, ids)
        for layer in streamer.layers():

            def step(cl) -> None:
                names = [n for n in cl.linear_names if n.endswith("gate_proj")]
                for n, stat in cl.collect(names, "hessian").items():
                    seen[cl.prefix + n[: -len(".gate_proj")]] = stat.n

            streamer.run_layer(layer, step)
    assert {k: v for k, v in seen.items() if ".experts." in k} == want
    for i in MOE_LAYERS:
        assert seen[f"model.layers.{i}.mlp.shared_experts"] == ids.numel()
    assert seen["model.layers.0.mlp"] == ids.numel()  # the dense layer
    model = load(routed)  # transformers' own forward routes the same tokens the same way
    picked: dict[int, torch.Tensor] = {}
    for i in MOE_LAYERS:
        gate = model.model.layers[i].mlp.gate
        gate.register_forward_hook(lambda m, a, out, i=i: picked.__setitem__(i, out[2]))
    with torch.no_grad():
        model(ids)
    for i in MOE_LAYERS:
        counts = torch.bincount(picked[i].reshape(-1), minlength=EXPERTS).tolist()
        assert counts == [want[f"model.layers.{i}.mlp.experts.{e}"] for e in range(EXPERTS)]


def test_expert_token_counts_and_fallbacks_hand_checked(routed, tmp_path) -> None:
    """GPTQ's --report counts per routed expert equal the hand-computed ones; experts under
    --min-expert-tokens (the four of group 0, expert 7, and the expert of the rarer parity)
    fall back to RTN; shared experts are never counted nor fall back. Wanda with
    --calibrate-all-experts reports the same router counts and no fallback."""
    _, even, odd = _parities(routed)
    want = _want(even, odd)
    threshold = min(even, odd) + 1
    extra = _run(["compress", "quantize", str(routed), "-o", str(tmp_path / "g"), "--method",
                  "gptq", "--group-size", "32", "--min-expert-tokens", str(threshold), *CALIB],
                 tmp_path)  # fmt: skip
    assert extra["expert_tokens"] == want
    starved = [0, 1, 2, 3, 7, 4 if even < odd else 5]
    fell = {f"model.layers.{i}.mlp.experts.{e}.{n}" for i in MOE_LAYERS for e in starved
            for n in LINEARS}  # fmt: skip
    assert set(extra["expert_rtn_fallbacks"]) == fell
    extra = _run(["compress", "prune", str(routed), "-o", str(tmp_path / "w"), "--method",
                  "wanda", "--min-expert-tokens", str(threshold), "--calibrate-all-experts",
                  *CALIB], tmp_path)  # fmt: skip
    assert extra["expert_tokens"] == want and extra["expert_magnitude_fallbacks"] == []


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every routed expert's gate/up/down (split out of the fused parameters) and every other
    decoder Linear, by name."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        for n, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear):
                out[f"{i}.{n}"] = mod.weight.detach()
        ex = getattr(layer.mlp, "experts", None)
        if ex is not None:
            half = ex.gate_up_proj.shape[1] // 2
            for e in range(ex.gate_up_proj.shape[0]):
                gu = ex.gate_up_proj[e].detach()
                parts = (gu[:half], gu[half:], ex.down_proj[e].detach())
                out.update({f"{i}.experts.{e}.{n}": w for n, w in zip(LINEARS, parts, strict=True)})
    return out


def test_wanda_keeps_exact_sparsity_per_expert(plain, tmp_path) -> None:
    extra = _run(["compress", "prune", str(plain), "-o", str(tmp_path / "p"), "--method",
                  "wanda", "--sparsity", "0.5", "--min-expert-tokens", "0", *CALIB], tmp_path)  # fmt: skip
    assert extra["pruned_linears"] == 3 * 5 + 3 + 2 * 3 * (1 + EXPERTS)
    loaded, ref = load(tmp_path / "p"), load(plain)
    got, orig = _weights(loaded), _weights(ref)
    assert len([k for k in got if ".experts." in k]) == 2 * EXPERTS * 3
    for key, w in got.items():
        kept = w != 0
        assert (kept.sum(dim=1) == w.shape[1] // 2).all(), key  # half of every row
        assert torch.equal(w[kept], orig[key][kept]), key  # the rest unchanged
    with torch.no_grad():  # the oracle: the original model with the same zeros
        for i in MOE_LAYERS:
            ex = ref.model.layers[i].mlp.experts
            for e in range(EXPERTS):
                g, u, d = (got[f"{i}.experts.{e}.{n}"] != 0 for n in LINEARS)
                ex.gate_up_proj[e] *= torch.cat([g, u])
                ex.down_proj[e] *= d
        for n, mod in ref.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in n:
                mod.weight *= loaded.get_submodule(n).weight != 0
    assert torch.allclose(logits(loaded), logits(ref), rtol=0, atol=1e-6)


def test_gptq_output_loads_with_close_logits(plain, tmp_path) -> None:
    pytest.importorskip("compressed_tensors")
    extra = _run(["compress", "quantize", str(plain), "-o", str(tmp_path / "g"), "--method",
                  "gptq", "--bits", "8", "--group-size", "32", "--min-expert-tokens", "0",
                  *CALIB], tmp_path)  # fmt: skip
    assert extra["quantized_linears"] == 3 * 5 + 3 + 2 * 3 * (1 + EXPERTS)
    # with --min-expert-tokens 0 only experts routed no token fall back (topk_group=1 of 2
    # groups: a short text can leave some unused)
    unused = {k for k, v in extra["expert_tokens"].items() if v == 0}
    assert {f.rsplit(".", 1)[0] for f in extra["expert_rtn_fallbacks"]} == unused
    assert sum(extra["expert_tokens"].values()) == 2 * 2 * SAMPLES * SEQ  # top-2, 2 MoE layers
    loaded, ref = load(tmp_path / "g"), load(plain)
    got, want = logits(loaded), logits(ref)
    # 8-bit: every weight within about a grid step (max|w_group| / 127) of the original, so
    # the tiny model's logits (|logit| ~ 1e-2) move by ~1% of their range at most
    assert 0 < (got - want).abs().max() <= 0.02 * want.abs().max()
    # every Linear and expert was loaded (a re-initialised one would be ~100% off)
    theirs = _weights(ref)
    for key, w in _weights(loaded).items():
        assert 0 < (w - theirs[key]).norm() <= 0.05 * theirs[key].norm(), key


def test_expert_pruning_keeps_per_group(routed, tmp_path) -> None:
    """--keep 4 with 2 router groups keeps 2 experts per group: group 0 saw no token (ties:
    the lower index, 0 and 1); group 1 keeps 6 (every token) and the expert of the commoner
    parity (4 even, 5 odd). The output has 4 experts per layer (config n_routed_experts 4,
    router weight rows and e_score_correction_bias sliced) and loads with the logits of the
    original with those experts sliced out (atol 1e-6)."""
    _, even, odd = _parities(routed)
    keep = [0, 1, 4 if even > odd else 5, 6]
    extra = _run(["compress", "prune", str(routed), "-o", str(tmp_path / "e"), "--method",
                  "experts", "--keep", "4", *CALIB], tmp_path)  # fmt: skip
    assert extra["kept_experts"] == {str(i): keep for i in MOE_LAYERS}
    assert extra["experts_before"] == 8 and extra["experts_after"] == 4
    assert extra["router_groups"] == 2
    assert extra["expert_tokens"]["1"] == [0, 0, 0, 0, even, odd, even + odd, 0]
    config = json.loads((tmp_path / "e" / "config.json").read_text())
    assert config["n_routed_experts"] == 4 and config["n_group"] == 2
    loaded, ref = load(tmp_path / "e"), load(routed)
    for i in MOE_LAYERS:
        mlp, mlp0 = loaded.model.layers[i].mlp, ref.model.layers[i].mlp
        assert mlp.experts.gate_up_proj.shape[0] == 4 and mlp.gate.weight.shape == (4, 64)
        assert torch.equal(mlp.gate.e_score_correction_bias,
                           mlp0.gate.e_score_correction_bias[keep])  # fmt: skip
    oracle = type(ref)(loaded.config).eval()  # the same class with 4 experts, weights sliced
    state = ref.state_dict()
    with torch.no_grad():
        for k, v in oracle.state_dict().items():
            w = state[k]
            v.copy_(w[keep] if w.dim() >= 1 and w.shape[0] == 8 and v.shape[0] == 4 else w)
    assert torch.allclose(logits(loaded), logits(oracle), rtol=0, atol=1e-6)
    # stored tensors: parameters and the (persistent) e_score_correction_bias buffers
    assert extra["params_after"] == sum(t.numel() for t in loaded.state_dict().values())


@pytest.mark.parametrize(("keep", "why"), [("3", "multiple of 2"), ("2", "at least 2 experts"),
                                           ("8", "--keep must be between")])  # fmt: skip
def test_expert_pruning_refuses_keep_that_breaks_the_groups(plain, tmp_path, keep, why) -> None:
    res = CliRunner().invoke(cli, ["compress", "prune", str(plain), "-o", str(tmp_path / "x"),
                                   "--method", "experts", "--keep", keep, *CALIB])  # fmt: skip
    assert res.exit_code == 1 and why in res.output, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and not (tmp_path / "x").exists()
