"""``compress bitnet`` output -> ``convert --format gguf --type TQ2_0/TQ1_0`` -> llama.cpp.

The bitnet checkpoint (transformers' ``bitnet`` format: packed ternary levels and one
``weight_scale`` per Linear) is decoded to the float model it computes with (``q · γ``) and
written as ternary GGUF blocks, which store exactly the levels and ``γ`` rounded to fp16.
Oracles: ``gguf.quants.dequantize`` of every TQ tensor equals ``q · fp16(γ)``; llama.cpp's
logits (the peer) equal transformers' own forward of the bitnet checkpoint within a stated
tolerance (BitLinear quantizes activations to int8 per token, llama.cpp's TQ kernels to 8 bits
per 256 values: the two roundings differ)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from weightsmith.cli.main import cli
from weightsmith.compress.bitnet_format import effective_gamma, unpack_ternary
from weightsmith.ggml import archs
from weightsmith.io.reader import open_checkpoint
from weightsmith.testing import build_tiny_model
from weightsmith.testing.peers import require_peer

TEXT = "the cat sat on a mat and saw a big red dog who ran far away from home to play"
RUN = """
import json, sys
import numpy as np
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=256, logits_all=True, verbose=False, n_threads=1)
ids = llm.tokenize(sys.argv[2].encode("utf-8"), add_bos=True, special=False)
llm.eval(ids)
json.dump({"ids": ids, "logits": np.asarray(llm.scores[: len(ids)], dtype=np.float64).tolist()}, sys.stdout)
"""


def _llama_cpp(python: Path, gguf_path: Path) -> tuple[list[int], np.ndarray]:
    cmd = [str(python), "-c", RUN, str(gguf_path), TEXT]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out.stdout)
    return data["ids"], np.asarray(data["logits"])


def _run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, [*args, "--no-progress"])
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def bitnet_model(tmp_path_factory) -> Path:
    """A tiny Llama (256/512-wide rows: whole TQ blocks) after 2 steps of ``compress bitnet``."""
    root = tmp_path_factory.mktemp("bitnet")
    src = build_tiny_model(root / "m", "llama", hidden_size=256, intermediate_size=512,
                           num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    data = root / "train.txt"
    rng = np.random.default_rng(0)
    data.write_text(" ".join(rng.choice(TEXT.split(), 2000)), encoding="utf-8")
    out = root / "b"
    code, output = _run("compress", "bitnet", str(src), "-o", str(out), "--data", str(data),
                        "--steps", "2", "--seq-len", "64", "--batch-size", "2",
                        "--lambda-warmup", "0")  # fmt: skip
    assert code == 0, output
    return out


@pytest.mark.parametrize("qtype", ["TQ2_0", "TQ1_0"])
def test_ternary_blocks_hold_the_levels_and_scale(bitnet_model: Path, tmp_path: Path, qtype):
    out, report = tmp_path / "b.gguf", tmp_path / "r.json"
    code, output = _run("convert", str(bitnet_model), "-o", str(out), "--format", "gguf",
                        "--type", qtype, "--report", str(report))  # fmt: skip
    assert code == 0, output
    result = json.loads(report.read_text())["result"]
    assert result["tensor_types"][qtype] == 14  # every ternary Linear of the 2 layers
    assert not list(tmp_path.glob(".bitnet-dense-*"))  # the dense copy is cleaned up
    reader = gguf.GGUFReader(str(out))
    got = {t.name: t for t in reader.tensors}
    with open_checkpoint(bitnet_model) as ckpt:
        qc = ckpt.config["quantization_config"]
        for hf in ckpt.tensors:
            if not hf.endswith(".weight_scale"):
                continue
            w = hf[: -len("_scale")]
            q = unpack_ternary(ckpt.get_tensor(w)).numpy().astype(np.float32)
            gamma = effective_gamma(ckpt.get_tensor(hf), qc["linear_class"]).item()
            name = archs.gguf_name(w)
            n_head = archs.qk_heads(archs.gguf_arch_for(ckpt.config), name, ckpt.config)
            if n_head is not None:
                q = archs.permute_rows(q, n_head)
            t = got[name]
            assert t.tensor_type.name == qtype
            deq = gguf.quants.dequantize(t.data, t.tensor_type).reshape(q.shape)
            scale = np.float32(np.float16(gamma))
            np.testing.assert_array_equal(deq, q * scale)  # exact: levels and fp16 γ


def test_llama_cpp_logits_match_transformers_bitnet_forward(
    bitnet_model: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    python = require_peer("llamacpp")
    model = AutoModelForCausalLM.from_pretrained(bitnet_model).eval()
    tok = AutoTokenizer.from_pretrained(bitnet_model)
    for qtype in ("TQ2_0", "TQ1_0"):
        out = tmp_path / f"{qtype}.gguf"
        code, output = _run("convert", str(bitnet_model), "-o", str(out), "--format", "gguf",
                            "--type", qtype)  # fmt: skip
        assert code == 0, output
        ids, logits = _llama_cpp(python, out)
        assert ids == tok(TEXT).input_ids
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].double().numpy()
        err = float(np.linalg.norm(logits - ref) / np.linalg.norm(ref))
        assert err <= 2e-3, (qtype, err)  # measured 3.8e-4 (TQ2_0 and TQ1_0 alike)


def test_bitnet_with_rms_norm_is_refused(tmp_path: Path) -> None:
    src = build_tiny_model(tmp_path / "m", "llama", hidden_size=256, intermediate_size=512,
                           num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    b = tmp_path / "b"
    code, output = _run("compress", "quantize", str(src), "-o", str(b), "--method", "ternary",
                        "--use-rms-norm")  # fmt: skip
    assert code == 0, output
    code, output = _run("convert", str(b), "-o", str(tmp_path / "x.gguf"), "--format", "gguf",
                        "--type", "TQ2_0")  # fmt: skip
    assert code == 1 and "use_rms_norm" in output and "llama graph has no such norm" in output
    assert not (tmp_path / "x.gguf").exists()
    assert not list(tmp_path.glob(".bitnet-dense-*"))
