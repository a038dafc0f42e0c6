"""``convert --format gguf --type Q4_K_M --calib FILE`` (and ``--imatrix FILE``): the importance
matrix from layer-streamed calibration weights every quantized tensor as llama.cpp's
``llama-quantize --imatrix`` does. Oracle: llama.cpp itself (the peer's ``llama-quantize``,
given the F32 GGUF of the same model and the imatrix file weightsmith saved) writes the same
tensors byte for byte; without the peer, ``kquants.quantize_tensor`` per tensor."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from weightsmith.cli.main import cli
from weightsmith.ggml import archs
from weightsmith.ggml.imatrix import load_imatrix
from weightsmith.ggml.kquants import quantize_tensor
from weightsmith.ggml.writer import write_gguf
from weightsmith.testing import build_tiny_model

WORDS = "the cat sat on a mat and saw big red dog who ran far away from home to play with ball"


@pytest.fixture(scope="module")
def model_and_text(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Llama whose rows are multiples of 256 (K-quants, not their fallbacks) and a text."""
    root = tmp_path_factory.mktemp("imx")
    src = build_tiny_model(root / "m", "llama", hidden_size=256, intermediate_size=512,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=320)  # fmt: skip
    rng = np.random.default_rng(0)
    words = WORDS.split()
    text = root / "calib.txt"
    text.write_text(" ".join(rng.choice(words, 3000)) + "\n", encoding="utf-8")
    return src, text


def _convert(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, ["convert", *args, "--no-progress"])
    return res.exit_code, res.output


def _tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    r = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, bytes(np.array(t.data).tobytes())) for t in r.tensors}


def _kv(path: Path) -> dict[str, object]:
    r = gguf.GGUFReader(str(path))
    out = {}
    for name, f in r.fields.items():
        if name.startswith(("GGUF.", "quantize.imatrix.")):
            continue  # the header counts, and the imatrix provenance llama-quantize records
        out[name] = f.contents()
    return out


def test_calib_imatrix_weights_every_quantized_tensor(model_and_text, tmp_path: Path) -> None:
    src, text = model_and_text
    out, imx, report = tmp_path / "m.gguf", tmp_path / "m.imatrix", tmp_path / "r.json"
    code, output = _convert(
        str(src), "-o", str(out), "--format", "gguf", "--type", "Q4_K_M", "--calib", str(text),
        "--calib-samples", "6", "--seq-len", "64", "--save-imatrix", str(imx),
        "--report", str(report),
    )  # fmt: skip
    assert code == 0, output
    result = json.loads(report.read_text())["result"]
    # 2 layers x 7 linears carry an entry; token_embd/output have none (llama-imatrix's too)
    assert result["imatrix_tensors"] == 14
    assert "imatrix used by 14 tensors" in output
    im = load_imatrix(imx)
    assert im.chunk_count == 6 and im.chunk_size == 64 and len(im.sums) == 14
    importance = im.importance()
    got = _tensors(out)
    # oracle without llama.cpp: each tensor is quantize_tensor of the (permuted) F32 rows
    write_gguf(src, tmp_path / "f32.gguf", type_name="F32", progress=False)
    f32 = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(tmp_path / "f32.gguf")).tensors}
    for name, (kind, data) in got.items():
        if kind in ("F32", "F16"):
            continue
        ours = quantize_tensor(f32[name], kind, importance.get(name))
        assert data == ours.tobytes(), name
    # the matrix changed the bytes: the plain Q4_K_M differs in the weighted tensors
    write_gguf(src, tmp_path / "plain.gguf", type_name="Q4_K_M", progress=False)
    plain = _tensors(tmp_path / "plain.gguf")
    changed = [n for n in importance if plain[n][1] != got[n][1]]
    assert len(changed) == 14
    assert plain["token_embd.weight"] == got["token_embd.weight"]  # no entry: unweighted
    # --imatrix FILE gives the same file as --calib that saved FILE
    code, output = _convert(
        str(src), "-o", str(tmp_path / "again.gguf"), "--format", "gguf", "--type", "Q4_K_M",
        "--imatrix", str(imx),
    )  # fmt: skip
    assert code == 0, output
    assert (tmp_path / "again.gguf").read_bytes() == out.read_bytes()


def test_bytes_equal_llama_quantize_with_the_same_imatrix(
    model_and_text, tmp_path: Path, llama_quantize_tool: Path
) -> None:
    src, text = model_and_text
    imx = tmp_path / "m.imatrix"
    for mix in ("Q4_K_M", "Q2_K", "Q3_K_M", "Q4_0"):
        ours = tmp_path / f"{mix}.gguf"
        save = ["--save-imatrix", str(imx)] if mix == "Q4_K_M" else ["--imatrix", str(imx)]
        if mix == "Q4_K_M":
            save += ["--calib", str(text), "--calib-samples", "6", "--seq-len", "64"]
        code, output = _convert(str(src), "-o", str(ours), "--format", "gguf", "--type", mix, *save)
        assert code == 0, output
        f32 = tmp_path / "f32.gguf"
        if not f32.exists():
            write_gguf(src, f32, type_name="F32", progress=False)
        theirs = tmp_path / f"{mix}-llama.gguf"
        cmd = [str(llama_quantize_tool), "--imatrix", str(imx), str(f32), str(theirs), mix, "2"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "loaded 14 importance matrix entries" in proc.stdout + proc.stderr
        a, b = _tensors(ours), _tensors(theirs)
        if mix == "Q4_0":  # a direct type: the output stays Q4_0 (convert_hf_to_gguf), llama.cpp
            a = {n: v for n, v in a.items() if n.startswith("blk.")}  # makes it Q6_K: compare
            b = {n: v for n, v in b.items() if n.startswith("blk.")}  # the weighted layers
        assert sorted(a) == sorted(b)  # same tensors (llama-quantize orders them its own way)
        for name in a:
            assert a[name][0] == b[name][0], f"{mix} {name}: type {a[name][0]} vs {b[name][0]}"
            assert a[name][1] == b[name][1], f"{mix} {name}: bytes differ"
        if mix != "Q4_0":
            assert _kv(ours) == _kv(theirs)  # same metadata but llama-quantize's imatrix notes


def test_imatrix_options_refused_in_one_line(model_and_text, tmp_path: Path) -> None:
    src, text = model_and_text
    base = [str(src), "-o", str(tmp_path / "x.gguf")]
    cases = [
        (["--format", "gguf", "--type", "Q4_K_M", "--calib", str(text), "--imatrix", str(text)],
         "choose one"),
        (["--calib", str(text)], "apply to --format gguf only"),
        (["--format", "gguf", "--type", "Q4_K_M", "--save-imatrix", str(tmp_path / "i")],
         "needs --calib"),
        (["--format", "gguf", "--type", "Q4_K_M", "--imatrix", str(text)],
         "not a GGUF or legacy imatrix file"),
    ]  # fmt: skip
    for args, msg in cases:
        code, output = _convert(*base, *args)
        assert code == 1 and msg in output, output
        assert not (tmp_path / "x.gguf").exists()


def test_gguf_name_of_every_linear_is_in_the_imatrix(model_and_text) -> None:
    """collect_imatrix keys entries by the same GGUF names the writer gives the tensors."""
    from weightsmith.ggml.imatrix import GGUF_LINEARS

    for linear, short in GGUF_LINEARS.items():
        name = archs.gguf_name(f"model.layers.3.{linear}.weight")
        assert name == f"blk.3.{short}.weight"


def test_recipe_step_takes_calib_keys(model_and_text, tmp_path: Path) -> None:
    """`convert: {format: gguf, type: Q4_K_M, calib: ...}` writes what the command writes."""
    import shutil

    import yaml

    src, text = model_and_text
    shutil.copy(text, tmp_path / "calib.txt")  # a relative path: taken from the recipe's folder
    step = {"args": [str(src)], "format": "gguf", "type": "Q4_K_M", "calib": "calib.txt",
            "calib_samples": 6, "seq_len": 64}  # fmt: skip
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"steps": [{"id": "q", "convert": step}]}))
    res = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(tmp_path / "w"), "--no-progress"])
    assert res.exit_code == 0, res.output
    code, output = _convert(
        str(src), "-o", str(tmp_path / "direct.gguf"), "--format", "gguf", "--type", "Q4_K_M",
        "--calib", str(text), "--calib-samples", "6", "--seq-len", "64",
    )  # fmt: skip
    assert code == 0, output
    assert (tmp_path / "w" / "q").read_bytes() == (tmp_path / "direct.gguf").read_bytes()
