"""compress qat end to end on a tiny llama: the quantized loss drops, and OUT (loaded by
transformers) computes exactly what the trained fake-quant model computes."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from weightsmith.cli.main import cli
from weightsmith.compress import QuantConfig, quantize_checkpoint
from weightsmith.compress.qat import QatConfig, TrainConfig, qat_checkpoint
from weightsmith.compress.qat.fake_quant import WeightSpec
from weightsmith.compress.qat.modules import as_fake_quant, swap_linears
from weightsmith.core.training import LoopConfig

pytest.importorskip("compressed_tensors")

from tests.compress.conftest import QAT_TEXT as TEXT

pytestmark = pytest.mark.usefixtures("one_thread")


def _lm_loss(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


def _ids(src, n: int = 64) -> torch.Tensor:
    from transformers import AutoTokenizer

    return torch.tensor([AutoTokenizer.from_pretrained(src)(TEXT)["input_ids"][:n]])


def test_qat_lowers_the_quantized_loss_and_out_matches_training_forward(tiny_model, tmp_path, data):
    src = tiny_model("llama")
    quant = QuantConfig(bits=2, group_size=32, symmetric=True)  # asym: transformers cannot load
    cfg = QatConfig(quant=quant, train=TrainConfig(steps=12, lr=3e-2, batch_size=2, seq_len=32))
    r = qat_checkpoint(src, tmp_path / "qat", data, cfg, progress=False,
                       keep_trained=tmp_path / "trained")  # fmt: skip
    assert r.steps == 12 and r.quantized_linears == 14 and len(r.losses) == 12
    assert 0.9 * 12 * 2 * 32 < r.train_tokens <= 12 * 2 * 32  # the last window may be short

    # the quantized loss: RTN of the original vs the QAT output, both as transformers loads them
    quantize_checkpoint(src, tmp_path / "rtn", quant, progress=False)
    ids = _ids(src)
    rtn = AutoModelForCausalLM.from_pretrained(tmp_path / "rtn").eval()
    qat = AutoModelForCausalLM.from_pretrained(tmp_path / "qat").eval()
    before, after = _lm_loss(rtn, ids), _lm_loss(qat, ids)
    assert after < before - 0.3, (before, after)

    # the trained fp weights, with the same fake-quant Linears, give OUT's logits
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "trained").eval()
    names = [n for n, m in trained.named_modules()
             if isinstance(m, torch.nn.Linear) and n != "lm_head"]  # fmt: skip
    spec = WeightSpec(2, 32, True, torch.float32, torch.float32)
    swap_linears(trained, names, as_fake_quant(spec, None))
    with torch.no_grad():
        got, want = qat(input_ids=ids).logits, trained(input_ids=ids).logits
    # same dequantized weights (bit-exact, see test_qat_fake_quant); float32 round-off only
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_kl_to_original_and_act_bits_train(tiny_model, tmp_path, data):
    src = tiny_model("llama")
    quant = QuantConfig(bits=4, group_size=-1)
    cfg = QatConfig(quant=quant, act_bits=8,
                    train=TrainConfig(steps=3, lr=1e-3, batch_size=2, seq_len=32, kl_weight=1.0))  # fmt: skip
    r = qat_checkpoint(src, tmp_path / "q", data, cfg, progress=False)
    # pure KL to the original: at step 0 the only difference is quantization, so the loss
    # is ~0 (CE on this text would be ~log(vocab) ≈ 5.8)
    assert 0 <= r.losses[0] < 0.5
    assert r.config["act_bits"] == 8


def test_one_pass_by_default():
    def total_steps(cfg: TrainConfig, n: int) -> int:
        return LoopConfig.of(cfg).total_steps(n)

    assert total_steps(TrainConfig(batch_size=4), 41) == 11  # ceil(41 / 4)
    assert total_steps(TrainConfig(batch_size=4, grad_accum=2, epochs=2.0), 41) == 11
    assert total_steps(TrainConfig(steps=5), 41) == 5


def test_cli_qat_report_summary_and_errors(tiny_model, tmp_path, data):
    src = tiny_model("llama")
    runner = CliRunner()
    out, report = tmp_path / "q", tmp_path / "r.json"
    res = runner.invoke(
        cli,
        ["compress", "qat", str(src), "-o", str(out), "--data", str(data), "--bits", "4",
         "--group-size", "32", "--steps", "2", "--batch-size", "2", "--seq-len", "32",
         "--no-progress", "--report", str(report)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert res.output.startswith("qat w4 (g32): 2 steps (") and " -> " in res.output
    rep = json.loads(report.read_text())
    assert rep["ok"] and rep["peak_rss"] > 0 and rep["wall_s"] > 0
    for key in ("steps", "train_tokens", "final_loss", "tokens_per_s", "output_size"):
        assert key in rep["result"], key
    assert rep["result"]["steps"] == 2 and 0 < rep["result"]["train_tokens"] <= 128
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["ignore"] == ["lm_head"]
    trained = json.loads((out / "weightsmith.json").read_text())["trained"]  # provenance kept
    assert trained["operation"] == "qat" and trained["training"]["steps"] == 2
    assert trained["source"] == str(src)

    gptq = tmp_path / "g"
    res = runner.invoke(cli, ["compress", "qat", str(src), "-o", str(gptq), "--data", str(data),
                              "--format", "gptq", "--group-size", "32", "--asym", "--steps", "1",
                              "--seq-len", "32", "--no-progress"])  # fmt: skip
    assert res.exit_code == 0, res.output
    qc = json.loads((gptq / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["sym"] is False

    def fails(args, message):
        bad = tmp_path / "bad"
        r = runner.invoke(cli, ["compress", "qat", str(src), "-o", str(bad), "--data", str(data),
                                "--steps", "1", "--no-progress", *args])  # fmt: skip
        assert r.exit_code == 1, r.output
        assert message in r.output and r.output.count("\n") == 1
        assert not bad.exists() and not list(tmp_path.glob(".bad*"))

    fails(["--group-size", "48"], "in_features 64 is not divisible by --group-size 48")
    fails(["--format", "gptq", "--bits", "3"], "--format gptq stores 2, 4 or 8 bits")
    fails(["--group-size", "32", "--ignore", "nonexistent"], "matches no Linear")
    r = runner.invoke(cli, ["compress", "qat", str(src), "-o", str(out), "--data", str(data)])
    assert r.exit_code == 1 and "already exists" in r.output  # refused before training


@pytest.mark.parametrize("command", ["qat", "bitnet"])
def test_undescribed_architecture_is_refused_before_training(tiny_model, tmp_path, data, command):
    """A config class no description covers fails at once (not after the training steps)."""
    import shutil

    src = tmp_path / "paligemma"  # (LLaVA is described: tests/test_multimodal.py)
    shutil.copytree(tiny_model("llama"), src)
    config = json.loads((src / "config.json").read_text())
    text = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    (src / "config.json").write_text(json.dumps({
        "model_type": "paligemma", "architectures": ["PaliGemmaForConditionalGeneration"],
        "text_config": {"model_type": "llama", **text},
    }))  # fmt: skip
    out = tmp_path / "q"
    res = CliRunner().invoke(
        cli, ["compress", command, str(src), "-o", str(out), "--data", str(data),
              "--steps", "1000", "--no-progress"],
    )  # fmt: skip
    assert res.exit_code == 1, res.output
    assert "architecture paligemma (PaliGemmaForConditionalGeneration)" in res.output
    assert "not described" in res.output and not out.exists()
