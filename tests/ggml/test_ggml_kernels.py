"""The native GGML encoders (kernels/ggml_kernels.c) against the numpy encoders they replace.

The numpy K-quant encoders are proven byte-identical to llama.cpp's ``llama_model_quantize`` by
test_kquants_peer.py / test_gguf_llamacpp.py, and ``gguf.quants`` is the ggml project's own
Q8_0 reference; here every byte of the native output must equal theirs (tolerance: none), on
seeded random rows and on the edge cases the searches branch on.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from weightsmith import kernels
from weightsmith.ggml import kquants
from weightsmith.kernels import ggml as native

pytestmark = pytest.mark.skipif(native.ggml_kernels() is None, reason="no C compiler here")


def _numpy_k(x: np.ndarray, type_name: str, imatrix, monkeypatch) -> np.ndarray:
    with monkeypatch.context() as m:
        m.setattr(native, "ggml_kernels", lambda: None)
        return kquants.quantize_k(x, type_name, imatrix)


def _edge_rows(rng: np.random.Generator) -> np.ndarray:
    """12 rows of 512: every super-block exercises one branch of the searches."""
    x = (rng.standard_normal((12, 512)) * 0.02).astype(np.float32)
    x[0] = 0.0  # all-zero blocks
    x[1] = 0.5  # constant positive
    x[2] = -0.25  # constant negative (the min branch)
    x[3] *= 1e6  # huge values
    x[4] *= 1e-30  # tiny (below GROUP_MAX_EPS in scale)
    x[5, :256] = 0.0  # one zero super-block beside a random one
    x[5, 256:272] = 3.0  # ... and one constant sub-block inside the random one
    x[6] = np.abs(x[6])  # all positive: min clamps to 0
    x[7] = -np.abs(x[7])  # all negative
    x[8, ::16] = 1.0  # one outlier per 16-value sub-block
    x[9] = np.round(x[9] * 200) / 200  # many exact ties
    x[10, :] = -0.0  # negative zeros
    x[11] = rng.standard_normal(512).astype(np.float32) * 5e-5  # fp16 subnormal scales
    return x


@pytest.mark.parametrize("type_name", kquants.K_TYPES)
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_native_k_quants_equal_numpy_bytes(type_name, with_imatrix, monkeypatch):
    rng = np.random.default_rng(17)
    x = np.concatenate([
        (rng.standard_normal((20, 512)) * rng.uniform(1e-3, 2.0, (20, 1))).astype(np.float32),
        _edge_rows(rng),
    ])  # fmt: skip
    imatrix = None
    if with_imatrix:
        imatrix = rng.gamma(0.5, 1.0, 512).astype(np.float32)
        imatrix[:64] = 0.0  # columns the calibration never saw
    ours = native.quantize_k(x, type_name, imatrix, threads=3)
    assert ours is not None
    ref = _numpy_k(x, type_name, imatrix, monkeypatch)
    assert ours.shape == ref.shape == (x.shape[0], 2 * kquants.BLOCK_BYTES[type_name])
    bad = np.nonzero((ours != ref).any(axis=1))[0]
    assert bad.size == 0, f"{type_name}: rows {bad.tolist()} differ"


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_thread_split_does_not_change_the_bytes(threads):
    x = (np.random.default_rng(3).standard_normal((37, 256)) * 0.1).astype(np.float32)
    one = native.quantize_k(x, "Q4_K", None, threads=1)
    assert np.array_equal(native.quantize_k(x, "Q4_K", None, threads=threads), one)
    assert np.array_equal(native.quantize_q8_0(x, threads), native.quantize_q8_0(x, 1))


def test_native_q8_0_equals_gguf_quants():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.standard_normal((16, 96)).astype(np.float32), _edge_rows(rng)[:, :96]])
    x[0, :32] = [0.5 * k for k in range(-16, 16)]  # exact .5 products: round half away from 0
    ref = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(native.quantize_q8_0(x, 2), ref.view(np.uint8))


def test_kquants_dispatches_to_native_and_falls_back(monkeypatch):
    x = (np.random.default_rng(9).standard_normal((4, 256)) * 0.05).astype(np.float32)
    calls = []
    real = native.quantize_k
    monkeypatch.setattr(native, "quantize_k", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    with_native = kquants.quantize_k(x, "Q5_K")
    assert calls == ["Q5_K"]
    monkeypatch.setenv("WEIGHTSMITH_KERNELS", "0")  # disabled: the numpy encoder, same bytes
    monkeypatch.setattr(kernels, "_loaded", {})
    assert native.ggml_kernels() is None
    assert np.array_equal(kquants.quantize_k(x, "Q5_K"), with_native)


def test_no_compiler_falls_back_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("WEIGHTSMITH_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_loaded", {})
    with pytest.warns(UserWarning, match="native ggml kernels unavailable"):
        assert native.ggml_kernels() is None
    assert native.quantize_q8_0(np.zeros((1, 32), np.float32)) is None


def _f16_edge_values() -> np.ndarray:
    rng = np.random.default_rng(11)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    bits = bits[np.isfinite(bits) & (np.abs(bits) <= 65504)]
    ties = np.array([1 + 2**-11, 1 + 3 * 2**-11, 2**-24, 2**-25, 3 * 2**-25, 2**-14 - 2**-25,
                     65504, 65519.99, 6.1e-5, -0.0, 0.0, 1e-30], np.float32)  # fmt: skip
    scaled = rng.standard_normal(50_000).astype(np.float32) * np.float32(1e-4)
    return np.concatenate([bits, ties, -ties, scaled])


def test_native_float16_equals_numpy_astype():
    x = _f16_edge_values()
    ours = native.to_float16(x, threads=2)
    assert np.array_equal(ours.view(np.uint16), x.astype(np.float16).view(np.uint16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_float32_conversion_and_stats(dtype):
    t = torch.from_numpy(np.resize(_f16_edge_values(), 5 << 19)).to(dtype)  # 3 chunks
    data, finite, amax = native.to_float32(t, threads=2)
    assert np.array_equal(data.view(np.uint32), t.float().numpy().view(np.uint32))
    assert finite and amax == float(t.float().abs().max())
    for bad in (float("nan"), float("inf"), float("-inf")):
        u = t.clone()
        u[-1] = bad
        assert native.to_float32(u)[1] is False


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_K_M", "Q3_K_M"])
def test_gguf_files_are_identical_with_and_without_the_kernels(tmp_path, monkeypatch, qtype):
    """The whole writer (bf16 source, pipelined row blocks, threads) against its numpy path."""
    import weightsmith.ggml.writer as writer
    from weightsmith.testing import build_tiny_model

    src = build_tiny_model(
        tmp_path / "m", "llama", dtype=torch.bfloat16, hidden_size=256, intermediate_size=512,
        max_shard_size="10MB",
    )  # fmt: skip
    monkeypatch.setattr(writer, "_BLOCK_ELEMENTS", 40 * 256)  # several blocks per tensor
    monkeypatch.setenv("WEIGHTSMITH_THREADS", "3")
    calls = []
    real = native.to_float32
    monkeypatch.setattr(native, "to_float32", lambda *a: calls.append(1) or real(*a))
    writer.write_gguf(src, tmp_path / "native.gguf", type_name=qtype, progress=False)
    assert calls  # the native conversion ran
    monkeypatch.setenv("WEIGHTSMITH_KERNELS", "0")
    monkeypatch.setattr(kernels, "_loaded", {})
    writer.write_gguf(src, tmp_path / "numpy.gguf", type_name=qtype, progress=False)
    assert (tmp_path / "native.gguf").read_bytes() == (tmp_path / "numpy.gguf").read_bytes()
