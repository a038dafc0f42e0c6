/* GGML block encoders (Q8_0 and the K-quants Q2_K..Q6_K) for weightsmith's GGUF writer.
 *
 * The same search llama.cpp runs in ggml/src/ggml-quants.c (quantize_row_qX_K_ref without an
 * importance matrix, quantize_row_qX_K_impl with one), written from its algorithm: float32
 * arithmetic in the same evaluation order, no fused multiply-add (-ffp-contract=off), sums
 * accumulated sequentially, integers stored in int8/uint8 wrapping as C does. That keeps the
 * bytes identical to llama.cpp's and to weightsmith's numpy encoders (ggml/kquants.py), which
 * the tests compare on random and edge-case data.
 *
 * Entry points take whole rows; the caller splits rows over threads (ctypes releases the GIL).
 */
#include <math.h>
#ifdef __F16C__
#include <immintrin.h>
#endif
#include <stdint.h>
#include <string.h>

#define QK_K 256
#define GROUP_MAX_EPS 1e-15f
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define MIN(a, b) ((a) < (b) ? (a) : (b))

enum { WS_Q2_K = 2, WS_Q3_K = 3, WS_Q4_K = 4, WS_Q5_K = 5, WS_Q6_K = 6 };

int ws_ggml_abi_version(void) { return 2; }

/* ---------------------------------------------------------------- helpers */

static inline int nearest_int(float fval) {
    float val = fval + 12582912.f; /* 1.5 * 2^23: the integer lands in the low mantissa bits */
    int32_t i;
    memcpy(&i, &val, sizeof(i));
    return (i & 0x007fffff) - 0x00400000;
}

/* float -> IEEE half bits, round to nearest even (what F16C's vcvtps2ph and numpy do). */
static inline uint16_t fp16_bits(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof(x));
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds past 65504 */
    if (ax < 0x38800000u) {                                  /* half subnormal (or zero) */
        float a;
        memcpy(&a, &ax, sizeof(a));
        return (uint16_t)(sign | (uint32_t)rintf(a * 16777216.0f)); /* exact scale, RNE */
    }
    uint32_t r = (ax - 0x38000000u) >> 13;
    uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) r++;
    return (uint16_t)(sign | r);
}

static inline float fp16_value(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu, bits;
    if (e == 0) {
        float v = (float)m * 5.9604644775390625e-08f; /* m * 2^-24, exact */
        return sign ? -v : v;
    }
    bits = sign | (e == 31 ? 0x7f800000u | (m << 13) : ((e + 112u) << 23) | (m << 13));
    float out;
    memcpy(&out, &bits, sizeof(out));
    return out;
}

static inline void put_fp16(uint8_t *dst, float v) {
    uint16_t h = fp16_bits(v);
    dst[0] = (uint8_t)(h & 0xff);
    dst[1] = (uint8_t)(h >> 8);
}

static inline float get_fp16(const uint8_t *src) {
    return fp16_value((uint16_t)(src[0] | (src[1] << 8)));
}

/* make_qx_quants with rmse_type 1: symmetric scale, 19 trial steps; qw NULL -> w = x^2. */
static float qx_quants(int n, int nmax, const float *x, int8_t *L, const float *qw) {
    float max = 0, amax = 0;
    for (int i = 0; i < n; ++i) {
        float ax = fabsf(x[i]);
        if (ax > amax) { amax = ax; max = x[i]; }
    }
    if (amax < GROUP_MAX_EPS) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        return 0.f;
    }
    float iscale = -nmax / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * x[i]);
        l = MAX(-nmax, MIN(nmax - 1, l));
        L[i] = (int8_t)(l + nmax);
        float w = qw ? qw[i] : x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    float scale = suml2 ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        iscale = -(nmax + 0.1f * is) / max;
        sumlx = suml2 = 0;
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale * x[i]);
            l = MAX(-nmax, MIN(nmax - 1, l));
            float w = qw ? qw[i] : x[i] * x[i];
            sumlx += w * x[i] * l;
            suml2 += w * l * l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; ++i) {
                int l = nearest_int(iscale * x[i]);
                L[i] = (int8_t)(nmax + MAX(-nmax, MIN(nmax - 1, l)));
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

/* make_q3_quants(do_rmse = true): coordinate descent on the levels, up to 5 sweeps. */
static float q3_quants(int n, int nmax, const float *x, int8_t *L) {
    float max = 0, amax = 0;
    for (int i = 0; i < n; ++i) {
        float ax = fabsf(x[i]);
        if (ax > amax) { amax = ax; max = x[i]; }
    }
    if (amax < GROUP_MAX_EPS) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        return 0.f;
    }
    float iscale = -nmax / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * x[i]);
        l = MAX(-nmax, MIN(nmax - 1, l));
        L[i] = (int8_t)l;
        float w = x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    for (int itry = 0; itry < 5; ++itry) {
        int changed = 0;
        for (int i = 0; i < n; ++i) {
            float w = x[i] * x[i];
            float slx = sumlx - w * x[i] * L[i];
            if (slx > 0) {
                float sl2 = suml2 - w * L[i] * L[i];
                int new_l = nearest_int(x[i] * sl2 / slx);
                new_l = MAX(-nmax, MIN(nmax - 1, new_l));
                if (new_l != L[i]) {
                    slx += w * x[i] * new_l;
                    sl2 += w * new_l * new_l;
                    if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (int8_t)new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        ++changed;
                    }
                }
            }
        }
        if (!changed) break;
    }
    for (int i = 0; i < n; ++i) L[i] = (int8_t)(L[i] + nmax);
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

/* ---------------------------------------------------------------- 8 groups at once */
/* The same search over 8 groups side by side: lane j of every vector is group j, so each lane
 * runs exactly the scalar code's float32 operations in the scalar code's order (IEEE SIMD
 * add/mul/div are correctly rounded lane by lane; -ffp-contract=off forbids FMA). Branches
 * become per-lane selects; a lane's result equals qkx_quants on that group. */

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8f vsplat(float f) { return (v8f){f, f, f, f, f, f, f, f}; }
static inline v8i isplat(int32_t v) { return (v8i){v, v, v, v, v, v, v, v}; }
static inline v8f vsel(v8i m, v8f a, v8f b) { return (v8f)(((v8i)a & m) | ((v8i)b & ~m)); }
static inline v8i isel(v8i m, v8i a, v8i b) { return (a & m) | (b & ~m); }
static inline v8f vabs(v8f a) { return (v8f)((v8i)a & isplat(0x7fffffff)); }
static inline v8f vcvt(v8i a) { return __builtin_convertvector(a, v8f); }

static inline v8i vnearest_clamp(v8f f, int32_t hi) {
    v8i i = (v8i)(f + vsplat(12582912.f));
    v8i l = (i & isplat(0x007fffff)) - isplat(0x00400000);
    l = isel(l > isplat(hi), isplat(hi), l);
    return isel(l < isplat(0), isplat(0), l);
}

static inline int vany(v8i m) {
    int32_t r = 0;
    for (int j = 0; j < 8; ++j) r |= m[j];
    return r != 0;
}

/* make_qkx2_quants / make_qkx3_quants with weights (the same arithmetic), x ~ scale*L - the_min,
 * on 8 groups of n <= 32 values (position-major: x[i] holds value i of each group). */
static void qkx_quants8(int n, int nmax, const v8f *x, const v8f *w, v8i *L, v8f *scale_out,
                        v8f *min_out, float rmin, float rdelta, int nstep, int use_mad) {
    v8i Laux[32];
    const v8f zero = vsplat(0.f);
    v8f min = x[0], max = x[0];
    v8f sum_w = w[0];
    v8f sum_x = sum_w * x[0];
    for (int i = 1; i < n; ++i) {
        min = vsel(x[i] < min, x[i], min);
        max = vsel(x[i] > max, x[i], max);
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    min = vsel(min > zero, zero, min);
    const v8i flat = max == min; /* the scalar code returns early there: masked at the end */
    v8f iscale = vsplat((float)nmax) / vsel(flat, vsplat(1.f), max - min);
    v8f scale = vsplat(1.f) / iscale;
    v8f best = zero;
    for (int i = 0; i < n; ++i) {
        L[i] = vnearest_clamp(iscale * (x[i] - min), nmax);
        v8f diff = scale * vcvt(L[i]) + min - x[i];
        diff = use_mad ? vabs(diff) : diff * diff;
        best += w[i] * diff;
    }
    for (int is = 0; is <= nstep; ++is) {
        const float num = rmin + rdelta * is + nmax;
        iscale = vsplat(num) / vsel(flat, vsplat(1.f), max - min);
        v8f sum_l = zero, sum_l2 = zero, sum_xl = zero;
        for (int i = 0; i < n; ++i) {
            Laux[i] = vnearest_clamp(iscale * (x[i] - min), nmax);
            v8f wl = w[i] * vcvt(Laux[i]);
            sum_l += wl;
            sum_l2 += wl * vcvt(Laux[i]);
            sum_xl += wl * x[i];
        }
        v8f D = sum_w * sum_l2 - sum_l * sum_l;
        v8i pos = D > zero;
        if (!vany(pos)) continue;
        v8f this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
        v8f this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
        v8i neg = this_min > zero;
        this_min = vsel(neg, zero, this_min);
        this_scale = vsel(neg, sum_xl / sum_l2, this_scale);
        v8f cur = zero;
        for (int i = 0; i < n; ++i) {
            v8f diff = this_scale * vcvt(Laux[i]) + this_min - x[i];
            diff = use_mad ? vabs(diff) : diff * diff;
            cur += w[i] * diff;
        }
        v8i upd = pos & (cur < best);
        if (!vany(upd)) continue;
        for (int i = 0; i < n; ++i) L[i] = isel(upd, Laux[i], L[i]);
        best = vsel(upd, cur, best);
        scale = vsel(upd, this_scale, scale);
        min = vsel(upd, this_min, min);
    }
    for (int i = 0; i < n; ++i) L[i] = isel(flat, isplat(0), L[i]);
    *scale_out = vsel(flat, zero, scale);
    *min_out = -min;
}

/* qkx_quants on 8 consecutive groups of n values of x (weights alike): scales[8], mins[8],
 * L[8 * n] in value order. */
static void qkx_quants_x8(int n, int nmax, const float *x, const float *weights, uint8_t *L,
                          float *scales, float *mins, float rmin, float rdelta, int nstep,
                          int use_mad) {
    v8f xt[32], wt[32], sc, mn;
    v8i Lt[32];
    for (int i = 0; i < n; ++i)
        for (int j = 0; j < 8; ++j) {
            xt[i][j] = x[n * j + i];
            wt[i][j] = weights[n * j + i];
        }
    qkx_quants8(n, nmax, xt, wt, Lt, &sc, &mn, rmin, rdelta, nstep, use_mad);
    for (int j = 0; j < 8; ++j) {
        scales[j] = sc[j];
        mins[j] = mn[j];
        for (int i = 0; i < n; ++i) L[n * j + i] = (uint8_t)Lt[i][j];
    }
}

/* qx_quants (make_qx_quants, rmse_type 1) on 8 groups of n <= 32 values side by side; qw
 * NULL -> w = x^2. Position-major as qkx_quants8; L gets the offset levels (l + nmax). */
static void qx_quants8(int n, int nmax, const v8f *x, const v8f *qw, v8i *L, v8f *scale_out) {
    v8i Laux[32];
    const v8f zero = vsplat(0.f);
    const v8i lo = isplat(-nmax), hi = isplat(nmax - 1), off = isplat(nmax);
    v8f max = zero, amax = zero;
    for (int i = 0; i < n; ++i) {
        v8f ax = vabs(x[i]);
        v8i m = ax > amax;
        amax = vsel(m, ax, amax);
        max = vsel(m, x[i], max);
    }
    const v8i empty = amax < vsplat(GROUP_MAX_EPS); /* the scalar code returns early there */
    max = vsel(empty, vsplat(1.f), max);
    v8f iscale = vsplat((float)-nmax) / max;
    v8f sumlx = zero, suml2 = zero;
    for (int i = 0; i < n; ++i) {
        v8i i32 = (v8i)(iscale * x[i] + vsplat(12582912.f));
        v8i l = (i32 & isplat(0x007fffff)) - isplat(0x00400000);
        l = isel(l > hi, hi, l);
        l = isel(l < lo, lo, l);
        L[i] = l + off;
        v8f w = qw ? qw[i] : x[i] * x[i];
        sumlx += w * x[i] * vcvt(l);
        suml2 += w * vcvt(l) * vcvt(l);
    }
    v8f scale = vsel(suml2 != zero, sumlx / suml2, zero);
    v8f best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        iscale = vsplat(-(nmax + 0.1f * is)) / max;
        sumlx = suml2 = zero;
        for (int i = 0; i < n; ++i) {
            v8i i32 = (v8i)(iscale * x[i] + vsplat(12582912.f));
            v8i l = (i32 & isplat(0x007fffff)) - isplat(0x00400000);
            l = isel(l > hi, hi, l);
            l = isel(l < lo, lo, l);
            Laux[i] = l;
            v8f w = qw ? qw[i] : x[i] * x[i];
            sumlx += w * x[i] * vcvt(l);
            suml2 += w * vcvt(l) * vcvt(l);
        }
        v8i upd = (suml2 > zero) & (sumlx * sumlx > best * suml2);
        if (!vany(upd)) continue;
        for (int i = 0; i < n; ++i) L[i] = isel(upd, Laux[i] + off, L[i]);
        scale = vsel(upd, sumlx / suml2, scale);
        best = vsel(upd, scale * sumlx, best);
    }
    for (int i = 0; i < n; ++i) L[i] = isel(empty, isplat(0), L[i]);
    *scale_out = vsel(empty, zero, scale);
}

/* qx_quants on 8 consecutive groups of n values (qw alike, or NULL): scales[8], L[8 * n]. */
static void qx_quants_x8(int n, int nmax, const float *x, const float *qw, int8_t *L,
                         float *scales) {
    v8f xt[32], wt[32], sc;
    v8i Lt[32];
    for (int i = 0; i < n; ++i)
        for (int j = 0; j < 8; ++j) {
            xt[i][j] = x[n * j + i];
            wt[i][j] = qw ? qw[n * j + i] : 0.f;
        }
    qx_quants8(n, nmax, xt, qw ? wt : NULL, Lt, &sc);
    for (int j = 0; j < 8; ++j) {
        scales[j] = sc[j];
        for (int i = 0; i < n; ++i) L[n * j + i] = (int8_t)Lt[i][j];
    }
}

/* make_qp_quants: a positive scale for the sub-block scales, weighted by quant_weights. */
static float qp_quants(int n, int nmax, const float *x, uint8_t *L, const float *qw) {
    float max = 0;
    for (int i = 0; i < n; ++i) max = MAX(max, x[i]);
    if (max < GROUP_MAX_EPS) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        return 0.f;
    }
    float iscale = nmax / max;
    for (int i = 0; i < n; ++i) L[i] = (uint8_t)nearest_int(iscale * x[i]);
    float scale = 1 / iscale;
    float best_mse = 0;
    for (int i = 0; i < n; ++i) {
        float diff = x[i] - scale * L[i];
        best_mse += qw[i] * diff * diff;
    }
    for (int is = -4; is <= 4; ++is) {
        if (is == 0) continue;
        float iscale_is = (0.1f * is + nmax) / max;
        float scale_is = 1 / iscale_is;
        float mse = 0;
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale_is * x[i]);
            l = MIN(nmax, l);
            float diff = x[i] - scale_is * l;
            mse += qw[i] * diff * diff;
        }
        if (mse < best_mse) {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * x[i]);
        l = MIN(nmax, l);
        L[i] = (uint8_t)l;
        float w = qw[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    for (int itry = 0; itry < 5; ++itry) {
        int changed = 0;
        for (int i = 0; i < n; ++i) {
            float w = qw[i];
            float slx = sumlx - w * x[i] * L[i];
            float sl2 = suml2 - w * L[i] * L[i];
            if (slx > 0 && sl2 > 0) {
                int new_l = nearest_int(x[i] * sl2 / slx);
                new_l = MIN(nmax, new_l);
                if (new_l != L[i]) {
                    slx += w * x[i] * new_l;
                    sl2 += w * new_l * new_l;
                    if (slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (uint8_t)new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        ++changed;
                    }
                }
            }
        }
        if (!changed) break;
    }
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

static float sum_sq(const float *x, int n) {
    float s = 0;
    for (int l = 0; l < n; ++l) s += x[l] * x[l];
    return s;
}

/* weight[l] = qw[l] * sqrt(sigma2 + x[l]^2); returns the sum of the weights in order. */
static float imatrix_weights(const float *x, const float *qw, float sigma2, int n, float *weight) {
    float sumw = 0;
    for (int l = 0; l < n; ++l) weight[l] = qw[l] * sqrtf(sigma2 + x[l] * x[l]);
    for (int l = 0; l < n; ++l) sumw += weight[l];
    return sumw;
}

static void pack_2bit(const uint8_t *L, uint8_t *qs) {
    for (int j = 0; j < QK_K; j += 128)
        for (int l = 0; l < 32; ++l)
            qs[j / 4 + l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) |
                                      (L[j + l + 96] << 6));
}

/* ---------------------------------------------------------------- Q2_K: 84-byte blocks */
/* scales[16] | qs[64] | d | dmin */

static void q2_k_block(const float *x, uint8_t *y, const float *qw) {
    uint8_t L[QK_K], Ls[16], Lm[16], *sc = y, *qs = y + 16;
    float mins[16], scales[16], weights[QK_K], sw[16];
    float d_all, m_all;
    if (!qw) {
        float max_scale = 0, max_min = 0;
        for (int l = 0; l < QK_K; ++l) weights[l] = fabsf(x[l]);
        for (int h = 0; h < 2; ++h)
            qkx_quants_x8(16, 3, x + 128 * h, weights + 128 * h, L + 128 * h, scales + 8 * h,
                          mins + 8 * h, -0.5f, 0.1f, 15, 1);
        for (int j = 0; j < 16; ++j) {
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        if (max_scale > 0) {
            float iscale = 15.f / max_scale;
            for (int j = 0; j < 16; ++j) sc[j] = (uint8_t)nearest_int(iscale * scales[j]);
            put_fp16(y + 80, max_scale / 15.f);
        } else {
            for (int j = 0; j < 16; ++j) sc[j] = 0;
            put_fp16(y + 80, 0.f);
        }
        if (max_min > 0) {
            float iscale = 15.f / max_min;
            for (int j = 0; j < 16; ++j) sc[j] |= (uint8_t)(nearest_int(iscale * mins[j]) << 4);
            put_fp16(y + 82, max_min / 15.f);
        } else {
            put_fp16(y + 82, 0.f);
        }
    } else {
        float sigma2 = sum_sq(x, QK_K) / QK_K;
        for (int j = 0; j < 16; ++j)
            sw[j] = imatrix_weights(x + 16 * j, qw + 16 * j, sigma2, 16, weights + 16 * j);
        for (int h = 0; h < 2; ++h)
            qkx_quants_x8(16, 3, x + 128 * h, weights + 128 * h, L + 128 * h, scales + 8 * h,
                          mins + 8 * h, -0.9f, 0.05f, 36, 0);
        put_fp16(y + 80, qp_quants(16, 15, scales, Ls, sw));
        put_fp16(y + 82, qp_quants(16, 15, mins, Lm, sw));
        for (int j = 0; j < 16; ++j) sc[j] = (uint8_t)(Ls[j] | (Lm[j] << 4));
    }
    d_all = get_fp16(y + 80);
    m_all = get_fp16(y + 82);
    for (int j = 0; j < 16; ++j) {
        const float d = d_all * (sc[j] & 0xF);
        if (!d) continue;
        const float dm = m_all * (sc[j] >> 4);
        for (int ii = 0; ii < 16; ++ii) {
            int l = nearest_int((x[16 * j + ii] + dm) / d);
            L[16 * j + ii] = (uint8_t)MAX(0, MIN(3, l));
        }
    }
    pack_2bit(L, qs);
}

/* ---------------------------------------------------------------- Q3_K: 110-byte blocks */
/* hmask[32] | qs[64] | scales[12] | d */

static void q3_k_block(const float *x, uint8_t *y, const float *qw) {
    int8_t L[QK_K];
    float scales[16], weight[QK_K], sw[16];
    uint8_t *hmask = y, *qs = y + 32, *sc = y + 96;
    memset(sc, 0, 12);
    if (!qw) {
        float max_scale = 0, amax = 0;
        for (int j = 0; j < 16; ++j) {
            scales[j] = q3_quants(16, 4, x + 16 * j, L + 16 * j);
            float scale = fabsf(scales[j]);
            if (scale > amax) { amax = scale; max_scale = scales[j]; }
        }
        if (max_scale) {
            float iscale = -32.f / max_scale;
            for (int j = 0; j < 16; ++j) {
                int8_t l = (int8_t)nearest_int(iscale * scales[j]);
                l = (int8_t)(MAX(-32, MIN(31, l)) + 32);
                if (j < 8) sc[j] = l & 0xF;
                else sc[j - 8] |= (uint8_t)((l & 0xF) << 4);
                l >>= 4;
                sc[j % 4 + 8] |= (uint8_t)(l << (2 * (j / 4)));
            }
            put_fp16(y + 108, 1 / iscale);
        } else {
            put_fp16(y + 108, 0.f);
        }
    } else {
        int8_t Ls[16];
        float sigma2 = 2 * sum_sq(x, QK_K) / QK_K;
        for (int j = 0; j < 16; ++j)
            sw[j] = imatrix_weights(x + 16 * j, qw + 16 * j, sigma2, 16, weight + 16 * j);
        for (int h = 0; h < 2; ++h)
            qx_quants_x8(16, 4, x + 128 * h, weight + 128 * h, L + 128 * h, scales + 8 * h);
        float d_block = qx_quants(16, 32, scales, Ls, sw);
        for (int j = 0; j < 16; ++j) {
            int l = Ls[j];
            if (j < 8) sc[j] = l & 0xF;
            else sc[j - 8] |= (uint8_t)((l & 0xF) << 4);
            l >>= 4;
            sc[j % 4 + 8] |= (uint8_t)(l << (2 * (j / 4)));
        }
        put_fp16(y + 108, d_block);
    }
    float d_all = get_fp16(y + 108);
    for (int j = 0; j < 16; ++j) {
        int8_t s = (int8_t)(j < 8 ? sc[j] & 0xF : sc[j - 8] >> 4);
        s = (int8_t)((s | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32);
        float d = d_all * s;
        if (!d) continue;
        for (int ii = 0; ii < 16; ++ii) {
            int l = nearest_int(x[16 * j + ii] / d);
            L[16 * j + ii] = (int8_t)(MAX(-4, MIN(3, l)) + 4);
        }
    }
    memset(hmask, 0, 32);
    int m = 0;
    uint8_t hm = 1;
    for (int j = 0; j < QK_K; ++j) {
        if (L[j] > 3) {
            hmask[m] |= hm;
            L[j] -= 4;
        }
        if (++m == QK_K / 8) { m = 0; hm <<= 1; }
    }
    pack_2bit((const uint8_t *)L, qs);
}

/* ---------------------------------------------------------------- Q4_K / Q5_K */
/* d | dmin | scales[12] | (Q5_K: qh[32]) | qs[128] */

static void pack_k4_scales(uint8_t *sc, const uint8_t *ls, const uint8_t *lm) {
    for (int j = 0; j < 8; ++j) {
        if (j < 4) {
            sc[j] = ls[j];
            sc[j + 4] = lm[j];
        } else {
            sc[j + 4] = (uint8_t)((ls[j] & 0xF) | ((lm[j] & 0xF) << 4));
            sc[j - 4] |= (uint8_t)((ls[j] >> 4) << 6);
            sc[j - 0] |= (uint8_t)((lm[j] >> 4) << 6);
        }
    }
}

static inline void scale_min_k4(int j, const uint8_t *q, uint8_t *d, uint8_t *m) {
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4));
    }
}

/* The scale search shared by Q4_K (nmax 15) and Q5_K (nmax 31); fills y[0..15] and L. */
static void q45_k_scales(const float *x, uint8_t *y, const float *qw, int nmax, uint8_t *L) {
    uint8_t ls[8], lm[8];
    float mins[8], scales[8], weights[QK_K], sw[8];
    if (!qw) {
        float max_scale = 0, max_min = 0;
        for (int j = 0; j < 8; ++j) {
            float av_x = sqrtf(sum_sq(x + 32 * j, 32) / 32);
            for (int l = 0; l < 32; ++l) weights[32 * j + l] = av_x + fabsf(x[32 * j + l]);
        }
        if (nmax == 15)
            qkx_quants_x8(32, 15, x, weights, L, scales, mins, -1.f, 0.1f, 20, 0);
        else
            qkx_quants_x8(32, 31, x, weights, L, scales, mins, -0.5f, 0.1f, 15, 0);
        for (int j = 0; j < 8; ++j) {
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
        float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
        for (int j = 0; j < 8; ++j) {
            uint8_t a = (uint8_t)nearest_int(inv_scale * scales[j]);
            uint8_t b = (uint8_t)nearest_int(inv_min * mins[j]);
            ls[j] = MIN(63, a);
            lm[j] = MIN(63, b);
        }
        put_fp16(y, max_scale / 63.f);
        put_fp16(y + 2, max_min / 63.f);
    } else {
        float sigma2 = 2 * sum_sq(x, QK_K) / QK_K;
        for (int j = 0; j < 8; ++j)
            sw[j] = imatrix_weights(x + 32 * j, qw + 32 * j, sigma2, 32, weights + 32 * j);
        qkx_quants_x8(32, nmax, x, weights, L, scales, mins, -0.9f, 0.05f, 36, 0);
        float d_block = qp_quants(8, 63, scales, ls, sw);
        float m_block = qp_quants(8, 63, mins, lm, sw);
        if (nmax == 31) {
            for (int j = 0; j < 8; ++j) {
                ls[j] = MIN(63, ls[j]);
                lm[j] = MIN(63, lm[j]);
            }
        }
        put_fp16(y, d_block);
        put_fp16(y + 2, m_block);
    }
    pack_k4_scales(y + 4, ls, lm);
    float d_all = get_fp16(y), m_all = get_fp16(y + 2);
    for (int j = 0; j < 8; ++j) {
        uint8_t sc, m;
        scale_min_k4(j, y + 4, &sc, &m);
        const float d = d_all * sc;
        if (!d) continue;
        const float dm = m_all * m;
        for (int ii = 0; ii < 32; ++ii) {
            int l = nearest_int((x[32 * j + ii] + dm) / d);
            L[32 * j + ii] = (uint8_t)MAX(0, MIN(nmax, l));
        }
    }
}

static void q4_k_block(const float *x, uint8_t *y, const float *qw) {
    uint8_t L[QK_K], *q = y + 16;
    q45_k_scales(x, y, qw, 15, L);
    for (int j = 0; j < QK_K; j += 64) {
        for (int l = 0; l < 32; ++l) q[l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 4));
        q += 32;
    }
}

static void q5_k_block(const float *x, uint8_t *y, const float *qw) {
    uint8_t L[QK_K], *qh = y + 16, *ql = y + 48;
    q45_k_scales(x, y, qw, 31, L);
    memset(qh, 0, 32);
    uint8_t m1 = 1, m2 = 2;
    for (int n = 0; n < QK_K; n += 64) {
        for (int j = 0; j < 32; ++j) {
            int l1 = L[n + j], l2 = L[n + j + 32];
            if (l1 > 15) { l1 -= 16; qh[j] |= m1; }
            if (l2 > 15) { l2 -= 16; qh[j] |= m2; }
            ql[j] = (uint8_t)(l1 | (l2 << 4));
        }
        m1 <<= 2;
        m2 <<= 2;
        ql += 32;
    }
}

/* ---------------------------------------------------------------- Q6_K: 210-byte blocks */
/* ql[128] | qh[64] | scales[16] (int8) | d */

static void q6_k_block(const float *x, uint8_t *y, const float *qw) {
    int8_t L[QK_K];
    float scales[16];
    float max_scale = 0, max_abs_scale = 0;
    for (int h = 0; h < 2; ++h)
        qx_quants_x8(16, 32, x + 128 * h, qw ? qw + 128 * h : NULL, L + 128 * h, scales + 8 * h);
    for (int ib = 0; ib < 16; ++ib) {
        const float scale = scales[ib];
        const float abs_scale = fabsf(scale);
        if (abs_scale > max_abs_scale) {
            max_abs_scale = abs_scale;
            max_scale = scale;
        }
    }
    if (max_abs_scale < GROUP_MAX_EPS) {
        memset(y, 0, 210);
        put_fp16(y + 208, 0.f);
        return;
    }
    int8_t *sc = (int8_t *)(y + 192);
    float iscale = -128.f / max_scale;
    put_fp16(y + 208, 1 / iscale);
    for (int ib = 0; ib < 16; ++ib) sc[ib] = (int8_t)MIN(127, nearest_int(iscale * scales[ib]));
    float d_all = get_fp16(y + 208);
    for (int j = 0; j < 16; ++j) {
        float d = d_all * sc[j];
        if (!d) continue;
        for (int ii = 0; ii < 16; ++ii) {
            int l = nearest_int(x[16 * j + ii] / d);
            L[16 * j + ii] = (int8_t)(MAX(-32, MIN(31, l)) + 32);
        }
    }
    uint8_t *ql = y, *qh = y + 128;
    for (int j = 0; j < QK_K; j += 128) {
        for (int l = 0; l < 32; ++l) {
            const uint8_t q1 = L[j + l + 0] & 0xF, q2 = L[j + l + 32] & 0xF;
            const uint8_t q3 = L[j + l + 64] & 0xF, q4 = L[j + l + 96] & 0xF;
            ql[l + 0] = (uint8_t)(q1 | (q3 << 4));
            ql[l + 32] = (uint8_t)(q2 | (q4 << 4));
            qh[l] = (uint8_t)((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) |
                              ((L[j + l + 64] >> 4) << 4) | ((L[j + l + 96] >> 4) << 6));
        }
        ql += 64;
        qh += 32;
    }
}

/* ---------------------------------------------------------------- entry points */

/* rows x n_per_row float32 (n_per_row % 256 == 0) -> encoded rows; qw: n_per_row importance
 * values (the same for every row) or NULL. Returns the bytes written, or -1 on a bad type. */
int64_t ws_quantize_k(int type, const float *x, int64_t rows, int64_t n_per_row,
                      const float *qw, uint8_t *out) {
    void (*block)(const float *, uint8_t *, const float *);
    int64_t bytes;
    switch (type) {
    case WS_Q2_K: block = q2_k_block; bytes = 84; break;
    case WS_Q3_K: block = q3_k_block; bytes = 110; break;
    case WS_Q4_K: block = q4_k_block; bytes = 144; break;
    case WS_Q5_K: block = q5_k_block; bytes = 176; break;
    case WS_Q6_K: block = q6_k_block; bytes = 210; break;
    default: return -1;
    }
    const int64_t nb = n_per_row / QK_K;
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t i = 0; i < nb; ++i) {
            block(x + r * n_per_row + i * QK_K, out + (r * nb + i) * bytes,
                  qw ? qw + i * QK_K : NULL);
        }
    }
    return rows * nb * bytes;
}

/* quantize_row_q8_0_ref: n % 32 == 0 values -> n / 32 blocks of fp16 d | 32 x int8. */
int64_t ws_quantize_q8_0(const float *x, int64_t n, uint8_t *out) {
    const int64_t nb = n / 32;
    for (int64_t i = 0; i < nb; ++i) {
        const float *v = x + i * 32;
        uint8_t *y = out + i * 34;
        float amax = 0.0f;
        for (int j = 0; j < 32; ++j) amax = MAX(amax, fabsf(v[j]));
        const float d = amax / 127;
        const float id = d ? 1.0f / d : 0.0f;
        put_fp16(y, d);
        for (int j = 0; j < 32; ++j) y[2 + j] = (uint8_t)(int8_t)roundf(v[j] * id);
    }
    return nb * 34;
}

/* ---------------------------------------------------------------- float conversions */

/* n values of src (dtype 0: float32, 1: bfloat16, 2: float16) -> float32 dst. Returns the
 * bits of the largest |value| (0 for n == 0): >= 0x7f800000 when any value is NaN or Inf.
 * |x| compares as its bit pattern (unsigned), so the reduction is an integer max. */
uint32_t ws_to_f32_stats(const void *src, int dtype, int64_t n, float *dst) {
    uint32_t *out = (uint32_t *)dst, amax = 0;
    if (dtype == 1) {
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t i = 0; i < n; ++i) {
            uint32_t bits = (uint32_t)s[i] << 16;
            out[i] = bits;
            uint32_t a = bits & 0x7fffffffu;
            amax = a > amax ? a : amax;
        }
    } else {
        if (dtype == 2) {
            const uint16_t *s = (const uint16_t *)src;
            for (int64_t i = 0; i < n; ++i) dst[i] = fp16_value(s[i]);
        } else {
            memcpy(dst, src, (size_t)n * sizeof(float));
        }
        for (int64_t i = 0; i < n; ++i) {
            uint32_t a = out[i] & 0x7fffffffu;
            amax = a > amax ? a : amax;
        }
    }
    return amax;
}

/* float32 -> IEEE half, round to nearest even (numpy's astype(float16) for finite values). */
void ws_f32_to_f16(const float *x, int64_t n, uint16_t *dst) {
    int64_t i = 0;
#ifdef __F16C__
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128((__m128i *)(dst + i), h);
    }
#endif
    for (; i < n; ++i) dst[i] = fp16_bits(x[i]);
}
