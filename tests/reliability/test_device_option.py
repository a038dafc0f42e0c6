"""Every command that takes ``--device`` refuses a device this machine lacks before any work:
exit 1, one ``error:`` line naming the option, no output written. ``cuda:7`` is absent both here
(no CUDA: "not available") and on a one-GPU machine ("has 1 CUDA device(s)")."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from weightsmith.cli.main import cli
from weightsmith.testing.tiny import TOKENIZER_CORPUS

CALIB = ["--calib", "{text}", "--calib-samples", "2", "--seq-len", "16"]
COMMANDS = {
    "quantize gptq": ["compress", "quantize", "{m}", "-o", "{out}", "--method", "gptq",
                      "--group-size", "32", *CALIB],
    "quantize rtn": ["compress", "quantize", "{m}", "-o", "{out}", "--group-size", "32"],
    "prune wanda": ["compress", "prune", "{m}", "-o", "{out}", "--method", "wanda",
                    "--sparsity", "0.5", *CALIB],
    "qat": ["compress", "qat", "{m}", "-o", "{out}", "--data", "{text}", "--steps", "1",
            "--group-size", "32"],
    "bitnet": ["compress", "bitnet", "{m}", "-o", "{out}", "--data", "{text}", "--steps", "1"],
    "merge": ["merge", "linear", "{m}", "{m}", "-o", "{out}"],
    "distill": ["distill", "kd", "--teacher", "{m}", "--student", "{m}", "--data", "{text}",
                "-o", "{out}", "--steps", "1"],
    "eval ppl": ["eval", "ppl", "{m}", "--data", "{text}"],
    "gguf imatrix": ["compress", "quantize", "{m}", "-o", "{out}", "--format", "gguf",
                     "--type", "Q4_K_M", *CALIB],
    "extract-lora": ["merge", "extract-lora", "{m}", "{m}", "-o", "{out}"],
    "eval sensitivity": ["eval", "sensitivity", "{m}", "--calib", "{text}", "--samples", "2",
                         "--seq-len", "16", "--schemes", "w4g32,w8g32"],
    "quantize bits-budget": ["compress", "quantize", "{m}", "-o", "{out}", "--bits-budget", "6",
                             "--budget-schemes", "w4g32,w8g32", "--sensitivity-samples", "2",
                             "--sensitivity-seq-len", "16"],
}  # fmt: skip
AUTO = ["quantize gptq", "prune wanda", "merge", "gguf imatrix", "extract-lora", "eval ppl",
        "eval sensitivity", "quantize bits-budget"]  # fmt: skip


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("dev") / "t.txt"
    p.write_text("\n".join(TOKENIZER_CORPUS * 3))
    return p


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_absent_device_is_refused_before_any_work(name, tiny_model, text, tmp_path):
    out = tmp_path / ("out.gguf" if name == "gguf imatrix" else "out")
    args = [a.format(m=tiny_model("llama"), out=out, text=text) for a in COMMANDS[name]]
    r = CliRunner().invoke(cli, [*args, "--device", "cuda:7"])
    assert r.exit_code == 1, r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "--device cuda:7" in errors[0], r.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unknown_device_name_is_refused(tiny_model, text, tmp_path):
    r = CliRunner().invoke(
        cli, ["eval", "ppl", str(tiny_model("llama")), "--data", str(text), "--device", "gpu0"]
    )
    assert r.exit_code == 1 and "error: unknown --device 'gpu0'" in r.output, r.output


@pytest.mark.parametrize("name", AUTO)
def test_auto_device_runs(name, tiny_model, text, tmp_path):
    """``--device auto`` is CUDA when present, else the CPU, in every command (it used to reach
    ``torch.device("auto")`` and exit 3 in quantize, prune, merge and the GGUF imatrix)."""
    out = tmp_path / ("out.gguf" if name == "gguf imatrix" else "out")
    args = [a.format(m=tiny_model("llama"), out=out, text=text) for a in COMMANDS[name]]
    r = CliRunner().invoke(cli, [*args, "--device", "auto"])
    assert r.exit_code == 0, r.output
    assert name.startswith("eval") or out.exists()
