/* Fused elementwise kernels for merges (task arithmetic, TIES, DARE, SLERP).
 *
 * Each function works on one flat float32 range and is pure: the Python side cuts tensors at
 * fixed offsets and calls these from several threads (ctypes releases the GIL). Every result
 * is bit-identical to the eager torch code in weightsmith.merge.methods (same operations in
 * the same order, no FMA contraction: build with -ffp-contract=off), which the tests check.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define TILE 256
#define MAXK 32

enum { SP_NONE = 0, SP_TOPK = 1, SP_DARE = 2 };

int ws_abi_version(void) { return 6; }
int ws_max_models(void) { return MAXK; }

/* SplitMix64's j-th output for a generator seeded with `seed` (Steele et al. 2014). */
static inline uint64_t splitmix64(uint64_t seed, uint64_t j) {
    uint64_t z = seed + (j + 1) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* DARE's uniform 32-bit draw for flat entry i: low half of output i/2 for even i, high for odd. */
static inline uint64_t dare_uniform(uint64_t seed, uint64_t i) {
    uint64_t w = splitmix64(seed, i >> 1);
    return (i & 1) ? (w >> 32) : (w & 0xFFFFFFFFULL);
}

/* Fill keep[0..n) with DARE's keep decisions (u < cut) for entries offset.. of a task vector. */
void ws_dare_keep(uint64_t seed, uint64_t cut, int64_t offset, int64_t n, uint8_t *keep) {
    for (int64_t i = 0; i < n; i++) keep[i] = dare_uniform(seed, (uint64_t)(offset + i)) < cut;
}

/* Generalized task arithmetic on one range [offset, offset + n) of a tensor:
 *   δ_k = x_k − base, sparsified per model (none / top-k cut / DARE drop and rescale),
 *   weighted by w_k; without consensus mixed = Σ w_k δ_k (÷ total when divide_total);
 *   with consensus the sign of Σ w_k δ_k is elected (0 → +) and only agreeing entries are
 *   summed (÷ their weight sum when normalize); out = mixed·λ + base.
 */
void ws_gta_combine(const float *base, const float *const *xs, int64_t K, int64_t n,
                    int64_t offset, const float *weights, const int32_t *modes,
                    const float *thr, const int64_t *last_tie, const uint64_t *seeds,
                    const uint64_t *cuts, const float *density, int32_t rescale,
                    int32_t consensus, int32_t normalize, int32_t divide_total, float total,
                    float lam, float *out) {
    float wd[MAXK][TILE];
    float mixed[TILE], acc[TILE], div[TILE];
    uint8_t pos[TILE];
    for (int64_t s = 0; s < n; s += TILE) {
        const int64_t m = (n - s < TILE) ? n - s : TILE;
        const float *b = base + s;
        for (int64_t k = 0; k < K; k++) {
            const float *x = xs[k] + s;
            float *d = wd[k];
            const float w = weights[k];
            const int32_t mode = modes[k];
            if (mode == SP_TOPK && thr[k] >= 0.0f) {
                const float t = thr[k];
                const int64_t first = offset + s;
                if (last_tie[k] >= first + m - 1) {
                    for (int64_t i = 0; i < m; i++) {
                        float v = x[i] - b[i];
                        d[i] = (v * (float)(fabsf(v) >= t)) * w;
                    }
                } else {
                    const int64_t lt = last_tie[k];
                    for (int64_t i = 0; i < m; i++) {
                        float v = x[i] - b[i];
                        float a = fabsf(v);
                        int keep = (a > t) || (a == t && first + i <= lt);
                        d[i] = (v * (float)keep) * w;
                    }
                }
            } else if (mode == SP_DARE) {
                const uint64_t seed = seeds[k], cut = cuts[k];
                const float dens = density[k];
                const uint64_t first = (uint64_t)(offset + s);
                for (int64_t i = 0; i < m; i++) {
                    float v = x[i] - b[i];
                    v = v * (float)(dare_uniform(seed, first + (uint64_t)i) < cut);
                    if (rescale) v = v / dens;
                    d[i] = v * w;
                }
            } else {
                for (int64_t i = 0; i < m; i++) d[i] = (x[i] - b[i]) * w;
            }
        }
        for (int64_t i = 0; i < m; i++) mixed[i] = wd[0][i];
        for (int64_t k = 1; k < K; k++)
            for (int64_t i = 0; i < m; i++) mixed[i] = mixed[i] + wd[k][i];
        float *o = out + s;
        if (consensus) {
            for (int64_t i = 0; i < m; i++) {
                pos[i] = mixed[i] >= 0.0f;
                acc[i] = 0.0f;
                div[i] = 0.0f;
            }
            for (int64_t k = 0; k < K; k++) {
                const float *d = wd[k];
                const float w = weights[k];
                for (int64_t i = 0; i < m; i++) {
                    float agree = (float)(pos[i] ? d[i] > 0.0f : d[i] < 0.0f);
                    acc[i] = acc[i] + d[i] * agree;
                    div[i] = div[i] + w * agree;
                }
            }
            if (normalize) {
                for (int64_t i = 0; i < m; i++) {
                    float q = div[i] + (float)(div[i] == 0.0f);
                    o[i] = acc[i] / q;
                }
            } else {
                for (int64_t i = 0; i < m; i++) o[i] = acc[i];
            }
        } else if (divide_total) {
            for (int64_t i = 0; i < m; i++) o[i] = mixed[i] / total;
        } else {
            for (int64_t i = 0; i < m; i++) o[i] = mixed[i];
        }
        for (int64_t i = 0; i < m; i++) o[i] = o[i] * lam + b[i];
    }
}

static inline uint32_t absdelta_bits(float x, float b) {
    float a = fabsf(x - b);
    uint32_t u;
    memcpy(&u, &a, sizeof u);
    return u;
}

/* Radix-select histograms of |x − base| as float bit patterns (monotone for values >= 0):
 * level 0 counts the top 16 bits; level 1 counts the low 16 bits of the entries whose top 16
 * bits equal `prefix`. hist has 65536 entries and is added to. */
void ws_absdelta_hist(const float *base, const float *x, int64_t n, int32_t level,
                      uint32_t prefix, int64_t *hist) {
    if (level == 0) {
        for (int64_t i = 0; i < n; i++) hist[absdelta_bits(x[i], base[i]) >> 16]++;
    } else {
        for (int64_t i = 0; i < n; i++) {
            uint32_t u = absdelta_bits(x[i], base[i]);
            if ((u >> 16) == prefix) hist[u & 0xFFFFu]++;
        }
    }
}

/* How many entries have |x − base| == t. */
int64_t ws_absdelta_count_eq(const float *base, const float *x, int64_t n, float t) {
    int64_t c = 0;
    for (int64_t i = 0; i < n; i++) c += fabsf(x[i] - base[i]) == t;
    return c;
}

/* out = float32(src) for bfloat16 (is_bf16) or float32 input; returns how many values are
 * NaN or ±Inf when check is set (0 otherwise). One pass instead of a cast plus a scan. */
int64_t ws_to_f32(const void *src, int32_t is_bf16, int64_t n, int32_t check, float *out) {
    int64_t bad = 0;
    if (is_bf16) {
        const uint16_t *h = (const uint16_t *)src;
        uint32_t *o = (uint32_t *)out;
        if (check) {
            for (int64_t i = 0; i < n; i++) {
                o[i] = (uint32_t)h[i] << 16;
                bad += (h[i] & 0x7F80u) == 0x7F80u;
            }
        } else {
            for (int64_t i = 0; i < n; i++) o[i] = (uint32_t)h[i] << 16;
        }
    } else {
        const uint32_t *f = (const uint32_t *)src;
        uint32_t *o = (uint32_t *)out;
        if (check) {
            for (int64_t i = 0; i < n; i++) {
                o[i] = f[i];
                bad += (f[i] & 0x7F800000u) == 0x7F800000u;
            }
        } else {
            memcpy(o, f, (size_t)n * sizeof(float));
        }
    }
    return bad;
}

/* Index of the need-th (1-based) entry with |x − base| == t, or −1. */
int64_t ws_absdelta_nth_eq(const float *base, const float *x, int64_t n, float t, int64_t need) {
    for (int64_t i = 0; i < n; i++)
        if (fabsf(x[i] - base[i]) == t && --need == 0) return i;
    return -1;
}

/* Storage types a kernel reads or writes directly: float32 and bfloat16. */
enum { DT_F32 = 0, DT_BF16 = 1 };


#define LANES 8

/* One lane-blocked pass of SLERP's statistics; T is the storage type and E its unsigned bit
 * type, LOAD(p, i) gives a float, EXP(p, i) the exponent bits, EXPMAX marks NaN/Inf. The
 * largest exponent seen is tracked (it vectorizes); NaN/Inf are counted only when one is there.
 * Instantiated per dtype so each loop vectorizes. */
/* Entry k into lane j: exact products summed in double, largest exponent field kept. */
#define DOTS_STEP(LOAD, EXP, E, k, j)                                                       \
    do {                                                                                    \
        double x = LOAD(a, k), y = LOAD(b, k);                                              \
        ab[j] += x * y;                                                                     \
        aa[j] += x * x;                                                                     \
        bb[j] += y * y;                                                                     \
        E u = EXP(a, k), v = EXP(b, k);                                                     \
        ea[j] = u > ea[j] ? u : ea[j];                                                      \
        eb[j] = v > eb[j] ? v : eb[j];                                                      \
    } while (0)

#define SLERP_DOTS(NAME, T, E, LOAD, EXP, EXPMAX)                                           \
    static void NAME(const T *a, const T *b, int64_t n, double *out, int64_t *bad) {        \
        double ab[LANES] = {0}, aa[LANES] = {0}, bb[LANES] = {0};                           \
        E ea[LANES] = {0}, eb[LANES] = {0};                                                 \
        int64_t i = 0;                                                                      \
        for (; i + LANES <= n; i += LANES)                                                  \
            for (int j = 0; j < LANES; j++) DOTS_STEP(LOAD, EXP, E, i + j, j);              \
        for (int j = 0; i + j < n; j++) DOTS_STEP(LOAD, EXP, E, i + j, j);                  \
        double s_ab = 0, s_aa = 0, s_bb = 0;                                                \
        E m_a = 0, m_b = 0;                                                                 \
        for (int j = 0; j < LANES; j++) {                                                   \
            s_ab += ab[j];                                                                  \
            s_aa += aa[j];                                                                  \
            s_bb += bb[j];                                                                  \
            m_a = ea[j] > m_a ? ea[j] : m_a;                                                \
            m_b = eb[j] > m_b ? eb[j] : m_b;                                                \
        }                                                                                   \
        out[0] = s_ab;                                                                      \
        out[1] = s_aa;                                                                      \
        out[2] = s_bb;                                                                      \
        bad[0] = bad[1] = 0;                                                                \
        if (m_a == (EXPMAX))                                                                \
            for (int64_t k = 0; k < n; k++) bad[0] += EXP(a, k) == (EXPMAX);                \
        if (m_b == (EXPMAX))                                                                \
            for (int64_t k = 0; k < n; k++) bad[1] += EXP(b, k) == (EXPMAX);                \
    }

static inline float bf16_at(const uint16_t *p, int64_t i) { return from_bf16(p[i]); }
static inline uint16_t bf16_exp(const uint16_t *p, int64_t i) { return p[i] & 0x7F80u; }
static inline float f32_at(const float *p, int64_t i) { return p[i]; }
static inline uint32_t f32_exp(const float *p, int64_t i) {
    uint32_t u;
    memcpy(&u, p + i, sizeof u);
    return u & 0x7F800000u;
}

SLERP_DOTS(slerp_dots_bf16, uint16_t, uint16_t, bf16_at, bf16_exp, 0x7F80u)
SLERP_DOTS(slerp_dots_f32, float, uint32_t, f32_at, f32_exp, 0x7F800000u)

/* SLERP's statistics of one range of two tensors stored as `dtype` (DT_F32 / DT_BF16):
 * out[0] = <a,b>, out[1] = <a,a>, out[2] = <b,b>, every product exact in double, summed in
 * LANES partial sums combined in a fixed order; bad[0], bad[1] = NaN/Inf counts of a and b. */
void ws_slerp_dots(const void *a, const void *b, int32_t dtype, int64_t n, double *out,
                   int64_t *bad) {
    if (dtype == DT_BF16)
        slerp_dots_bf16((const uint16_t *)a, (const uint16_t *)b, n, out, bad);
    else
        slerp_dots_f32((const float *)a, (const float *)b, n, out, bad);
}

#define COUNT_BLOCK 65536 /* entries per narrow (uint32) NaN/Inf counter */

/* The stores are unchanged by the count: the same bits as without it (an overflow to ±Inf in
 * the output is counted, like a NaN/Inf input in ws_to_f32, and the caller refuses to write). */
#define LERP2(NAME, TI, LOAD, TO, STORE, OEXP, OEXPMAX)                                     \
    static int64_t NAME(const TI *a, const TI *b, int64_t n, float s0, float s1, TO *o) {   \
        int64_t bad = 0;                                                                    \
        for (int64_t s = 0; s < n; s += COUNT_BLOCK) { /* narrow counters vectorize */     \
            const int64_t e = n - s < COUNT_BLOCK ? n : s + COUNT_BLOCK;                    \
            uint32_t nb = 0;                                                                \
            for (int64_t i = s; i < e; i++) {                                               \
                o[i] = STORE(fmaf(LOAD(b, i), s1, LOAD(a, i) * s0));                        \
                nb += OEXP(o, i) == (OEXPMAX);                                              \
            }                                                                               \
            bad += nb;                                                                      \
        }                                                                                   \
        return bad;                                                                         \
    }

static inline float f32_id(float f) { return f; }

LERP2(lerp2_bf16_bf16, uint16_t, bf16_at, uint16_t, to_bf16, bf16_exp, 0x7F80u)
LERP2(lerp2_bf16_f32, uint16_t, bf16_at, float, f32_id, f32_exp, 0x7F800000u)
LERP2(lerp2_f32_bf16, float, f32_at, uint16_t, to_bf16, bf16_exp, 0x7F80u)
LERP2(lerp2_f32_f32, float, f32_at, float, f32_id, f32_exp, 0x7F800000u)

/* out = s0·a + s1·b over one range, as torch's a.mul(s0).add_(b, alpha=s1) computes it on
 * float32 (vectorized: fma(b, s1, a·s0)), stored as out_dtype (bfloat16: round to nearest even).
 * Returns how many outputs are NaN or ±Inf (an overflow of the output dtype). */
int64_t ws_lerp2(const void *a, const void *b, int32_t in_dtype, int64_t n, float s0, float s1,
                 void *out, int32_t out_dtype) {
    if (in_dtype == DT_BF16 && out_dtype == DT_BF16)
        return lerp2_bf16_bf16((const uint16_t *)a, (const uint16_t *)b, n, s0, s1,
                               (uint16_t *)out);
    if (in_dtype == DT_BF16)
        return lerp2_bf16_f32((const uint16_t *)a, (const uint16_t *)b, n, s0, s1, (float *)out);
    if (out_dtype == DT_BF16)
        return lerp2_f32_bf16((const float *)a, (const float *)b, n, s0, s1, (uint16_t *)out);
    return lerp2_f32_f32((const float *)a, (const float *)b, n, s0, s1, (float *)out);
}

/* A stored value (DT_F32 / DT_BF16) rounded to bfloat16, as a float: x.to(bfloat16). */

/* Tile of input k's values [s, s + m), rounded to bfloat16; counts its NaN/Inf into *bad. */
static void load_bf16_tile(const void *x, int32_t dtype, int64_t s, int64_t m, float *v,
                           int64_t *bad) {
    uint32_t nb = 0; /* per tile (m < 2^32): narrow lanes vectorize, int64 ones do not */
    if (dtype == DT_BF16) {
        const uint16_t *p = (const uint16_t *)x + s;
        prefetch_ahead(p, m * 2, 2048);
        for (int64_t i = 0; i < m; i++) {
            v[i] = bf16_at(p, i);
            nb += bf16_exp(p, i) == 0x7F80u;
        }
    } else {
        const float *p = (const float *)x + s;
        for (int64_t i = 0; i < m; i++) {
            v[i] = bf16_round(p[i]);
            nb += f32_exp(p, i) == 0x7F800000u;
        }
    }
    *bad += nb;
}

/* Store a float32 tile as out_dtype (bfloat16: round to nearest even); the NaN/Inf count. */
static int64_t store_tile(const float *v, int64_t m, void *out, int32_t out_dtype, int64_t s) {
    uint32_t nb = 0; /* per tile (m < 2^32): narrow lanes vectorize, int64 ones do not */
    if (out_dtype == DT_BF16) {
        uint16_t *o = (uint16_t *)out + s;
        for (int64_t i = 0; i < m; i++) {
            o[i] = to_bf16(v[i]);
            nb += bf16_exp(o, i) == 0x7F80u;
        }
    } else {
        float *o = (float *)out + s;
        for (int64_t i = 0; i < m; i++) {
            o[i] = v[i];
            nb += f32_exp(o, i) == 0x7F800000u;
        }
    }
    return nb;
}

/* mergekit's bfloat16 linear and task arithmetic over one range, every torch rounding step
 * reproduced (float32 arithmetic, bfloat16 rounding where torch rounds):
 *   mode 0 (linear, weights w float32): acc = 0; acc = fma(bf16(x_k), w_k, acc) in order (torch's
 *     addcmul_ is a fused multiply-add on the CPU); acc /= div when do_div; out = bf16(acc);
 *   mode 1 (task arithmetic, x_0 the base, w_k already bfloat16 values): δ_k = bf16(x_k − b),
 *     p_k = bf16(δ_k·w_k), mixed = bf16(Σ p_k) (float32 sum in order), bf16(mixed / div) when
 *     do_div, bf16(mixed · lam) when do_lam, out = bf16(b + mixed).
 * out is stored as out_dtype; bad[k] counts NaN/Inf of input k; returns the NaN/Inf outputs. */
int64_t ws_narrow_mix(const void *const *xs, int32_t K, int32_t in_dtype, int64_t n,
                      int32_t mode, const float *w, int32_t do_div, float div, int32_t do_lam,
                      float lam, void *out, int32_t out_dtype, int64_t *bad) {
    float acc[TILE], v[TILE], b[TILE];
    int64_t bad_out = 0;
    for (int32_t k = 0; k < K; k++) bad[k] = 0;
    for (int64_t s = 0; s < n; s += TILE) {
        const int64_t m = (n - s < TILE) ? n - s : TILE;
        for (int64_t i = 0; i < m; i++) acc[i] = 0.0f;
        if (mode == 0) {
            for (int32_t k = 0; k < K; k++) {
                const float wk = w[k];
                load_bf16_tile(xs[k], in_dtype, s, m, v, &bad[k]);
                for (int64_t i = 0; i < m; i++) acc[i] = fmaf(v[i], wk, acc[i]);
            }
            if (do_div)
                for (int64_t i = 0; i < m; i++) acc[i] = acc[i] / div;
            if (out_dtype != DT_BF16)
                for (int64_t i = 0; i < m; i++) acc[i] = bf16_round(acc[i]);
        } else {
            load_bf16_tile(xs[0], in_dtype, s, m, b, &bad[0]);
            for (int32_t k = 1; k < K; k++) {
                const float wk = w[k - 1];
                load_bf16_tile(xs[k], in_dtype, s, m, v, &bad[k]);
                for (int64_t i = 0; i < m; i++)
                    acc[i] = acc[i] + bf16_round(bf16_round(v[i] - b[i]) * wk);
            }
            for (int64_t i = 0; i < m; i++) {
                float mixed = bf16_round(acc[i]);
                if (do_div) mixed = bf16_round(mixed / div);
                if (do_lam) mixed = bf16_round(mixed * lam);
                acc[i] = bf16_round(b[i] + mixed);
            }
        }
        bad_out += store_tile(acc, m, out, out_dtype, s);
    }
    return bad_out;
}

/* ---- bfloat16 NearSwap, RAM / RAM+ and Model Stock, as mergekit's torch ops in bfloat16 ---- */

#define RAM_MAXK 15 /* torch sums up to 15 rows of a dim-0 reduction in order (then cascades) */

/* mergekit's nearswap on bfloat16 values a (base), b: d = bf16(a − b), c = max(|d|, lo),
 * w = clamp(bf16(bf16(1 / c)·t), 0, 1) (torch's t / c is c.reciprocal() * t), out =
 * bf16(bf16(w·b) + bf16(bf16(1 − w)·a)). bad[0], bad[1] count NaN/Inf inputs; returns the
 * NaN/Inf outputs. */
WIDE_VECTORS int64_t ws_nearswap(const void *a, const void *b, int32_t in_dtype, int64_t n, float t, float lo,
                    void *out, int32_t out_dtype, int64_t *bad) {
    float va[TILE], vb[TILE], acc[TILE];
    int64_t bad_out = 0;
    bad[0] = bad[1] = 0;
    for (int64_t s = 0; s < n; s += TILE) {
        const int64_t m = (n - s < TILE) ? n - s : TILE;
        load_bf16_tile(a, in_dtype, s, m, va, &bad[0]);
        load_bf16_tile(b, in_dtype, s, m, vb, &bad[1]);
        for (int64_t i = 0; i < m; i++) {
            float d = fabsf(bf16_round_arith(va[i] - vb[i]));
            float c = d < lo ? lo : d; /* NaN stays NaN (torch's clamp propagates it) */
            float w = bf16_round_arith(bf16_round_arith(1.0f / c) * t);
            w = w < 0.0f ? 0.0f : (w > 1.0f ? 1.0f : w);
            acc[i] = bf16_round_arith(bf16_round_arith(w * vb[i]) +
                                      bf16_round_arith(bf16_round_arith(1.0f - w) * va[i]));
        }
        bad_out += store_tile(acc, m, out, out_dtype, s);
    }
    return bad_out;
}

/* RAM over one range, x_0 the base and K − 1 ≤ RAM_MAXK models, as mergekit's bfloat16 ops:
 * δ_k = bf16(x_k − b), changed_k = |δ_k| > eps, c = Σ changed_k, kept_k = δ_k·changed_k,
 * m_k = kept_k·[c = 1] + bf16(kept_k·[c > 1] / max(c, 1)) (bfloat16 sum), out = b + Σ m_k.
 *   mode 0 (ram): the sums in float32 rounded to bfloat16 as torch does: out = bf16(b + bf16(Σ));
 *   mode 1 (ramplus_tl): the unique term times lam[k] is float32 (torch promotes), m_k and Σ
 *     float32, out = b + Σ in float32 (then stored as out_dtype);
 *   mode 2 (ramplus_tl's statistics): nothing stored; counts[2k] += entries model k changed
 *     that another model also changed, counts[2k + 1] += entries only model k changed.
 * bad[k] counts NaN/Inf of input k; returns the NaN/Inf outputs. */
int64_t ws_ram(const void *const *xs, int32_t K, int32_t in_dtype, int64_t n, float eps,
               int32_t mode, const float *lam, int64_t *counts, void *out, int32_t out_dtype,
               int64_t *bad) {
    float b[TILE], v[TILE], d[RAM_MAXK][TILE], c[TILE], acc[TILE];
    const int32_t M = K - 1;
    int64_t bad_out = 0;
    for (int32_t k = 0; k < K; k++) bad[k] = 0;
    if (M < 1 || M > RAM_MAXK) return -1;
    for (int64_t s = 0; s < n; s += TILE) {
        const int64_t m = (n - s < TILE) ? n - s : TILE;
        load_bf16_tile(xs[0], in_dtype, s, m, b, &bad[0]);
        for (int64_t i = 0; i < m; i++) c[i] = 0.0f;
        for (int32_t k = 0; k < M; k++) {
            load_bf16_tile(xs[k + 1], in_dtype, s, m, v, &bad[k + 1]);
            for (int64_t i = 0; i < m; i++) {
                float dk = bf16_round(v[i] - b[i]);
                float ch = fabsf(dk) > eps ? 1.0f : 0.0f;
                d[k][i] = dk * ch; /* kept_k: δ or a signed zero, as δ·False in torch */
                c[i] += ch;
            }
        }
        if (mode == 2) {
            for (int32_t k = 0; k < M; k++) {
                int64_t shared = 0, unique = 0;
                for (int64_t i = 0; i < m; i++) {
                    /* kept_k is δ_k·changed_k: changed exactly when |kept_k| > eps */
                    int ch = fabsf(d[k][i]) > eps;
                    shared += ch & (c[i] > 1.0f);
                    unique += ch & (c[i] == 1.0f);
                }
                counts[2 * k] += shared;
                counts[2 * k + 1] += unique;
            }
            continue;
        }
        for (int64_t i = 0; i < m; i++) acc[i] = 0.0f;
        for (int32_t k = 0; k < M; k++) {
            const float lk = mode == 1 ? lam[k] : 1.0f;
            for (int64_t i = 0; i < m; i++) {
                float one = c[i] == 1.0f ? 1.0f : 0.0f, many = c[i] > 1.0f ? 1.0f : 0.0f;
                float cnt = c[i] < 1.0f ? 1.0f : c[i];
                float shared = bf16_round((d[k][i] * many) / cnt);
                float unique = d[k][i] * one;
                float mk = mode == 1 ? unique * lk + shared : bf16_round(unique + shared);
                acc[i] = acc[i] + mk;
            }
        }
        if (mode == 1)
            for (int64_t i = 0; i < m; i++) acc[i] = b[i] + acc[i];
        else
            for (int64_t i = 0; i < m; i++) acc[i] = bf16_round(b[i] + bf16_round(acc[i]));
        bad_out += store_tile(acc, m, out, out_dtype, s);
    }
    return bad_out;
}

/* Model Stock's output over one range [offset, offset + n), x_0 the base and K − 1 models, as
 * mergekit's bfloat16 ops: avg = bf16(bf16(Σ x_k) / (K − 1)) (Python's sum: 0 + x_1 + ...,
 * each add rounded), out = bf16(bf16(t·avg) + bf16(u·b)) with t = t_rows[row], u =
 * u_rows[row] = bf16(1 − t), row = (offset + i) / cols (row 0 when cols ≤ 0). bad[k] counts NaN/Inf of input k. */
int64_t ws_stock_mix(const void *const *xs, int32_t K, int32_t in_dtype, int64_t n,
                     int64_t offset, const float *t_rows, const float *u_rows, int64_t cols,
                     void *out, int32_t out_dtype, int64_t *bad) {
    float b[TILE], v[TILE], acc[TILE];
    const float count = (float)(K - 1);
    int64_t bad_out = 0;
    for (int32_t k = 0; k < K; k++) bad[k] = 0;
    for (int64_t s = 0; s < n; s += TILE) {
        const int64_t m = (n - s < TILE) ? n - s : TILE;
        load_bf16_tile(xs[0], in_dtype, s, m, b, &bad[0]);
        for (int64_t i = 0; i < m; i++) acc[i] = 0.0f;
        for (int32_t k = 1; k < K; k++) {
            load_bf16_tile(xs[k], in_dtype, s, m, v, &bad[k]);
            for (int64_t i = 0; i < m; i++) acc[i] = bf16_round_arith(acc[i] + v[i]);
        }
        if (cols <= 0) { /* one ratio for the whole tensor */
            const float t = t_rows[0], u = u_rows[0];
            for (int64_t i = 0; i < m; i++)
                acc[i] = bf16_round_arith(bf16_round_arith(t * bf16_round_arith(acc[i] / count)) +
                                          bf16_round_arith(u * b[i]));
        } else {
            for (int64_t i = 0; i < m; i++) {
                const int64_t row = (offset + s + i) / cols;
                acc[i] = bf16_round_arith(
                    bf16_round_arith(t_rows[row] * bf16_round_arith(acc[i] / count)) +
                    bf16_round_arith(u_rows[row] * b[i]));
            }
        }
        bad_out += store_tile(acc, m, out, out_dtype, s);
    }
    return bad_out;
}

/* out = bf16(x − b) over one range of two same-dtype inputs (x.to(bf16) − b.to(bf16)), stored
 * as bfloat16; bad[0], bad[1] count NaN/Inf of x and b. */
void ws_bf16_sub(const void *x, const void *b, int32_t in_dtype, int64_t n, uint16_t *out,
                 int64_t *bad) {
    float vx[TILE], vb[TILE];
    bad[0] = bad[1] = 0;
    for (int64_t s = 0; s < n; s += TILE) {
        const int64_t m = (n - s < TILE) ? n - s : TILE;
        load_bf16_tile(x, in_dtype, s, m, vx, &bad[0]);
        load_bf16_tile(b, in_dtype, s, m, vb, &bad[1]);
        for (int64_t i = 0; i < m; i++) out[s + i] = to_bf16(vx[i] - vb[i]);
    }
}

/* ---- mergekit's bfloat16 SCE / DARE / DELLA, torch's rounding op by op ----
 * Inputs are stored float32 or bfloat16 (rounded to bfloat16 first, mergekit's load cast);
 * δ_k = bf16(x_k − base); every later op is float32 arithmetic rounded to bfloat16 where torch
 * rounds a bfloat16 tensor. Sums over the models are float32 from 0 in model order (torch's
 * reduction over a leading dimension), rounded once. */

/* Tile of the task vectors δ_k = bf16(x_k − b) of inputs 1..K-1 (b: input 0's tile). */
static void load_deltas(const void *const *xs, int32_t K1, int32_t dtype, int64_t s, int64_t m,
                        float *b, float d[][TILE], int64_t *bad) {
    load_bf16_tile(xs[0], dtype, s, m, b, &bad[0]);
    for (int32_t k = 1; k < K1; k++) {
        load_bf16_tile(xs[k], dtype, s, m, d[k - 1], &bad[k]);
        for (int64_t i = 0; i < m; i++) d[k - 1][i] = bf16_round(d[k - 1][i] - b[i]);
    }
}

/* torch.var(stack(δ), dim=0, unbiased=False) on bfloat16: Welford's update in double over the
 * models in order (torch's binary_kernel_reduce), var = m2 / K converted double -> float ->
 * bfloat16, written to var_out[0..n); bad[k] counts NaN/Inf of input k. */
void ws_sce_var(const void *const *xs, int32_t K1, int32_t dtype, int64_t n, uint16_t *var_out,
                int64_t *bad) {
    float b[TILE], d[MAXK][TILE];
    for (int32_t k = 0; k < K1; k++) bad[k] = 0;
    for (int64_t s = 0; s < n; s += TILE) {
        const int64_t m = (n - s < TILE) ? n - s : TILE;
        load_deltas(xs, K1, dtype, s, m, b, d, bad);
        for (int64_t i = 0; i < m; i++) {
            double mean = 0.0, m2 = 0.0;
            for (int32_t k = 0; k < K1 - 1; k++) {
                double x = d[k][i], nf = (double)(k + 1);
                double delta = x - mean;
                mean = mean + delta / nf;
                m2 = m2 + delta * (x - mean);
            }
            var_out[s + i] = to_bf16((float)(m2 / (double)(K1 - 1)));
        }
    }
}

/* (δ_k · mask)² in bfloat16 for each model k into sq[k][0..n) (mask NULL: every entry):
 * mergekit's tvs * mask, then .square(), before its float32 mean. */
void ws_sce_sq(const void *const *xs, int32_t K1, int32_t dtype, int64_t n, const uint8_t *mask,
               uint16_t *const *sq) {
    float b[TILE], d[MAXK][TILE];
    int64_t bad[MAXK + 1];
    for (int64_t s = 0; s < n; s += TILE) {
        const int64_t m = (n - s < TILE) ? n - s : TILE;
        load_deltas(xs, K1, dtype, s, m, b, d, bad);
        for (int32_t k = 0; k < K1 - 1; k++)
            for (int64_t i = 0; i < m; i++) {
                float v = (mask == NULL || mask[s + i]) ? d[k][i] : d[k][i] * 0.0f;
                sq[k][s + i] = to_bf16(v * v);
            }
    }
}

static inline float sign_of(float v) { return (float)((v > 0.0f) - (v < 0.0f)); }

/* mergekit's sce combine on one range: δ·mask, majority = bf16(Σ δ) >= 0 ? 1 : -1,
 * e_k = w_k where sign(δ_k) == majority else 0, merged = bf16(Σ bf16(δ_k·e_k)),
 * out = bf16(b + bf16(merged / max(bf16(Σ e_k), lo))). w: bfloat16 values; lo: the clamp. */
int64_t ws_sce_combine(const void *const *xs, int32_t K1, int32_t dtype, int64_t n,
                       const uint8_t *mask, const float *w, float lo, void *out,
                       int32_t out_dtype, int64_t *bad) {
    float b[TILE], d[MAXK][TILE], acc[TILE], major[TILE], div[TILE];
    int64_t bad_out = 0;
    for (int32_t k = 0; k < K1; k++) bad[k] = 0;
    for (int64_t s = 0; s < n; s += TILE) {
        const int64_t m = (n - s < TILE) ? n - s : TILE;
        load_deltas(xs, K1, dtype, s, m, b, d, bad);
        if (mask != NULL)
            for (int32_t k = 0; k < K1 - 1; k++)
                for (int64_t i = 0; i < m; i++) d[k][i] = mask[s + i] ? d[k][i] : d[k][i] * 0.0f;
        for (int64_t i = 0; i < m; i++) acc[i] = 0.0f;
        for (int32_t k = 0; k < K1 - 1; k++)
            for (int64_t i = 0; i < m; i++) acc[i] = acc[i] + d[k][i];
        for (int64_t i = 0; i < m; i++) {
            major[i] = bf16_round(acc[i]) >= 0.0f ? 1.0f : -1.0f;
            acc[i] = 0.0f;
            div[i] = 0.0f;
        }
        for (int32_t k = 0; k < K1 - 1; k++) {
            const float wk = w[k];
            for (int64_t i = 0; i < m; i++) {
                const float e = sign_of(d[k][i]) == major[i] ? wk : 0.0f;
                acc[i] = acc[i] + bf16_round(d[k][i] * e);
                div[i] = div[i] + e;
            }
        }
        for (int64_t i = 0; i < m; i++) {
            float dv = bf16_round(div[i]);
            dv = dv >= lo ? dv : lo;
            acc[i] = bf16_round(b[i] + bf16_round(bf16_round(acc[i]) / dv));
        }
        bad_out += store_tile(acc, m, out, out_dtype, s);
    }
    return bad_out;
}

/* Task vector k of one range, sparsified as mergekit's bfloat16 DARE / DELLA: kept entries
 * (masks[k][i], or DARE's draw dare_uniform(seeds[k], offset + i) < cuts[k] when masks[k] is
 * NULL and cuts[k] > 0) stay, the rest become ±0 (δ·0); then bf16(δ·scale_k) when has_scale[k]. */
static void sparsify_tile(float *d, int64_t m, int64_t at, const uint8_t *mask, uint64_t seed,
                          uint64_t cut, int32_t has_scale, float scale) {
    if (mask != NULL) {
        for (int64_t i = 0; i < m; i++) d[i] = mask[at + i] ? d[i] : d[i] * 0.0f;
    } else if (cut > 0) {
        int64_t i = 0;
        if (at & 1) {
            d[0] = dare_uniform(seed, (uint64_t)at) < cut ? d[0] : d[0] * 0.0f;
            i = 1;
        }
        for (; i + 1 < m; i += 2) { /* one SplitMix64 output per pair of entries */
            const uint64_t u = splitmix64(seed, (uint64_t)(at + i) >> 1);
            d[i] = (u & 0xFFFFFFFFULL) < cut ? d[i] : d[i] * 0.0f;
            d[i + 1] = (u >> 32) < cut ? d[i + 1] : d[i + 1] * 0.0f;
        }
        if (i < m) d[i] = dare_uniform(seed, (uint64_t)(at + i)) < cut ? d[i] : d[i] * 0.0f;
    }
    if (has_scale)
        for (int64_t i = 0; i < m; i++) d[i] = bf16_round(d[i] * scale);
}

/* (Σ|δ|, Σ|kept δ|) of task vector x − base over [0, n) (flat offset `offset`), each |δ| a
 * bfloat16 value summed in double: mergekit's L1 rescale norms before their bf16 rounding. */
void ws_narrow_l1(const void *base, const void *x, int32_t dtype, int64_t n, int64_t offset,
                  const uint8_t *mask, uint64_t seed, uint64_t cut, double *out, int64_t *bad) {
    float b[TILE], d[1][TILE], kept[TILE];
    const void *xs[2] = {base, x};
    double before = 0.0, after = 0.0;
    bad[0] = bad[1] = 0;
    for (int64_t s = 0; s < n; s += TILE) {
        const int64_t m = (n - s < TILE) ? n - s : TILE;
        load_deltas(xs, 2, dtype, s, m, b, d, bad);
        memcpy(kept, d[0], sizeof(float) * (size_t)m);
        sparsify_tile(kept, m, mask != NULL ? s : offset + s, mask, seed, cut, 0, 1.0f);
        for (int64_t i = 0; i < m; i++) {
            before += fabsf(d[0][i]);
            after += fabsf(kept[i]);
        }
    }
    out[0] = before;
    out[1] = after;
}

/* mergekit's bfloat16 generalized task arithmetic (dare_*, della*) on one range [offset,
 * offset + n) of a tensor, as weightsmith's _combine_narrow: δ_k sparsified (masks point at
 * this range), p_k = bf16(δ_k·w_k); consensus: majority = bf16(Σ p_k) >= 0 ? 1 : -1,
 * mixed = bf16(Σ agreeing p_k), div = bf16(Σ agreeing w_k) (0 -> 1); else mixed = bf16(Σ p_k)
 * and div = total; bf16(mixed / div) when normalize, bf16(mixed·lam) when do_lam,
 * out = bf16(b + mixed). */
int64_t ws_narrow_gta(const void *const *xs, int32_t K1, int32_t dtype, int64_t n,
                      int64_t offset, const uint8_t *const *masks, const uint64_t *seeds,
                      const uint64_t *cuts, const int32_t *has_scale, const float *scales,
                      const float *w, int32_t consensus, int32_t normalize, float total,
                      int32_t do_lam, float lam, void *out, int32_t out_dtype, int64_t *bad) {
    float b[TILE], d[MAXK][TILE], acc[TILE], major[TILE], div[TILE];
    int64_t bad_out = 0;
    for (int32_t k = 0; k < K1; k++) bad[k] = 0;
    for (int64_t s = 0; s < n; s += TILE) {
        const int64_t m = (n - s < TILE) ? n - s : TILE;
        load_deltas(xs, K1, dtype, s, m, b, d, bad);
        for (int32_t k = 0; k < K1 - 1; k++) {
            sparsify_tile(d[k], m, masks[k] != NULL ? s : offset + s, masks[k], seeds[k],
                          cuts[k], has_scale[k], scales[k]);
            const float wk = w[k];
            for (int64_t i = 0; i < m; i++) d[k][i] = bf16_round(d[k][i] * wk);
        }
        for (int64_t i = 0; i < m; i++) acc[i] = 0.0f;
        for (int32_t k = 0; k < K1 - 1; k++)
            for (int64_t i = 0; i < m; i++) acc[i] = acc[i] + d[k][i];
        for (int64_t i = 0; i < m; i++) {
            acc[i] = bf16_round(acc[i]);
            div[i] = total;
        }
        if (consensus) {
            for (int64_t i = 0; i < m; i++) {
                major[i] = acc[i] >= 0.0f ? 1.0f : -1.0f;
                acc[i] = 0.0f;
                div[i] = 0.0f;
            }
            for (int32_t k = 0; k < K1 - 1; k++) {
                const float wk = w[k];
                for (int64_t i = 0; i < m; i++) {
                    const int agree = sign_of(d[k][i]) == major[i];
                    acc[i] = acc[i] + (agree ? d[k][i] : d[k][i] * 0.0f);
                    div[i] = div[i] + (agree ? wk : 0.0f);
                }
            }
            for (int64_t i = 0; i < m; i++) {
                acc[i] = bf16_round(acc[i]);
                div[i] = bf16_round(div[i]);
                div[i] = div[i] == 0.0f ? 1.0f : div[i];
            }
        }
        if (normalize)
            for (int64_t i = 0; i < m; i++) acc[i] = bf16_round(acc[i] / div[i]);
        if (do_lam)
            for (int64_t i = 0; i < m; i++) acc[i] = bf16_round(acc[i] * lam);
        for (int64_t i = 0; i < m; i++) acc[i] = bf16_round(b[i] + acc[i]);
        bad_out += store_tile(acc, m, out, out_dtype, s);
    }
    return bad_out;
}

/* DELLA's MagPrune keep decisions for `rows` rows of `cols` entries (row-major, the first one
 * is row `row0` of the tensor): in each row the entries are ranked by bfloat16 |δ| (stable: equal
 * magnitudes in column order, two counting-sort passes over the 15 magnitude bits) and the
 * entry of rank r is kept when its 32-bit draw dare_uniform(seed, flat index) is below
 * cuts[r]. keep: rows·cols bytes. Returns 0, or -1 when scratch memory is not available. */
int32_t ws_della_keep(const void *base, const void *x, int32_t dtype, int64_t rows,
                      int64_t cols, int64_t row0, uint64_t seed, const uint64_t *cuts,
                      uint8_t *keep) {
    uint16_t *key = malloc(sizeof(uint16_t) * (size_t)cols);
    uint32_t *tmp = malloc(sizeof(uint32_t) * (size_t)cols);
    uint32_t *order = malloc(sizeof(uint32_t) * (size_t)cols);
    if (key == NULL || tmp == NULL || order == NULL) {
        free(key), free(tmp), free(order);
        return -1;
    }
    float b[TILE], d[1][TILE];
    int64_t bad[2];
    const void *xs[2] = {base, x};
    for (int64_t r = 0; r < rows; r++) {
        const int64_t at = r * cols;
        for (int64_t s = 0; s < cols; s += TILE) {
            const int64_t m = (cols - s < TILE) ? cols - s : TILE;
            load_deltas(xs, 2, dtype, at + s, m, b, d, bad);
            for (int64_t i = 0; i < m; i++) key[s + i] = to_bf16(d[0][i]) & 0x7FFFu;
        }
        int64_t count[256];
        /* pass 1: low 8 bits, column order in, tmp out */
        memset(count, 0, sizeof count);
        for (int64_t i = 0; i < cols; i++) count[key[i] & 0xFF]++;
        for (int64_t c = 0, pos = 0; c < 256; c++) {
            const int64_t t = count[c];
            count[c] = pos;
            pos += t;
        }
        for (int64_t i = 0; i < cols; i++) tmp[count[key[i] & 0xFF]++] = (uint32_t)i;
        /* pass 2: high 7 bits, stable */
        memset(count, 0, sizeof count);
        for (int64_t i = 0; i < cols; i++) count[key[i] >> 8]++;
        for (int64_t c = 0, pos = 0; c < 256; c++) {
            const int64_t t = count[c];
            count[c] = pos;
            pos += t;
        }
        for (int64_t j = 0; j < cols; j++) order[count[key[tmp[j]] >> 8]++] = tmp[j];
        const uint64_t flat = (uint64_t)((row0 + r) * cols);
        for (int64_t j = 0; j < cols; j++) {
            const uint32_t i = order[j];
            keep[at + i] = dare_uniform(seed, flat + i) < cuts[j];
        }
    }
    free(key), free(tmp), free(order);
    return 0;
}

/* ---- torch.topk(v, k, largest=True)'s selected set on a bfloat16 vector, without torch's
 * 16-byte (value, index) queue: libstdc++'s std::nth_element (introselect: median-of-three
 * pivot, unguarded partition, heap select past the depth limit, insertion sort for ≤ 3) run
 * step by step on 4-byte indices with torch's comparator (NaN first, then larger values), so
 * the entries picked among equal values are torch's. Only the comparator's answers steer the
 * algorithm, so what is moved (index or pair) does not change the result. */
typedef uint32_t sel_t;

static inline uint16_t sel_key(const uint16_t *v, sel_t i) {
    const uint16_t a = v[i] & 0x7FFFu; /* |v|: torch ranks var.abs() */
    return a > 0x7F80u ? 0x7FC0u : a;  /* every NaN alike, above +Inf */
}
#define SEL_LESS(v, a, b) (sel_key(v, a) > sel_key(v, b)) /* torch's "largest" comparator */

static void sel_push_heap(const uint16_t *v, sel_t *f, int64_t hole, int64_t top, sel_t val) {
    int64_t parent = (hole - 1) / 2;
    while (hole > top && SEL_LESS(v, f[parent], val)) {
        f[hole] = f[parent];
        hole = parent;
        parent = (hole - 1) / 2;
    }
    f[hole] = val;
}

static void sel_adjust_heap(const uint16_t *v, sel_t *f, int64_t hole, int64_t len, sel_t val) {
    const int64_t top = hole;
    int64_t child = hole;
    while (child < (len - 1) / 2) {
        child = 2 * (child + 1);
        if (SEL_LESS(v, f[child], f[child - 1])) child--;
        f[hole] = f[child];
        hole = child;
    }
    if ((len & 1) == 0 && child == (len - 2) / 2) {
        child = 2 * (child + 1);
        f[hole] = f[child - 1];
        hole = child - 1;
    }
    sel_push_heap(v, f, hole, top, val);
}

static void sel_heap_select(const uint16_t *v, sel_t *first, sel_t *middle, sel_t *last) {
    const int64_t len = middle - first;
    if (len >= 2)
        for (int64_t parent = (len - 2) / 2;; parent--) {
            sel_adjust_heap(v, first, parent, len, first[parent]);
            if (parent == 0) break;
        }
    for (sel_t *i = middle; i < last; ++i)
        if (SEL_LESS(v, *i, *first)) { /* __pop_heap(first, middle, i) */
            const sel_t val = *i;
            *i = *first;
            sel_adjust_heap(v, first, 0, len, val);
        }
}

static void sel_swap(sel_t *a, sel_t *b) {
    const sel_t t = *a;
    *a = *b;
    *b = t;
}

static void sel_median_to_first(const uint16_t *v, sel_t *r, sel_t *a, sel_t *b, sel_t *c) {
    if (SEL_LESS(v, *a, *b)) {
        if (SEL_LESS(v, *b, *c)) sel_swap(r, b);
        else if (SEL_LESS(v, *a, *c)) sel_swap(r, c);
        else sel_swap(r, a);
    } else if (SEL_LESS(v, *a, *c)) sel_swap(r, a);
    else if (SEL_LESS(v, *b, *c)) sel_swap(r, c);
    else sel_swap(r, b);
}

static sel_t *sel_partition(const uint16_t *v, sel_t *first, sel_t *last, sel_t *pivot) {
    for (;;) {
        while (SEL_LESS(v, *first, *pivot)) ++first;
        --last;
        while (SEL_LESS(v, *pivot, *last)) --last;
        if (!(first < last)) return first;
        sel_swap(first, last);
        ++first;
    }
}

static void sel_insertion_sort(const uint16_t *v, sel_t *first, sel_t *last) {
    if (first == last) return;
    for (sel_t *i = first + 1; i != last; ++i) {
        const sel_t val = *i;
        if (SEL_LESS(v, val, *first)) {
            memmove(first + 1, first, sizeof(sel_t) * (size_t)(i - first));
            *first = val;
        } else {
            sel_t *hole = i, *next = i - 1;
            while (SEL_LESS(v, val, *next)) {
                *hole = *next;
                hole = next;
                --next;
            }
            *hole = val;
        }
    }
}

/* mask[i] = 1 for the k entries torch.topk(v, k, largest=True) returns (0 < k <= n < 2^32;
 * other entries untouched); idx: n scratch entries. */
void ws_topk_mask(const uint16_t *v, int64_t n, int64_t k, sel_t *idx, uint8_t *mask) {
    for (int64_t i = 0; i < n; i++) idx[i] = (sel_t)i;
    sel_t *first = idx, *last = idx + n, *nth = idx + k - 1;
    if (nth != last) {
        int64_t depth = 2 * (63 - __builtin_clzll((unsigned long long)n));
        while (last - first > 3) {
            if (depth == 0) {
                sel_heap_select(v, first, nth + 1, last);
                sel_swap(first, nth);
                break;
            }
            --depth;
            sel_t *mid = first + (last - first) / 2;
            sel_median_to_first(v, first, first + 1, mid, last - 1);
            sel_t *cut = sel_partition(v, first + 1, last, first);
            if (cut <= nth) first = cut;
            else last = cut;
        }
        if (last - first <= 3) sel_insertion_sort(v, first, last);
    }
    /* v is not read from here on: mask may share its storage (the caller's values buffer). */
    memset(mask, 0, (size_t)n);
    for (int64_t j = 0; j < k; j++) mask[idx[j]] = 1;
}
