"""compress bitnet on a tiny llama: the trained model at λ = 1 (eval) computes exactly what
transformers computes from the converted ``bitnet`` checkpoint, and training beats ternary PTQ."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.compress.conftest import QAT_TEXT as TEXT
from weightsmith.cli.main import cli
from weightsmith.compress import QuantConfig, quantize_checkpoint
from weightsmith.compress.qat import BitnetConfig, TrainConfig, bitnet_checkpoint
from weightsmith.compress.qat import run as qat_run
from weightsmith.compress.qat.modules import (
    BitLinearTrain,
    as_bitlinear,
    bitnet_inference,
    swap_linears,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(src, n: int = 64) -> torch.Tensor:
    return torch.tensor([AutoTokenizer.from_pretrained(src)(TEXT)["input_ids"][:n]])


def _loss(model, ids) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


@pytest.mark.parametrize(
    "linear_class,use_rms_norm", [("bitlinear", True), ("autobitlinear", False)]
)
def test_trained_bitnet_equals_converted_checkpoint(tiny_model, tmp_path, data, monkeypatch,
                                                     linear_class, use_rms_norm):  # fmt: skip
    src = tiny_model("llama")
    seen: list[float] = []
    real = qat_run.set_lambda
    monkeypatch.setattr(
        qat_run, "set_lambda", lambda mods, lam: (seen.append(lam), real(mods, lam))
    )
    cfg = BitnetConfig(train=TrainConfig(steps=12, lr=2e-2, batch_size=2, seq_len=32),
                       lambda_warmup=4, use_rms_norm=use_rms_norm, linear_class=linear_class)  # fmt: skip
    r = bitnet_checkpoint(src, tmp_path / "bn", data, cfg, progress=False,
                          keep_trained=tmp_path / "trained")  # fmt: skip
    assert seen[:6] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0] and seen[-1] == 1.0  # λ = min(s/4, 1)
    qc = json.loads((tmp_path / "bn" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitnet" and qc["linear_class"] == linear_class
    assert qc["use_rms_norm"] is use_rms_norm and r.quantized_linears == 14

    ids = _ids(src)
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "bn").eval()
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "trained").eval()
    names = [n for n, m in trained.named_modules()
             if isinstance(m, torch.nn.Linear) and n != "lm_head"]  # fmt: skip
    swap_linears(trained, names, as_bitlinear(use_rms_norm, 1e-6, linear_class))
    trained.eval()
    with torch.no_grad():
        got, want = out(input_ids=ids).logits, trained(input_ids=ids).logits
    # the same operations in the same order: equal up to float32 round-off (bit-exact here)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    # training beats ternary PTQ of the original (as transformers loads both)
    ptq = QuantConfig(method="ternary", format="bitnet",
                      use_rms_norm=use_rms_norm, linear_class=linear_class)  # fmt: skip
    quantize_checkpoint(src, tmp_path / "ptq", ptq, progress=False)
    before = _loss(AutoModelForCausalLM.from_pretrained(tmp_path / "ptq").eval(), ids)
    assert _loss(out, ids) < before - 0.3, (before, _loss(out, ids))


def test_bitlinear_eval_forward_matches_training_forward():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 8, bias=True)
    x = torch.randn(3, 5, 32)
    for cls in ("bitlinear", "autobitlinear"):
        mod = as_bitlinear(False, 1e-6, cls)(lin)
        assert isinstance(mod, BitLinearTrain)
        train_y = mod(x)  # STE form: F.linear(x̃/m, W̃·γ) + b
        mod.eval()
        eval_y = mod(x)
        assert torch.equal(eval_y, bitnet_inference(x, lin.weight, lin.bias, cls))
        torch.testing.assert_close(eval_y, train_y, atol=1e-5, rtol=1e-5)
        mod.lam = 0.5  # below λ = 1, eval uses the blended forward too
        torch.testing.assert_close(mod(x), mod.train()(x))


def test_cli_bitnet(tiny_model, tmp_path, data):
    src = tiny_model("llama")
    runner = CliRunner()
    out, report = tmp_path / "bn", tmp_path / "r.json"
    res = runner.invoke(
        cli,
        ["compress", "bitnet", str(src), "-o", str(out), "--data", str(data), "--steps", "2",
         "--batch-size", "2", "--seq-len", "32", "--lambda-warmup", "0", "--no-rms-norm",
         "--no-progress", "--report", str(report)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "bitnet: 2 steps (" in res.output
    rep = json.loads(report.read_text())
    assert rep["ok"] and rep["result"]["config"]["lambda_warmup"] == 0
    assert rep["result"]["config"]["use_rms_norm"] is False
    assert rep["result"]["output_size"] < rep["result"]["quantize"]["extra"]["input_size"]
    r = runner.invoke(cli, ["compress", "bitnet", str(src), "-o", str(tmp_path / "x"),
                            "--data", str(data), "--lambda-warmup", "-1"])  # fmt: skip
    assert r.exit_code == 1 and "--lambda-warmup must be >= 0" in r.output
    assert not (tmp_path / "x").exists()
