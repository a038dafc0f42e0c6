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
/* Bytes a consumer prefetches ahead of what it reads: the values it reduces were just written
 * by other threads into buffers larger than a core's L2, and the hardware prefetchers alone
 * leave each 4 KB page starting with misses (a norm of 11.5M values from L3: 0.45 -> 0.26 ns
 * a value). */
#define AHEAD 2048
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

/* nvec whole vectors at v, the accumulator in a local (a register) for the whole run instead of
 * a load and store through the state per vector: the same adds in the same order. */
static inline void norm_run_w(float *state_acc, const uint16_t *v, int64_t nvec, const int w) {
    float acc[MAXW];
    memcpy(acc, state_acc, sizeof acc);
    for (int64_t j = 0; j < nvec; j++) {
        if (((j * 4 * w) & 63) == 0) __builtin_prefetch(v + j * 2 * w + AHEAD / 2);
        norm_vec_w(acc, v + j * 2 * w, w);
    }
    memcpy(state_acc, acc, sizeof acc);
}

/* nvec vectors; the lane count as a constant so each width compiles to straight vector code. */
static void norm_run(norm_t *s, const uint16_t *v, int64_t nvec) {
    if (s->w == 8)
        norm_run_w(s->acc, v, nvec, 8);
    else
        norm_run_w(s->acc, v, nvec, 16);
}

static inline void norm_vec(norm_t *s, const uint16_t *v) { norm_run(s, v, 1); }

/* Values [seen, seen + m) of the row. */
static void norm_feed(norm_t *s, const uint16_t *v, int64_t m) {
    const int64_t vl = 2 * s->w, vend = s->n - s->n % vl;
    int64_t i = 0;
    while (i < m && s->npend > 0 && s->seen < vend) { /* complete a pending vector */
        s->pend[s->npend++] = v[i++], s->seen++;
        if (s->npend == vl) norm_vec(s, s->pend), s->npend = 0;
    }
    if (s->seen < vend) { /* the whole vectors of this span, in one run */
        int64_t nvec = (m - i) / vl;
        if (nvec > (vend - s->seen) / vl) nvec = (vend - s->seen) / vl;
        norm_run(s, v + i, nvec);
        i += nvec * vl, s->seen += nvec * vl;
    }
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

/* The values are bfloat16 (esize 2: each load of the cascade is a 2W-value vector, its low
 * half + its high half in float) or float32 (esize 4: a W-value vector). */
typedef struct {
    int w, npend, collapsed, esize;
    int64_t n, seen, vl, vec_size, size_ilp, step, mask, power;
    float tail, scalar[ILP]; /* scalar: torch's row_sum of a part shorter than one vector */
    unsigned char pend[2 * MAXW * 4];
    float acc[LEVELS][ILP][MAXW];
} casc_t;

static int64_t ceil_log2(int64_t x) {
    if (x <= 2) return 1;
    return 64 - __builtin_clzll((uint64_t)(x - 1));
}

static void casc_init(casc_t *s, int64_t n, int w, int esize) {
    memset(s, 0, sizeof *s);
    s->n = n, s->w = w, s->esize = esize;
    s->vl = esize == 2 ? 2 * w : w;
    s->vec_size = n / s->vl;
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

/* a += one load of the cascade at v. */
static inline void load_add(float *a, const void *v, const int w, const int esize) {
    if (esize == 2) {
        const uint16_t *h = (const uint16_t *)v;
        for (int l = 0; l < w; l++) a[l] += from_bf16(h[l]) + from_bf16(h[w + l]);
    } else {
        const float *f = (const float *)v;
        for (int l = 0; l < w; l++) a[l] += f[l];
    }
}

/* load_add with the width and element size as constants (straight vector code for each). */
static inline void load_add_s(const casc_t *s, float *a, const void *v) {
    if (s->esize == 2)
        s->w == 8 ? load_add(a, v, 8, 2) : load_add(a, v, 16, 2);
    else
        s->w == 8 ? load_add(a, v, 8, 4) : load_add(a, v, 16, 4);
}

/* After `groups` whole groups of ILP vectors: when a level step completes, carry up. */
static void casc_carry(casc_t *s, int64_t groups) {
    if (groups % s->step != 0) return;
    for (int j = 1; j < LEVELS; j++) {
        for (int k = 0; k < ILP; k++)
            for (int l = 0; l < s->w; l++) {
                s->acc[j][k][l] += s->acc[j - 1][k][l];
                s->acc[j - 1][k][l] = 0.0f;
            }
        if ((groups & (s->mask << (j * s->power))) != 0) break;
    }
}

/* ngroups whole groups of ILP vectors at v, the first group number g0: the level-0
 * accumulators in a local (registers) between carries instead of a load and store through the
 * state per vector; the same adds in the same order. */
static inline void casc_run_w(casc_t *s, const unsigned char *v, int64_t g0, int64_t ngroups,
                              const int w, const int esize) {
    const int64_t vbytes = (esize == 2 ? 2 * w : w) * esize;
    float a[ILP][MAXW];
    memcpy(a, s->acc[0], sizeof a);
    for (int64_t g = 0; g < ngroups; g++) {
        for (int64_t o = 0; o < ILP * vbytes; o += 64) __builtin_prefetch(v + g * ILP * vbytes + AHEAD + o);
        for (int k = 0; k < ILP; k++) load_add(a[k], v + (g * ILP + k) * vbytes, w, esize);
        if ((g0 + g + 1) % s->step == 0) {
            memcpy(s->acc[0], a, sizeof a);
            casc_carry(s, g0 + g + 1);
            memcpy(a, s->acc[0], sizeof a);
        }
    }
    memcpy(s->acc[0], a, sizeof a);
}

static void casc_run(casc_t *s, const unsigned char *v, int64_t g0, int64_t ngroups) {
    if (s->esize == 2)
        s->w == 8 ? casc_run_w(s, v, g0, ngroups, 8, 2) : casc_run_w(s, v, g0, ngroups, 16, 2);
    else
        s->w == 8 ? casc_run_w(s, v, g0, ngroups, 8, 4) : casc_run_w(s, v, g0, ngroups, 16, 4);
}

/* Vector number vi (its values at v). */
static inline void casc_vec(casc_t *s, int64_t vi, const void *v) {
    if (vi < s->size_ilp * ILP) {
        load_add_s(s, s->acc[0][vi % ILP], v);
        if (vi % ILP == ILP - 1) casc_carry(s, vi / ILP + 1);
        return;
    }
    if (!s->collapsed) casc_collapse(s);
    load_add_s(s, s->acc[0][0], v);
}

static inline float value_at(const casc_t *s, const unsigned char *v, int64_t i) {
    if (s->esize == 2) {
        uint16_t h;
        memcpy(&h, v + i * 2, sizeof h);
        return from_bf16(h);
    }
    float f;
    memcpy(&f, v + i * 4, sizeof f);
    return f;
}

static void casc_feed(casc_t *s, const void *data, int64_t m) {
    const unsigned char *v = (const unsigned char *)data;
    const int64_t vl = s->vl, vend = s->vec_size * vl, es = s->esize;
    int64_t i = 0;
    while (i < m && s->npend > 0 && s->seen < vend) {
        memcpy(s->pend + s->npend++ * es, v + i++ * es, (size_t)es), s->seen++;
        if (s->npend == vl) casc_vec(s, s->seen / vl - 1, s->pend), s->npend = 0;
    }
    /* whole vectors up to a group boundary, whole groups in one run, then the rest */
    for (; i + vl <= m && s->seen + vl <= vend && (s->seen / vl) % ILP != 0; i += vl, s->seen += vl)
        casc_vec(s, s->seen / vl, v + i * es);
    if (i + vl <= m && s->seen / vl < s->size_ilp * ILP) {
        const int64_t gl = ILP * vl, g0 = s->seen / gl;
        int64_t ngroups = (m - i) / gl;
        if (ngroups > s->size_ilp - g0) ngroups = s->size_ilp - g0;
        casc_run(s, v + i * es, g0, ngroups);
        i += ngroups * gl, s->seen += ngroups * gl;
    }
    for (; i + vl <= m && s->seen + vl <= vend; i += vl, s->seen += vl)
        casc_vec(s, s->seen / vl, v + i * es);
    for (; i < m && s->seen < vend; i++, s->seen++)
        memcpy(s->pend + s->npend++ * es, v + i * es, (size_t)es);
    if (s->vec_size == 0) { /* shorter than one vector: torch's scalar row_sum, 4 ILP sums */
        const int64_t whole = s->n / ILP * ILP;
        for (; i < m; i++, s->seen++)
            s->scalar[s->seen < whole ? s->seen % ILP : 0] += value_at(s, v, i);
        return;
    }
    for (; i < m; i++, s->seen++) s->tail += value_at(s, v, i); /* the scalar tail */
}

/* The part's float sum (torch then adds it to its slot). */
static float casc_finish(casc_t *s) {
    if (s->vec_size == 0) {
        float f = s->scalar[0];
        for (int k = 1; k < ILP; k++) f += s->scalar[k];
        return f;
    }
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
void ws_casc_start(casc_t *s, int64_t n, int32_t w) { casc_init(s, n, w, 2); }
void ws_casc_feed(casc_t *s, const uint16_t *v, int64_t m) { casc_feed(s, v, m); }
float ws_casc_end(casc_t *s) { return casc_finish(s); }

/* The same cascade over float32 values (torch's sum of a float32 part). */
int64_t ws_casc32_state_size(void) { return sizeof(casc_t); }
void ws_casc32_start(casc_t *s, int64_t n, int32_t w) { casc_init(s, n, w, 4); }
void ws_casc32_feed(casc_t *s, const float *v, int64_t m) { casc_feed(s, v, m); }
float ws_casc32_end(casc_t *s) { return casc_finish(s); }

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
