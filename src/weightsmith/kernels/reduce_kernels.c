/* torch's CPU reductions of bfloat16 tensors, in torch's own order, so their bits match.
 *
 * Two reductions, each written as a streaming consumer that takes the values in order in spans
 * of any length (so a kernel can feed it values it computes on the fly, never storing the
 * tensor torch would reduce):
 *
 *  - norm: torch.norm of a contiguous bfloat16 row (the vectorized last-dimension norm of
 *    ReduceOpsKernel.cpp): one float accumulator of W lanes; each vector of 2W bfloat16 values
 *    adds its low half squared, then its high half squared (a bfloat16 square is exact in
 *    float, so fused multiply-adds would give the same sums but for underflow);
 *    the lanes summed in order into lane 0, the scalar tail's squares added, sqrt, bfloat16.
 *  - cascade: the float sum of one contiguous bfloat16 part as SumKernel.cpp's cascade_sum
 *    computes it (vectorized_inner_sum -> row_sum -> multi_row_sum, 4 ILP rows, 4 levels; each
 *    load is the low half + the high half of a 2W-value vector, in float).
 *
 * W is the float lane count of torch's CPU capability (16 for AVX512, 8 for AVX2). The Python
 * side splits a whole-tensor sum into torch's per-thread parts and rounds as torch does; it
 * checks these against torch itself before using them. Build with -ffp-contract=off.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define MAXW 16
#define LEVELS 4
#define ILP 4

int ws_reduce_abi(void) { return 1; }

static inline float r(float f) { return bf16_round(f); }

/* ---------------------------------------------------------------- norm consumer */

typedef struct {
    int w;
    int64_t n, seen;  /* row length, values consumed */
    int npend;
    uint16_t pend[2 * MAXW];
    float acc[MAXW];
} norm_t;

static void norm_init(norm_t *s, int64_t n, int w) {
    memset(s, 0, sizeof *s);
    s->n = n, s->w = w;
}

static inline void norm_vec_w(float *acc, const uint16_t *v, const int w) {
    for (int l = 0; l < w; l++) acc[l] += from_bf16(v[l]) * from_bf16(v[l]);
    for (int l = 0; l < w; l++) acc[l] += from_bf16(v[w + l]) * from_bf16(v[w + l]);
}

/* One vector; the lane count as a constant so each width compiles to straight vector code. */
static inline void norm_vec(norm_t *s, const uint16_t *v) {
    if (s->w == 8)
        norm_vec_w(s->acc, v, 8);
    else
        norm_vec_w(s->acc, v, 16);
}

/* Values [seen, seen + m) of the row. */
static void norm_feed(norm_t *s, const uint16_t *v, int64_t m) {
    const int64_t vl = 2 * s->w, vend = s->n - s->n % vl;
    int64_t i = 0;
    while (i < m && s->npend > 0 && s->seen < vend) { /* complete a pending vector */
        s->pend[s->npend++] = v[i++], s->seen++;
        if (s->npend == vl) norm_vec(s, s->pend), s->npend = 0;
    }
    for (; i + vl <= m && s->seen + vl <= vend; i += vl, s->seen += vl) norm_vec(s, v + i);
    for (; i < m; i++, s->seen++) s->pend[s->npend++] = v[i]; /* a partial vector or the tail */
}

static float norm_finish(norm_t *s) {
    float b0 = s->acc[0];
    for (int l = 1; l < s->w; l++) b0 = b0 + s->acc[l];
    for (int j = 0; j < s->npend; j++) {
        float x = from_bf16(s->pend[j]);
        b0 = b0 + x * x;
    }
    return r(sqrtf(b0));
}

/* ---------------------------------------------------------------- cascade consumer */

typedef struct {
    int w, npend, collapsed;
    int64_t n, seen, vec_size, size_ilp, step, mask, power;
    float tail;
    uint16_t pend[2 * MAXW];
    float acc[LEVELS][ILP][MAXW];
} casc_t;

static int64_t ceil_log2(int64_t x) {
    if (x <= 2) return 1;
    return 64 - __builtin_clzll((uint64_t)(x - 1));
}

static void casc_init(casc_t *s, int64_t n, int w) {
    memset(s, 0, sizeof *s);
    s->n = n, s->w = w;
    s->vec_size = n / (2 * w);
    s->size_ilp = s->vec_size / ILP;
    s->power = ceil_log2(s->size_ilp) / LEVELS;
    if (s->power < 4) s->power = 4;
    s->step = (int64_t)1 << s->power;
    s->mask = s->step - 1;
}

static void casc_collapse(casc_t *s) {
    for (int j = 1; j < LEVELS; j++)
        for (int k = 0; k < ILP; k++)
            for (int l = 0; l < s->w; l++) s->acc[0][k][l] += s->acc[j][k][l];
    s->collapsed = 1;
}

/* a += the vector's low half + its high half (one load of the cascade), in float. */
static inline void load_add(float *a, const uint16_t *v, const int w) {
    for (int l = 0; l < w; l++) a[l] += from_bf16(v[l]) + from_bf16(v[w + l]);
}

/* Vector number vi (its 2W values at v). */
static inline void casc_vec(casc_t *s, int64_t vi, const uint16_t *v) {
    const int w = s->w;
    if (vi < s->size_ilp * ILP) {
        float *a = s->acc[0][vi % ILP];
        if (w == 8)
            load_add(a, v, 8);
        else
            load_add(a, v, 16);
        if (vi % ILP != ILP - 1) return;
        int64_t groups = vi / ILP + 1;
        if (groups % s->step != 0) return; /* a level step completes: carry up */
        for (int j = 1; j < LEVELS; j++) {
            for (int k = 0; k < ILP; k++)
                for (int l = 0; l < w; l++) {
                    s->acc[j][k][l] += s->acc[j - 1][k][l];
                    s->acc[j - 1][k][l] = 0.0f;
                }
            if ((groups & (s->mask << (j * s->power))) != 0) break;
        }
        return;
    }
    if (!s->collapsed) casc_collapse(s);
    if (w == 8)
        load_add(s->acc[0][0], v, 8);
    else
        load_add(s->acc[0][0], v, 16);
}

static void casc_feed(casc_t *s, const uint16_t *v, int64_t m) {
    const int64_t vl = 2 * s->w, vend = s->vec_size * vl;
    int64_t i = 0;
    while (i < m && s->npend > 0 && s->seen < vend) {
        s->pend[s->npend++] = v[i++], s->seen++;
        if (s->npend == vl) casc_vec(s, s->seen / vl - 1, s->pend), s->npend = 0;
    }
    for (; i + vl <= m && s->seen + vl <= vend; i += vl, s->seen += vl)
        casc_vec(s, s->seen / vl, v + i);
    for (; i < m && s->seen < vend; i++, s->seen++) s->pend[s->npend++] = v[i];
    for (; i < m; i++, s->seen++) s->tail += from_bf16(v[i]); /* the scalar tail */
}

/* The part's float sum (torch then adds it to its bfloat16 slot). */
static float casc_finish(casc_t *s) {
    if (!s->collapsed) casc_collapse(s);
    for (int k = 1; k < ILP; k++)
        for (int l = 0; l < s->w; l++) s->acc[0][0][l] += s->acc[0][k][l];
    float f = s->tail;
    for (int l = 0; l < s->w; l++) f += s->acc[0][0][l];
    return f;
}

/* ---------------------------------------------------------------- entry points */

/* Streaming: the caller holds the state (ws_*_state_size bytes) and feeds the values in order. */
int64_t ws_norm_state_size(void) { return sizeof(norm_t); }
void ws_norm_start(norm_t *s, int64_t n, int32_t w) { norm_init(s, n, w); }
void ws_norm_feed(norm_t *s, const uint16_t *v, int64_t m) { norm_feed(s, v, m); }
float ws_norm_end(norm_t *s) { return norm_finish(s); }

int64_t ws_casc_state_size(void) { return sizeof(casc_t); }
void ws_casc_start(casc_t *s, int64_t n, int32_t w) { casc_init(s, n, w); }
void ws_casc_feed(casc_t *s, const uint16_t *v, int64_t m) { casc_feed(s, v, m); }
float ws_casc_end(casc_t *s) { return casc_finish(s); }

/* torch's final reduction of its per-thread bfloat16 slots (t < 2W of them, so the scalar
 * row_sum: 4 ILP partial sums, the rest added to the first), rounded to bfloat16. */
float ws_bf16_combine(const float *parts, int32_t t) {
    float p[ILP] = {0.0f, 0.0f, 0.0f, 0.0f};
    int64_t size_ilp = t / ILP, i = 0;
    for (; i < size_ilp * ILP; i++) p[i % ILP] += r(parts[i]);
    for (; i < t; i++) p[0] += r(parts[i]);
    for (int k = 1; k < ILP; k++) p[0] += p[k];
    return r(0.0f + p[0]);
}
