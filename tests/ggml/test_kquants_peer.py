"""K-quant bytes identical to llama.cpp's own ``llama_model_quantize`` (the peer build).

An F32 GGUF of a tiny llama model (weights from stories260K when ../shared is there, else a
heavy-tailed random draw) is quantized by llama.cpp with ``pure`` mixes (every 2-D weight at the
mix's base type), with and without an importance matrix; every tensor read back must equal
``quantize_k`` of the same F32 rows byte for byte. Skips without the peer (fails under
WEIGHTSMITH_REQUIRE_PEERS=1).
"""

from __future__ import annotations

import numpy as np
import pytest

from weightsmith.ggml.kquants import quantize_k, quantize_tensor
from weightsmith.ggml.kquants_legacy import quantize_legacy
from weightsmith.ggml.mixes import ModelFacts, plan_types
from weightsmith.testing import shared_model

pytestmark = pytest.mark.slow

PURE = {"Q2_K": "Q2_K", "Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q6_K": "Q6_K"}


def _pool() -> np.ndarray | None:
    root = shared_model("stories260K")
    if root is None:
        return None
    from safetensors.numpy import load_file

    w = load_file(str(root / "model.safetensors"))
    return np.concatenate([v.reshape(-1) for k, v in sorted(w.items()) if v.ndim == 2])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_llama_gguf):
    root = tmp_path_factory.mktemp("kq")
    real = tiny_llama_gguf(root / "real.gguf", n_layer=1, pool=_pool(), seed=0)
    rand = tiny_llama_gguf(root / "rand.gguf", n_layer=1, seed=1)
    return root, [real, rand]


def _imatrix(model, seed: int) -> dict[str, np.ndarray]:
    """A skewed importance per input column for every quantized weight (like real ones)."""
    rng = np.random.default_rng(seed)
    return {
        name: (rng.lognormal(0.0, 2.0, t.shape[1])).astype(np.float32)
        for name, t in model.tensors.items()
        if name != "token_embd.weight"
    }


@pytest.mark.parametrize("use_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("qtype", list(PURE))
def test_bytes_equal_llama_model_quantize(tiny, llama_quantize, qtype, use_imatrix):
    root, models = tiny
    for k, model in enumerate(models):
        imx = _imatrix(model, k) if use_imatrix else None
        dst = root / f"{model.path.stem}-{qtype}-{int(use_imatrix)}.gguf"
        got = llama_quantize(model.path, dst, PURE[qtype], pure=True, imatrix=imx)
        for name, src in model.tensors.items():
            ggml_type, data = got[name]
            assert ggml_type == qtype, name
            ours = quantize_k(src, qtype, None if imx is None else imx.get(name))
            assert data.shape == ours.shape, name
            same = (data == ours).all(axis=1)
            assert same.all(), f"{model.path.stem} {name}: {np.count_nonzero(~same)} rows differ"


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_32_block_types_with_imatrix_equal_llama_model_quantize(tiny, llama_quantize, qtype):
    """With an imatrix llama.cpp takes quantize_row_qX_Y_impl, not the _ref path gguf.quants
    reproduces: quantize_legacy follows it."""
    root, models = tiny
    for k, model in enumerate(models):
        imx = _imatrix(model, 10 + k)
        got = llama_quantize(model.path, root / f"{model.path.stem}-{qtype}-im.gguf", qtype,
                             pure=True, imatrix=imx)  # fmt: skip
        for name, src in model.tensors.items():
            ggml_type, data = got[name]
            assert ggml_type == qtype, name
            ours = quantize_legacy(src, qtype, imx.get(name))
            assert (data == ours).all(), f"{model.path.stem} {name}"


@pytest.mark.parametrize("mix", ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q4_0"])
def test_whole_mix_bytes_equal_llama_model_quantize(tmp_path, tiny_llama_gguf, llama_quantize, mix):
    """Every tensor of a mix (incl. the 32-block fallbacks of 288-column rows), with and without
    an imatrix: plan_types' type and quantize_tensor's bytes equal llama.cpp's file."""
    model = tiny_llama_gguf(tmp_path / "m.gguf", n_layer=3, n_ff=288, n_head=4, n_head_kv=1, seed=5)
    shapes = {name: t.shape for name, t in model.tensors.items()}
    for with_imatrix in (False, True):
        imx = _imatrix(model, 20) if with_imatrix else None
        got = llama_quantize(model.path, tmp_path / f"{mix}-{with_imatrix}.gguf", mix, imatrix=imx)
        facts = ModelFacts(n_layer=3, n_head=4, n_head_kv=1, has_imatrix=with_imatrix)
        plan = plan_types(mix, shapes, facts)
        assert len(set(plan.values())) >= 2  # a real mix, not one type
        for name, src in model.tensors.items():
            ggml_type, data = got[name]
            assert ggml_type == plan[name], name
            ours = quantize_tensor(src, ggml_type, None if imx is None else imx.get(name))
            assert (data.reshape(ours.shape) == ours).all(), f"{mix} imatrix={with_imatrix} {name}"
