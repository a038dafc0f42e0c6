/* mergekit's bfloat16 arithmetic for the spherical merges (slerp, nuslerp, multislerp) and
 * arcee_fusion, entry by entry, straight from the stored inputs.
 *
 * Each function works on one flat range [s, s + n) of float32 or bfloat16 storage (a float32
 * input is first rounded to bfloat16, as mergekit's load cast does) and is pure, so the Python
 * side calls it from several threads on fixed pieces. Every bfloat16 torch op is reproduced:
 * the operands as float32, one correctly rounded float32 operation, the result rounded to
 * bfloat16 (nearest even) where torch stores a bfloat16 tensor. Whole-tensor reductions stay in
 * torch: these kernels write the tensor torch reduces, or use its reduced values. Build with
 * -ffp-contract=off (no FMA contraction).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define TILE 256
#define MAXK 16

int ws_sphere_abi(void) { return 4; }
int ws_sphere_max_models(void) { return MAXK; }

enum { DT_F32 = 0, DT_BF16 = 1 };

/* r(x): x rounded to bfloat16, as a float (what a bfloat16 tensor holds). */
static inline float r(float f) { return bf16_round(f); }
/* r of an arithmetic result that is only stored or computed with (never its bits read). */
static inline float ra(float f) { return bf16_round_arith(f); }

/* Values [s, s + m) of input x (stored as dtype) rounded to bfloat16; NaN/Inf counted. */
WIDE_VECTORS static void load(const void *x, int32_t dtype, int64_t s, int64_t m, float *v, int64_t *bad) {
    uint32_t nb = 0; /* per tile (m < 2^32): narrow lanes vectorize, int64 ones do not */
    if (dtype == DT_BF16) {
        const uint16_t *p = (const uint16_t *)x + s;
        prefetch_ahead(p, m * 2, 2048);
        for (int64_t i = 0; i < m; i++) {
            v[i] = from_bf16(p[i]);
            nb += (p[i] & 0x7F80u) == 0x7F80u;
        }
    } else {
        const float *p = (const float *)x + s;
        for (int64_t i = 0; i < m; i++) {
            uint32_t u;
            memcpy(&u, p + i, sizeof u);
            v[i] = r(p[i]);
            nb += (u & 0x7F800000u) == 0x7F800000u;
        }
    }
    *bad += nb;
}

/* A tile of arithmetic results (bf16_round_arith's: their low 16 bits are zero) stored as
 * bfloat16 at entry s: their high halves, without store's rounding and NaN count. A NaN (only
 * ever made from inputs or overflows that the callers refuse) stays a NaN. */
WIDE_VECTORS static void store_kept(const float *v, int64_t m, uint16_t *out, int64_t s) {
    for (int64_t i = 0; i < m; i++) {
        uint32_t u;
        memcpy(&u, v + i, sizeof u);
        out[s + i] = (uint16_t)(u >> 16);
    }
}

/* A tile of kept bfloat16 values (read without a NaN count: they were counted when made). */
WIDE_VECTORS static void load_kept(const uint16_t *x, int64_t s, int64_t m, float *v) {
    prefetch_ahead(x + s, m * 2, 2048);
    for (int64_t i = 0; i < m; i++) v[i] = from_bf16(x[s + i]);
}

/* Task vector k of a tile: r(x_k − base) with a base (xs[0]), else x_k. */
WIDE_VECTORS static void vec_tile(const void *const *xs, int32_t has_base, int32_t k, int32_t dtype,
                     int64_t s, int64_t m, const float *b, float *v, int64_t *bad) {
    load(xs[k], dtype, s, m, v, &bad[k]);
    if (has_base)
        for (int64_t i = 0; i < m; i++) v[i] = ra(v[i] - b[i]);
}

/* Store a tile as out_dtype; the count of NaN/Inf stored. */
WIDE_VECTORS static int64_t store(const float *v, int64_t m, void *out, int32_t out_dtype, int64_t s) {
    uint32_t nb = 0; /* per tile (m < 2^32): narrow lanes vectorize, int64 ones do not */
    if (out_dtype == DT_BF16) {
        uint16_t *o = (uint16_t *)out + s;
        for (int64_t i = 0; i < m; i++) {
            o[i] = to_bf16(v[i]);
            nb += (o[i] & 0x7F80u) == 0x7F80u;
        }
    } else {
        float *o = (float *)out + s;
        for (int64_t i = 0; i < m; i++) {
            uint32_t u;
            o[i] = v[i];
            memcpy(&u, o + i, sizeof u);
            nb += (u & 0x7F800000u) == 0x7F800000u;
        }
    }
    return nb;
}

/* Input xs[k] rounded to bfloat16 (task vector r(x_k − x_0) with has_base), stored as out_dtype
 * (bfloat16: the tensor mergekit reduces; float32: slerp's float32 pieces). bad[i]: NaN/Inf of
 * input i read here. */
void ws_sph_vector(const void *const *xs, int32_t has_base, int32_t k, int32_t dtype, int64_t n,
                   void *out, int32_t out_dtype, int64_t *bad) {
    float b[TILE], v[TILE];
    for (int64_t s = 0; s < n; s += TILE) {
        const int64_t m = (n - s < TILE) ? n - s : TILE;
        if (has_base) load(xs[0], dtype, s, m, b, &bad[0]);
        vec_tile(xs, has_base, k, dtype, s, m, b, v, bad);
        store(v, m, out, out_dtype, s);
    }
}

/* nuslerp's r(r(v1 / n1) · r(v2 / n2)) (bfloat16 out), v1, v2 the task vectors of xs[f], xs[f+1],
 * f = has_base; n1, n2 the clamped bfloat16 norms. */
void ws_nus_prod(const void *const *xs, int32_t has_base, int32_t dtype, int64_t n, float n1,
                 float n2, uint16_t *out) {
    float b[TILE], v[TILE], w[TILE];
    int64_t bad[3] = {0, 0, 0};
    const int32_t f = has_base ? 1 : 0;
    for (int64_t s = 0; s < n; s += TILE) {
        const int64_t m = (n - s < TILE) ? n - s : TILE;
        if (has_base) load(xs[0], dtype, s, m, b, &bad[0]);
        vec_tile(xs, has_base, f, dtype, s, m, b, v, bad);
        vec_tile(xs, has_base, f + 1, dtype, s, m, b, w, bad);
        for (int64_t i = 0; i < m; i++) out[s + i] = to_bf16(ra(v[i] / n1) * ra(w[i] / n2));
    }
}

/* model_stock's statistics' values, every row of a range at once (row r at out + r·n): with
 * xs[0] the base and M = K − 1 ≤ STOCK_MAXM models, rows 0..M−1 the task vectors
 * δ_k = r(x_k − x_0), then one row per pair i < j (in order) of r(δ_i·δ_j): what ws_sph_vector
 * and ws_nus_prod (unit norms) store, each input read once. With avg (not NULL), also the
 * models' mean there, r(r(Σ_k x_k) / M) (the sum from 0 in model order, each add rounded), as
 * ws_stock_mix makes it, for ws_stock_out. bad[i]: NaN/Inf of input i. */
#define STOCK_MAXM 4
WIDE_VECTORS int32_t ws_stock_rows(const void *const *xs, int32_t K, int32_t dtype, int64_t n,
                                   uint16_t *out, uint16_t *avg, int64_t *bad) {
    float b[TILE], d[STOCK_MAXM][TILE], acc[TILE];
    const int32_t M = K - 1;
    if (M < 1 || M > STOCK_MAXM) return -1;
    for (int64_t s = 0; s < n; s += TILE) {
        const int64_t m = (n - s < TILE) ? n - s : TILE;
        load(xs[0], dtype, s, m, b, &bad[0]);
        if (avg)
            for (int64_t i = 0; i < m; i++) acc[i] = 0.0f;
        for (int32_t k = 0; k < M; k++) {
            load(xs[k + 1], dtype, s, m, d[k], &bad[k + 1]);
            if (avg)
                for (int64_t i = 0; i < m; i++) acc[i] = ra(acc[i] + d[k][i]);
            for (int64_t i = 0; i < m; i++) d[k][i] = ra(d[k][i] - b[i]);
            store_kept(d[k], m, out + (int64_t)k * n, s);
        }
        int64_t row = M;
        for (int32_t i = 0; i < M; i++)
            for (int32_t j = i + 1; j < M; j++, row++) {
                uint16_t *o = out + row * n + s;
                for (int64_t t = 0; t < m; t++) o[t] = to_bf16(d[i][t] * d[j][t]);
            }
        if (avg) {
            for (int64_t i = 0; i < m; i++) acc[i] = ra(acc[i] / (float)M);
            store_kept(acc, m, avg, s);
        }
    }
    return 0;
}

/* A reduction a kernel feeds from one of the rows it writes: entries [lo, hi) of row `row`,
 * fed in order to `state` by `feed` (reduce_kernels' ws_norm_feed, ws_casc_feed). */
typedef void (*feed_fn)(void *state, const uint16_t *values, int64_t count);
typedef struct {
    int64_t row, lo, hi;
    void *state;
    feed_fn feed;
} feed_t;

/* The reductions' parts in the span [s, s + m) of the rows in scratch (row r at r·m), fed. */
static void feed_span(const feed_t *feeds, int32_t nfeeds, const uint16_t *scratch, int64_t s,
                      int64_t m) {
    for (int32_t f = 0; f < nfeeds; f++) {
        const int64_t a = feeds[f].lo > s ? feeds[f].lo : s;
        const int64_t b = feeds[f].hi < s + m ? feeds[f].hi : s + m;
        if (a < b) feeds[f].feed(feeds[f].state, scratch + feeds[f].row * m + (a - s), b - a);
    }
}

/* model_stock's statistics in one sequential pass: ws_stock_rows over spans of `step` entries
 * into `scratch` (its rows, step entries each: small enough to stay in cache), each span's
 * rows fed to the reductions at once, in order. The same values in the same order as
 * filling the whole rows first; no row of the tensor's size is stored (but avg, when not
 * NULL). Returns 0, or -1 for a model count ws_stock_rows refuses. */
int32_t ws_stock_reduce(const void *const *xs, int32_t K, int32_t dtype, int64_t n, int64_t step,
                        uint16_t *scratch, uint16_t *avg, const feed_t *feeds, int32_t nfeeds,
                        int64_t *bad) {
    const void *p[STOCK_MAXM + 1];
    const int64_t es = dtype == DT_BF16 ? 2 : 4;
    if (K - 1 < 1 || K - 1 > STOCK_MAXM || step < 1) return -1;
    for (int64_t s = 0; s < n; s += step) {
        const int64_t m = (n - s < step) ? n - s : step;
        for (int32_t k = 0; k < K; k++) p[k] = (const char *)xs[k] + s * es;
        ws_stock_rows(p, K, dtype, m, scratch, avg ? avg + s : NULL, bad);
        feed_span(feeds, nfeeds, scratch, s, m);
    }
    return 0;
}

/* Model Stock's output from ws_stock_rows' kept mean: r(r(t·avg) + r(u·b)) (b the stored
 * base, dtype), as ws_stock_mix gives it with one ratio, stored as out_dtype. Returns the
 * NaN/Inf outputs; *bad counts the base's. */
WIDE_VECTORS int64_t ws_stock_out(const uint16_t *avg, const void *base, int32_t dtype, int64_t n,
                                  float t, float u, void *out, int32_t out_dtype, int64_t *bad) {
    float b[TILE], a[TILE];
    int64_t bad_out = 0;
    for (int64_t s = 0; s < n; s += TILE) {
        const int64_t m = (n - s < TILE) ? n - s : TILE;
        load(base, dtype, s, m, b, bad);
        load_kept(avg, s, m, a);
        for (int64_t i = 0; i < m; i++) a[i] = ra(ra(t * a[i]) + ra(u * b[i]));
        bad_out += store(a, m, out, out_dtype, s);
    }
    return bad_out;
}

/* nuslerp's output: r((r(r(A·v1) + r(B·v2))) / S), or when colinear r(r(lt·v1) + r(t·v2))
 * (lt = 1 − t), plus the base r(b + ·) when there is one; stored as out_dtype. Returns the
 * NaN/Inf outputs; bad[i] counts NaN/Inf of input i. */
int64_t ws_nus_out(const void *const *xs, int32_t has_base, int32_t dtype, int64_t n, float A,
                   float B, float S, int32_t colinear, float lt, float t, void *out,
                   int32_t out_dtype, int64_t *bad) {
    float b[TILE], v[TILE], w[TILE];
    int64_t bad_out = 0;
    const int32_t f = has_base ? 1 : 0;
    for (int64_t s = 0; s < n; s += TILE) {
        const int64_t m = (n - s < TILE) ? n - s : TILE;
        if (has_base) load(xs[0], dtype, s, m, b, &bad[0]);
        vec_tile(xs, has_base, f, dtype, s, m, b, v, bad);
        vec_tile(xs, has_base, f + 1, dtype, s, m, b, w, bad);
        if (colinear)
            for (int64_t i = 0; i < m; i++) v[i] = ra(ra(lt * v[i]) + ra(t * w[i]));
        else
            for (int64_t i = 0; i < m; i++) v[i] = ra(ra(ra(A * v[i]) + ra(B * w[i])) / S);
        if (has_base)
            for (int64_t i = 0; i < m; i++) v[i] = ra(b[i] + v[i]);
        bad_out += store(v, m, out, out_dtype, s);
    }
    return bad_out;
}

/* multislerp, K task vectors v_k (of xs[f..f+K), f = has_base), ne[k] = r(‖v_k‖ + eps), w[k] the
 * bfloat16 weights. Stages of one tile, each from the previous:
 *   unit u_k = r(v_k / ne_k); mean μ = r(Σ_k r(u_k·w_k)) (float32 sum in order from 0);
 *   direction d = r(μ / mn); tangent τ = r(Σ_k r(r(u_k − r(dots_k·d))·w_k));
 *   out = r(r(r(d·c1) + r(τ·c2))·avg) (+ base: r(· + b)).
 * mode 0 writes μ, mode 1 r(u_which·d) (which < 0: every k's, row k at out + k·n), mode 2 τ
 * (bfloat16), mode 3 out (out_dtype). The stages of one tile of m entries, each from the
 * previous (w: the weights, K of them): */
WIDE_VECTORS static void ms_mean(float u[][TILE], int32_t K, const float *w, int64_t m, float *mu) {
    for (int64_t i = 0; i < m; i++) mu[i] = 0.0f;
    for (int32_t k = 0; k < K; k++)
        for (int64_t i = 0; i < m; i++) mu[i] = mu[i] + ra(u[k][i] * w[k]);
    for (int64_t i = 0; i < m; i++) mu[i] = ra(mu[i]);
}

WIDE_VECTORS static void ms_direction(float *mu, int64_t m, float mn) {
    for (int64_t i = 0; i < m; i++) mu[i] = ra(mu[i] / mn);
}

/* r(u_k·d) for k in [first, last], row k at out + (k − first)·n, each stored at entry s. */
WIDE_VECTORS static void ms_products(float u[][TILE], int32_t first, int32_t last, const float *d,
                                     int64_t m, void *out, int64_t s, int64_t n) {
    for (int32_t k = first; k <= last; k++) {
        for (int64_t i = 0; i < m; i++) u[k][i] = ra(u[k][i] * d[i]);
        store_kept(u[k], m, (uint16_t *)out + (k - first) * n, s);
    }
}

WIDE_VECTORS static void ms_tangent(float u[][TILE], int32_t K, const float *w, const float *dots,
                                    const float *d, int64_t m, float *tau) {
    for (int64_t i = 0; i < m; i++) tau[i] = 0.0f;
    for (int32_t k = 0; k < K; k++)
        for (int64_t i = 0; i < m; i++)
            tau[i] = tau[i] + ra(ra(u[k][i] - ra(dots[k] * d[i])) * w[k]);
    for (int64_t i = 0; i < m; i++) tau[i] = ra(tau[i]);
}

/* The output r(r(r(d·c1) + r(τ·c2))·avg) (+ base b: r(· + b)) into d. */
WIDE_VECTORS static void ms_output(float *d, const float *tau, const float *b, int64_t m, float c1,
                                   float c2, float avg) {
    for (int64_t i = 0; i < m; i++) d[i] = ra(ra(ra(d[i] * c1) + ra(tau[i] * c2)) * avg);
    if (b)
        for (int64_t i = 0; i < m; i++) d[i] = ra(d[i] + b[i]);
}

WIDE_VECTORS int64_t ws_ms_pass(const void *const *xs, int32_t K, int32_t has_base, int32_t dtype, int64_t n,
                   int32_t mode, int32_t which, const float *ne, const float *w, float mn,
                   const float *dots, float c1, float c2, float avg, void *out,
                   int32_t out_dtype, int64_t *bad) {
    float b[TILE], u[MAXK][TILE], acc[TILE], tau[TILE];
    int64_t bad_out = 0;
    const int32_t f = has_base ? 1 : 0;
    if (K > MAXK) return -1;
    for (int64_t s = 0; s < n; s += TILE) {
        const int64_t m = (n - s < TILE) ? n - s : TILE;
        if (has_base) load(xs[0], dtype, s, m, b, &bad[0]);
        for (int32_t k = 0; k < K; k++) {
            vec_tile(xs, has_base, f + k, dtype, s, m, b, u[k], bad);
            for (int64_t i = 0; i < m; i++) u[k][i] = ra(u[k][i] / ne[k]);
        }
        ms_mean(u, K, w, m, acc);
        if (mode == 0) {
            store(acc, m, out, DT_BF16, s);
            continue;
        }
        ms_direction(acc, m, mn);
        if (mode == 1) {
            const int32_t first = which < 0 ? 0 : which, last = which < 0 ? K - 1 : which;
            ms_products(u, first, last, acc, m, out, s, n);
            continue;
        }
        ms_tangent(u, K, w, dots, acc, m, tau);
        if (mode == 2) {
            store(tau, m, out, DT_BF16, s);
            continue;
        }
        ms_output(acc, tau, has_base ? b : NULL, m, c1, c2, avg);
        bad_out += store(acc, m, out, out_dtype, s);
    }
    return bad_out;
}

/* ws_ms_pass from K + 1 kept bfloat16 rows of n entries instead of the inputs, each pass
 * leaving in them what the next one reads (every kept value is one the stage would make
 * again, so the results are ws_ms_pass's):
 *   mode 0 (mean): rows[k] hold v_k, replaced by u_k = r(v_k / ne_k); μ to out and rows[K];
 *   mode 1 (products, every k's): reads u_k and μ; d = r(μ / mn) replaces μ in rows[K];
 *   mode 2 (tangent): reads u_k and d; τ to out and over rows[0];
 *   mode 3 (output): reads τ (rows[0]), d (rows[K]) and the stored base (dtype; NULL: none,
 *   its NaN/Inf counted in *bad). */
WIDE_VECTORS int64_t ws_ms_rows(uint16_t *const *rows, int32_t K, const void *base, int32_t dtype,
                                int64_t n, int32_t mode, const float *ne, const float *w,
                                float mn, const float *dots, float c1, float c2, float avg,
                                void *out, int32_t out_dtype, int64_t *bad) {
    float b[TILE], u[MAXK][TILE], d[TILE], tau[TILE];
    int64_t bad_out = 0;
    if (K > MAXK || mode < 0 || mode > 3) return -1;
    for (int64_t s = 0; s < n; s += TILE) {
        const int64_t m = (n - s < TILE) ? n - s : TILE;
        const int32_t units = mode == 3 ? 0 : K;
        for (int32_t k = 0; k < units; k++) load_kept(rows[k], s, m, u[k]);
        if (mode == 0) {
            for (int32_t k = 0; k < K; k++) {
                for (int64_t i = 0; i < m; i++) u[k][i] = ra(u[k][i] / ne[k]);
                store_kept(u[k], m, rows[k], s);
            }
            ms_mean(u, K, w, m, d);
            store_kept(d, m, out, s);
            store_kept(d, m, rows[K], s);
            continue;
        }
        load_kept(rows[K], s, m, d);
        if (mode == 1) {
            ms_direction(d, m, mn);
            store_kept(d, m, rows[K], s);
            ms_products(u, 0, K - 1, d, m, out, s, n);
        } else if (mode == 2) {
            ms_tangent(u, K, w, dots, d, m, tau);
            store_kept(tau, m, out, s);
            store_kept(tau, m, rows[0], s);
        } else {
            load_kept(rows[0], s, m, tau);
            if (base) load(base, dtype, s, m, b, bad);
            ms_output(d, tau, base ? b : NULL, m, c1, c2, avg);
            bad_out += store(d, m, out, out_dtype, s);
        }
    }
    return bad_out;
}

/* ws_ms_rows over the whole kept rows in spans of `step` entries (modes 0…2), each span's
 * values written to `scratch` (one row; mode 1: K rows of the span) and fed to the reductions
 * at once, in order, on this thread (see ws_stock_reduce). Returns ws_ms_rows' error (-1). */
int64_t ws_ms_reduce(uint16_t *const *rows, int32_t K, int64_t n, int32_t mode, const float *ne,
                     const float *w, float mn, const float *dots, int64_t step, uint16_t *scratch,
                     const feed_t *feeds, int32_t nfeeds) {
    uint16_t *p[MAXK + 1];
    int64_t ignored = 0;
    if (K > MAXK || mode < 0 || mode > 2 || step < 1) return -1;
    for (int64_t s = 0; s < n; s += step) {
        const int64_t m = (n - s < step) ? n - s : step;
        for (int32_t k = 0; k <= K; k++) p[k] = rows[k] + s;
        ws_ms_rows(p, K, NULL, DT_BF16, m, mode, ne, w, mn, dots, 0.0f, 0.0f, 0.0f, scratch,
                   DT_BF16, &ignored);
        feed_span(feeds, nfeeds, scratch, s, m);
    }
    return 0;
}

/* mergekit's slerp pieces (float32 arithmetic on bfloat16-rounded inputs a = xs[0], b = xs[1]):
 * mode 0: out (float32) = (a / na) · (b / nb), the products its dot sums;
 * mode 1: out = r(s0·a + s1·b) (two products, then the sum: no FMA) as out_dtype.
 * Returns the NaN/Inf outputs; bad[i] counts NaN/Inf of input i. */
int64_t ws_slerp_pass(const void *const *xs, int32_t dtype, int64_t n, int32_t mode, float na,
                      float nb, float s0, float s1, void *out, int32_t out_dtype, int64_t *bad) {
    float a[TILE], b[TILE];
    int64_t bad_out = 0;
    for (int64_t s = 0; s < n; s += TILE) {
        const int64_t m = (n - s < TILE) ? n - s : TILE;
        load(xs[0], dtype, s, m, a, &bad[0]);
        load(xs[1], dtype, s, m, b, &bad[1]);
        if (mode == 0) {
            for (int64_t i = 0; i < m; i++) a[i] = (a[i] / na) * (b[i] / nb);
            store(a, m, out, DT_F32, s);
        } else {
            for (int64_t i = 0; i < m; i++) a[i] = ra(s0 * a[i] + s1 * b[i]);
            bad_out += store(a, m, out, out_dtype, s);
        }
    }
    return bad_out;
}

/* arcee_fusion's output for entries [offset, offset + n) (xs[0] the base B, xs[1] the model X,
 * pointing at entry offset): δ = r(X − B), importance r(|δ|·kl[row]) with row = entry / cols,
 * out = B + δ·[importance ≥ thr] in float32 (mergekit's float mask), stored as out_dtype. */
int64_t ws_fusion_out(const void *const *xs, int32_t dtype, int64_t n, int64_t offset,
                      int64_t cols, const float *kl, float thr, void *out, int32_t out_dtype,
                      int64_t *bad) {
    float b[TILE], x[TILE], k[TILE];
    int64_t bad_out = 0, row = offset / cols, col = offset % cols;
    for (int64_t s = 0; s < n; s += TILE) {
        const int64_t m = (n - s < TILE) ? n - s : TILE;
        load(xs[0], dtype, s, m, b, &bad[0]);
        load(xs[1], dtype, s, m, x, &bad[1]);
        for (int64_t i = 0; i < m; i++) { /* each entry's row, without a division per entry */
            k[i] = kl[row];
            if (++col == cols) {
                col = 0;
                row++;
            }
        }
        for (int64_t i = 0; i < m; i++) {
            const float d = r(x[i] - b[i]);
            const float imp = r(fabsf(d) * k[i]);
            const float mask = imp >= thr ? 1.0f : 0.0f;
            x[i] = b[i] + d * mask;
        }
        bad_out += store(x, m, out, out_dtype, s);
    }
    return bad_out;
}

/* arcee_fusion's importances at sampled entries: out[i] = r(|r(X[j] − B[j])| · kl[j / cols]) for
 * j = idx[i] (xs as in ws_fusion_out, pointing at entry 0; kl float32 per row, bfloat16 values):
 * what mergekit's gathers and bfloat16 ops give for its quantile sample. */
void ws_fusion_sampled(const void *const *xs, int32_t dtype, const int64_t *idx, int64_t m,
                       int64_t cols, const float *kl, uint16_t *out) {
    const double inv = 1.0 / (double)cols; /* j / cols without an integer division per entry */
    for (int64_t i = 0; i < m; i++) {
        const int64_t j = idx[i];
        int64_t row = (int64_t)((double)j * inv);
        row -= row * cols > j;
        row += (row + 1) * cols <= j;
        float b, x;
        if (dtype == DT_BF16) {
            b = from_bf16(((const uint16_t *)xs[0])[j]);
            x = from_bf16(((const uint16_t *)xs[1])[j]);
        } else {
            b = r(((const float *)xs[0])[j]);
            x = r(((const float *)xs[1])[j]);
        }
        out[i] = to_bf16(fabsf(r(x - b)) * kl[row]);
    }
}

/* idx[0..m) (flat indices below n) reordered by block (j >> shift), each block's indices in
 * their first order, into out: a counting sort, so that a gather over out walks memory forward
 * instead of at random. Returns 0, or -1 when the counts cannot be allocated. */
int32_t ws_block_order(const int64_t *idx, int64_t m, int64_t n, int32_t shift, int64_t *out) {
    const int64_t blocks = ((n - 1) >> shift) + 2;
    int64_t *start = calloc((size_t)blocks, sizeof *start);
    if (!start) return -1;
    for (int64_t i = 0; i < m; i++) start[(idx[i] >> shift) + 1]++;
    for (int64_t b = 1; b < blocks; b++) start[b] += start[b - 1];
    for (int64_t i = 0; i < m; i++) out[start[idx[i] >> shift]++] = idx[i];
    free(start);
    return 0;
}

/* count[key] += how many of x[0..n) (bfloat16) have each bit pattern, under an
 * order-preserving key (−0 before +0; NaN last, as torch.sort puts it). */
void ws_bf16_count(const uint16_t *x, int64_t n, int64_t *count) {
    for (int64_t i = 0; i < n; i++) {
        const uint16_t h = x[i];
        const int nan = (h & 0x7FFFu) > 0x7F80u;
        count[nan ? 0xFFFFu : (h & 0x8000u) ? (uint16_t)~h : (uint16_t)(h | 0x8000u)]++;
    }
}

/* The values at 0-based ranks[0..k) of the values counted by ws_bf16_count, sorted ascending
 * (±0 are equal, so any sort's value at a rank is the same number): one scan per rank. */
void ws_count_ranks(const int64_t *count, const int64_t *ranks, int32_t k, uint16_t *out) {
    for (int32_t q = 0; q < k; q++) {
        int64_t seen = 0;
        uint32_t key = 0;
        while (key < 65535u && seen + count[key] <= ranks[q]) seen += count[key++];
        out[q] = (key & 0x8000u) ? (uint16_t)(key & 0x7FFFu) : (uint16_t)~key;
    }
}
