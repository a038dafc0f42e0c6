"""K-quant encoders without llama.cpp: hand-checked blocks, round trips through gguf's own
decoders (``gguf.quants.dequantize``, independent of this code) with error bounds, real weights.

Byte identity with llama.cpp is tested in test_kquants_peer.py.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize

from weightsmith.errors import ConfigError
from weightsmith.ggml.kquants import BLOCK_BYTES, K_TYPES, quantize_k, quantize_tensor
from weightsmith.ggml.kquants_legacy import quantize_legacy
from weightsmith.ggml.kquants_ops import nearest_int, seqsum

# relative RMS error bounds on Gaussian rows (measured 0.29, 0.15, 0.070, 0.035, 0.017)
REL_RMSE = {"Q2_K": 0.33, "Q3_K": 0.17, "Q4_K": 0.08, "Q5_K": 0.04, "Q6_K": 0.02}


def roundtrip(x: np.ndarray, t: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    return dequantize(quantize_k(x, t, imatrix), gguf.GGMLQuantizationType[t])


def test_nearest_int_is_round_half_even_in_range():
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 2.4999998, 7.5, -3.2, 4194303.0], np.float32)
    assert nearest_int(v).tolist() == [0, 2, 2, 0, -2, 2, 8, -3, 4194303]


def test_seqsum_accumulates_in_order():
    # 1e8 + 1 + 1 + ... in float32: each +1 is lost in sequence (pairwise would keep some)
    a = np.array([[1e8]] + [[1.0]] * 16, np.float32)
    assert seqsum(a)[0] == np.float32(1e8)


@pytest.mark.parametrize("t", K_TYPES)
def test_zero_rows_encode_to_zero_bytes(t):
    q = quantize_k(np.zeros((3, 512), np.float32), t)
    assert q.shape == (3, 2 * BLOCK_BYTES[t]) and q.dtype == np.uint8
    assert not q.any()


def test_q4_k_exact_grid_hand_checked():
    """x = (i % 16) / 8 in every 32-group: min 0, scale 1/8, so L = i % 16 exactly;
    d = fp16(0.125 / 63) with sub-scale 63, dmin = 0 and mins 0."""
    x = ((np.arange(256) % 16) / 8).astype(np.float32)[None]
    q = quantize_k(x, "Q4_K")[0]
    assert q[:2].view(np.float16)[0] == np.float16(np.float32(0.125) / np.float32(63))
    assert q[2:4].view(np.float16)[0] == 0  # dmin
    scales = q[4:16]  # j<4: ls | (ls[j+4] >> 4) << 6 = 63 | 3 << 6; j+4: lm; 8..11: ls & 15
    assert (scales[0:4] == 255).all() and (scales[4:8] == 0).all() and (scales[8:12] == 15).all()
    lv = np.arange(32) % 16  # byte l of each 64-chunk holds L[l] | L[l + 32] << 4
    assert (q[16:].reshape(4, 32) == lv | (lv << 4)).all()
    np.testing.assert_allclose(roundtrip(x, "Q4_K")[0], x[0], rtol=2**-10)  # fp16 d


def test_q6_k_exact_grid_hand_checked():
    """x = (i % 16 - 8) / 16: every 16-group is l * (1/64) with l = 4 * (i % 16 - 8), so all
    sub-scales equal the block's largest (stored as -128) and only d's fp16 rounding remains."""
    x = (((np.arange(256) % 16) - 8) / 16).astype(np.float32)[None]
    q = quantize_k(x, "Q6_K")[0]
    assert (q[192:208].view(np.int8) == -128).all()
    np.testing.assert_allclose(roundtrip(x, "Q6_K")[0], x[0], rtol=2**-10)


@pytest.mark.parametrize("t", K_TYPES)
def test_gaussian_roundtrip_error(t):
    x = np.random.default_rng(0).standard_normal((32, 1024)).astype(np.float32)
    err = np.sqrt(np.mean((roundtrip(x, t) - x) ** 2))
    assert err < REL_RMSE[t]


@pytest.mark.parametrize("t", K_TYPES)
def test_imatrix_lowers_weighted_error(t):
    """With a skewed importance, the importance-weighted error drops (what the imatrix is for)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 512)).astype(np.float32)
    imx = (rng.random(512) ** 8 * 100 + 1e-3).astype(np.float32)
    plain = np.sum(imx * (roundtrip(x, t) - x) ** 2)
    weighted = np.sum(imx * (roundtrip(x, t, imx) - x) ** 2)
    assert weighted < 0.9 * plain


@pytest.mark.parametrize("t", K_TYPES)
def test_real_weight_rows(t, stories260k):
    """stories260K's weights (hidden 64, so its rows are re-cut into 256-value rows)."""
    from safetensors.numpy import load_file

    w = load_file(str(stories260k / "model.safetensors"))
    flat = np.concatenate([v.reshape(-1) for v in w.values() if v.ndim == 2])
    x = flat[: flat.size // 1024 * 1024].reshape(-1, 1024).astype(np.float32)
    rms = np.sqrt(np.mean(x**2))
    err = np.sqrt(np.mean((roundtrip(x, t) - x) ** 2))
    assert err < REL_RMSE[t] * 1.2 * rms


def test_bad_input_refused():
    with pytest.raises(ConfigError, match="multiple of 256"):
        quantize_k(np.zeros((2, 100), np.float32), "Q4_K")
    with pytest.raises(ConfigError, match="unknown K-quant"):
        quantize_k(np.zeros((2, 256), np.float32), "Q7_K")
    with pytest.raises(ConfigError, match="imatrix has 3 values"):
        quantize_k(np.zeros((2, 256), np.float32), "Q4_K", np.ones(3, np.float32))


@pytest.mark.parametrize("t", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_legacy_types_with_imatrix(t):
    """Without an imatrix: gguf.quants' bytes (llama.cpp's _ref path); with one: a weighted
    search that lowers the importance-weighted error and decodes with gguf's decoder."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((32, 256)).astype(np.float32)
    qt = gguf.GGMLQuantizationType[t]
    assert (quantize_legacy(x, t) == gguf.quants.quantize(x, qt)).all()
    imx = (rng.random(256) ** 8 * 100 + 1e-3).astype(np.float32)
    plain = np.sum(imx * (dequantize(quantize_legacy(x, t), qt) - x) ** 2)
    weighted = np.sum(imx * (dequantize(quantize_legacy(x, t, imx), qt) - x) ** 2)
    assert weighted < 0.9 * plain
    assert (quantize_tensor(x, t, imx) == quantize_legacy(x, t, imx)).all()
    with pytest.raises(ConfigError, match="multiple of 32"):
        quantize_legacy(x[:, :40], t, imx[:40])
