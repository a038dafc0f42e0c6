"""Gemma, Gemma 2 and Gemma 3 (text) as GGUF: tiny seeded models built from transformers' own
config classes, written by weightsmith and run by llama.cpp itself (the `llamacpp` peer; skips
without it, fails under WEIGHTSMITH_REQUIRE_PEERS=1): it tokenizes like the HF tokenizer and its
F32 logits match transformers' within 1e-3 relative L2. The configs exercise what Gemma adds
over Llama: norms stored +1, the embedding scale, soft-capping (small caps, so a missing key
would show), a sliding window shorter than the text, a per-layer sliding pattern that is not
llama.cpp's default, and Gemma 3's two RoPE bases and q/k norms. Without the peer the metadata
and the +1 norms are still checked, and transformers' own GGUF loader (Gemma 2/3) is an oracle."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from weightsmith.cli.main import cli
from weightsmith.ggml.reader import GgufFile, materialize_hf
from weightsmith.ggml.writer import write_gguf
from weightsmith.testing.peers import require_peer

TEXT = 'Once upon a time, Lily saw a big dog. She said: "Hello!" Ünïcode  and  spaces?'
RUN = """
import json, sys
import numpy as np
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=256, logits_all=True, verbose=False, n_threads=1, type_k=0, type_v=0)
ids = llm.tokenize(sys.argv[2].encode("utf-8"), add_bos=True, special=False)
llm.eval(ids)
json.dump({"ids": ids, "logits": np.asarray(llm.scores[: len(ids)], dtype=np.float64).tolist()}, sys.stdout)
"""
COMMON = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=256, vocab_size=512, bos_token_id=1,
              eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-6)  # fmt: skip
GEMMA2 = dict(query_pre_attn_scalar=16, sliding_window=4, attn_logit_softcapping=0.05,
              final_logit_softcapping=0.1)  # fmt: skip
GEMMA3 = dict(query_pre_attn_scalar=16, sliding_window=4,
              layer_types=["sliding_attention", "full_attention", "sliding_attention"])  # fmt: skip
CONFIGS = {
    "gemma": ("GemmaConfig", dict(COMMON, num_hidden_layers=2)),
    "gemma2": ("Gemma2Config", dict(COMMON, num_hidden_layers=3, **GEMMA2)),
    "gemma3": ("Gemma3TextConfig", dict(COMMON, num_hidden_layers=3, **GEMMA3)),
}


def build_gemma(out: Path, family: str, stories: Path, **overrides) -> Path:
    """A seeded tiny ``family`` model (weights N(0, 0.02), norms too, so the +1 matters) with
    stories260K's SentencePiece-style tokenizer made Gemma-like: no leading "▁"."""
    import transformers

    cls, kwargs = CONFIGS[family]
    config = getattr(transformers, cls)(**{**kwargs, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    model.save_pretrained(out, safe_serialization=True)
    tok = json.loads((stories / "tokenizer.json").read_text(encoding="utf-8"))
    tok["normalizer"] = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    tok["decoder"]["decoders"] = tok["decoder"]["decoders"][:3]  # Replace, ByteFallback, Fuse
    (out / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    shutil.copy(stories / "tokenizer_config.json", out / "tokenizer_config.json")
    return out


def _hf_logits(src: Path, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _fields(path: Path) -> dict:
    r = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_llama_cpp_runs_gemma(stories260k: Path, tmp_path: Path, family: str) -> None:
    python = require_peer("llamacpp")
    src = build_gemma(tmp_path / "m", family, stories260k)
    write_gguf(src, tmp_path / "f32.gguf", type_name="F32", progress=False)
    proc = subprocess.run([str(python), "-c", RUN, str(tmp_path / "f32.gguf"), TEXT],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(src)(TEXT).input_ids
    assert got["ids"] == ids and len(ids) > 3 * 4  # BOS included; longer than the window
    ref = _hf_logits(src, ids)
    # measured (F32 K/V cache): gemma 7.9e-6, gemma2 3.2e-4, gemma3 3.2e-4 -- ggml's GELU goes
    # through an fp16 table, and Gemma 2/3's post-norms rescale the FFN/attention outputs
    assert _rel(np.asarray(got["logits"]), ref) <= 1e-3


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_metadata_and_norms_as_llama_cpp_writes_them(
    stories260k: Path, tmp_path: Path, family: str
) -> None:
    src = build_gemma(tmp_path / "m", family, stories260k)
    out = tmp_path / "f32.gguf"
    write_gguf(src, out, type_name="F32", progress=False)
    kv, arch = _fields(out), family
    assert kv["general.architecture"] == arch
    assert kv["tokenizer.ggml.add_space_prefix"] is False  # the tokenizer prepends no "▁"
    assert kv[f"{arch}.attention.key_length"] == kv[f"{arch}.attention.value_length"] == 16
    assert kv[f"{arch}.attention.head_count_kv"] == 2
    if family == "gemma2":
        assert kv["gemma2.attention.sliding_window"] == 4
        assert np.isclose(kv["gemma2.attn_logit_softcapping"], 0.05)
        assert np.isclose(kv["gemma2.final_logit_softcapping"], 0.1)
        assert "gemma2.attention.sliding_window_pattern" not in kv  # llama.cpp's default (2)
    if family == "gemma3":
        assert kv["gemma3.rope.freq_base"] == 1e6 and kv["gemma3.rope.freq_base_swa"] == 1e4
        assert kv["gemma3.attention.sliding_window_pattern"] == [True, False, True]
    hf = {**load_file(src / "model.safetensors")}
    names = {t.name for t in gguf.GGUFReader(str(out)).tensors}
    assert "output.weight" not in names  # tied: stored once as token_embd
    norms = [n for n in hf if n.endswith("norm.weight")]
    assert len(norms) == {"gemma": 5, "gemma2": 13, "gemma3": 19}[family]
    f = GgufFile(out)
    raw = {t.name: np.array(t.data) for t in f.reader.tensors}
    for n in norms:
        from weightsmith.ggml.archs import gguf_name

        stored = raw[gguf_name(n, arch)]
        np.testing.assert_array_equal(stored, hf[n].numpy() + np.float32(1))  # +1, in float32
        # read back (compare, eval): -1, exact up to the float32 rounding of w + 1 (2^-24)
        np.testing.assert_allclose(f.tensor(n).numpy(), hf[n].numpy(), rtol=0, atol=2**-24)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_transformers_gguf_loader_matches_source(
    stories260k: Path, tmp_path: Path, family: str
) -> None:
    """``materialize_hf`` (what ``eval`` runs): transformers' GGUF loader, plus the config keys
    it leaves at its defaults (query scaling, soft-caps, sliding pattern) read from the file."""
    from transformers import AutoModelForCausalLM

    src = build_gemma(tmp_path / "m", family, stories260k)
    ids = [1, 5, 77, 300, 12, 99, 410, 3, 250, 8, 64, 128, 7]
    ref = _hf_logits(src, ids)
    # measured (gemma2 / gemma3): F32 0 / 0, F16 8.2e-4 / 8.3e-4, Q8_0 1.9e-2 / 1.9e-2,
    # Q4_0 0.33 / 0.30 (the post-norms rescale the rounding error, hence above Llama's 0.3)
    for kind, tol in (("F32", 1e-5), ("F16", 2e-3), ("Q8_0", 3e-2), ("Q4_0", 0.5)):
        write_gguf(src, tmp_path / f"{kind}.gguf", type_name=kind, progress=False)
        hf = materialize_hf(tmp_path / f"{kind}.gguf", tmp_path / f"hf-{kind}")
        loaded = AutoModelForCausalLM.from_pretrained(hf, attn_implementation="eager").eval()
        with torch.no_grad():
            got = loaded(torch.tensor([ids])).logits[0].double().numpy()
        assert _rel(got, ref) <= tol, kind
    # the keys came from the file (transformers alone leaves 256 and its default pattern)
    raw = json.loads((tmp_path / "hf-F32" / "config.json").read_text())
    assert raw["query_pre_attn_scalar"] == 16 and raw["layer_types"][1] == "full_attention"


@pytest.mark.parametrize(
    ("family", "overrides", "needle"),
    [
        ("gemma2", {"query_pre_attn_scalar": 32}, "query_pre_attn_scalar 32"),
        ("gemma2", {"attn_logit_softcapping": None}, "without attn_logit_softcapping"),
        ("gemma3", {"attn_logit_softcapping": 10.0}, "llama.cpp's gemma3 has none"),
        ("gemma", {"tie_word_embeddings": False}, "untied lm_head"),
    ],
)
def test_gemma_llama_cpp_cannot_run_is_refused(
    stories260k: Path, tmp_path: Path, family: str, overrides: dict, needle: str
) -> None:
    src = build_gemma(tmp_path / "m", family, stories260k, **overrides)
    out = tmp_path / "m.gguf"
    res = CliRunner().invoke(
        cli, ["convert", str(src), "-o", str(out), "--format", "gguf", "--no-progress"]
    )
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], res.output
    assert not out.exists()


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_k_mixes_equal_llama_quantize(
    stories260k: Path, tmp_path: Path, family: str, llama_quantize, gguf_tensors
) -> None:
    """The K mixes on a Gemma file (rows of 256/512, so K types, not fallbacks): every tensor's
    type and bytes equal llama.cpp's ``llama_model_quantize`` of the F32 file."""
    scalar = {} if family == "gemma" else {"query_pre_attn_scalar": 64}
    src = build_gemma(tmp_path / "m", family, stories260k, hidden_size=256,
                      intermediate_size=512, head_dim=64, **scalar)  # fmt: skip
    write_gguf(src, tmp_path / "f32.gguf", type_name="F32", progress=False)
    for mix in ("Q4_K_M", "Q2_K"):
        write_gguf(src, tmp_path / f"{mix}.gguf", type_name=mix, progress=False)
        ref = llama_quantize(tmp_path / "f32.gguf", tmp_path / f"ref.{mix}.gguf", mix)
        got = gguf_tensors(tmp_path / f"{mix}.gguf")
        assert got.keys() == ref.keys()
        for name, (kind, data) in ref.items():
            assert got[name][0] == kind, (mix, name)
            np.testing.assert_array_equal(got[name][1], data, err_msg=f"{mix} {name}")


def test_llama_cpp_runs_gemma3_with_linear_rope_scaling(stories260k: Path, tmp_path: Path) -> None:
    """Gemma 3's full-attention layers scale RoPE linearly (rope.scaling.*), the sliding ones
    keep their own base (rope.freq_base_swa) unscaled."""
    python = require_peer("llamacpp")
    rope = {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}  # fmt: skip
    src = build_gemma(tmp_path / "m", "gemma3", stories260k, rope_parameters=rope)
    out = tmp_path / "f32.gguf"
    write_gguf(src, out, type_name="F32", progress=False)
    kv = _fields(out)
    assert kv["gemma3.rope.scaling.type"] == "linear" and kv["gemma3.rope.scaling.factor"] == 2.0
    proc = subprocess.run([str(python), "-c", RUN, str(out), TEXT],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout)
    assert _rel(np.asarray(got["logits"]), _hf_logits(src, got["ids"])) <= 1e-3  # 3.4e-4
