"""HF -> GGUF writer. Oracles: ``gguf.quants.quantize`` (the ggml project's block encoders) for
every stored byte, and transformers' own GGUF loader for logits and tokenization."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from weightsmith.cli.main import cli
from weightsmith.ggml.writer import write_gguf
from weightsmith.testing import build_tiny_model

TEXT = 'Once upon a time, Lily saw a big dog. She said: "Hello!" Ünïcode  and  spaces?'


def _source_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py's LlamaModel.permute, written out independently of weightsmith.ggml
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _expected(hf: str, w: np.ndarray, config: dict) -> np.ndarray:
    if hf.endswith("self_attn.q_proj.weight"):
        return _llama_permute(w, config["num_attention_heads"])
    if hf.endswith("self_attn.k_proj.weight"):
        return _llama_permute(w, config["num_key_value_heads"])
    return w


GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def _hf(name: str) -> str:
    if name.startswith("blk."):
        _, bid, rest = name.split(".", 2)
        return f"model.layers.{bid}.{GGUF_TO_HF[rest]}"
    return GGUF_TO_HF[name]


@pytest.mark.parametrize(
    "qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "TQ1_0", "TQ2_0"]
)
def test_every_tensor_is_byte_identical_to_gguf_quants(tmp_path: Path, qtype: str) -> None:
    # hidden 256 so TQ*_0 (block 256) applies to the 2-D weights; intermediate 160 is not a
    # multiple of 256 (ffn_down falls back to F16 there) but is of 32 (legacy types apply).
    src = build_tiny_model(
        tmp_path / "m", "llama", hidden_size=256, intermediate_size=160, with_tokenizer=True,
        max_shard_size="10MB",
    )  # fmt: skip
    config = json.loads((src / "config.json").read_text())
    out = tmp_path / "m.gguf"
    result = write_gguf(src, out, type_name=qtype, progress=False)
    tensors = _source_tensors(src)
    reader = gguf.GGUFReader(out)
    assert len(reader.tensors) == len(tensors) == result.tensors
    seen_types = set()
    for t in reader.tensors:
        hf = _hf(t.name)
        w = _expected(hf, tensors[hf].float().numpy(), config)
        want_type = t.tensor_type.name
        seen_types.add(want_type)
        if w.ndim == 1:
            assert want_type == "F32", t.name  # norms stay F32 as llama.cpp keeps them
        want = gguf.quants.quantize(w, gguf.GGMLQuantizationType[want_type])
        assert np.asarray(t.data).tobytes() == want.tobytes(), t.name
        assert list(t.shape) == list(reversed(w.shape)), t.name  # GGUF stores ne0 first
    assert qtype in seen_types
    fell_back = {f["tensor"] for f in result.fallbacks}
    if qtype.startswith("TQ"):
        # convert_hf_to_gguf.py keeps embeddings/output F16 and falls back on rows of 160
        assert {"token_embd.weight", "output.weight", "blk.0.ffn_down.weight"} <= fell_back
    else:
        assert fell_back == set()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


# relative L2 error of the logits vs the source: F32 is exact up to float rounding
TOLERANCES = {"F32": 1e-6, "F16": 2e-3, "Q8_0": 2e-2, "Q4_0": 0.3}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_transformers_loads_each_type_with_matching_logits_and_tokens(
    tiny_model, tmp_path: Path, arch: str
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_model(arch)
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    tok = AutoTokenizer.from_pretrained(src)
    ids = torch.tensor([tok(TEXT).input_ids])
    ref = _logits(model, ids)
    errors = {}
    for qtype, tol in TOLERANCES.items():
        write_gguf(src, tmp_path / f"{qtype}.gguf", type_name=qtype, progress=False)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f"{qtype}.gguf").eval()
        assert type(loaded) is type(model)
        err = ((_logits(loaded, ids) - ref).norm() / ref.norm()).item()
        errors[qtype] = err
        assert err <= tol, (qtype, err)
    assert errors["F32"] < errors["Q8_0"] < errors["Q4_0"]  # the types differ as they should
    gguf_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="F32.gguf")
    assert gguf_tok(TEXT).input_ids == tok(TEXT).input_ids


def test_qwen3_with_qk_norms_loads_exactly(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    import weightsmith.testing.tiny as tiny

    tiny.TINY_ARCHS.setdefault(
        "qwen3", ("Qwen3Config", dict(tiny.TINY_ARCHS["qwen2"][1], head_dim=128))
    )
    src = build_tiny_model(tmp_path / "q3", "qwen3")
    result = write_gguf(src, tmp_path / "q3.gguf", type_name="F32", progress=False)
    assert result.architecture == "qwen3"
    names = {t.name for t in gguf.GGUFReader(tmp_path / "q3.gguf").tensors}
    assert {"blk.0.attn_q_norm.weight", "blk.1.attn_k_norm.weight"} <= names
    assert "output.weight" not in names  # tied: stored once, as token_embd
    ids = torch.arange(3, 40)[None]
    ref = _logits(AutoModelForCausalLM.from_pretrained(src).eval(), ids)
    got = _logits(AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q3.gguf").eval(), ids)
    assert torch.allclose(got, ref, rtol=0, atol=1e-6)


def test_phi3_keeps_fused_projections_and_loads_exactly(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    import weightsmith.testing.tiny as tiny

    kwargs = dict(tiny.TINY_ARCHS["llama"][1], bos_token_id=0, eos_token_id=0, pad_token_id=1)
    tiny.TINY_ARCHS.setdefault("phi3", ("Phi3Config", kwargs))
    src = build_tiny_model(tmp_path / "p3", "phi3")
    out = tmp_path / "p3.gguf"
    result = write_gguf(src, out, type_name="Q8_0", progress=False)
    assert result.architecture == "phi3" and result.tensors == 15
    r = gguf.GGUFReader(out)
    shapes = {t.name: [int(d) for d in t.shape] for t in r.tensors}
    assert shapes["blk.0.attn_qkv.weight"] == [64, 64 + 2 * 32]  # q (4 heads) + k, v (2 heads)
    assert shapes["blk.0.ffn_up.weight"] == [64, 2 * 128]  # gate and up, fused as in HF
    assert r.fields["phi3.rope.scaling.original_context_length"].contents() == 4096
    assert r.fields["phi3.rope.dimension_count"].contents() == 16
    assert r.fields["phi3.attention.sliding_window"].contents() == 0
    write_gguf(src, tmp_path / "f.gguf", type_name="F32", progress=False)
    ids = torch.arange(3, 40)[None]
    ref = _logits(AutoModelForCausalLM.from_pretrained(src).eval(), ids)
    got = _logits(AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="f.gguf").eval(), ids)
    assert torch.allclose(got, ref, rtol=0, atol=1e-6)
    q8 = _logits(AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="p3.gguf").eval(), ids)
    assert 0 < ((q8 - ref).norm() / ref.norm()).item() < 2e-2


def test_mistral_is_written_as_llama_like_llama_cpp(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    import weightsmith.testing.tiny as tiny

    kwargs = dict(tiny.TINY_ARCHS["llama"][1], sliding_window=None, bos_token_id=0, eos_token_id=0)
    tiny.TINY_ARCHS.setdefault("mistral", ("MistralConfig", kwargs))
    # not named "mistral…": transformers' loader then looks for a gguf-py "mistral" arch
    src = build_tiny_model(tmp_path / "tiny-m", "mistral")
    assert json.loads((src / "config.json").read_text())["model_type"] == "mistral"
    result = write_gguf(src, tmp_path / "m.gguf", type_name="F32", progress=False)
    assert result.architecture == "llama"  # convert_hf_to_gguf.py's LlamaModel takes Mistral
    ids = torch.arange(3, 40)[None]
    ref = _logits(AutoModelForCausalLM.from_pretrained(src).eval(), ids)
    got = _logits(AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval(), ids)
    assert torch.allclose(got, ref, rtol=0, atol=1e-6)


def test_metadata_as_llama_cpp_writes_it(tiny_model, tmp_path: Path) -> None:
    src = tiny_model("llama")
    write_gguf(src, tmp_path / "m.gguf", type_name="Q8_0", progress=False)
    r = gguf.GGUFReader(tmp_path / "m.gguf")

    def field(key):
        return r.fields[key].contents()

    assert field("general.architecture") == "llama"
    assert field("general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert field("llama.block_count") == 2
    assert field("llama.embedding_length") == 64
    assert field("llama.feed_forward_length") == 128
    assert field("llama.attention.head_count") == 4
    assert field("llama.attention.head_count_kv") == 2
    assert field("llama.rope.dimension_count") == 16
    assert field("llama.vocab_size") == 320
    assert field("llama.context_length") == 256
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.pre") == "gpt-2"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == 320 and tokens[300] == "[PAD300]"  # padded to the model's vocabulary
    types = field("tokenizer.ggml.token_type")
    assert types[tokens.index("<|endoftext|>")] == int(gguf.TokenType.CONTROL)
    assert types[300] == int(gguf.TokenType.UNUSED)
    assert field("tokenizer.ggml.eos_token_id") == tokens.index("<|endoftext|>")
    assert len(field("tokenizer.ggml.merges")) > 0


def test_stories260k_spm_vocab_and_fallbacks(stories260k: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "s.gguf"
    result = write_gguf(stories260k, out, type_name="Q8_0", progress=False)
    # intermediate 172 is not a multiple of 32: each ffn_down falls back to F16, listed
    assert sorted(f["tensor"] for f in result.fallbacks) == [
        f"blk.{i}.ffn_down.weight" for i in range(5)
    ]
    assert {f["type"] for f in result.fallbacks} == {"F16"}
    r = gguf.GGUFReader(out)
    assert r.fields["tokenizer.ggml.model"].contents() == "llama"
    assert r.fields["tokenizer.ggml.bos_token_id"].contents() == 1
    assert r.fields["tokenizer.ggml.add_bos_token"].contents() is True
    types = r.fields["tokenizer.ggml.token_type"].contents()
    assert types[3:259] == [int(gguf.TokenType.BYTE)] * 256  # <0x00>..<0xFF>
    write_gguf(stories260k, tmp_path / "f32.gguf", type_name="F32", progress=False)
    tok = AutoTokenizer.from_pretrained(stories260k)
    gguf_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="f32.gguf")
    assert gguf_tok(TEXT).input_ids == tok(TEXT).input_ids
    ids = torch.tensor([tok(TEXT).input_ids])
    ref = _logits(AutoModelForCausalLM.from_pretrained(stories260k).eval(), ids)
    got = _logits(AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="f32.gguf").eval(), ids)
    assert torch.allclose(got, ref, rtol=0, atol=1e-5)
    q8 = _logits(AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="s.gguf").eval(), ids)
    assert ((q8 - ref).norm() / ref.norm()).item() < 2e-2


def test_cli_convert_gguf_report_and_refusals(tiny_model, tmp_path: Path) -> None:
    src = tiny_model("llama")
    out = tmp_path / "m.gguf"
    report = tmp_path / "r.json"
    runner = CliRunner()
    args = ["convert", str(src), "-o", str(out), "--format", "gguf", "--type", "Q4_0"]
    res = runner.invoke(cli, [*args, "--report", str(report), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "wrote 21 tensors as Q4_0 GGUF (llama" in res.output
    data = json.loads(report.read_text())["result"]
    assert data["tensor_types"] == {"Q4_0": 16, "F32": 5}
    before = out.read_bytes()
    res = runner.invoke(cli, args)  # exists, no --force
    assert res.exit_code == 1 and "already exists" in res.output
    assert out.read_bytes() == before
    if importlib.util.find_spec("weightsmith.ggml.kquants") is None:
        res = runner.invoke(cli, [*args[:-1], "Q4_K_M", "--force"])
        assert res.exit_code == 1 and "not available in this build" in res.output
        assert out.read_bytes() == before
    res = runner.invoke(cli, [*args[:-1], "Q3_0", "--force"])
    assert res.exit_code == 1 and "unknown GGUF type" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "r.json"]  # no temp left


K_PRESENT = importlib.util.find_spec("weightsmith.ggml.kquants") is not None


@pytest.mark.skipif(not K_PRESENT, reason="this build has no K-quant encoder (ggml/kquants.py)")
def test_k_mix_routes_through_mixes_and_kquants(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from weightsmith.ggml import kquants, mixes

    src = build_tiny_model(
        tmp_path / "m", "llama", hidden_size=256, intermediate_size=512, max_shard_size="10MB"
    )
    config = json.loads((src / "config.json").read_text())
    result = write_gguf(src, tmp_path / "k.gguf", type_name="Q4_K_M", progress=False)
    assert result.fallbacks == []
    tensors = _source_tensors(src)
    reader = gguf.GGUFReader(tmp_path / "k.gguf")
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    facts_kwargs = dict(n_layer=2, n_head=4, n_head_kv=2)
    facts = mixes.ModelFacts(**facts_kwargs)
    for t in reader.tensors:
        hf = _hf(t.name)
        w = _expected(hf, tensors[hf].float().numpy(), config)
        if w.ndim == 1:
            assert t.tensor_type.name == "F32"
            continue
        assert t.tensor_type.name == mixes.tensor_type("Q4_K_M", t.name, shapes[t.name], facts)
        assert t.tensor_type.name in kquants.K_TYPES
        want = kquants.quantize_k(w, t.tensor_type.name)
        assert np.asarray(t.data).tobytes() == want.tobytes(), t.name
    ids = torch.arange(1, 40)[None]
    ref = _logits(AutoModelForCausalLM.from_pretrained(src).eval(), ids)
    got = _logits(AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="k.gguf").eval(), ids)
    assert ((got - ref).norm() / ref.norm()).item() < 0.15  # measured 0.073


@pytest.mark.skipif(not K_PRESENT, reason="this build has no K-quant encoder (ggml/kquants.py)")
def test_k_mix_fallbacks_are_listed(stories260k: Path, tmp_path: Path) -> None:
    result = write_gguf(stories260k, tmp_path / "s.gguf", type_name="Q4_K_M", progress=False)
    fell = {f["tensor"]: f["type"] for f in result.fallbacks}
    # hidden 64 and intermediate 172: no row is a multiple of 256, every 2-D weight falls back
    assert len(fell) == 5 * 7 + 1
    assert fell["blk.0.ffn_down.weight"] == "F16"  # 172 is not a multiple of 32 either
    assert fell["blk.0.ffn_gate.weight"] in ("Q5_0", "Q8_0")


@pytest.mark.parametrize("qtype", ["F32", "Q4_1"])
def test_row_blocks_write_the_same_bytes(
    tiny_model, tmp_path: Path, monkeypatch, qtype: str
) -> None:
    import weightsmith.ggml.writer as writer

    src = tiny_model("llama")
    write_gguf(src, tmp_path / "whole.gguf", type_name=qtype, progress=False)
    # 3 rows of 64 per block: q (16 rows/head) and k are cut at whole heads, the rest at 3 rows
    monkeypatch.setattr(writer, "_BLOCK_ELEMENTS", 3 * 64)
    write_gguf(src, tmp_path / "blocks.gguf", type_name=qtype, progress=False)
    assert (tmp_path / "blocks.gguf").read_bytes() == (tmp_path / "whole.gguf").read_bytes()


def test_spm_vocab_types_added_tokens_as_llama_cpp(stories260k: Path, tmp_path: Path) -> None:
    import shutil

    src = tmp_path / "s"
    shutil.copytree(stories260k, src)
    tok = json.loads((src / "tokenizer.json").read_text())
    text = next(t for t, i in tok["model"]["vocab"].items() if i == 300)
    tok["added_tokens"].append({"id": 300, "content": text, "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": False})  # fmt: skip
    (src / "tokenizer.json").write_text(json.dumps(tok))
    write_gguf(src, tmp_path / "s.gguf", type_name="F32", progress=False)
    r = gguf.GGUFReader(tmp_path / "s.gguf")
    types = r.fields["tokenizer.ggml.token_type"].contents()
    scores = r.fields["tokenizer.ggml.scores"].contents()
    assert types[300] == int(gguf.TokenType.USER_DEFINED) and scores[300] == -1000.0
    assert types[0:3] == [int(gguf.TokenType.CONTROL)] * 3  # <unk> <s> </s>
    assert types[301] == int(gguf.TokenType.NORMAL)
    # SentencePiece order: a token made by an earlier merge scores higher
    assert scores[259] > scores[260] > scores[265]  # '▁t' (merge 0), 'he' (1), '▁the' (later)


_LLAMA3 = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
_BYTE_LEVEL = {
    "type": "ByteLevel",
    "add_prefix_space": False,
    "trim_offsets": True,
    "use_regex": False,
}


@pytest.mark.parametrize(
    ("pre_tokenizer", "name"),
    [
        ({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}, "gpt-2"),
        ({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _LLAMA3}, "behavior": "Isolated", "invert": False},
            _BYTE_LEVEL]}, "llama-bpe"),
        ({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _LLAMA3.replace("{1,3}", "")}, "behavior": "Isolated",
             "invert": False}, _BYTE_LEVEL]}, "qwen2"),
        ({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, dict(_BYTE_LEVEL, use_regex=True)]}, "smollm"),
        ({"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}, None),
    ],
)  # fmt: skip
def test_byte_level_pre_tokenizer_names(
    tiny_model_copy, tmp_path: Path, pre_tokenizer: dict, name
) -> None:
    from weightsmith.errors import ConfigError

    src = tiny_model_copy("llama")
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = pre_tokenizer
    (src / "tokenizer.json").write_text(json.dumps(tok))
    out = tmp_path / "m.gguf"
    if name is None:
        with pytest.raises(ConfigError, match="cannot be represented in GGUF"):
            write_gguf(src, out, type_name="F32", progress=False)
        return
    write_gguf(src, out, type_name="F32", progress=False)
    assert gguf.GGUFReader(out).fields["tokenizer.ggml.pre"].contents() == name
