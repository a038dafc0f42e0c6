"""Mixed precision (``--scheme-map``): parsing, per-module grids checked against RTN computed
by hand, compressed-tensors config groups that transformers loads, GPTQ/AWQ per module, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from weightsmith.cli.main import cli
from weightsmith.compare import packed_weights
from weightsmith.compress import QuantConfig, quantize_checkpoint
from weightsmith.compress.schemes import (
    Scheme,
    average_bits_per_weight,
    bits_per_weight,
    parse_scheme,
    parse_scheme_map,
    resolve_schemes,
)
from weightsmith.errors import ConfigError
from weightsmith.io import open_checkpoint
from weightsmith.pipeline import load_recipe
from weightsmith.pipeline.runner import plan_recipe

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300, 2]])
DOWN = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
KEPT_Q = "model.layers.0.self_attn.q_proj"


def _rtn_by_hand(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Symmetric min-max RTN on signed levels: ``scale = max|w| / ((2^b - 1) / 2)`` per group,
    ``q = clamp(round(w / scale), -2^(b-1), 2^(b-1) - 1)``, dequantized ``q · scale``."""
    out_f, in_f = w.shape
    g = w.reshape(out_f, in_f // group, group)
    scale = g.abs().amax(-1, keepdim=True) / ((2**bits - 1) / 2)
    q = torch.clamp(torch.round(g / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return (q * scale).reshape(out_f, in_f)


def test_parse_schemes_by_hand():
    assert parse_scheme("w4g64") == Scheme(4, 64, True)
    assert parse_scheme("w8") == Scheme(8, -1, True)  # per output channel
    assert parse_scheme("W4G128a") == Scheme(4, 128, False)
    assert str(Scheme(3, 64)) == "w3g64" and str(Scheme(4, -1, False)) == "w4a"
    for bad in ["w9g64", "w1", "x4", "w4g0", "w4g", "4", "", "w4g64b", "keep"]:
        with pytest.raises(ConfigError, match="bad scheme") as e:
            parse_scheme(bad)
        assert repr(bad) in str(e.value) and "\n" not in str(e.value)
    m = parse_scheme_map(["down_proj=w8g128", "re:.*q_proj=keep", "re:a{1,2}=w4a"])
    assert m == (("down_proj", Scheme(8, 128)), ("re:.*q_proj", None), ("re:a{1,2}", Scheme(4, -1, False)))  # fmt: skip
    for bad in ["down_proj", "=w4", "down_proj=w4g"]:
        with pytest.raises(ConfigError):
            parse_scheme_map([bad])
    # first match wins; no match -> the default
    got = resolve_schemes(
        ["a.mlp.down_proj", "a.self_attn.q_proj", "a.mlp.up_proj"],
        parse_scheme_map(["mlp.down_proj=w8", "down_proj=w3g64", "q_proj=keep"]),
        Scheme(4, 32),
    )
    assert got == {"a.mlp.down_proj": Scheme(8), "a.self_attn.q_proj": None,
                   "a.mlp.up_proj": Scheme(4, 32)}  # fmt: skip


def test_bits_per_weight_by_hand():
    assert bits_per_weight(Scheme(4, 64), 4096) == 4 + 16 / 64 == 4.25
    assert bits_per_weight(Scheme(3, 64), 4096) == 3.25
    assert bits_per_weight(Scheme(8, -1), 128) == 8 + 16 / 128  # one scale per row
    assert bits_per_weight(Scheme(4, 128, False), 4096) == 4 + (16 + 4) / 128  # + packed zero
    avg = average_bits_per_weight([((10, 64), Scheme(4, 64)), ((10, 128), Scheme(8, -1))])
    assert avg == pytest.approx((640 * 4.25 + 1280 * 8.125) / 1920, abs=1e-12)


def test_quant_config_schemes_and_refusals():
    cfg = QuantConfig("rtn", bits=4, group_size=32, schemes={"down_proj": "w8g32", "o_proj": None})
    cfg.validate()
    assert cfg.schemes == (("down_proj", Scheme(8, 32)), ("o_proj", None))
    assert cfg.record()["schemes"] == {"down_proj": "w8g32", "o_proj": "keep"}
    assert cfg.with_scheme(Scheme(3, 64, False)).options.describe() == {
        "bits": 3, "group_size": 64, "symmetric": False}  # fmt: skip
    for method in ["nf4", "fp8", "w8a8", "nvfp4", "mxfp4", "ternary"]:
        with pytest.raises(ConfigError, match="--scheme-map applies to the integer-grid methods"):
            QuantConfig(method, schemes=["down_proj=w8"]).validate()
    with pytest.raises(ConfigError, match="--format gptq stores one"):
        QuantConfig("rtn", format="gptq", schemes=["down_proj=w8"]).validate()


def _run(args, tmp_path, name="q"):
    out, report = tmp_path / name, tmp_path / f"{name}.json"
    res = CliRunner().invoke(
        cli,
        ["compress", "quantize", *args, "-o", str(out), "--no-progress", "--report", str(report)],
    )
    return res, out, report


def test_rtn_mixed_matches_hand_rtn_and_loads_in_transformers(tiny_model, tmp_path):
    pytest.importorskip("compressed_tensors")
    src = tiny_model("llama")
    res, out, report = _run(
        [str(src), "--bits", "4", "--group-size", "32", "--scheme-map", "down_proj=w8g32",
         "--scheme-map", f"{KEPT_Q}=keep"], tmp_path,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "mixed (w4g32 x11, w8g32 x2;" in res.output
    # (c) one config group per scheme: the exact names first, the default "Linear" last
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    groups = qc["config_groups"]
    assert list(groups) == ["group_0", "group_1"]
    assert groups["group_0"]["targets"] == DOWN and groups["group_0"]["weights"]["num_bits"] == 8
    assert groups["group_1"]["targets"] == ["Linear"]
    assert groups["group_1"]["weights"]["num_bits"] == 4
    assert all(g["weights"]["group_size"] == 32 for g in groups.values())
    # (d) keep: in ignore, stored as the original float tensor
    assert qc["ignore"] == [KEPT_Q, "lm_head"]
    stored, original = open_checkpoint(out), open_checkpoint(src)
    assert torch.equal(
        stored.get_tensor(KEPT_Q + ".weight"), original.get_tensor(KEPT_Q + ".weight")
    )
    # (a) every quantized Linear decodes to RTN at its own scheme, computed by hand
    packed = packed_weights(stored)
    assert len(packed) == 13
    by_hand = {}
    for name, pw in packed.items():
        w = original.get_tensor(name).float()
        by_hand[name] = _rtn_by_hand(w, 8 if "down_proj" in name else 4, 32)
        # same float32 operations in another order: a rounding step of the scale at most
        torch.testing.assert_close(pw.decode(stored), by_hand[name], atol=1e-6, rtol=0)
    assert stored.info(DOWN[0] + ".weight_packed").shape == (64, 128 * 8 // 32)
    assert stored.info("model.layers.0.mlp.up_proj.weight_packed").shape == (128, 64 * 4 // 32)
    # report: counts per scheme and the average bits per weight (4.5 and 8.5 with g32 scales)
    sch = json.loads(report.read_text())["result"]["extra"]["schemes"]
    assert sch["per_scheme"]["w4g32"] == {"linears": 11, "params": 53248, "bits_per_weight": 4.5}
    assert sch["per_scheme"]["w8g32"] == {"linears": 2, "params": 16384, "bits_per_weight": 8.5}
    assert sch["average_bits_per_weight"] == round((53248 * 4.5 + 16384 * 8.5) / 69632, 4)
    assert sch["modules"][DOWN[1]] == "w8g32" and KEPT_Q not in sch["modules"]
    prov = json.loads((out / "weightsmith.json").read_text())
    assert prov["config"]["schemes"] == {"down_proj": "w8g32", KEPT_Q: "keep"}
    # (b) transformers + compressed-tensors loads the mixed num_bits
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.model.layers[0].mlp.down_proj.quantization_scheme.weights.num_bits == 8
    assert loaded.model.layers[0].mlp.up_proj.quantization_scheme.weights.num_bits == 4
    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    fp32 = AutoModelForCausalLM.from_pretrained(src).eval()
    for name, mod in ref.named_modules():
        if name + ".weight" in by_hand:
            mod.weight.data = by_hand[name + ".weight"]
    with torch.no_grad():
        got, want, full = loaded(IDS).logits, ref(IDS).logits, fp32(IDS).logits
    # the same dequantized weights: float32 round-off only
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # and close to the float model: 4/8-bit error on a tiny random model (measured 0.4%)
    assert (got - full).norm() / full.norm() < 0.05


def test_cli_bad_inputs_fail_in_one_line_and_write_nothing(tiny_model, tmp_path):
    src = tiny_model("llama")

    def fails(args, message):
        res, out, _ = _run([str(src), *args], tmp_path, "bad")
        assert res.exit_code == 1, res.output
        assert message in res.output and res.output.count("\n") == 1, res.output
        assert not out.exists() and not list(tmp_path.glob(".bad*"))

    fails(["--group-size", "32", "--scheme-map", "down_proj=w9g32"], "bad scheme 'w9g32'")
    fails(["--group-size", "32", "--scheme-map", "down_proj=int4"], "bad scheme 'int4'")
    fails(["--group-size", "32", "--scheme-map", "down_proj"], "expected PATTERN=SCHEME")
    fails(
        ["--group-size", "32", "--scheme-map", "nonexistent=w8"],
        "--scheme-map 'nonexistent' matches no quantized",
    )
    fails(
        ["--group-size", "32", "--scheme-map", "lm_head=w8"],
        "--scheme-map 'lm_head' matches no quantized",
    )
    fails(
        ["--group-size", "32", "--scheme-map", "down_proj=w4g48"],
        "model.layers.0.mlp.down_proj: in_features 128 is not divisible by the group size 48 "
        "of --scheme-map down_proj=w4g48",
    )
    fails(["--method", "nf4", "--scheme-map", "down_proj=w8"], "not --method nf4")
    fails(["--method", "fp8", "--scheme-map", "down_proj=w8"], "not --method fp8")
    fails(["--format", "gptq", "--scheme-map", "down_proj=w8"], "--format gptq stores one")
    fails(["--format", "gguf", "--type", "Q8_0", "--scheme-map", "down_proj=w8"],
          "--scheme-map does not apply to --format gguf")  # fmt: skip


@pytest.fixture
def calib(tmp_path):
    from weightsmith.core.calibration import load_calibration_text

    p = tmp_path / "calib.txt"
    p.write_text(load_calibration_text(None).text[:20000])
    return dict(calib=str(p), calib_samples=8, seq_len=32)


def _tensors(out) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(out)
    return {n: ckpt.get_tensor(n) for n in ckpt.tensors}


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_methods_quantize_each_linear_on_its_own_grid(
    method, tiny_model, tmp_path, calib, one_thread
):
    # A map that sends every Linear to w8g32 (the default grid w4g64 is never used) runs every
    # Linear through the per-module path; it must give exactly the uniform w8g32 run.
    src = tiny_model("llama")
    mixed = QuantConfig(method, bits=4, group_size=64, schemes=["re:.*=w8g32"], **calib)
    uniform = QuantConfig(method, bits=8, group_size=32, **calib)
    quantize_checkpoint(src, tmp_path / "m", mixed, progress=False)
    quantize_checkpoint(src, tmp_path / "u", uniform, progress=False)
    a, b = _tensors(tmp_path / "m"), _tensors(tmp_path / "u")
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n
    qc = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert list(qc["config_groups"]) == ["group_0"]  # the unused default group is left out
    assert len(qc["config_groups"]["group_0"]["targets"]) == 14


def test_gptq_layer0_qkv_match_the_uniform_runs(tiny_model, tmp_path, calib, one_thread):
    # Layer 0's q/k/v see the embeddings in every run (same Hessian): q_proj at w8g32 must equal
    # the uniform w8g32 run's, k_proj at the default w4g32 the uniform w4g32 run's.
    src = tiny_model("llama")
    runs = {
        "m": QuantConfig("gptq", bits=4, group_size=32, schemes={"q_proj": "w8g32"}, **calib),
        "w8": QuantConfig("gptq", bits=8, group_size=32, **calib),
        "w4": QuantConfig("gptq", bits=4, group_size=32, **calib),
    }
    t = {}
    for k, cfg in runs.items():
        quantize_checkpoint(src, tmp_path / k, cfg, progress=False)
        t[k] = _tensors(tmp_path / k)
    q, k_ = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    for part in ("weight_packed", "weight_scale"):
        assert torch.equal(t["m"][f"{q}.{part}"], t["w8"][f"{q}.{part}"])
        assert torch.equal(t["m"][f"{k_}.{part}"], t["w4"][f"{k_}.{part}"])
    assert not torch.equal(t["m"][f"{q}.weight_scale"], t["w4"][f"{q}.weight_scale"])


def test_rtn_hqq_honours_the_scheme(tiny_model, tmp_path):
    src = tiny_model("llama")
    cfg = QuantConfig("rtn", bits=4, group_size=32, hqq=True, schemes=["up_proj=w3g64a"])
    quantize_checkpoint(src, tmp_path / "m", cfg, progress=False)
    ref = QuantConfig("rtn", bits=3, group_size=64, symmetric=False, hqq=True)
    quantize_checkpoint(src, tmp_path / "u", ref, progress=False)
    a, b = _tensors(tmp_path / "m"), _tensors(tmp_path / "u")
    m = "model.layers.1.mlp.up_proj"
    for part in ("weight_packed", "weight_scale", "weight_zero_point"):
        assert torch.equal(a[f"{m}.{part}"], b[f"{m}.{part}"]), part


def _recipe(tiny_model, tmp_path):
    shutil.copytree(tiny_model("llama"), tmp_path / "a")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"steps": [
        {"id": "q", "input": "a", "quantize": {"method": "rtn", "bits": 4, "group_size": 32,
                                               "schemes": {"down_proj": "w8g32", "re:.*k_proj": "keep"}}},
    ]}, sort_keys=False))  # fmt: skip
    return recipe


def test_recipe_schemes_key_builds_scheme_map_options(tiny_model, tmp_path):
    recipe = _recipe(tiny_model, tmp_path)
    planned = plan_recipe(load_recipe(recipe), tmp_path / "work")  # click parses it too
    cmd = planned[0].command
    assert cmd[cmd.index("--scheme-map") :][:4] == [
        "--scheme-map", "down_proj=w8g32", "--scheme-map", "re:.*k_proj=keep"]  # fmt: skip


@pytest.mark.slow
def test_recipe_schemes_step_runs(tiny_model, tmp_path):
    recipe = _recipe(tiny_model, tmp_path)
    res = CliRunner().invoke(
        cli, ["run", str(recipe), "-o", str(tmp_path / "work"), "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    qc = json.loads((tmp_path / "work" / "q" / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["targets"] == DOWN
    assert qc["ignore"] == ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj",
                            "lm_head"]  # fmt: skip


def test_bf16_keep_stays_bf16_and_scales_follow_the_model(tiny_model, tmp_path):
    src = tiny_model("llama", dtype=torch.bfloat16)
    cfg = QuantConfig("rtn", bits=4, group_size=32, schemes=[f"{KEPT_Q}=keep", "up_proj=w8"])
    r = quantize_checkpoint(src, tmp_path / "q", cfg, progress=False)
    stored, original = open_checkpoint(tmp_path / "q"), open_checkpoint(src)
    kept = stored.get_tensor(KEPT_Q + ".weight")
    assert kept.dtype == torch.bfloat16 and torch.equal(
        kept, original.get_tensor(KEPT_Q + ".weight")
    )
    up = "model.layers.0.mlp.up_proj"
    assert stored.info(up + ".weight_scale").shape == (128, 1)  # w8: per output channel
    assert stored.info(up + ".weight_scale").torch_dtype == torch.bfloat16
    assert r.extra["kept_linears"] == [KEPT_Q, "lm_head"]
    # per channel: 8 + 16/64 bits for the two up_proj, 4 + 16/32 for the other 11
    sch = r.extra["schemes"]
    assert sch["per_scheme"]["w8"]["bits_per_weight"] == 8.25
    assert sch["per_scheme"]["w4g32"]["linears"] == 11
