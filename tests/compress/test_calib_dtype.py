"""``--calib-dtype``: the dtype of the calibration forwards. ``auto`` runs a bfloat16
checkpoint's layers in bfloat16 where the device has native bfloat16 matmuls (as
llm-compressor calibrates such a checkpoint), a float32 one in float32; the choice is
recorded; statistics stay float32."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import weightsmith.core.calibration as C
from weightsmith.cli.main import cli
from weightsmith.errors import ConfigError
from weightsmith.io import open_checkpoint
from weightsmith.testing.tiny import build_tiny_model

TEXT = "the cat sat on the mat. a dog ran to the park and back again, then slept. " * 60


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib-dtype")
    return {
        dt: build_tiny_model(d / str(dt), dtype=dt, max_shard_size="10MB")
        for dt in (torch.float32, torch.bfloat16)
    }


@pytest.mark.parametrize("fast", [True, False])
def test_auto_is_bfloat16_only_for_a_bfloat16_checkpoint_on_a_fast_device(
    models, monkeypatch, fast
):
    monkeypatch.setattr(C, "fast_bfloat16", lambda device: fast)
    cpu = torch.device("cpu")
    with open_checkpoint(models[torch.bfloat16]) as ck:
        assert C.calibration_dtype("auto", ck, cpu) == (torch.bfloat16 if fast else torch.float32)
        assert C.calibration_dtype("float32", ck, cpu) == torch.float32
    with open_checkpoint(models[torch.float32]) as ck:
        assert C.calibration_dtype("auto", ck, cpu) == torch.float32
        assert C.calibration_dtype("bfloat16", ck, cpu) == torch.bfloat16
        with pytest.raises(ConfigError, match="--calib-dtype"):
            C.calibration_dtype("float16", ck, cpu)


def _quantize(src, out, tmp_path, *extra):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    report = tmp_path / f"{out.name}.json"
    args = ["compress", "quantize", str(src), "-o", str(out), "--method", "gptq", "--bits", "4",
            "--group-size", "32", "--calib", str(calib), "--calib-samples", "4", "--seq-len",
            "32", "--no-progress", "--report", str(report), *extra]  # fmt: skip
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    return json.loads(report.read_text())["result"]["extra"]


def test_cli_records_the_dtype_and_both_calibrations_are_close(models, tmp_path):
    src = models[torch.bfloat16]
    x16 = _quantize(src, tmp_path / "bf16", tmp_path, "--calib-dtype", "bfloat16")
    x32 = _quantize(src, tmp_path / "f32", tmp_path, "--calib-dtype", "float32")
    assert x16["calibration"]["dtype"] == "bfloat16" and x32["calibration"]["dtype"] == "float32"
    from safetensors.torch import load_file

    a = load_file(tmp_path / "bf16" / "model.safetensors")
    b = load_file(tmp_path / "f32" / "model.safetensors")
    packed = [k for k in a if k.endswith("weight_packed")]
    assert packed and a.keys() == b.keys()
    # the same stored weights, Hessians from bfloat16 vs float32 activations: most levels agree
    same = sum(int((a[k] == b[k]).sum()) for k in packed)
    total = sum(a[k].numel() for k in packed)
    assert 0.5 < same / total < 1.0, same / total  # close, yet the option did change the run


def test_calib_dtype_is_refused_for_data_free_methods(models, tmp_path):
    r = CliRunner().invoke(cli, ["compress", "quantize", str(models[torch.float32]), "-o",
                                 str(tmp_path / "o"), "--method", "rtn", "--calib-dtype",
                                 "float32"])  # fmt: skip
    assert r.exit_code == 1 and "--calib-dtype does not apply to --method rtn" in r.output
    assert not (tmp_path / "o").exists()


def test_api_refuses_an_unknown_calib_dtype_in_one_line():
    from weightsmith.compress import QuantConfig

    with pytest.raises(
        ConfigError,
        match=r"^--calib-dtype must be one of auto, float32, bfloat16 \(got 'float16'\)$",
    ):
        QuantConfig("gptq", calib_dtype="float16").validate()


def _prune(src, out, tmp_path, method, *extra):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    report = tmp_path / f"{out.name}.json"
    args = ["compress", "prune", str(src), "-o", str(out), "--method", method, "--calib",
            str(calib), "--calib-samples", "4", "--seq-len", "32", "--no-progress", "--report",
            str(report), *extra]  # fmt: skip
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    return json.loads(report.read_text())["result"]["extra"]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_prune_calib_dtype(models, tmp_path, method):
    """``compress prune --calib-dtype`` (default float32, as before): bfloat16 forwards on a
    bfloat16 checkpoint give the same sparsity and mostly the same kept entries, and the choice
    is recorded in the report and the provenance."""
    from safetensors.torch import load_file

    src = models[torch.bfloat16]
    x16 = _prune(src, tmp_path / "bf16", tmp_path, method, "--calib-dtype", "bfloat16")
    x32 = _prune(src, tmp_path / "f32", tmp_path, method)  # the default
    assert x16["calibration"]["dtype"] == "bfloat16" and x32["calibration"]["dtype"] == "float32"
    assert x16["sparsity"] == x32["sparsity"] == pytest.approx(0.5, abs=1e-3)
    prov = json.loads((tmp_path / "bf16" / "weightsmith.json").read_text())
    assert "bfloat16" in json.dumps(prov)
    a = load_file(tmp_path / "bf16" / "model.safetensors")
    b = load_file(tmp_path / "f32" / "model.safetensors")
    pruned = [k for k in a if k.endswith("proj.weight")]
    same = sum(int(((a[k] == 0) == (b[k] == 0)).sum()) for k in pruned)
    total = sum(a[k].numel() for k in pruned)
    assert 0.8 < same / total < 1.0, same / total  # close, yet the option did change the run


def test_prune_calib_dtype_is_refused_where_it_does_not_apply(models, tmp_path):
    for method, extra in (("magnitude", []), ("layers", ["--drop", "1"])):
        out = tmp_path / method
        r = CliRunner().invoke(cli, ["compress", "prune", str(models[torch.float32]), "-o",
                                     str(out), "--method", method, *extra, "--calib-dtype",
                                     "bfloat16"])  # fmt: skip
        assert r.exit_code == 1, r.output
        assert f"--calib-dtype does not apply to --method {method}" in r.output
        assert not out.exists()
