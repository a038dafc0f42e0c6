"""llama.cpp itself (the `llamacpp` peer: llama-cpp-python's bindings) loads the writer's GGUF
files, tokenizes a fixed text exactly as the HF tokenizer does, and its logits match
transformers' on the source checkpoint. Skips without the peer (fails under
WEIGHTSMITH_REQUIRE_PEERS=1)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from weightsmith.ggml.writer import write_gguf
from weightsmith.testing import build_tiny_model
from weightsmith.testing.peers import require_peer

TEXT = 'Once upon a time, Lily saw a big dog. She said: "Hello!" Ünïcode  and  spaces?'
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
    out = subprocess.run(
        [str(python), "-c", RUN, str(gguf_path), TEXT], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out.stdout)
    return data["ids"], np.asarray(data["logits"])


def _check(python: Path, src: Path, gguf_path: Path, tol: float) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids, logits = _llama_cpp(python, gguf_path)
    assert ids == AutoTokenizer.from_pretrained(src)(TEXT).input_ids  # same tokens, BOS included
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].double().numpy()
    err = float(np.linalg.norm(logits - ref) / np.linalg.norm(ref))
    assert err <= tol, err
    return err


def test_llama_cpp_runs_stories260k(stories260k: Path, tmp_path: Path) -> None:
    python = require_peer("llamacpp")
    write_gguf(stories260k, tmp_path / "f32.gguf", type_name="F32", progress=False)
    _check(python, stories260k, tmp_path / "f32.gguf", 1e-3)  # measured 5.8e-4
    write_gguf(stories260k, tmp_path / "q8.gguf", type_name="Q8_0", progress=False)
    _check(python, stories260k, tmp_path / "q8.gguf", 3e-2)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_cpp_runs_tiny_byte_level_models(tiny_model, tmp_path: Path, arch: str) -> None:
    python = require_peer("llamacpp")
    src = tiny_model(arch)
    write_gguf(src, tmp_path / "f32.gguf", type_name="F32", progress=False)
    _check(python, src, tmp_path / "f32.gguf", 1e-3)  # measured 4.5e-6 / 2.7e-5


def test_llama_cpp_runs_qwen3_with_qk_norms(tmp_path: Path) -> None:
    import weightsmith.testing.tiny as tiny

    python = require_peer("llamacpp")
    tiny.TINY_ARCHS.setdefault(
        "qwen3", ("Qwen3Config", dict(tiny.TINY_ARCHS["qwen2"][1], head_dim=128))
    )
    src = build_tiny_model(tmp_path / "q3", "qwen3")
    write_gguf(src, tmp_path / "f32.gguf", type_name="F32", progress=False)
    _check(python, src, tmp_path / "f32.gguf", 1e-3)  # measured 7.4e-6


def test_llama_cpp_runs_phi3_with_fused_tensors(stories260k: Path, tmp_path: Path) -> None:
    import weightsmith.testing.tiny as tiny

    python = require_peer("llamacpp")
    kwargs = dict(tiny.TINY_ARCHS["llama"][1], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    tiny.TINY_ARCHS.setdefault("phi3-spm", ("Phi3Config", kwargs))
    src = build_tiny_model(tmp_path / "p3", "phi3-spm", vocab_size=512, with_tokenizer=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # Phi-3's SentencePiece-style kind
        shutil.copy(stories260k / name, src / name)
    write_gguf(src, tmp_path / "f32.gguf", type_name="F32", progress=False)
    _check(python, src, tmp_path / "f32.gguf", 1e-3)  # measured 3.3e-6
