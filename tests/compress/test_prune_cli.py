"""`compress prune` from the command line: errors (one line, exit 1, no output left) and
composition with `compress quantize`."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from weightsmith.cli.main import cli
from weightsmith.compress.prune import PruneConfig, prune_checkpoint
from weightsmith.io import open_checkpoint


def _run(*args: str):
    return CliRunner().invoke(cli, ["compress", "prune", *args, "--no-progress"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "wanda", "--sparsity", "1.5"], "--sparsity must be in (0, 1)"),
        (
            ["--method", "wanda", "--sparsity", "0.5", "--pattern", "2:4"],
            "give --sparsity or --pattern, not both",
        ),
        (["--method", "magnitude", "--pattern", "3:7"], "not divisible by M=7"),
        (["--method", "magnitude", "--pattern", "2-4"], "expected N:M"),
        (
            ["--method", "magnitude", "--ignore", "nope_proj"],
            "--ignore 'nope_proj' matches no Linear",
        ),
        (["--method", "wanda", "--drop", "1"], "--drop does not apply to --method wanda"),
        (["--method", "layers", "--drop", "2"], "--drop 2: "),
        (["--method", "layers", "--layers", "0,5"], "has no layer 5"),
        (["--method", "layers", "--layers", "0,1"], "cannot drop all 2 layers"),
        (["--method", "layers", "--layers", "a"], "expected comma-separated"),
        (["--method", "channels"], "needs --mlp-ratio"),
        (
            ["--method", "wanda", "--calib", "/nonexistent.txt"],
            "calibration file /nonexistent.txt: no such file",
        ),
    ],
)
def test_errors_are_one_line_and_leave_no_output(tiny_model, tmp_path, args, message):
    out = tmp_path / "out"
    report = tmp_path / "r.json"
    res = _run(str(tiny_model("llama")), "-o", str(out), *args, "--report", str(report))
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], res.output
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [report]
    assert json.loads(report.read_text())["ok"] is False


def test_missing_model_and_existing_output(tiny_model, tmp_path):
    res = _run(str(tmp_path / "nope"), "-o", str(tmp_path / "o"), "--method", "magnitude")
    assert res.exit_code == 1 and res.output.count("error:") == 1
    assert not (tmp_path / "o").exists()
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")
    res = _run(str(tiny_model("llama")), "-o", str(tmp_path / "o"), "--method", "magnitude")
    assert res.exit_code == 1 and "error:" in res.output
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["keep.txt"]


def test_quantized_input_is_refused(tiny_model, tmp_path):
    from weightsmith.compress import QuantConfig, quantize_checkpoint

    quantize_checkpoint(
        tiny_model("llama"), tmp_path / "q", QuantConfig(group_size=32), progress=False
    )
    res = _run(str(tmp_path / "q"), "-o", str(tmp_path / "o"), "--method", "magnitude")
    assert res.exit_code == 1 and "is quantized" in res.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("sym", [True, False])
def test_zeros_survive_rtn_quantization(tiny_model, tmp_path, sym):
    # prune 2:4 then `compress quantize --method rtn`: decompressing the stored levels with
    # compressed-tensors' own decompressor gives exact zeros wherever the pruned model had them.
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    src = tiny_model("llama")
    prune_checkpoint(
        src, tmp_path / "p", PruneConfig(method="magnitude", pattern=(2, 4)), progress=False
    )
    res = CliRunner().invoke(
        cli,
        ["compress", "quantize", str(tmp_path / "p"), "-o", str(tmp_path / "q"), "--method", "rtn",
         "--group-size", "32", "--sym" if sym else "--asym", "--no-progress"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme(
        targets=["Linear"], weights=QuantizationArgs(**qc["config_groups"]["group_0"]["weights"])
    )
    pruned, quant = open_checkpoint(tmp_path / "p"), open_checkpoint(tmp_path / "q")
    checked = 0
    for name in pruned.tensors:
        if ".layers." not in name or not name.endswith("_proj.weight"):
            continue
        m = name[: -len(".weight")]
        sd = {k.split(".")[-1]: quant.get_tensor(k) for k in quant.tensors if k.startswith(m + ".")}
        dec = PackedQuantizationCompressor.decompress(sd, scheme)["weight"].float()
        zero = pruned.get_tensor(name) == 0
        assert zero.sum().item() == zero.numel() // 2
        assert (dec[zero] == 0).all(), m
        checked += 1
    assert checked == 14
    if sym:  # transformers loads it too
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
        with torch.no_grad():
            assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()


def test_cli_structured_summaries_and_reports(tiny_model, tmp_path):
    src = str(tiny_model("llama"))
    res = _run(
        src,
        "-o",
        str(tmp_path / "d"),
        "--method",
        "layers",
        "--layers",
        "1",
        "--report",
        str(tmp_path / "d.json"),
    )
    assert res.exit_code == 0, res.output
    assert "dropped layers [1] (2 -> 1)" in res.output
    assert "note: no --calib" not in res.output  # --layers needs no calibration
    extra = json.loads((tmp_path / "d.json").read_text())["result"]["extra"]
    assert extra["dropped_layers"] == [1] and extra["layer_scores"] is None
    assert set(open_checkpoint(tmp_path / "d").layers()) == {0}
    res = _run(src, "-o", str(tmp_path / "w"), "--method", "channels", "--mlp-ratio", "0.5",
               "--calib-samples", "2", "--seq-len", "16", "--report", str(tmp_path / "w.json"))  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "MLP width 128 -> 64" in res.output and "note: no --calib given" in res.output
    extra = json.loads((tmp_path / "w.json").read_text())["result"]["extra"]
    assert extra["width_after"] == 64 and extra["calibration"]["samples"] == 2
    assert open_checkpoint(tmp_path / "w").info("model.layers.0.mlp.down_proj.weight").shape == (
        64,
        64,
    )


def test_wanda_calibration_text_too_short_fails_before_any_output(tiny_model, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("A few words of calibration text. " * 3)
    out = tmp_path / "p"
    res = _run(str(tiny_model("llama")), "-o", str(out), "--method", "wanda", "--sparsity", "0.5",
               "--calib", str(short), "--calib-samples", "4", "--seq-len", "32")  # fmt: skip
    assert res.exit_code == 1, res.output
    assert "calibration text " + str(short) + ": " in res.output
    assert "tokens, fewer than the 128 that --calib-samples 4 x --seq-len 32 need" in res.output
    assert not out.exists() and not list(tmp_path.glob(".p*"))
