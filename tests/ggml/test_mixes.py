"""llama.cpp's quantization mixes: hand-checked choices, and the types llama.cpp itself picks
(``llama_model_quantize`` in the peer) for tiny models of three shapes, every mix, with and
without an importance matrix."""

from __future__ import annotations

import numpy as np
import pytest

from weightsmith.errors import ConfigError
from weightsmith.ggml.mixes import MIXES, ModelFacts, fallback_type, plan_types, tensor_type

L32 = ModelFacts(n_layer=32, n_head=32, n_head_kv=8)


def test_q4_k_m_attn_v_and_ffn_down_use_more_bits_layers():
    # use_more_bits(i, 32): i < 4, i >= 28, or (i - 4) % 3 == 2 -> 6, 9, ..., 27
    more = {i for i in range(32) if i < 4 or i >= 28 or (i - 4) % 3 == 2}
    assert sorted(more)[:8] == [0, 1, 2, 3, 6, 9, 12, 15]
    for i in range(32):
        want = "Q6_K" if i in more else "Q4_K"
        assert tensor_type("Q4_K_M", f"blk.{i}.attn_v.weight", (1024, 4096), L32) == want
        assert tensor_type("Q4_K_M", f"blk.{i}.ffn_down.weight", (4096, 11008), L32) == want
        assert tensor_type("Q4_K_M", f"blk.{i}.attn_q.weight", (4096, 4096), L32) == "Q4_K"


def test_output_embeddings_and_small_mixes():
    assert tensor_type("Q4_K_M", "output.weight", (32000, 4096), L32) == "Q6_K"
    assert tensor_type("Q4_K_M", "token_embd.weight", (32000, 4096), L32) == "Q4_K"
    tied = ModelFacts(n_layer=32, n_head=32, n_head_kv=8, tied_embeddings=True)
    assert tensor_type("Q4_K_M", "token_embd.weight", (32000, 4096), tied) == "Q6_K"
    assert tensor_type("Q8_0", "output.weight", (32000, 4096), L32) == "Q8_0"
    assert tensor_type("Q4_0", "output.weight", (32000, 4096), L32) == "Q6_K"
    assert tensor_type("Q2_K", "blk.3.attn_v.weight", (1024, 4096), L32) == "Q4_K"  # gqa 4
    assert tensor_type("Q2_K", "blk.3.ffn_down.weight", (4096, 11008), L32) == "Q3_K"
    assert tensor_type("Q3_K_M", "blk.1.ffn_down.weight", (4096, 11008), L32) == "Q5_K"  # 1 < 32/16
    assert tensor_type("Q3_K_M", "blk.2.ffn_down.weight", (4096, 11008), L32) == "Q4_K"
    assert tensor_type("Q3_K_L", "blk.9.attn_output.weight", (4096, 4096), L32) == "Q5_K"
    assert tensor_type("Q4_K_M", "blk.0.attn_norm.weight", (4096,), L32) == "F32"
    assert tensor_type("F16", "blk.0.attn_q.weight", (4096, 4096), L32) == "F16"


def test_fallbacks_for_rows_not_multiple_of_the_block():
    # stories260K: hidden 64, intermediate 172
    assert fallback_type("Q4_K", 64) == "Q5_0"
    assert fallback_type("Q6_K", 64) == "Q8_0"
    assert fallback_type("Q2_K", 64) == "Q4_0"
    assert fallback_type("Q5_K", 64) == "Q5_1"
    assert fallback_type("Q4_K", 172) == "F16"  # 172 % 32 != 0
    assert fallback_type("Q8_0", 172) == "F16"
    assert fallback_type("Q4_K", 4096) == "Q4_K"
    s = ModelFacts(n_layer=5, n_head=8, n_head_kv=4, tied_embeddings=True)
    assert tensor_type("Q4_K_M", "blk.0.ffn_down.weight", (64, 172), s) == "F16"
    assert tensor_type("Q4_K_M", "token_embd.weight", (512, 64), s) == "Q8_0"
    with pytest.raises(ConfigError, match="unknown GGUF type"):
        tensor_type("Q9_K", "output.weight", (8, 256), s)


# ------------------------------------------------------------------ llama.cpp as the oracle
SHAPES = {  # name -> (n_layer, n_embd, n_ff, n_head, n_head_kv, tied)
    "gqa1-16l-untied": (16, 256, 288, 4, 4, False),
    "gqa4-8l-tied": (8, 256, 256, 8, 2, True),
    "small-rows": (2, 96, 80, 4, 2, False),
}
IMATRIX_MIXES = ("Q4_0", "Q5_0", "Q2_K_S", "Q4_K_M")  # where has_imatrix matters (+ a control)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_llama_gguf):
    root = tmp_path_factory.mktemp("mixes")
    out = {}
    for key, (n_layer, n_embd, n_ff, n_head, n_kv, tied) in SHAPES.items():
        out[key] = tiny_llama_gguf(
            root / f"{key}.gguf", n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, n_head=n_head,
            n_head_kv=n_kv, tied=tied, n_vocab=256, seed=3,
        )  # fmt: skip
    return root, out


@pytest.mark.slow
@pytest.mark.parametrize("key", list(SHAPES))
def test_types_equal_llama_model_quantize(models, llama_quantize, key):
    root, all_models = models
    model = all_models[key]
    shapes = {name: t.shape for name, t in model.tensors.items()}
    n_embd = SHAPES[key][1]
    for norm in [f"blk.{i}.{n}_norm.weight" for i in range(model.n_layer) for n in ("attn", "ffn")]:
        shapes[norm] = (n_embd,)
    shapes["output_norm.weight"] = (n_embd,)
    runs = [(mix, False) for mix in MIXES if mix not in ("F32", "Q2_K_S")]
    runs += [(mix, True) for mix in IMATRIX_MIXES]
    for mix, with_imatrix in runs:
        imx = None
        if with_imatrix:
            imx = {n: np.ones(t.shape[1], np.float32) for n, t in model.tensors.items()}
        got = llama_quantize(model.path, root / f"{key}-{mix}.gguf", mix, imatrix=imx)
        facts = ModelFacts(
            n_layer=model.n_layer, n_head=model.n_head, n_head_kv=model.n_head_kv,
            has_imatrix=with_imatrix,
        )  # fmt: skip
        plan = plan_types(mix, shapes, facts)
        tied = ModelFacts(**{**facts.__dict__, "tied_embeddings": "output.weight" not in shapes})
        for name, (ggml_type, _) in got.items():
            assert plan[name] == ggml_type, f"{mix} imatrix={with_imatrix} {name}"
            assert tensor_type(mix, name, shapes[name], tied) == ggml_type, f"{mix} {name}"
