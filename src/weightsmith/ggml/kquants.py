"""GGML K-quant encoders (Q2_K..Q6_K), byte-identical to llama.cpp's ``llama_model_quantize``.

llama.cpp quantizes a row with ``quantize_row_qX_K_ref`` when no importance matrix is given and
with ``quantize_row_qX_K_impl(x, y, n, quant_weights)`` when one is (ggml/src/ggml-quants.c).
Both are reproduced here in float32, vectorised over super-blocks of 256 values (see
:mod:`weightsmith.ggml.kquants_ops` for the arithmetic rules that keep the bytes identical).
"""

from __future__ import annotations

import numpy as np

from weightsmith.core.parallel import default_workers
from weightsmith.errors import ConfigError
from weightsmith.ggml.kquants_legacy import LEGACY_TYPES, quantize_legacy
from weightsmith.ggml.kquants_ops import (
    F32,
    GROUP_MAX_EPS,
    abs_max_signed,
    fp16_round,
    fp16_value,
    make_q3_quants,
    make_qkx_quants,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    pack_2bit,
    pack_k4_scales,
    seqsum,
    unpack_k4_scales,
    wrap_i8,
    wrap_u8,
)
from weightsmith.kernels import ggml as native_ggml

QK_K = 256
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
BLOCK_BYTES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
_CHUNK_BLOCKS = 2048  # super-blocks encoded per numpy pass (bounds the temporaries to ~100 MB)


def quantize_k(
    data: np.ndarray,
    type_name: str,
    imatrix: np.ndarray | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """float32 (rows, n), n % 256 == 0 -> uint8 (rows, n // 256 * block_bytes).

    Bytes exactly as llama.cpp's ``llama_model_quantize`` writes them; ``imatrix`` is the
    float32 (n,) per-column importance llama.cpp reads from an imatrix file. Encoded by the
    native kernels (:mod:`weightsmith.kernels.ggml`, rows split over ``threads``, default
    :func:`~weightsmith.core.parallel.default_workers`) when they are available, else by the
    numpy code below (``WEIGHTSMITH_KERNELS=0``): the same bytes either way.
    """
    if type_name not in K_TYPES:
        raise ConfigError(f"unknown K-quant type {type_name!r}; choose one of {', '.join(K_TYPES)}")
    x = np.asarray(data, dtype=F32)
    if x.ndim != 2 or x.shape[1] % QK_K:
        raise ConfigError(
            f"{type_name} needs a 2-D array whose rows are a multiple of {QK_K}, got shape {x.shape}"
        )
    rows, n = x.shape
    nb = n // QK_K
    qw_row = None
    if imatrix is not None:
        qw_row = np.asarray(imatrix, dtype=F32).reshape(-1)
        if qw_row.shape[0] != n:
            raise ConfigError(f"imatrix has {qw_row.shape[0]} values, the rows have {n}")
    native = native_ggml.quantize_k(x, type_name, qw_row, threads or default_workers())
    if native is not None:  # the C encoder: same bytes, ~2-10x faster per thread
        return native
    if qw_row is not None:
        qw_row = qw_row.reshape(nb, QK_K)
    blocks = x.reshape(rows * nb, QK_K)
    out = np.empty((rows * nb, BLOCK_BYTES[type_name]), np.uint8)
    encode = _ENCODERS[type_name]
    per = max(nb, _CHUNK_BLOCKS // nb * nb)  # whole rows per chunk, so the imatrix tiles evenly
    with np.errstate(all="ignore"):
        for start in range(0, rows * nb, per):
            chunk = blocks[start : start + per]
            qw = None if qw_row is None else np.tile(qw_row, (chunk.shape[0] // nb, 1))
            out[start : start + per] = encode(chunk, qw)
    return out.reshape(rows, nb * BLOCK_BYTES[type_name])


def _groups(blocks: np.ndarray, size: int) -> np.ndarray:
    """(B, 256) -> position-major (size, B * 256 / size): sub-block s = b * (256/size) + j."""
    return np.ascontiguousarray(blocks.reshape(-1, size).T)


def _block_sigma2(blocks: np.ndarray, factor: float) -> np.ndarray:
    """``factor * sum_x2 / QK_K`` with sum_x2 accumulated over the 256 values in order."""
    xt = np.ascontiguousarray(blocks.T)
    return F32(factor) * seqsum(xt * xt) / F32(QK_K) if factor != 1 else seqsum(xt * xt) / F32(QK_K)


def _imatrix_weights(blocks: np.ndarray, qw: np.ndarray, size: int, factor: float) -> np.ndarray:
    """quant_weights * sqrt(sigma2 + x^2), position-major per sub-block of ``size``."""
    sigma2 = _block_sigma2(blocks, factor)
    w = qw * np.sqrt(sigma2[:, None] + blocks * blocks)
    return _groups(w, size)


def _positive_max(v: np.ndarray) -> np.ndarray:
    """``m = 0; for (...) if (v > m) m = v;`` over axis 1 (never -0.0)."""
    m = v.max(axis=1)
    return np.where(m > 0, m, F32(0))


def _requant(
    xg: np.ndarray, big_l: np.ndarray, d: np.ndarray, dm: np.ndarray | None, lo: int, hi: int
):
    """Final pass: L = clamp(nearest_int((x [+ dm]) / d)) where d != 0, else keep L."""
    live = d != 0
    num = xg if dm is None else xg + dm
    fresh = np.clip(nearest_int(num / np.where(live, d, F32(1))), lo, hi)
    return np.where(live, fresh, big_l)


def _finish_positions(big_l_groups: np.ndarray, n_blocks: int) -> np.ndarray:
    """Position-major (size, S) -> (B, 256) in value order."""
    return big_l_groups.T.reshape(n_blocks, QK_K)


def _encode_q4_q5(blocks: np.ndarray, qw: np.ndarray | None, nmax: int) -> tuple:
    """Shared Q4_K / Q5_K search; returns (dbytes, scales12, L (B, 256))."""
    nb = blocks.shape[0]
    xg = _groups(blocks, 32)
    if qw is None:
        sum_x2 = seqsum(xg * xg)
        av_x = np.sqrt(sum_x2 / F32(32))
        w = av_x + np.abs(xg)
        rmin, rdelta, nstep = (-1.0, 0.1, 20) if nmax == 15 else (-0.5, 0.1, 15)
        scales, mins, big_l = make_qkx_quants(xg, w, nmax, rmin, rdelta, nstep, False)
        scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
        max_scale, max_min = _positive_max(scales), _positive_max(mins)
        inv_scale = np.where(
            max_scale > 0, F32(63) / np.where(max_scale > 0, max_scale, F32(1)), F32(0)
        )
        inv_min = np.where(max_min > 0, F32(63) / np.where(max_min > 0, max_min, F32(1)), F32(0))
        ls = np.minimum(63, wrap_u8(nearest_int(inv_scale[:, None] * scales)))
        lm = np.minimum(63, wrap_u8(nearest_int(inv_min[:, None] * mins)))
        d_bits, m_bits = fp16_round(max_scale / F32(63)), fp16_round(max_min / F32(63))
    else:
        w = _imatrix_weights(blocks, qw, 32, 2.0)
        sw = seqsum(w).reshape(nb, 8)
        scales, mins, big_l = make_qkx_quants(xg, w, nmax, -0.9, 0.05, 36, False)
        swt = np.ascontiguousarray(sw.T)
        d_block, ls = make_qp_quants(np.ascontiguousarray(scales.reshape(nb, 8).T), 63, swt)
        m_block, lm = make_qp_quants(np.ascontiguousarray(mins.reshape(nb, 8).T), 63, swt)
        ls, lm = ls.T, lm.T
        if nmax == 31:
            ls, lm = np.minimum(63, ls), np.minimum(63, lm)
        d_bits, m_bits = fp16_round(d_block), fp16_round(m_block)
    sc12 = pack_k4_scales(ls, lm)
    sc, m = unpack_k4_scales(sc12)
    d = (fp16_value(d_bits)[:, None] * sc.astype(F32)).reshape(-1)
    dm = (fp16_value(m_bits)[:, None] * m.astype(F32)).reshape(-1)
    big_l = _requant(xg, big_l, d, dm, 0, nmax)
    dbytes = np.stack([d_bits, m_bits], axis=1).view(np.uint8).reshape(nb, 4)
    return dbytes, sc12.astype(np.uint8), _finish_positions(big_l, nb)


def _encode_q4_k(blocks: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    dbytes, sc12, big_l = _encode_q4_q5(blocks, qw, 15)
    q = big_l.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128).astype(np.uint8)
    return np.concatenate([dbytes, sc12, qs], axis=1)


def _encode_q5_k(blocks: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    dbytes, sc12, big_l = _encode_q4_q5(blocks, qw, 31)
    q = big_l.reshape(-1, 4, 2, 32)  # (B, k, lo/hi half, j)
    high = q >> 4
    qh = np.zeros((q.shape[0], 32), np.int64)
    for k in range(4):
        qh |= (high[:, k, 0] << (2 * k)) | (high[:, k, 1] << (2 * k + 1))
    low = q & 0xF
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([dbytes, sc12, qh.astype(np.uint8), ql.astype(np.uint8)], axis=1)


def _encode_q6_k(blocks: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    nb = blocks.shape[0]
    xg = _groups(blocks, 16)
    scales, big_l = make_qx_quants(xg, 32, None if qw is None else _groups(qw, 16))
    scales = scales.reshape(nb, 16)
    max_abs, max_scale = abs_max_signed(np.ascontiguousarray(scales.T))
    zero = max_abs < GROUP_MAX_EPS
    iscale = F32(-128) / np.where(zero, F32(1), max_scale)
    d_bits = fp16_round(F32(1) / iscale)
    sc = wrap_i8(np.minimum(127, nearest_int(iscale[:, None] * scales)))
    d = (fp16_value(d_bits)[:, None] * sc.astype(F32)).reshape(-1)
    big_l = _finish_positions(_requant(xg, big_l, d, None, -32, 31) + np.where(d != 0, 32, 0), nb)
    q = big_l.reshape(nb, 2, 4, 32)
    low, high = q & 0xF, q >> 4
    ql = np.concatenate(
        [low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2
    )
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    out = np.concatenate(
        [
            ql.reshape(nb, 128).astype(np.uint8),
            qh.reshape(nb, 64).astype(np.uint8),
            sc.astype(np.int8).view(np.uint8),
            d_bits.view(np.uint8).reshape(nb, 2),
        ],
        axis=1,
    )
    out[zero] = 0
    return out


def _pack_q3_scales(lv: np.ndarray) -> np.ndarray:
    """lv: (B, 16) 6-bit values (already offset by 32) -> 12 packed bytes."""
    sc = np.zeros((lv.shape[0], 12), np.int64)
    sc[:, 0:8] = lv[:, 0:8] & 0xF
    sc[:, 0:8] |= (lv[:, 8:16] & 0xF) << 4
    high = lv >> 4
    for j in range(16):
        sc[:, 8 + j % 4] |= high[:, j] << (2 * (j // 4))
    return sc & 0xFF


def _unpack_q3_scales(sc: np.ndarray) -> np.ndarray:
    """Signed sub-block scales (B, 16) from the 12 packed bytes, as dequantize reads them."""
    low = np.concatenate([sc[:, 0:8] & 0xF, sc[:, 0:8] >> 4], axis=1)
    j = np.arange(16)
    high = (sc[:, 8 + j % 4] >> (2 * (j // 4))) & 3
    return wrap_i8((low | (high << 4)) - 32)


def _encode_q3_k(blocks: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    nb = blocks.shape[0]
    xg = _groups(blocks, 16)
    if qw is None:
        scales, big_l = make_q3_quants(xg, 4)
        scales = scales.reshape(nb, 16)
        _, max_scale = abs_max_signed(np.ascontiguousarray(scales.T))
        live = max_scale != 0
        iscale = F32(-32) / np.where(live, max_scale, F32(1))
        lv = np.clip(wrap_i8(nearest_int(iscale[:, None] * scales)), -32, 31) + 32
        sc12 = np.where(live[:, None], _pack_q3_scales(lv), 0)
        d_bits = np.where(live, fp16_round(F32(1) / iscale), fp16_round(F32(0)))
    else:
        w = _imatrix_weights(blocks, qw, 16, 2.0)
        sw = np.ascontiguousarray(seqsum(w).reshape(nb, 16).T)
        scales, big_l = make_qx_quants(xg, 4, w)
        d_block, ls = make_qx_quants(np.ascontiguousarray(scales.reshape(nb, 16).T), 32, sw)
        sc12 = _pack_q3_scales(ls.T)
        d_bits = fp16_round(d_block)
    sc = _unpack_q3_scales(sc12)
    d = (fp16_value(d_bits)[:, None] * sc.astype(F32)).reshape(-1)
    big_l = _finish_positions(_requant(xg, big_l, d, None, -4, 3) + np.where(d != 0, 4, 0), nb)
    hbit = big_l > 3
    big_l = np.where(hbit, big_l - 4, big_l)
    hm = hbit.reshape(nb, 8, 32).astype(np.int64)
    hmask = np.zeros((nb, 32), np.int64)
    for k in range(8):
        hmask |= hm[:, k] << k
    return np.concatenate(
        [
            hmask.astype(np.uint8),
            pack_2bit(big_l).astype(np.uint8),
            sc12.astype(np.uint8),
            d_bits.view(np.uint8).reshape(nb, 2),
        ],
        axis=1,
    )


def _encode_q2_k(blocks: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    nb = blocks.shape[0]
    xg = _groups(blocks, 16)
    if qw is None:
        scales, mins, big_l = make_qkx_quants(xg, np.abs(xg), 3, -0.5, 0.1, 15, True)
        scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
        max_scale, max_min = _positive_max(scales), _positive_max(mins)
        has_s, has_m = max_scale > 0, max_min > 0
        ls = nearest_int((F32(15) / np.where(has_s, max_scale, F32(1)))[:, None] * scales)
        lm = nearest_int((F32(15) / np.where(has_m, max_min, F32(1)))[:, None] * mins)
        sc = wrap_u8(np.where(has_s[:, None], ls, 0) | np.where(has_m[:, None], lm << 4, 0))
        d_bits = np.where(has_s, fp16_round(max_scale / F32(15)), fp16_round(F32(0)))
        m_bits = np.where(has_m, fp16_round(max_min / F32(15)), fp16_round(F32(0)))
    else:
        w = _imatrix_weights(blocks, qw, 16, 1.0)
        sw = np.ascontiguousarray(seqsum(w).reshape(nb, 16).T)
        scales, mins, big_l = make_qkx_quants(xg, w, 3, -0.9, 0.05, 36, False)
        dm, ls = make_qp_quants(np.ascontiguousarray(scales.reshape(nb, 16).T), 15, sw)
        mm, lm = make_qp_quants(np.ascontiguousarray(mins.reshape(nb, 16).T), 15, sw)
        sc = wrap_u8(ls.T | (lm.T << 4))
        d_bits, m_bits = fp16_round(dm), fp16_round(mm)
    d = (fp16_value(d_bits)[:, None] * (sc & 0xF).astype(F32)).reshape(-1)
    dmv = (fp16_value(m_bits)[:, None] * (sc >> 4).astype(F32)).reshape(-1)
    big_l = _finish_positions(_requant(xg, big_l, d, dmv, 0, 3), nb)
    dbytes = np.stack([d_bits, m_bits], axis=1).view(np.uint8).reshape(nb, 4)
    return np.concatenate([sc.astype(np.uint8), pack_2bit(big_l).astype(np.uint8), dbytes], axis=1)


_ENCODERS = {
    "Q2_K": _encode_q2_k,
    "Q3_K": _encode_q3_k,
    "Q4_K": _encode_q4_k,
    "Q5_K": _encode_q5_k,
    "Q6_K": _encode_q6_k,
}


def quantize_tensor(
    data: np.ndarray, type_name: str, imatrix: np.ndarray | None = None
) -> np.ndarray:
    """Any type a mix chooses, as llama.cpp encodes it: K types by :func:`quantize_k`, the
    32-value types by :func:`~weightsmith.ggml.kquants_legacy.quantize_legacy` (llama.cpp's
    imatrix path when ``imatrix`` is given), F32/F16/BF16 and the rest by ``gguf.quants``."""
    if type_name in K_TYPES:
        return quantize_k(data, type_name, imatrix)
    if type_name in LEGACY_TYPES:
        return quantize_legacy(data, type_name, imatrix)
    import gguf
    from gguf.quants import quantize

    try:
        qtype = gguf.GGMLQuantizationType[type_name]
    except KeyError:
        raise ConfigError(f"unknown GGML type {type_name!r}") from None
    return quantize(np.asarray(data, dtype=F32), qtype)
