"""GPTQ: the blocked Cholesky algorithm against a naive OBQ-style reference, error vs RTN,
act-order, dead columns, non-PD Hessians and the layer-streamed end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from weightsmith.cli.main import cli
from weightsmith.compress import QuantConfig, gptq, quantize_checkpoint
from weightsmith.compress.gptq import (
    HessianNotPositiveDefinite,
    HessianStat,
    gptq_quantize_weight,
)
from weightsmith.compress.mse import MSEConfig, mse_quantize
from weightsmith.compress.rtn import quantize_levels, rtn_quantize
from weightsmith.core.calibration_data import BUILTIN_SOURCE


def _problem(out_f=16, in_f=64, tokens=512, seed=0):
    """A weight and correlated inputs (X = Z·A with a decaying spectrum), H = 2/n·XᵀX."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    a = torch.randn(in_f, in_f, generator=g) * torch.logspace(0, -2, in_f)[:, None]
    x = torch.randn(tokens, in_f, generator=g) @ a
    return w, x, 2 * x.t() @ x / tokens


def _out_err(w, deq, x):
    return ((x @ (w - deq).t()) ** 2).sum().item()


def _naive_gptq(w, h, bits, damp):
    """Sec. 3 of the paper without blocks or Cholesky: quantize column q, spread its error with
    the inverse Hessian, then remove q from the inverse (Gaussian elimination, Eq. 4). Per-channel
    symmetric qparams fixed up front. float64."""
    W, H = w.double().clone(), h.double().clone()
    n = W.shape[1]
    H += damp * H.diag().mean() * torch.eye(n, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    qmax = (1 << (bits - 1)) - 1
    scale = (W.abs().amax(1, keepdim=True) / ((2 * qmax + 1) / 2)).float().double()
    Q = torch.zeros_like(W)
    for q in range(n):
        lv = quantize_levels(W[:, q : q + 1], scale, torch.zeros_like(scale), bits).double()
        Q[:, q] = (lv * scale)[:, 0]
        err = (W[:, q] - Q[:, q]) / Hinv[q, q]
        W[:, q:] -= err[:, None] * Hinv[q, q:][None, :]
        Hinv = Hinv - Hinv[:, q : q + 1] @ Hinv[q : q + 1, :] / Hinv[q, q]
    return Q.float()


def test_matches_naive_reference_for_any_block_size():
    # Lazy block updates + Cholesky are a reformulation: same result as the naive algorithm
    # (float32 vs float64 can flip a rounding tie: allow 0.5% of entries to differ).
    w, _, h = _problem()
    ref = _naive_gptq(w, h, bits=4, damp=0.01)
    for block in (128, 16, 7):
        qw = gptq_quantize_weight(
            w, h, bits=4, group_size=-1, symmetric=True, block_size=block, damp=0.01
        )
        diff = (qw.dequantize() - ref).abs() > 1e-4
        assert diff.float().mean() < 0.005, block


def test_identity_hessian_reduces_to_rtn():
    # With uncorrelated inputs nothing is compensated: GPTQ == RTN, per channel and group-wise.
    w, _, _ = _problem()
    h = torch.eye(64)
    for g in (-1, 16):
        for sym in (True, False):
            qw = gptq_quantize_weight(w, h, bits=4, group_size=g, symmetric=sym)
            ref = rtn_quantize(w, QuantConfig(bits=4, group_size=g, symmetric=sym))
            assert torch.equal(qw.q, ref.q)
            torch.testing.assert_close(qw.scale, ref.scale)


@pytest.mark.parametrize("act_order", [False, True])
def test_mse_observer_with_identity_hessian_is_the_mse_method(act_order):
    # Nothing is compensated under H = I, so GPTQ's mse observer must choose exactly the
    # qparams of --method mse (itself checked by hand in test_quant_mse.py): same levels,
    # bit-identical scales and zeros (dynamic groups, act-order's static ones, per channel).
    w, _, _ = _problem()
    w[::3, ::5] *= 4  # outliers, so that clipping pays off in some groups
    for g in (-1, 16):
        for sym in (True, False):
            qw = gptq_quantize_weight(w, torch.eye(64), bits=3, group_size=g, symmetric=sym,
                                      act_order=act_order, observer="mse")  # fmt: skip
            ref = mse_quantize(w, MSEConfig(bits=3, group_size=g, symmetric=sym))
            assert ref.info["mean_clip_ratio"] < 1  # the search did clip somewhere
            assert torch.equal(qw.q, ref.q) and torch.equal(qw.scale, ref.scale)
            assert torch.equal(qw.zero, ref.zero)


@pytest.mark.parametrize(
    "bits,g,sym", [(4, -1, True), (4, 16, False), (3, 16, True), (2, -1, False)]
)
@pytest.mark.parametrize("act_order", [False, True])
def test_lower_output_error_than_rtn(bits, g, sym, act_order):
    # The objective GPTQ minimises, ||X(W - Ŵ)ᵀ||², on the calibration inputs: GPTQ must beat
    # RTN by a clear margin (at least 15%) at every setting.
    w, x, h = _problem(seed=bits)
    qw = gptq_quantize_weight(w, h, bits=bits, group_size=g, symmetric=sym, act_order=act_order)
    rtn = rtn_quantize(w, QuantConfig(bits=bits, group_size=g, symmetric=sym))
    assert _out_err(w, qw.dequantize(), x) < 0.85 * _out_err(w, rtn.dequantize(), x)


def test_act_order_uses_static_groups_with_trivial_g_idx():
    w, _, h = _problem()
    qw = gptq_quantize_weight(w, h, bits=4, group_size=16, symmetric=True, act_order=True)
    assert qw.g_idx.tolist() == [i // 16 for i in range(64)]
    # static groups: scales are RTN's min-max of the original weights, group by group
    ref = rtn_quantize(w, QuantConfig(bits=4, group_size=16, symmetric=True))
    torch.testing.assert_close(qw.scale, ref.scale)
    # levels differ from RTN (error compensation happened) but decode with those scales
    assert not torch.equal(qw.q, ref.q)
    deq = qw.q.float() * qw.scale[:, torch.arange(64) // 16]
    torch.testing.assert_close(qw.dequantize(), deq)


def test_dead_columns_are_zero_and_non_pd_is_an_error():
    w, _, h = _problem()
    h[5, :] = 0
    h[:, 5] = 0
    qw = gptq_quantize_weight(w, h, bits=4, group_size=-1, symmetric=True)
    assert bool((qw.dequantize()[:, 5] == 0).all())
    with pytest.raises(HessianNotPositiveDefinite, match="not positive definite"):
        gptq_quantize_weight(w, -torch.eye(64), bits=4, group_size=-1, symmetric=True)


@pytest.mark.parametrize("act_order,g", [(False, -1), (False, 32), (True, 32)])
def test_overwriting_the_hessian_gives_identical_results(act_order, g, monkeypatch):
    # The memory-saving path (Cholesky steps written into the caller's Hessian, as the
    # layer-streamed driver does) must not change a single level, scale or the loss; without
    # it the caller's Hessian is untouched. 160 columns: two blocks of the default 128.
    w, x, _ = _problem(out_f=24, in_f=160, tokens=640, seed=3)
    x[:, 9] = 0  # a dead column
    stat = HessianStat(160)
    stat.add(x[:300])
    stat.add(x[300:])
    h = stat.hessian()
    h_before = h.clone()
    kw = dict(bits=4, group_size=g, symmetric=True, act_order=act_order, dtype=torch.bfloat16)
    a = gptq_quantize_weight(w, h, **kw)
    assert torch.equal(h, h_before)
    taken = stat.take_hessian()
    assert torch.equal(taken, h_before) and stat.sum is None  # handed over, computed in place
    monkeypatch.setattr(gptq, "_FACTORS", gptq._FactorCache())  # factorize it again
    b = gptq_quantize_weight(w, taken, overwrite_hessian=True, **kw)
    assert not torch.equal(taken, h_before)  # its storage was reused
    assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale)
    assert torch.equal(a.zero, b.zero) and a.info["loss"] == b.info["loss"]


def _rel_error_to_original(src, out, ids):
    """Relative error of every decoder layer's output (the tiny model's N(0, 0.02) norm
    weights make its logits nearly constant, so hidden states are the meaningful signal)."""
    a = AutoModelForCausalLM.from_pretrained(src).eval()
    b = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        ha = a(ids, output_hidden_states=True).hidden_states[1:]
        hb = b(ids, output_hidden_states=True).hidden_states[1:]
    return sum(((x - y).norm() / x.norm()).item() for x, y in zip(ha, hb, strict=True))


def test_layer_streamed_gptq_beats_rtn_end_to_end(tiny_model, tmp_path):
    # Same calibration text for both; evaluated on that text: GPTQ's layers stay closer.
    pytest.importorskip("compressed_tensors")
    src = tiny_model("llama")
    calib = tmp_path / "calib.txt"
    from weightsmith.core.calibration import load_calibration_text, load_tokenizer, tokenize_windows

    calib.write_text(load_calibration_text(None).text)
    ids = tokenize_windows(load_tokenizer(src), calib.read_text(), samples=4, seq_len=64)
    grid = dict(bits=3, group_size=32, symmetric=True)
    calibration = dict(calib=str(calib), calib_samples=16, seq_len=64)
    g = quantize_checkpoint(
        src, tmp_path / "gptq", QuantConfig(method="gptq", **grid, **calibration), progress=False
    )
    quantize_checkpoint(src, tmp_path / "rtn", QuantConfig(method="rtn", **grid), progress=False)
    assert g.extra["calibration"]["source"] == str(calib)
    assert g.extra["calibration"]["samples"] == 16 and g.extra["calibration"]["tokens"] == 1024
    assert len(g.extra["loss"]) == 14 and all(v > 0 for v in g.extra["loss"].values())
    err_g = _rel_error_to_original(src, tmp_path / "gptq", ids)
    err_r = _rel_error_to_original(src, tmp_path / "rtn", ids)
    assert err_g < 0.8 * err_r, (err_g, err_r)


def test_cli_gptq_builtin_fallback_and_errors(tiny_model, tmp_path):
    src = tiny_model("qwen2")
    runner = CliRunner()
    report = tmp_path / "r.json"
    r = runner.invoke(
        cli,
        ["compress", "quantize", str(src), "-o", str(tmp_path / "q"), "--method", "gptq",
         "--group-size", "32", "--act-order", "--observer", "mse", "--calib-samples", "4",
         "--seq-len", "32", "--no-progress", "--report", str(report)],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "built-in mix (builtin:calibration-mix-v1" in r.stderr
    rep = json.loads(report.read_text())["result"]["extra"]
    assert rep["calibration"]["source"] == BUILTIN_SOURCE and rep["rtn_fallbacks"] == []
    prov = json.loads((tmp_path / "q" / "weightsmith.json").read_text())
    assert (
        prov["calibration"]["source"] == BUILTIN_SOURCE
        and prov["config"]["gptq"]["act_order"] is True
        and prov["config"]["gptq"]["observer"] == "mse"
    )
    qcfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qcfg["config_groups"]["group_0"]["weights"]["observer"] == "mse"
    # A degenerate Hessian: negative dampening breaks positive definiteness.
    bad = tmp_path / "bad"
    args = ["compress", "quantize", str(src), "-o", str(bad), "--method", "gptq", "--group-size",
            "32", "--calib-samples", "2", "--seq-len", "16", "--no-progress"]  # fmt: skip
    r = runner.invoke(cli, [*args, "--damp", "-0.5"])
    assert r.exit_code == 1 and "--damp must be in [0, 1)" in r.output and not bad.exists()


def test_missing_calibration_file_fails_before_any_output(tiny_model, tmp_path):
    out = tmp_path / "q"
    r = CliRunner().invoke(
        cli,
        ["compress", "quantize", str(tiny_model("llama")), "-o", str(out), "--method", "gptq",
         "--group-size", "32", "--calib", str(tmp_path / "nope.txt")],
    )  # fmt: skip
    assert r.exit_code == 1 and "calibration file" in r.output and "no such file" in r.output
    assert not out.exists() and not list(tmp_path.glob(".q*"))


def test_calibration_text_too_short_fails_before_any_output(tiny_model, tmp_path):
    """Fewer tokens than --calib-samples x --seq-len is a one-line error naming the file and
    both numbers (not fewer windows), exit 1, nothing written."""
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time there was a tiny calibration file. " * 4)
    out = tmp_path / "q"
    r = CliRunner().invoke(
        cli,
        ["compress", "quantize", str(tiny_model("llama")), "-o", str(out), "--method", "gptq",
         "--group-size", "32", "--calib", str(short), "--calib-samples", "8", "--seq-len", "64"],
    )  # fmt: skip
    assert r.exit_code == 1, r.output
    line = [x for x in r.output.splitlines() if "short.txt" in x]
    assert (
        len(line) == 1
        and "tokens, fewer than the 512 that --calib-samples 8 x --seq-len 64" in (line[0])
    ), r.output
    assert "lower --calib-samples or --seq-len" in line[0]
    assert not out.exists() and not list(tmp_path.glob(".q*"))


def test_default_calibration_mix_end_to_end(tiny_model, tmp_path):
    """No --calib, default --calib-samples 128 x --seq-len 512: the built-in mix is long
    enough, and the report records it."""
    report = tmp_path / "r.json"
    r = CliRunner().invoke(
        cli,
        ["compress", "quantize", str(tiny_model("llama")), "-o", str(tmp_path / "q"), "--method",
         "gptq", "--group-size", "32", "--no-progress", "--report", str(report)],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert r.stderr.count("note: no --calib given") == 1
    cal = json.loads(report.read_text())["result"]["extra"]["calibration"]
    want = {"source": BUILTIN_SOURCE, "samples": 128, "seq_len": 512, "tokens": 65536}
    assert cal == {**want, "dtype": "float32"}  # a float32 model: float32 forwards
