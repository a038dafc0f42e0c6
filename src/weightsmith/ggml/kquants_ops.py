"""Float32 building blocks of llama.cpp's K-quant search (ggml-quants.c), vectorised over groups.

Every array here is *position-major*: shape ``(n, S)`` holds ``S`` independent groups of ``n``
values, so a loop over the ``n`` in-group positions (as the C code loops) is one numpy operation
over all groups. Arithmetic is float32 in the C evaluation order (sums accumulated sequentially,
``a*b*c`` as ``(a*b)*c``); integers that C stores in ``uint8_t``/``int8_t`` wrap the same way.
That is what makes the encoded bytes identical to llama.cpp's, not merely close.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)
_MAGIC = F32(12582912.0)


def nearest_int(v: np.ndarray) -> np.ndarray:
    """llama.cpp's ``nearest_int``: add 1.5*2^23 in float32 and read the mantissa bits."""
    bits = (np.asarray(v, dtype=F32) + _MAGIC).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def seqsum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 in order, ``((a0 + a1) + a2) + ...``, as a C ``for`` loop does."""
    acc = a[0].copy()
    for i in range(1, a.shape[0]):
        acc += a[i]
    return acc


def fp16_round(v: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16 (round to nearest even) as uint16 bits."""
    return np.asarray(v, dtype=F32).astype(np.float16).view(np.uint16)


def fp16_value(bits: np.ndarray) -> np.ndarray:
    """GGML_FP16_TO_FP32 of uint16 bits."""
    return bits.view(np.float16).astype(F32)


def wrap_u8(v: np.ndarray) -> np.ndarray:
    """Store into ``uint8_t`` (modulo 256), kept as int64 for further arithmetic."""
    return np.asarray(v, dtype=np.int64) & 0xFF


def wrap_i8(v: np.ndarray) -> np.ndarray:
    """Store into ``int8_t`` (two's complement wrap)."""
    return ((np.asarray(v, dtype=np.int64) + 128) & 0xFF) - 128


def abs_max_signed(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``amax`` and the signed value at the first position reaching it (strict ``>`` scan from 0)."""
    ax = np.abs(x)
    idx = np.argmax(ax, axis=0)
    cols = np.arange(x.shape[1])
    return ax[idx, cols], x[idx, cols]


def make_qx_quants(
    x: np.ndarray, nmax: int, qw: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)``: symmetric scale search over 19 steps.

    ``|iscale * x| <= nmax + 1`` here, so ``nearest_int`` is ``rint``; the best step's iscale is
    kept per group and L re-derived from it at the end (same float operations, same L)."""
    amax, mx = abs_max_signed(x)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    w = x * x if qw is None else qw
    wx = w * x

    def levels(iscale: np.ndarray) -> np.ndarray:
        v = x * iscale
        np.rint(v, out=v)
        return np.clip(v, -nmax, nmax - 1, out=v)

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lf = levels(iscale)
        wl = w * lf
        wl *= lf
        return seqsum(wx * lf), seqsum(wl)

    sel = F32(-nmax) / mx
    sumlx, suml2 = trial(sel)
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, F32(1)), F32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F32(nmax) + F32(0.1) * F32(step)) / mx
        sumlx, suml2 = trial(iscale)
        upd = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        sel = np.where(upd, iscale, sel)
        scale = np.where(upd, sumlx / np.where(upd, suml2, F32(1)), scale)
        best = np.where(upd, scale * sumlx, best)
    big_l = levels(sel).astype(np.int64) + nmax
    return np.where(zero, F32(0), scale), np.where(zero, 0, big_l)


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)``: coordinate descent, 5 sweeps."""
    amax, mx = abs_max_signed(x)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    big_l = np.clip(nearest_int((F32(-nmax) / mx) * x), -nmax, nmax - 1)
    w = x * x
    wx = w * x
    lf = big_l.astype(F32)
    sumlx = seqsum(wx * lf)
    suml2 = seqsum(w * lf * lf)
    for _ in range(5):
        for i in range(x.shape[0]):
            li = big_l[i].astype(F32)
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            ok = slx > 0
            new_l = np.clip(nearest_int(x[i] * sl2 / np.where(ok, slx, F32(1))), -nmax, nmax - 1)
            nf = new_l.astype(F32)
            slx = slx + wx[i] * nf
            sl2 = sl2 + w[i] * nf * nf
            acc = ok & (new_l != big_l[i]) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            big_l[i] = np.where(acc, new_l, big_l[i])
            sumlx = np.where(acc, slx, sumlx)
            suml2 = np.where(acc, sl2, suml2)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, F32(1)), F32(0))
    return np.where(zero, F32(0), scale), np.where(zero, 0, big_l + nmax)


def _levels(
    x: np.ndarray, lo: np.ndarray, iscale: np.ndarray, nmax: int, bound: np.ndarray
) -> np.ndarray:
    """``clamp(nearest_int(iscale*(x - lo)), 0, nmax)`` as float32. ``bound`` bounds
    ``|x - lo|`` per group: while ``|iscale|*bound`` stays far below 2^22, ``nearest_int`` is
    exactly ``rint`` (round half to even), computed in place; otherwise the bit trick."""
    v = x - lo
    v *= iscale
    if np.all(np.abs(iscale) * bound < 4.0e6):
        np.rint(v, out=v)
        return np.clip(v, 0, nmax, out=v)
    return np.clip(nearest_int(v), 0, nmax).astype(F32)


def _weighted_error(
    x: np.ndarray, w: np.ndarray, lf: np.ndarray, scale: np.ndarray, mn: np.ndarray, mad: bool
) -> np.ndarray:
    """``sum_i w * f(scale*L + min - x)`` with f = |.| (mad) or square, in C order."""
    diff = lf * scale
    diff += mn
    diff -= x
    if mad:
        np.abs(diff, out=diff)
    else:
        diff *= diff
    diff *= w
    return seqsum(diff)


def make_qkx_quants(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``make_qkx2_quants`` / ``make_qkx3_quants`` (same arithmetic when weights are given).

    Returns (scale, the_min, L): x ~ scale*L - the_min, L in [0, nmax]. The search keeps the
    (iscale, min) of the best step per group and re-derives L from it once at the end (the same
    float operations, so the same L)."""
    cols = np.arange(x.shape[1])
    # C scans with strict < / >: the first element reaching the extreme (matters for +-0)
    xmin, hi = x[np.argmin(x, axis=0), cols], x[np.argmax(x, axis=0), cols]
    lo = np.where(xmin > 0, F32(0), xmin)
    sum_w = seqsum(w)
    sum_x = seqsum(w * x)
    flat = hi == lo
    iscale = F32(nmax) / np.where(flat, F32(1), hi - lo)
    scale = F32(1) / iscale

    def bound(mn: np.ndarray) -> np.ndarray:
        return np.maximum(np.abs(hi - mn), np.abs(xmin - mn))

    best = _weighted_error(x, w, _levels(x, lo, iscale, nmax, bound(lo)), scale, lo, use_mad)
    sel_iscale, sel_lo = iscale, lo
    for step in range(nstep + 1):
        num = F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)
        iscale = num / np.where(flat, F32(1), hi - lo)
        lf = _levels(x, lo, iscale, nmax, bound(lo))
        wl = w * lf
        sum_l, sum_xl = seqsum(wl), seqsum(wl * x)
        wl *= lf
        sum_l2 = seqsum(wl)
        d = sum_w * sum_l2 - sum_l * sum_l
        pos = d > 0
        dd = np.where(pos, d, F32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / dd
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / dd
        neg = this_min > 0
        this_min = np.where(neg, F32(0), this_min)
        this_scale = np.where(neg, sum_xl / np.where(neg, sum_l2, F32(1)), this_scale)
        cur = _weighted_error(x, w, lf, this_scale, this_min, use_mad)
        upd = pos & (cur < best)
        sel_iscale = np.where(upd, iscale, sel_iscale)
        sel_lo = np.where(upd, lo, sel_lo)
        best = np.where(upd, cur, best)
        scale = np.where(upd, this_scale, scale)
        lo = np.where(upd, this_min, lo)
    big_l = _levels(x, sel_lo, sel_iscale, nmax, bound(sel_lo)).astype(np.int64)
    scale = np.where(flat, F32(0), scale)
    big_l = np.where(flat, 0, big_l)
    return scale, -lo, big_l


def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``make_qp_quants(n, nmax, x, L, quant_weights)``: positive scales of the sub-block scales."""
    mx = np.maximum.reduce(np.concatenate([np.zeros((1, x.shape[1]), F32), x]), axis=0)
    zero = mx < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    iscale = F32(nmax) / mx
    big_l = wrap_u8(nearest_int(iscale * x))
    diff = x - (F32(1) / iscale) * big_l.astype(F32)
    best = seqsum(qw * diff * diff)
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (F32(0.1) * F32(step) + F32(nmax)) / mx
        lq = np.minimum(nmax, nearest_int(iscale_is * x))
        diff = x - (F32(1) / iscale_is) * lq.astype(F32)
        mse = seqsum(qw * diff * diff)
        upd = mse < best
        best = np.where(upd, mse, best)
        iscale = np.where(upd, iscale_is, iscale)
    lq = np.minimum(nmax, nearest_int(iscale * x))
    big_l = wrap_u8(lq)
    lf = lq.astype(F32)
    wx = qw * x
    sumlx = seqsum(wx * lf)
    suml2 = seqsum(qw * lf * lf)
    for _ in range(5):
        for i in range(x.shape[0]):
            li = big_l[i].astype(F32)
            slx = sumlx - wx[i] * li
            sl2 = suml2 - qw[i] * li * li
            ok = (slx > 0) & (sl2 > 0)
            new_l = np.minimum(nmax, nearest_int(x[i] * sl2 / np.where(ok, slx, F32(1))))
            nf = new_l.astype(F32)
            slx = slx + wx[i] * nf
            sl2 = sl2 + qw[i] * nf * nf
            acc = ok & (new_l != big_l[i]) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            big_l[i] = np.where(acc, wrap_u8(new_l), big_l[i])
            sumlx = np.where(acc, slx, sumlx)
            suml2 = np.where(acc, sl2, suml2)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, F32(1)), F32(0))
    return np.where(zero, F32(0), scale), np.where(zero, 0, big_l)


def pack_k4_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K 12-byte scale/min packing; ls, lm: (B, 8) ints (uint8 values)."""
    sc = np.zeros((ls.shape[0], 12), np.int64)
    sc[:, 0:4] = ls[:, 0:4]
    sc[:, 4:8] = lm[:, 0:4]
    sc[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    sc[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    sc[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    return sc & 0xFF


def unpack_k4_scales(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``get_scale_min_k4`` for j = 0..7 -> (scales, mins), each (B, 8)."""
    d = np.empty((sc.shape[0], 8), np.int64)
    m = np.empty((sc.shape[0], 8), np.int64)
    d[:, 0:4] = sc[:, 0:4] & 63
    m[:, 0:4] = sc[:, 4:8] & 63
    d[:, 4:8] = (sc[:, 8:12] & 0xF) | ((sc[:, 0:4] >> 6) << 4)
    m[:, 4:8] = (sc[:, 8:12] >> 4) | ((sc[:, 4:8] >> 6) << 4)
    return d, m


def pack_2bit(big_l: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K ``qs``: for each half of 128, byte l holds L[l], L[l+32], L[l+64], L[l+96]."""
    q = big_l.reshape(-1, 2, 4, 32)
    out = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return out.reshape(-1, 64)
