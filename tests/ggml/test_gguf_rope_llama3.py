"""Llama 3 RoPE scaling (``rope_type: llama3``) as llama.cpp stores it: no scaling keys, a
``rope_freqs.weight`` F32 tensor of per-frequency divisors computed from config.json. Oracles:
transformers' own llama3 RoPE initialisation (the divisors are its default frequencies over its
scaled ones) and llama.cpp itself (the peer; skips without it, fails under
WEIGHTSMITH_REQUIRE_PEERS=1): same tokens, F32 logits within 1e-5 of transformers'."""

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
from weightsmith.ggml.writer import write_gguf
from weightsmith.testing import build_tiny_model
from weightsmith.testing.peers import require_peer

TEXT = (
    "Once upon a time, Lily saw a big dog. She said hello to the dog and they played all day long."
)
RUN = """
import json, sys
import numpy as np
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=256, logits_all=True, verbose=False, n_threads=1,
            type_k=0, type_v=0)
ids = llm.tokenize(sys.argv[2].encode("utf-8"), add_bos=True, special=False)
llm.eval(ids)
json.dump({"ids": ids, "logits": np.asarray(llm.scores[: len(ids)], dtype=np.float64).tolist()}, sys.stdout)
"""
# head_dim 16 -> 8 frequencies; with base 5e5 and an original context of 64 their wavelengths
# fall in all three bands: high (< 64/4: kept), medium (smoothed), low (> 64/1: divided by 8)
ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip


@pytest.fixture(scope="module")
def llama3(tmp_path_factory) -> Path:
    src = build_tiny_model(tmp_path_factory.mktemp("l3") / "m", "llama", rope_parameters=ROPE)
    # larger attention weights so attention (and so RoPE) moves the logits: N(0, 0.02) -> 0.3
    from safetensors.torch import load_file, save_file

    for shard in src.glob("*.safetensors"):
        t = load_file(shard)
        t = {
            k: v * 15
            if k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"))
            else v
            for k, v in t.items()
        }
        save_file(t, shard, metadata={"format": "pt"})
    return src


def _divisors_from_transformers(src: Path) -> np.ndarray:
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = AutoConfig.from_pretrained(src)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    head_dim = config.hidden_size // config.num_attention_heads
    base = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    default = 1.0 / (config.rope_parameters["rope_theta"] ** base)
    return (default / scaled).numpy()


def test_rope_freqs_are_transformers_llama3_divisors(llama3: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    write_gguf(llama3, out, type_name="Q8_0", progress=False)
    r = gguf.GGUFReader(str(out))
    t = next(t for t in r.tensors if t.name == "rope_freqs.weight")
    assert t.tensor_type.name == "F32" and r.tensors[0].name == "rope_freqs.weight"
    got = np.array(t.data)
    want = _divisors_from_transformers(llama3)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[0] == 1.0 and got[-1] == 8.0 and 1.0 < got[1] < 8.0  # the three bands
    assert not any(k.startswith("llama.rope.scaling") for k in r.fields)  # as llama.cpp writes
    # eval cannot load it faithfully: transformers' loader ignores rope_freqs
    res = CliRunner().invoke(cli, ["eval", "ppl", str(out), "--data", str(out), "--no-progress"])
    assert res.exit_code == 1 and "ignores rope_freqs" in res.output, res.output


def test_llama_cpp_matches_transformers_with_llama3_rope(llama3: Path, tmp_path: Path) -> None:
    python = require_peer("llamacpp")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    write_gguf(llama3, tmp_path / "f32.gguf", type_name="F32", progress=False)
    proc = subprocess.run([str(python), "-c", RUN, str(tmp_path / "f32.gguf"), TEXT],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout)
    ids = AutoTokenizer.from_pretrained(llama3)(TEXT).input_ids
    assert got["ids"] == ids
    model = AutoModelForCausalLM.from_pretrained(llama3).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].double().numpy()
    logits = np.asarray(got["logits"])
    # measured 3.2e-7; the same file without rope_freqs (llama.cpp then rotates unscaled):
    # 5.2e-4, so the bound is tighter than the usual 1e-3 to tell them apart
    assert np.linalg.norm(logits - ref) / np.linalg.norm(ref) <= 1e-5
