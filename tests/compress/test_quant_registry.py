"""The quantization registry is real: a registered method's own function runs (data-free and
calibrated, with the statistic it declares), formats are picked and checked in one place, and
every tensor read must be finite."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from weightsmith.cli.main import cli
from weightsmith.compress import QuantConfig, quantize_checkpoint
from weightsmith.compress.registry import (
    METHODS,
    CalibratedConfig,
    GridConfig,
    QuantizedWeight,
    quant_method,
)
from weightsmith.compress.rtn import RTNConfig, rtn_quantize
from weightsmith.core.calibration import load_calibration_text, load_tokenizer, tokenize_windows
from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.io import open_checkpoint

STEP = 0.125  # the dummy method's fixed grid


@dataclass(frozen=True)
class EighthsConfig(GridConfig):
    """A dummy method's options."""


def eighths(w, cfg, stat=None, *, dtype=None, zero_min=None) -> QuantizedWeight:
    """Rounds to the fixed grid k/8 (no min-max): nothing like RTN."""
    lo, hi = -(1 << (cfg.bits - 1)), (1 << (cfg.bits - 1)) - 1
    q = torch.clamp(torch.round(w.float() / STEP), lo, hi).to(torch.int8)
    groups = w.shape[1] // cfg.group_size
    return QuantizedWeight(q, torch.full((w.shape[0], groups), STEP, dtype=dtype or w.dtype),
                           torch.zeros(w.shape[0], groups, dtype=torch.int8), cfg.bits,
                           cfg.group_size, True)  # fmt: skip


@dataclass(frozen=True)
class MagnitudeConfig(GridConfig, CalibratedConfig):
    """A dummy calibrated method's options."""


SEEN: dict[tuple, torch.Tensor] = {}


def record_magnitudes(w, cfg, stat=None, *, dtype=None, zero_min=None) -> QuantizedWeight:
    """RTN, keeping the per-channel input magnitudes it was given (keyed by weight shape+sum)."""
    SEEN[(tuple(w.shape), round(float(w.double().sum()), 6))] = stat
    return rtn_quantize(w, cfg, dtype=dtype, zero_min=zero_min)


@pytest.fixture
def registered():
    quant_method("eighths", config=EighthsConfig)(eighths)
    quant_method("magnitudes", config=MagnitudeConfig, statistic="channel_magnitude")(
        record_magnitudes
    )
    yield
    del METHODS["eighths"], METHODS["magnitudes"]


def test_a_registered_data_free_method_runs_its_own_function(registered, tiny_model, tmp_path):
    # before the registry was real, every data-free method silently ran RTN
    src = tiny_model("llama")
    cfg = QuantConfig("eighths", bits=8, group_size=32)
    assert isinstance(cfg.options, EighthsConfig) and cfg.format == "compressed-tensors"
    r = quantize_checkpoint(src, tmp_path / "q", cfg, progress=False)
    assert r.extra["method"] == "eighths" and r.extra["quantized_linears"] == 14
    ckpt, out = open_checkpoint(src), open_checkpoint(tmp_path / "q")
    m = "model.layers.1.mlp.up_proj"
    assert torch.equal(out.get_tensor(f"{m}.weight_scale"), torch.full((128, 2), STEP))
    w = ckpt.get_tensor(f"{m}.weight")
    want = eighths(w, cfg.options)
    assert not torch.equal(want.q, rtn_quantize(w, cfg.options).q)  # tells the two apart
    from weightsmith.compare import packed_weights

    decoded = packed_weights(out)[f"{m}.weight"].decode(out)
    assert torch.equal(decoded, want.dequantize())
    prov = json.loads((tmp_path / "q" / "weightsmith.json").read_text())
    assert prov["config"]["method"] == "eighths"
    assert prov["config"]["eighths"] == {
        "version": 1,
        "bits": 8,
        "group_size": 32,
        "symmetric": True,
    }


def test_a_calibrated_method_gets_the_statistic_it_declares(registered, tiny_model, tmp_path):
    src = tiny_model("llama")
    SEEN.clear()
    cfg = QuantConfig("magnitudes", bits=8, group_size=32, calib_samples=3, seq_len=16)
    quantize_checkpoint(src, tmp_path / "q", cfg, progress=False)
    assert len(SEEN) == 14
    # layer 0's q_proj sees the model's own (unquantized) normed embeddings: mean |x| per column
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    ids = tokenize_windows(load_tokenizer(src), load_calibration_text(None).text, samples=3,
                           seq_len=16)  # fmt: skip
    xs = []
    q_proj = model.model.layers[0].self_attn.q_proj
    q_proj.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(ids)
    want = torch.cat(xs).abs().mean(0)
    w = q_proj.weight.detach()
    got = SEEN[(tuple(w.shape), round(float(w.double().sum()), 6))]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def _cli(*args):
    return CliRunner().invoke(cli, ["compress", "quantize", *map(str, args), "--no-progress"])


@pytest.mark.parametrize("method, fmt", [("nf4", "bnb"), ("ternary", "bitnet"), ("rtn", "compressed-tensors"), ("mse", "compressed-tensors")])  # fmt: skip
def test_each_method_writes_its_default_format(tiny_model, tmp_path, method, fmt):
    assert QuantConfig(method).format == fmt  # the library's rule is the CLI's
    grid = ["--group-size", "32"] if fmt == "compressed-tensors" else []
    r = _cli(tiny_model("llama"), "-o", tmp_path / "q", "--method", method, *grid)
    assert r.exit_code == 0, r.output
    assert f"into {fmt}" in r.output
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == {"bnb": "bitsandbytes"}.get(fmt, fmt)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "ternary", "--format", "compressed-tensors"],
         "--method ternary writes --format bitnet, not compressed-tensors"),
        (["--method", "nf4", "--format", "bitnet"], "--method nf4 writes --format bnb, not bitnet"),
        (["--method", "nf4", "--bits", "3"], "--bits does not apply to --method nf4"),
        (["--method", "rtn", "--damp", "0.1"], "--damp does not apply to --method rtn"),
        (["--method", "gptq", "--damp", "nan"], "--damp: 'nan' is not a finite number"),
        (["--method", "ternary", "--rms-norm-eps", "nan"], "--rms-norm-eps: 'nan' is not a finite"),
        (["--method", "ternary", "--rms-norm-eps", "inf"], "--rms-norm-eps: 'inf' is not a finite"),
    ],
)  # fmt: skip
def test_bad_method_format_or_option_is_one_line_exit_1(tiny_model, tmp_path, args, message):
    r = _cli(tiny_model("llama"), "-o", tmp_path / "q", *args)
    assert r.exit_code == 1 and r.output.count("\n") == 1 and message in r.output
    assert not (tmp_path / "q").exists()


def _poison(model: Path, name_part: str, value: float) -> str:
    """Put ``value`` into one element of the first tensor whose name contains ``name_part``."""
    for shard in sorted(model.glob("*.safetensors")):
        state = load_file(shard)
        name = next((n for n in state if name_part in n), None)
        if name is not None:
            state[name].view(-1)[3] = value
            save_file(state, shard, metadata={"format": "pt"})
            return name
    raise AssertionError(name_part)


@pytest.mark.parametrize(
    "method, part, value",
    [("rtn", "layers.1.mlp.up_proj.weight", float("nan")),
     ("mse", "layers.0.self_attn.o_proj.weight", float("inf")),
     ("gptq", "layers.1.self_attn.k_proj.weight", float("nan")),
     ("nf4", "layers.0.mlp.down_proj.weight", float("-inf")),
     ("ternary", "layers.0.self_attn.q_proj.weight", float("nan")),
     ("rtn", "model.norm.weight", float("nan")),
     ("gptq", "layers.1.post_attention_layernorm.weight", float("nan")),
     ("ternary", "embed_tokens.weight", float("inf"))],
)  # fmt: skip
def test_non_finite_input_is_an_error_naming_it(tiny_model_copy, tmp_path, method, part, value):
    bad = tiny_model_copy("llama")
    name = _poison(bad, part, value)
    opts = {"rtn": {"group_size": 32}, "mse": {"group_size": 32},
            "gptq": {"group_size": 32, "calib_samples": 2, "seq_len": 16}}.get(method, {})  # fmt: skip
    args = [a for k, v in opts.items() for a in (f"--{k.replace('_', '-')}", v)]
    r = _cli(bad, "-o", tmp_path / "q", "--method", method, *args)
    assert r.exit_code == 1, r.output
    assert (
        r.output.strip().splitlines()[-1]
        == f"error: {bad}: tensor {name!r} holds NaN or Inf values"
    )
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".q.*"))
    with pytest.raises(CheckpointError, match=name):
        quantize_checkpoint(bad, tmp_path / "q2", QuantConfig(method, **opts), progress=False)
    assert not (tmp_path / "q2").exists()


def test_options_of_other_methods_and_unknown_names_are_refused():
    with pytest.raises(ConfigError, match="unknown method 'spqr'"):
        QuantConfig("spqr")  # (awq was the example until it was implemented)
    with pytest.raises(ConfigError, match="--double-quant does not apply to --method rtn"):
        QuantConfig("rtn", double_quant=True)
    cfg = QuantConfig("gptq", bits=3, damp=0.05, act_order=True)
    assert (cfg.bits, cfg.damp, cfg.options.act_order, cfg.format) == (
        3,
        0.05,
        True,
        "compressed-tensors",
    )
    with pytest.raises(AttributeError):
        _ = QuantConfig("nf4").bits
    with pytest.raises(ConfigError, match="as an object or as keywords"):
        QuantConfig("rtn", options=RTNConfig(bits=8), bits=4)
    assert QuantConfig("rtn", options=RTNConfig(bits=8)).bits == 8


def test_a_scale_that_overflows_its_stored_dtype_is_an_error(tiny_model_copy, tmp_path):
    # gptq stores float16 scales: a group whose max is 1e6 needs 1e6 / 7.5 > 65504
    bad = tiny_model_copy("llama")
    name = _poison(bad, "layers.0.self_attn.v_proj.weight", 1e6)
    r = _cli(bad, "-o", tmp_path / "q", "--format", "gptq", "--group-size", "32")
    assert r.exit_code == 1, r.output
    module = name[: -len(".weight")]
    assert r.output == (
        f"error: {module}.scales: quantizing {name} gives non-finite values (overflows "
        "torch.float16)\n"
    )
    assert not (tmp_path / "q").exists()


def test_statistics_are_hand_computed():
    from weightsmith.core.statistics import STATISTICS

    x = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    h = STATISTICS["hessian"](2)
    m = STATISTICS["channel_magnitude"](2)
    for s in (h, m):
        s.add(x[:1])
        s.add(x[1:])
    # H = 2/n · XᵀX = [[1+9, -2], [-2, 4]] (n = 2 tokens); mean |x| = [(1+3)/2, (2+0)/2]
    assert torch.equal(h.result(), torch.tensor([[10.0, -2.0], [-2.0, 4.0]]))
    assert torch.equal(m.result(), torch.tensor([2.0, 1.0])) and h.n == m.n == 2
