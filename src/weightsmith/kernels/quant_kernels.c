/* Fused kernels for data-free integer quantization (round-to-nearest, min-max qparams).
 *
 * One pass per group computes the qparams and one writes the levels, straight from the
 * stored bfloat16/float32 weight (no float32 copy, no temporaries), and the levels are packed
 * into compressed-tensors' int32 words in place. Every result is bit-identical to the torch
 * code in weightsmith.compress.rtn / packing (same float32 operations in the same order, IEEE
 * division, round-half-even, no FMA contraction: build with -ffp-contract=off), which the
 * tests check.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

int ws_quant_abi_version(void) { return 6; }

static inline float bf16_load(const uint16_t *h, int64_t i) { return from_bf16(h[i]); }

static inline float f32_load(const float *f, int64_t i) { return f[i]; }


#define COUNT_BLOCK 65536

/* How many of n stored values are NaN/Inf (float32, or bfloat16 when is_bf16). */
int64_t ws_count_nonfinite(const void *src, int32_t is_bf16, int64_t n) {
    int64_t bad = 0;
    for (int64_t s = 0; s < n; s += COUNT_BLOCK) {
        const int64_t m = n - s < COUNT_BLOCK ? n - s : COUNT_BLOCK;
        uint32_t nb = 0; /* per block: narrow lanes vectorize, int64 ones do not */
        if (is_bf16) {
            const uint16_t *h = (const uint16_t *)src + s;
            for (int64_t i = 0; i < m; i++) nb += (h[i] & 0x7F80u) == 0x7F80u;
        } else {
            const uint32_t *f = (const uint32_t *)src + s;
            for (int64_t i = 0; i < m; i++) nb += (f[i] & 0x7F800000u) == 0x7F800000u;
        }
        bad += nb;
    }
    return bad;
}

/* Min-max qparams and levels of one group of g values (see weightsmith.compress.rtn):
 *   lo = min(min(w), 0), hi = max(max(w), 0)
 *   symmetric: scale = max(-lo, hi) / ((qmax - qmin) / 2), zero = 0
 *   else:      scale = (hi - lo) / (qmax - qmin)
 *   scale <= 0 -> 1; scale rounded to bfloat16 when scale_bf16
 *   else:      zero = clamp(round(qmin - lo / scale), zmin, qmax)
 *   q = clamp(round(w / scale) + zero, qmin, qmax)                                         */
#define RTN_GROUP(NAME, TI, LOAD)                                                           \
    static void NAME(const TI *w, int64_t g, int32_t qmin, int32_t qmax, int32_t zmin,      \
                     int32_t symmetric, int32_t scale_bf16, void *scale_out, int8_t *zero_out, \
                     int8_t *q) {                                                           \
        float lo = LOAD(w, 0), hi = lo;                                                     \
        for (int64_t i = 1; i < g; i++) {                                                   \
            const float v = LOAD(w, i);                                                     \
            lo = v < lo ? v : lo;                                                           \
            hi = v > hi ? v : hi;                                                           \
        }                                                                                   \
        lo = lo < 0.0f ? lo : 0.0f;                                                         \
        hi = hi > 0.0f ? hi : 0.0f;                                                         \
        float scale;                                                                        \
        if (symmetric) {                                                                    \
            const float a = -lo > hi ? -lo : hi;                                            \
            scale = a / ((float)(qmax - qmin) / 2.0f);                                      \
        } else {                                                                            \
            scale = (hi - lo) / (float)(qmax - qmin);                                       \
        }                                                                                   \
        if (!(scale > 0.0f)) scale = 1.0f;                                                  \
        if (scale_bf16) scale = bf16_round_arith(scale);                                    \
        float zero = 0.0f;                                                                  \
        if (!symmetric) {                                                                   \
            zero = rintf((float)qmin - lo / scale);                                         \
            zero = zero < (float)zmin ? (float)zmin : zero;                                 \
            zero = zero > (float)qmax ? (float)qmax : zero;                                 \
        }                                                                                   \
        if (scale_bf16) {                                                                   \
            uint32_t u;                                                                     \
            memcpy(&u, &scale, sizeof u);                                                   \
            *(uint16_t *)scale_out = (uint16_t)(u >> 16);                                   \
        } else {                                                                            \
            *(float *)scale_out = scale;                                                    \
        }                                                                                   \
        *zero_out = (int8_t)zero;                                                           \
        const float fmin = (float)qmin, fmax = (float)qmax;                                 \
        for (int64_t i = 0; i < g; i++) {                                                   \
            float v = rintf(LOAD(w, i) / scale) + zero;                                     \
            v = v < fmin ? fmin : v;                                                        \
            v = v > fmax ? fmax : v;                                                        \
            q[i] = (int8_t)v;                                                               \
        }                                                                                   \
    }

RTN_GROUP(rtn_group_bf16, uint16_t, bf16_load)
RTN_GROUP(rtn_group_f32, float, f32_load)

/* RTN of a row-major (rows, cols) weight in groups of g columns: scale_out (rows, cols / g)
 * bfloat16 when scale_bf16 else float32, zero_out the same shape int8, q (rows, cols) int8. */
void ws_rtn_rows(const void *src, int32_t is_bf16, int64_t rows, int64_t cols, int64_t g,
                 int32_t bits, int32_t symmetric, int32_t zmin, int32_t scale_bf16,
                 void *scale_out, int8_t *zero_out, int8_t *q) {
    const int32_t qmin = -(1 << (bits - 1)), qmax = (1 << (bits - 1)) - 1;
    const int64_t groups = rows * (cols / g), scale_size = scale_bf16 ? 2 : 4;
    for (int64_t k = 0; k < groups; k++) {
        void *s = (char *)scale_out + k * scale_size;
        if (is_bf16)
            rtn_group_bf16((const uint16_t *)src + k * g, g, qmin, qmax, zmin, symmetric,
                           scale_bf16, s, zero_out + k, q + k * g);
        else
            rtn_group_f32((const float *)src + k * g, g, qmin, qmax, zmin, symmetric,
                          scale_bf16, s, zero_out + k, q + k * g);
    }
}

/* compressed-tensors pack-quantized along rows: level i of a row, offset to unsigned, takes
 * bits [i*bits, (i+1)*bits) of the row's bit stream (low bits first, straddling words), each
 * row padded to whole int32 words (out: rows x ceil(cols*bits/32)). */
void ws_pack_rows(const int8_t *q, int64_t rows, int64_t cols, int32_t bits, int32_t *out) {
    const int64_t words = (cols * bits + 31) / 32;
    const uint32_t offset = 1u << (bits - 1), mask = (1u << bits) - 1u;
    if (bits == 4) {
        for (int64_t r = 0; r < rows; r++) {
            const int8_t *row = q + r * cols;
            uint32_t *o = (uint32_t *)out + r * words;
            const int64_t full = cols / 8;
            for (int64_t w = 0; w < full; w++) {
                uint32_t acc = 0;
                for (int j = 0; j < 8; j++)
                    acc |= (((uint32_t)(int32_t)row[w * 8 + j] + offset) & mask) << (4 * j);
                o[w] = acc;
            }
            if (full < words) {
                uint32_t acc = 0;
                for (int64_t i = full * 8; i < cols; i++)
                    acc |= (((uint32_t)(int32_t)row[i] + offset) & mask) << (4 * (i - full * 8));
                o[full] = acc;
            }
        }
        return;
    }
    for (int64_t r = 0; r < rows; r++) {
        const int8_t *row = q + r * cols;
        uint32_t *o = (uint32_t *)out + r * words;
        uint64_t acc = 0;
        int32_t held = 0;
        int64_t w = 0;
        for (int64_t i = 0; i < cols; i++) {
            acc |= (uint64_t)(((uint32_t)(int32_t)row[i] + offset) & mask) << held;
            held += bits;
            if (held >= 32) {
                o[w++] = (uint32_t)acc;
                acc >>= 32;
                held -= 32;
            }
        }
        if (held > 0) o[w++] = (uint32_t)acc;
        for (; w < words; w++) o[w] = 0;
    }
}

/* MSE-clipped qparams of each of `rows` float32 rows of g values (row r at w + r * stride),
 * as weightsmith.compress.mse.mse_qparams: for each ratio p (float32, in the order given) the
 * min-max qparams of p * row (lo = min(p * min, 0), hi = max(p * max, 0), as RTN_GROUP; the
 * scale rounded to bfloat16 when scale_bf16), the row's levels q = clamp(round(w / scale) +
 * zero) and err = sum((q - zero) * scale - w)^2, each term in float32 and summed in double (8
 * lanes, then lane order); the first p with the least err wins. Outputs per row: scale (as
 * float32), zero and the chosen ratio.                                                      */
void ws_mse_rows(const float *w, int64_t rows, int64_t g, int64_t stride, int32_t bits,
                 int32_t symmetric, int32_t zmin, int32_t scale_bf16, const float *ratios,
                 int32_t n_ratios, float *scale_out, float *zero_out, float *chosen_out) {
    const int32_t qmin = -(1 << (bits - 1)), qmax = (1 << (bits - 1)) - 1;
    const float fmin = (float)qmin, fmax = (float)qmax;
    for (int64_t r = 0; r < rows; r++) {
        const float *x = w + r * stride;
        float mn = x[0], mx = x[0];
        for (int64_t i = 1; i < g; i++) {
            mn = x[i] < mn ? x[i] : mn;
            mx = x[i] > mx ? x[i] : mx;
        }
        double best = 0.0;
        float best_scale = 1.0f, best_zero = 0.0f, best_p = 1.0f;
        for (int32_t k = 0; k < n_ratios; k++) {
            const float p = ratios[k];
            float lo = mn * p, hi = mx * p; /* min/max of p * x: the product is monotone */
            lo = lo < 0.0f ? lo : 0.0f;
            hi = hi > 0.0f ? hi : 0.0f;
            float scale;
            if (symmetric) {
                const float a = -lo > hi ? -lo : hi;
                scale = a / ((float)(qmax - qmin) / 2.0f);
            } else {
                scale = (hi - lo) / (float)(qmax - qmin);
            }
            if (!(scale > 0.0f)) scale = 1.0f;
            if (scale_bf16) scale = bf16_round_arith(scale);
            float zero = 0.0f;
            if (!symmetric) {
                zero = rintf((float)qmin - lo / scale);
                zero = zero < (float)zmin ? (float)zmin : zero;
                zero = zero > fmax ? fmax : zero;
            }
            double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            int64_t i = 0;
            for (; i + 8 <= g; i += 8) {
                for (int j = 0; j < 8; j++) {
                    float q = rintf(x[i + j] / scale) + zero;
                    q = q < fmin ? fmin : q;
                    q = q > fmax ? fmax : q;
                    const float d = (q - zero) * scale - x[i + j];
                    lane[j] += (double)(d * d);
                }
            }
            for (int j = 0; i < g; i++, j++) {
                float q = rintf(x[i] / scale) + zero;
                q = q < fmin ? fmin : q;
                q = q > fmax ? fmax : q;
                const float d = (q - zero) * scale - x[i];
                lane[j] += (double)(d * d);
            }
            double err = 0.0;
            for (int j = 0; j < 8; j++) err += lane[j];
            if (k == 0 || err < best) {
                best = err;
                best_scale = scale;
                best_zero = zero;
                best_p = p;
            }
        }
        scale_out[r] = best_scale;
        zero_out[r] = best_zero;
        chosen_out[r] = best_p;
    }
}

/* AWQ's candidate weight of one grid point, row by row: out = Q(w * s) / s, Q the min-max RTN
 * of RTN_GROUP in groups of g with its levels dequantized as (q - zero) * scale in float32 (as
 * weightsmith.compress.levels.dequantize). w * s and the division by s are computed in s's
 * precision and rounded to float32 once: torch's arithmetic with a float64 s; with a float32 s
 * (s_f32) in float32, which is the same as in double rounded once (double rounding is exact
 * for * and / when 53 >= 2 * 24 + 2). s NULL: Q(w), the dequantized RTN weight. out is
 * float32, or bfloat16 (out_bf16: the float32 value rounded as torch's copy_ rounds it).
 * Each loop below is one of a few fixed variants, so the compiler vectorizes it. Returns -1
 * when out of memory (nothing valid then), else 0. */
static void scaled_row(const void *src, int32_t is_bf16, const void *s, int32_t s_f32,
                       int64_t cols, float *restrict o) {
    const uint16_t *h = (const uint16_t *)src;
    const float *f = (const float *)src;
    const float *sf = (const float *)s;
    const double *sd = (const double *)s;
    if (!s) {
        if (is_bf16)
            for (int64_t i = 0; i < cols; i++) o[i] = from_bf16(h[i]);
        else
            for (int64_t i = 0; i < cols; i++) o[i] = f[i];
    } else if (s_f32) {
        if (is_bf16)
            for (int64_t i = 0; i < cols; i++) o[i] = from_bf16(h[i]) * sf[i];
        else
            for (int64_t i = 0; i < cols; i++) o[i] = f[i] * sf[i];
    } else {
        if (is_bf16)
            for (int64_t i = 0; i < cols; i++) o[i] = (float)((double)from_bf16(h[i]) * sd[i]);
        else
            for (int64_t i = 0; i < cols; i++) o[i] = (float)((double)f[i] * sd[i]);
    }
}

/* v[i] = ((q[i] - z) * scale) / s[i] for one group (s NULL: no division). */
static void dequant_group(const int8_t *restrict q, int64_t g, float z, float scale,
                          const void *s, int32_t s_f32, float *restrict v) {
    const float *sf = (const float *)s;
    const double *sd = (const double *)s;
    if (!s)
        for (int64_t i = 0; i < g; i++) v[i] = ((float)q[i] - z) * scale;
    else if (s_f32)
        for (int64_t i = 0; i < g; i++) v[i] = (((float)q[i] - z) * scale) / sf[i];
    else
        for (int64_t i = 0; i < g; i++) v[i] = (float)((double)(((float)q[i] - z) * scale) / sd[i]);
}

int32_t ws_fake_quant_scaled_rows(const void *src, int32_t is_bf16, const void *s,
                                  int32_t s_f32, int64_t rows, int64_t cols, int64_t g,
                                  int32_t bits, int32_t symmetric, int32_t zmin,
                                  int32_t scale_bf16, void *out, int32_t out_bf16) {
    const int32_t qmin = -(1 << (bits - 1)), qmax = (1 << (bits - 1)) - 1;
    const int64_t esize = is_bf16 ? 2 : 4, ssize = s_f32 ? 4 : 8;
    int8_t *q = malloc((size_t)g);
    float *scratch = out_bf16 ? malloc(sizeof(float) * (size_t)cols) : NULL;
    if (!q || (out_bf16 && !scratch)) {
        free(q);
        free(scratch);
        return -1;
    }
    for (int64_t r = 0; r < rows; r++) {
        float *o = out_bf16 ? scratch : (float *)out + r * cols;
        scaled_row((const char *)src + r * cols * esize, is_bf16, s, s_f32, cols, o);
        for (int64_t k = 0; k < cols / g; k++) {
            float *og = o + k * g;
            unsigned char stored[4]; /* the scale as RTN_GROUP stores it, read back by memcpy */
            int8_t zero;
            rtn_group_f32(og, g, qmin, qmax, zmin, symmetric, scale_bf16, stored, &zero, q);
            float scale;
            if (scale_bf16) {
                uint16_t h;
                memcpy(&h, stored, sizeof h);
                scale = from_bf16(h);
            } else {
                memcpy(&scale, stored, sizeof scale);
            }
            const void *sg = s ? (const char *)s + k * g * ssize : NULL;
            dequant_group(q, g, (float)zero, scale, sg, s_f32, og);
        }
        if (out_bf16) {
            uint16_t *ob = (uint16_t *)out + r * cols;
            for (int64_t i = 0; i < cols; i++) ob[i] = to_bf16(o[i]);
        }
    }
    free(q);
    free(scratch);
    return 0;
}

/* sum((a[i] - b[i])^2) over n values, each stored float32 or bfloat16 (a_bf16, b_bf16): the
 * difference and its square in float32 (as torch's mse_loss on float32 copies), summed in
 * double over 16 fixed lanes, then lane by lane: deterministic, and at least as accurate as
 * torch's float32 cascade sum (AWQ's grid losses). */
double ws_sq_err(const void *a, int32_t a_bf16, const void *b, int32_t b_bf16, int64_t n) {
    double lane[16] = {0};
    const uint16_t *ah = (const uint16_t *)a, *bh = (const uint16_t *)b;
    const float *af = (const float *)a, *bf = (const float *)b;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        for (int j = 0; j < 16; j++) {
            const float x = a_bf16 ? from_bf16(ah[i + j]) : af[i + j];
            const float y = b_bf16 ? from_bf16(bh[i + j]) : bf[i + j];
            const float d = x - y;
            lane[j] += (double)(d * d);
        }
    }
    for (int j = 0; i < n; i++, j++) {
        const float x = a_bf16 ? from_bf16(ah[i]) : af[i];
        const float y = b_bf16 ? from_bf16(bh[i]) : bf[i];
        const float d = x - y;
        lane[j] += (double)(d * d);
    }
    double total = 0.0;
    for (int j = 0; j < 16; j++) total += lane[j];
    return total;
}
