"""Q4_0, Q4_1, Q5_0, Q5_1 with an importance matrix, byte-identical to llama.cpp.

Without an imatrix llama.cpp encodes these 32-value blocks with ``quantize_row_qX_Y_ref``,
which ``gguf.quants.quantize`` reproduces. With one (an imatrix run, and the types the K-quant
mixes fall back to when a row is not a multiple of 256) it uses ``quantize_row_qX_Y_impl``: a
weighted scale search (``make_qx_quants`` for Q4_0/Q5_0, ``make_qkx3_quants`` for Q4_1/Q5_1)
with weights ``imatrix * sqrt(sigma2 + x^2)``, ``sigma2`` the row's mean square. Q8_0 ignores
the imatrix.
"""

from __future__ import annotations

import numpy as np

from weightsmith.errors import ConfigError
from weightsmith.ggml.kquants_ops import F32, fp16_round, make_qkx_quants, make_qx_quants, seqsum

LEGACY_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
LEGACY_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}


def quantize_legacy(
    data: np.ndarray, type_name: str, imatrix: np.ndarray | None = None
) -> np.ndarray:
    """float32 (rows, n), n % 32 == 0 -> uint8 (rows, n // 32 * block_bytes), bytes as
    llama.cpp's ``llama_model_quantize`` writes them, with or without ``imatrix`` (n,)."""
    import gguf
    from gguf.quants import quantize

    if type_name not in LEGACY_TYPES:
        raise ConfigError(
            f"unknown 32-block type {type_name!r}; choose one of {', '.join(LEGACY_TYPES)}"
        )
    x = np.asarray(data, dtype=F32)
    if x.ndim != 2 or x.shape[1] % 32:
        raise ConfigError(
            f"{type_name} needs a 2-D array whose rows are a multiple of 32, got shape {x.shape}"
        )
    if imatrix is None or type_name == "Q8_0":
        return quantize(x, gguf.GGMLQuantizationType[type_name])
    qw = np.asarray(imatrix, dtype=F32).reshape(-1)
    if qw.shape[0] != x.shape[1]:
        raise ConfigError(f"imatrix has {qw.shape[0]} values, the rows have {x.shape[1]}")
    rows, n = x.shape
    out = np.empty((rows, n // 32 * LEGACY_BLOCK_BYTES[type_name]), np.uint8)
    step = max(1, 65536 // n)
    with np.errstate(all="ignore"):
        for r in range(0, rows, step):
            out[r : r + step] = _encode_rows(x[r : r + step], qw, type_name)
    return out


def _encode_rows(x: np.ndarray, qw: np.ndarray, type_name: str) -> np.ndarray:
    rows, n = x.shape
    xt = np.ascontiguousarray(x.T)
    sigma2 = seqsum(xt * xt) / F32(n)  # per row, over the whole row in order
    w = qw[None, :] * np.sqrt(sigma2[:, None] + x * x)
    xg = np.ascontiguousarray(x.reshape(-1, 32).T)  # (32, rows * n / 32)
    wg = np.ascontiguousarray(w.reshape(-1, 32).T)
    nb = xg.shape[1]
    if type_name in ("Q4_0", "Q5_0"):
        d, big_l = make_qx_quants(xg, 8 if type_name == "Q4_0" else 16, wg)
        head = [fp16_round(d).view(np.uint8).reshape(nb, 2)]
    else:
        d, the_min, big_l = make_qkx_quants(
            xg, wg, 15 if type_name == "Q4_1" else 31, -0.9, 0.05, 36, False
        )
        dm = np.stack([fp16_round(d), fp16_round(-the_min)], axis=1)
        head = [dm.view(np.uint8).reshape(nb, 4)]
    lv = big_l.T.astype(np.int64)  # (blocks, 32)
    qs = ((lv[:, :16] & 0xF) | ((lv[:, 16:] & 0xF) << 4)).astype(np.uint8)
    if type_name in ("Q5_0", "Q5_1"):
        bits = (lv >> 4) & 1
        qh = (bits << np.arange(32)).sum(axis=1).astype("<u4")
        head.append(qh.view(np.uint8).reshape(nb, 4))
    return np.concatenate([*head, qs], axis=1).reshape(rows, -1)
