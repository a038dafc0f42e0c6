"""Reading GGUF back: inspect, compare (dequantized, Q/K permutation undone) and eval ppl.
Oracles: the source checkpoint, and gguf.quants' own quantize -> dequantize round trip."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from weightsmith.cli.main import cli
from weightsmith.compare import compare_checkpoints
from weightsmith.errors import CheckpointError
from weightsmith.ggml.reader import GgufFile
from weightsmith.ggml.writer import write_gguf


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_inspect_lists_metadata_and_every_tensor(tiny_model, tmp_path: Path) -> None:
    src = tiny_model("llama")
    out = tmp_path / "m.gguf"
    written = write_gguf(src, out, type_name="Q5_1", progress=False)
    res = CliRunner().invoke(cli, ["inspect", str(out), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["format"] == "gguf" and info["architecture"] == "llama"
    assert info["file_type"] == "MOSTLY_Q5_1"
    assert info["tensor_types"] == written.tensor_types == {"Q5_1": 16, "F32": 5}
    assert info["num_params"] == sum(t.numel() for t in _tensors(src).values())
    shapes = {t["name"]: t["shape"] for t in info["tensors"]}
    assert shapes["blk.0.ffn_down.weight"] == [128, 64]  # ne0 = the row length (HF dim 1)
    assert info["metadata"]["llama.attention.head_count_kv"] == 2
    text = CliRunner().invoke(cli, ["inspect", str(out)]).output
    assert "file type MOSTLY_Q5_1" in text and "blk.1.attn_q.weight" in text


def test_compare_f32_gguf_is_identical_after_unpermuting(tiny_model, tmp_path: Path) -> None:
    src = tiny_model("llama")
    write_gguf(src, tmp_path / "f.gguf", type_name="F32", progress=False)
    r = compare_checkpoints(src, tmp_path / "f.gguf")
    assert r["compared"] == r["identical"] == 21  # Q/K rows back in HF order, bit for bit
    assert r["only_in_a"] == r["only_in_b"] == [] and r["dequantized"] == 0


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_compare_reports_the_rounding_error_of_each_tensor(
    tiny_model, tmp_path: Path, qtype: str
) -> None:
    src = tiny_model("llama")
    write_gguf(src, tmp_path / "q.gguf", type_name=qtype, progress=False)
    r = compare_checkpoints(src, tmp_path / "q.gguf")
    tensors = _tensors(src)
    qt = gguf.GGMLQuantizationType[qtype]
    by_name = {d["name"]: d for d in r["tensors"]}
    for name, w in tensors.items():
        a = w.float().numpy()
        if a.ndim == 1:
            assert by_name[name]["equal"], name
            continue
        # rows are quantized independently, so the row permutation does not change the error
        back = gguf.quants.dequantize(gguf.quants.quantize(a, qt), qt).astype(np.float64)
        want = np.linalg.norm(back - a) / np.linalg.norm(a)
        assert math.isclose(by_name[name]["rel_l2"], want, rel_tol=1e-6), name
        assert by_name[name]["dequantized"]
    assert r["dequantized"] == 16


def test_compare_cli_and_a_corrupt_gguf(tiny_model, tmp_path: Path) -> None:
    src = tiny_model("llama")
    write_gguf(src, tmp_path / "q.gguf", type_name="Q8_0", progress=False)
    res = CliRunner().invoke(cli, ["compare", str(src), str(tmp_path / "q.gguf")])
    assert res.exit_code == 0, res.output
    assert "21 tensors compared, 5 identical" in res.output and "16 dequantized" in res.output
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOTGGUF" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        GgufFile(bad)
    res = CliRunner().invoke(cli, ["compare", str(src), str(bad)])
    assert (
        res.exit_code == 1
        and res.output.startswith("error:")
        and "not a readable GGUF" in res.output
    )


def test_eval_ppl_of_gguf_matches_the_source(
    stories260k: Path, tinystories_valid: Path, tmp_path: Path
) -> None:
    from weightsmith.evaluate import perplexity

    ref = perplexity(stories260k, tinystories_valid, seq_len=128, max_tokens=2048)
    write_gguf(stories260k, tmp_path / "f.gguf", type_name="F32", progress=False)
    write_gguf(stories260k, tmp_path / "q.gguf", type_name="Q4_0", progress=False)
    got = {}
    for name in ("f", "q"):
        report = tmp_path / f"{name}.json"
        res = CliRunner().invoke(cli, [
            "eval", "ppl", str(tmp_path / f"{name}.gguf"), "--data", str(tinystories_valid),
            "--seq-len", "128", "--max-tokens", "2048", "--no-progress", "--report", str(report),
        ])  # fmt: skip
        assert res.exit_code == 0, res.output
        got[name] = json.loads(report.read_text())["result"]
        assert got[name]["model"] == str(tmp_path / f"{name}.gguf")
    assert got["f"]["tokens"] == ref.tokens  # the GGUF's tokenizer gives the same ids
    assert math.isclose(got["f"]["ppl"], ref.ppl, rel_tol=1e-5)
    assert got["q"]["ppl"] > ref.ppl * 1.01  # 4-bit rounding costs perplexity
