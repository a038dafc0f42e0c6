"""transformers' ``bitnet`` format: packing as transformers packs, and loaded logits equal to
weightsmith's reference BitLinear forward for both linear classes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

from weightsmith.cli.main import cli
from weightsmith.compress import QuantConfig, quantize_checkpoint
from weightsmith.compress.bitnet_format import (
    effective_gamma,
    pack_ternary,
    stored_scale,
    unpack_ternary,
)
from weightsmith.compress.ternary import bitlinear_reference, ternary_quantize
from weightsmith.errors import ConfigError
from weightsmith.io import open_checkpoint

transformers = pytest.importorskip("transformers")
bitnet = pytest.importorskip("transformers.integrations.bitnet")
from transformers import AutoModelForCausalLM  # noqa: E402

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300, 2]])
CLASSES = ["bitlinear", "autobitlinear"]


@pytest.fixture
def eager():
    """transformers' BitLinear is torch.compile'd (a minute to compile on CPU): run it eagerly."""
    with torch._dynamo.config.patch(disable=True):
        yield


def _stored(out) -> dict[str, torch.Tensor]:
    with open_checkpoint(out) as ckpt:
        return {n: ckpt.get_tensor(n) for n in ckpt.tensors}


class RefBitLinear(nn.Module):
    """A Linear replaced by :func:`bitlinear_reference` (levels and γ from ternary_quantize)."""

    def __init__(self, linear: nn.Linear, rms_norm_weight: torch.Tensor | None, eps: float):
        super().__init__()
        qw = ternary_quantize(linear.weight.data)
        self.q, self.gamma = qw.q, qw.scale.reshape(())
        self.bias = None if linear.bias is None else linear.bias.data
        self.rms, self.eps = rms_norm_weight, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bitlinear_reference(x, self.q, self.gamma, self.bias, self.rms, self.eps)


def _reference_model(src, *, use_rms_norm=False, eps=1e-6, rms_weights=None, keep=("lm_head",)):
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name not in keep:
            rms = None
            if use_rms_norm:
                rms = (rms_weights or {}).get(name, torch.ones(mod.in_features))
            model.set_submodule(name, RefBitLinear(mod, rms, eps))
    return model


def _load(out):
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    return model.eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


# ---------------------------------------------------------------- packing


def test_pack_hand_example():
    # out = 4 rows (one block row each), in = 2: byte = (q0+1) | (q1+1)<<2 | (q2+1)<<4 | (q3+1)<<6
    q = torch.tensor([[1, -1], [0, 1], [-1, 0], [1, 1]], dtype=torch.int8)
    packed = pack_ternary(q)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 2)
    assert packed.tolist() == [[2 | 1 << 2 | 0 << 4 | 2 << 6, 0 | 2 << 2 | 1 << 4 | 2 << 6]]


@pytest.mark.parametrize("shape", [(4, 3), (16, 64), (172, 64), (8,)])
def test_pack_round_trips_and_matches_transformers(shape, eager):
    torch.manual_seed(sum(shape))
    q = torch.randint(-1, 2, shape, dtype=torch.int8)
    mine = pack_ternary(q)
    theirs = bitnet.pack_weights(q.clone())  # (it adds 1 in place)
    assert torch.equal(mine, theirs)
    assert torch.equal(unpack_ternary(mine), q)
    assert torch.equal(bitnet.unpack_weights(mine, dtype=torch.float32), q.float())


def test_pack_rejects_non_multiple_of_4_and_non_ternary():
    with pytest.raises(ValueError, match="divisible by 4"):
        pack_ternary(torch.zeros(6, 2, dtype=torch.int8))
    with pytest.raises(ValueError, match="ternary"):
        pack_ternary(torch.full((4, 2), 2, dtype=torch.int8))


def test_stored_scale_conventions():
    # BitLinear divides by weight_scale, AutoBitLinear multiplies by it
    assert stored_scale(0.25, "bitlinear", torch.float32).tolist() == [4.0]
    assert stored_scale(0.25, "autobitlinear", torch.float32).tolist() == [0.25]
    for cls in CLASSES:
        assert effective_gamma(stored_scale(0.25, cls, torch.float32), cls) == 0.25


# ---------------------------------------------------------------- transformers parity


@pytest.mark.parametrize("linear_class", CLASSES)
def test_loads_in_transformers_and_matches_reference(tiny_model, tmp_path, eager, linear_class):
    src = tiny_model("llama")
    cfg = QuantConfig(method="ternary", format="bitnet", linear_class=linear_class)
    r = quantize_checkpoint(src, tmp_path / "q", cfg, progress=False)
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc == {
        "quant_method": "bitnet", "linear_class": linear_class, "quantization_mode": "offline",
        "modules_to_not_convert": ["lm_head"], "use_rms_norm": False, "rms_norm_eps": 1e-6,
    }  # fmt: skip
    assert r.extra["quantized_linears"] == 14 and r.extra["kept_linears"] == ["lm_head"]
    loaded = _load(tmp_path / "q")
    want_cls = bitnet.BitLinear if linear_class == "bitlinear" else bitnet.AutoBitLinear
    assert isinstance(loaded.model.layers[0].mlp.down_proj, want_cls)
    got, want = _logits(loaded), _logits(_reference_model(src))
    # same integer products, differently ordered float32 rescaling: round-off only
    # (logits are ~1e-2 here; a swapped scale convention is off by a factor γ^±2 ~ 1e3)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    # and ternary is a real change: the float model differs by far more
    orig = _logits(AutoModelForCausalLM.from_pretrained(src).eval())
    assert (orig - want).abs().max() > 100 * (got - want).abs().max()


@pytest.mark.parametrize("linear_class", CLASSES)
def test_single_linear_matches_reference_tightly(tiny_model, tmp_path, eager, linear_class):
    src = tiny_model("llama")
    cfg = QuantConfig(method="ternary", format="bitnet", linear_class=linear_class)
    quantize_checkpoint(src, tmp_path / "q", cfg, progress=False)
    mod = _load(tmp_path / "q").model.layers[1].self_attn.o_proj
    w = open_checkpoint(src).get_tensor("model.layers.1.self_attn.o_proj.weight")
    qw = ternary_quantize(w)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        got, want = mod(x), bitlinear_reference(x, qw.q, qw.scale)
    # bitlinear: the same exact integer product, rescaled in another order (a few ulp);
    # autobitlinear sums dequantized float32 terms: round-off ~1e-6 of the output's scale
    torch.testing.assert_close(got, want, atol=1e-6 * float(want.abs().max()), rtol=1e-5)


def test_swapping_the_linear_class_breaks_the_logits(tiny_model, tmp_path, eager):
    # the test above must be able to fail: declare the other class over the same tensors
    src = tiny_model("llama")
    quantize_checkpoint(
        src, tmp_path / "q", QuantConfig(method="ternary", format="bitnet"), progress=False
    )
    config = tmp_path / "q" / "config.json"
    c = json.loads(config.read_text())
    c["quantization_config"]["linear_class"] = "autobitlinear"
    config.write_text(json.dumps(c))
    swapped = _load(tmp_path / "q")
    # one Linear: AutoBitLinear multiplies by the stored 1/γ instead of γ -> off by 1/γ²
    w = open_checkpoint(src).get_tensor("model.layers.1.self_attn.o_proj.weight")
    qw = ternary_quantize(w)
    x = torch.randn(2, 64)
    with torch.no_grad():
        ratio = swapped.model.layers[1].self_attn.o_proj(x) / bitlinear_reference(x, qw.q, qw.scale)
    torch.testing.assert_close(
        ratio, torch.full_like(ratio, float(qw.scale) ** -2), rtol=1e-3, atol=0
    )
    # the logits (RMS-normed, so damped) are still far outside the parity tolerance
    got, want = _logits(swapped), _logits(_reference_model(src))
    assert (got - want).abs().max() > 0.3 * want.abs().max()


@pytest.mark.parametrize("linear_class", CLASSES)
def test_biases_survive_both_conventions(tiny_model, tmp_path, eager, linear_class):
    # qwen2 has q/k/v biases; AutoBitLinear scales them with the output, so it stores b / γ
    src = tiny_model("qwen2")
    cfg = QuantConfig(method="ternary", format="bitnet", linear_class=linear_class)
    quantize_checkpoint(src, tmp_path / "q", cfg, progress=False)
    stored = _stored(tmp_path / "q")
    orig = open_checkpoint(src)
    b = orig.get_tensor("model.layers.0.self_attn.q_proj.bias")
    g = ternary_quantize(orig.get_tensor("model.layers.0.self_attn.q_proj.weight")).scale
    want_b = b if linear_class == "bitlinear" else b / g.reshape(())
    torch.testing.assert_close(stored["model.layers.0.self_attn.q_proj.bias"], want_b)
    got, want = _logits(_load(tmp_path / "q")), _logits(_reference_model(src))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("linear_class", CLASSES)
def test_use_rms_norm_writes_ones_and_matches_reference(tiny_model, tmp_path, eager, linear_class):
    src = tiny_model("llama")
    cfg = QuantConfig(
        method="ternary", format="bitnet", linear_class=linear_class, use_rms_norm=True,
        rms_norm_eps=1e-5,
    )  # fmt: skip
    quantize_checkpoint(src, tmp_path / "q", cfg, progress=False)
    stored = _stored(tmp_path / "q")
    norm = stored["model.layers.0.mlp.down_proj.rms_norm.weight"]
    assert norm.shape == (128,) and bool((norm == 1).all())
    assert sum(n.endswith(".rms_norm.weight") for n in stored) == 14
    got = _logits(_load(tmp_path / "q"))
    want = _logits(_reference_model(src, use_rms_norm=True, eps=1e-5))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    # the norm is really applied: without it the reference is far off
    assert (got - _logits(_reference_model(src))).abs().max() > 1e-3 * got.abs().max()


def test_checkpoint_rms_norm_weights_pass_through(tiny_model, tmp_path, eager):
    src = tiny_model("llama")
    own = tmp_path / "own"
    shutil.copytree(src, own, ignore=shutil.ignore_patterns("*.safetensors*"))
    sd = _stored(src)
    torch.manual_seed(3)
    rms = {
        n[: -len(".weight")]: 1 + 0.1 * torch.randn(t.shape[1])
        for n, t in sd.items()
        if n.endswith("_proj.weight")
    }
    save_file(
        {**sd, **{f"{m}.rms_norm.weight": w for m, w in rms.items()}}, own / "model.safetensors"
    )
    with pytest.raises(ConfigError, match="--use-rms-norm"):
        quantize_checkpoint(
            own, tmp_path / "x", QuantConfig(method="ternary", format="bitnet"), progress=False
        )
    assert not (tmp_path / "x").exists()
    cfg = QuantConfig(method="ternary", format="bitnet", use_rms_norm=True)
    quantize_checkpoint(own, tmp_path / "q", cfg, progress=False)
    stored = _stored(tmp_path / "q")
    m = "model.layers.1.mlp.up_proj"
    torch.testing.assert_close(stored[f"{m}.rms_norm.weight"], rms[m], atol=0, rtol=0)
    got = _logits(_load(tmp_path / "q"))
    want = _logits(_reference_model(src, use_rms_norm=True, rms_weights=rms))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_compiled_bitlinear_matches_reference(tiny_model, tmp_path):
    # transformers' default path (torch.compile'd unpack / activation quant), not eager
    src = tiny_model("llama")
    cfg = QuantConfig(method="ternary", format="bitnet")
    quantize_checkpoint(src, tmp_path / "q", cfg, progress=False)
    got, want = _logits(_load(tmp_path / "q")), _logits(_reference_model(src))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------- storage, errors, CLI


def test_weights_take_two_bits(tiny_model, tmp_path):
    src = tiny_model("llama")
    r = quantize_checkpoint(
        src, tmp_path / "q", QuantConfig(method="ternary", format="bitnet"), progress=False
    )
    stored = _stored(tmp_path / "q")
    orig = open_checkpoint(src)
    packed = {n: t for n, t in stored.items() if n.endswith("_proj.weight")}
    assert len(packed) == 14 and all(t.dtype == torch.uint8 for t in packed.values())
    bits = sum(8 * t.numel() for t in packed.values())
    weights = sum(orig.info(n).numel for n in packed)
    assert bits == 2 * weights  # exactly 2 bits per weight (+ one scale per tensor)
    assert r.extra["quantized_params"] == weights
    assert 0.2 < r.extra["zero_fraction"] < 0.5  # ~31% for Gaussian weights


def test_out_features_not_divisible_by_4_is_an_error(tmp_path):
    from weightsmith.testing import build_tiny_model

    src = build_tiny_model(tmp_path / "m", "llama", intermediate_size=130, with_tokenizer=False)
    cfg = QuantConfig(method="ternary", format="bitnet")
    with pytest.raises(ConfigError, match=r"model.layers.0.mlp.gate_proj: out_features 130"):
        quantize_checkpoint(src, tmp_path / "q", cfg, progress=False)
    assert not (tmp_path / "q").exists()
    ok = QuantConfig(method="ternary", format="bitnet", ignore=("gate_proj", "up_proj"))
    r = quantize_checkpoint(src, tmp_path / "q", ok, progress=False)
    assert r.extra["quantized_linears"] == 10  # down_proj (130 -> 64) is fine


def test_cli_end_to_end(tiny_model, tmp_path):
    src = tiny_model("llama")
    out, rep = tmp_path / "q", tmp_path / "r.json"
    res = CliRunner().invoke(
        cli,
        ["compress", "quantize", str(src), "-o", str(out), "--method", "ternary",
         "--linear-class", "autobitlinear", "--no-progress", "--report", str(rep)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "quantized 14 Linears" in res.output and "ternary 1.58-bit into bitnet" in res.output
    report = json.loads(rep.read_text())
    x = report["result"]["extra"]
    assert x["format"] == "bitnet" and x["linear_class"] == "autobitlinear"
    assert x["fraction_quantized"] == pytest.approx(x["quantized_params"] / x["params"])
    # float32 for the rest, 2 bits per quantized weight, one float32 scale per Linear
    kept = 4 * (x["params"] - x["quantized_params"])
    assert 0 <= x["output_size"] - (kept + x["quantized_params"] // 4 + 4 * 14) < 8192
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["linear_class"] == "autobitlinear"


@pytest.mark.parametrize(
    "args, match",
    [
        (["--bits", "2"], "--bits does not apply"),
        (["--group-size", "-1"], "--group-size does not apply"),
        (["--format", "gptq"], "--method ternary writes --format bitnet, not gptq"),
        (["--asym"], "--sym/--asym does not apply"),
        (["--ignore", "nothing_like_this"], "matches no Linear"),
    ],
)
def test_cli_errors_exit_1_with_one_line_and_no_output(tiny_model, tmp_path, args, match):
    out = tmp_path / "q"
    res = CliRunner().invoke(
        cli, ["compress", "quantize", str(tiny_model("llama")), "-o", str(out), "--method",
              "ternary", "--no-progress", *args],
    )  # fmt: skip
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], res.output
    assert not out.exists()


def test_cli_rejects_bitnet_for_other_methods(tiny_model, tmp_path):
    res = CliRunner().invoke(
        cli, ["compress", "quantize", str(tiny_model("llama")), "-o", str(tmp_path / "q"),
              "--format", "bitnet", "--no-progress"],
    )  # fmt: skip
    assert res.exit_code == 1
    assert "--method rtn writes --format compressed-tensors or gptq, not bitnet" in res.output


@pytest.mark.slow
def test_stories260k_converts_every_linear_and_matches_reference(stories260k, tmp_path, eager):
    # intermediate 172 = 4·43 and kv 32: every Linear's out_features is divisible by 4
    r = quantize_checkpoint(
        stories260k, tmp_path / "q", QuantConfig(method="ternary", format="bitnet"), progress=False
    )
    assert r.extra["quantized_linears"] == 35 and r.extra["kept_linears"] == ["lm_head"]
    loaded, orig = _load(tmp_path / "q"), open_checkpoint(stories260k)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, mod in loaded.named_modules():
        if isinstance(mod, bitnet.BitLinear):
            mod.register_forward_hook(lambda m, i, o, n=name: seen.__setitem__(n, (i[0], o)))
    ids = torch.arange(1, 65).reshape(1, 64) * 7 % 512
    with torch.no_grad():
        got = loaded(ids).logits
        want = _reference_model(stories260k)(ids).logits
    # every BitLinear, fed the same input, equals the reference up to float32 round-off
    assert len(seen) == 35
    for name, (x, y) in seen.items():
        qw = ternary_quantize(orig.get_tensor(f"{name}.weight"))
        ref = bitlinear_reference(x, qw.q, qw.scale)
        torch.testing.assert_close(y, ref, atol=1e-6 * float(ref.abs().max()), rtol=1e-5)
    # end to end, a one-ulp difference can flip an int8 activation rounding and the flips
    # compound over 5 layers (max |Δ| ~0.3 on logits ~20): compare the distributions instead
    rel = (got - want).norm() / want.norm()
    top1 = (got.argmax(-1) == want.argmax(-1)).float().mean()
    assert rel < 0.01 and top1 > 0.95, (float(rel), float(top1))
