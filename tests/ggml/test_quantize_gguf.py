"""``compress quantize --format gguf --type T``: the same file as ``convert --format gguf`` with
the same options (oracle: that command, whose output tests/ggml/test_gguf_imatrix_cli.py checks
against llama.cpp's own quantizer), data-free or importance-weighted from ``--calib``; in a
recipe too. Bad input: one line, exit 1, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from weightsmith.cli.main import cli
from weightsmith.testing import build_tiny_model

WORDS = "the cat sat on a mat and saw big red dog who ran far away from home to play with ball"
CALIB = ("--calib-samples", "4", "--seq-len", "64")


@pytest.fixture(scope="module")
def model_and_text(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Llama whose rows are multiples of 256 (K-quants, not their fallbacks) and a text."""
    root = tmp_path_factory.mktemp("qgguf")
    src = build_tiny_model(root / "m", "llama", hidden_size=256, intermediate_size=512,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=320)  # fmt: skip
    words = WORDS.split()
    text = root / "calib.txt"
    text.write_text(" ".join(np.random.default_rng(0).choice(words, 2000)) + "\n", "utf-8")
    return src, text


def _run(*args: str):
    return CliRunner().invoke(cli, [*args, "--no-progress"])


def _quantize(src: Path, out: Path, *extra: str):
    return _run("compress", "quantize", str(src), "-o", str(out), "--format", "gguf", *extra)


def _convert(src: Path, out: Path, *extra: str):
    return _run("convert", str(src), "-o", str(out), "--format", "gguf", *extra)


def test_data_free_equals_convert(model_and_text, tmp_path: Path) -> None:
    src, _ = model_and_text
    a, b, report = tmp_path / "q.gguf", tmp_path / "c.gguf", tmp_path / "r.json"
    res = _quantize(src, a, "--type", "Q4_K_M", "--report", str(report))
    assert res.exit_code == 0, res.output
    assert "as Q4_K_M GGUF (llama" in res.output and "imatrix" not in res.output
    assert _convert(src, b, "--type", "Q4_K_M").exit_code == 0
    assert a.read_bytes() == b.read_bytes()
    result = json.loads(report.read_text())["result"]
    assert result["type"] == "Q4_K_M" and result["imatrix_tensors"] == 0


def test_calibrated_equals_convert_calib(model_and_text, tmp_path: Path) -> None:
    src, text = model_and_text
    a, b = tmp_path / "q.gguf", tmp_path / "c.gguf"
    ia, ib = tmp_path / "q.imatrix", tmp_path / "c.imatrix"
    common = ("--type", "Q3_K_M", "--calib", str(text), *CALIB)
    res = _quantize(src, a, *common, "--save-imatrix", str(ia))
    assert res.exit_code == 0, res.output
    assert "imatrix used by 14 tensors" in res.output  # 2 layers x 7 Linears
    assert _convert(src, b, *common, "--save-imatrix", str(ib)).exit_code == 0
    assert a.read_bytes() == b.read_bytes() and ia.read_bytes() == ib.read_bytes()
    # the matrix changed the encoding: the data-free file differs
    free = tmp_path / "free.gguf"
    assert _quantize(src, free, "--type", "Q3_K_M").exit_code == 0
    assert free.read_bytes() != a.read_bytes()
    # --imatrix FILE (the saved one) gives the calibrated file again, in both commands
    c, d = tmp_path / "qi.gguf", tmp_path / "ci.gguf"
    assert _quantize(src, c, "--type", "Q3_K_M", "--imatrix", str(ia)).exit_code == 0
    assert _convert(src, d, "--type", "Q3_K_M", "--imatrix", str(ia)).exit_code == 0
    assert c.read_bytes() == d.read_bytes() == a.read_bytes()


def test_ternary_equals_bitnet_then_convert(model_and_text, tmp_path: Path) -> None:
    """``--method ternary --type TQ2_0`` is ``--method ternary`` (bitnet format) followed by
    ``convert --format gguf --type TQ2_0``, whose TQ blocks store the levels exactly
    (tests/ggml/test_gguf_bitnet.py); ``--ignore`` keeps a Linear dense (F16) in both."""
    src, _ = model_and_text
    for kind in ("TQ2_0", "TQ1_0"):
        a, packed = tmp_path / f"q.{kind}.gguf", tmp_path / kind / src.name
        keep = ("--ignore", "layers.1.mlp.down_proj")
        res = _quantize(src, a, "--method", "ternary", "--type", kind, *keep)
        assert res.exit_code == 0, res.output
        assert f"as {kind} GGUF (llama" in res.output
        two = _run(
            "compress", "quantize", str(src), "-o", str(packed), "--method", "ternary", *keep
        )
        assert two.exit_code == 0, two.output
        b = tmp_path / f"c.{kind}.gguf"
        assert _convert(packed, b, "--type", kind).exit_code == 0
        assert a.read_bytes() == b.read_bytes()
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(a)).tensors}
        assert types["blk.0.ffn_down.weight"] == kind and types["blk.1.ffn_down.weight"] == "F16"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_recipe_quantize_step_writes_gguf(model_and_text, tmp_path: Path) -> None:
    src, text = model_and_text
    steps = [{"id": "q", "quantize": {"args": [str(src)], "format": "gguf", "type": "Q4_K_S",
                                      "calib": str(text), "calib_samples": 4, "seq_len": 64}}]  # fmt: skip
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"steps": steps}))
    res = _run("run", str(recipe), "-o", str(tmp_path / "work"))
    assert res.exit_code == 0, res.output
    direct = tmp_path / "c.gguf"
    assert _convert(src, direct, "--type", "Q4_K_S", "--calib", str(text), *CALIB).exit_code == 0
    assert (tmp_path / "work" / "q").read_bytes() == direct.read_bytes()


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (("--type", "Q4_K_X"), ("Q4_K_X",)),
        ((), ("needs --type",)),
        (("--type", "Q4_K_M", "--method", "gptq"), ("rtn or ternary, not gptq", "round again")),
        (("--type", "Q4_K_M", "--method", "mse"), ("not mse",)),
        (("--type", "Q4_K_M", "--method", "nf4"), ("not nf4", "no GGUF tensor type")),
        (("--type", "Q4_K_M", "--method", "ternary"), ("writes TQ1_0 or TQ2_0, not Q4_K_M",)),
        (
            ("--type", "TQ1_0", "--method", "ternary", "--calib", "x"),
            ("do not apply to --method ternary",),
        ),
        (("--type", "TQ1_0", "--method", "ternary", "--use-rms-norm"), ("--use-rms-norm cannot",)),
        (("--type", "TQ1_0", "--method", "ternary", "--bits", "3"), ("--bits does not apply",)),
        (("--type", "Q8_0", "--max-shard-size", "1GB"), ("--max-shard-size does not apply",)),
        (("--type", "Q4_K_M", "--bits", "3"), ("--bits does not apply to --format gguf",)),
        (("--type", "Q4_K_M", "--asym"), ("--sym/--asym does not apply",)),
        (("--type", "Q4_K_M", "--ignore", "q_proj"), ("--ignore does not apply",)),
        (("--type", "Q4_K_M", "--imatrix", "x", "--calib", "y"), ("choose one",)),
        (("--type", "Q4_K_M", "--save-imatrix", "x"), ("needs --calib",)),
    ],
)
def test_bad_input_is_refused(model_and_text, tmp_path: Path, extra, needles) -> None:
    src, _ = model_and_text
    out = tmp_path / "m.gguf"
    _assert_refused(_quantize(src, out, *extra), out, *needles)
    assert list(tmp_path.iterdir()) == []


def test_type_without_format_gguf_is_refused(model_and_text, tmp_path: Path) -> None:
    src, _ = model_and_text
    out = tmp_path / "m"
    res = _run("compress", "quantize", str(src), "-o", str(out), "--type", "Q4_K_M")
    _assert_refused(res, out, "apply to --format gguf only")


def test_existing_out_is_kept_without_force(model_and_text, tmp_path: Path) -> None:
    src, text = model_and_text
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep")
    for extra in ((), ("--calib", str(text), *CALIB)):  # refused before the calibration too
        res = _quantize(src, out, "--type", "Q8_0", *extra)
        assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
        assert "exists" in res.output and out.read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def _assert_refused(res, out: Path, *needles: str) -> None:
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
