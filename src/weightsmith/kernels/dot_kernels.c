/* torch's CPU dot and float32 norm of bfloat16 vectors, in the order torch computes them here, so
 * their bits match (mergekit's Karcher mean takes both in every iteration).
 *
 * dot: torch.dot of two contiguous bfloat16 vectors of more than 4096 entries runs oneDNN's
 * matmul (1 x n times n x 1). On an AMX machine that is brgemm with tile dot products, whose
 * order was read from probes whose cancellation shows which partial sums meet (see dot.py):
 *  - entries go by groups of 32 (a tile row; the last group padded with zeros);
 *  - a group's sum is (p0 + p2 + ... + p30) + (p1 + p3 + ... + p31), each chain in order;
 *  - the group sums are added in order into a chunk sum that starts from zero every `cg` groups
 *    (oneDNN's K chunks), and the chunk sums are added in order into the total;
 *  - inputs, products and sums flush denormals to zero (DAZ/FTZ, as AMX does);
 *  - the total is rounded to bfloat16.
 * The Python side finds `cg` for each length with probes and checks the whole order against
 * torch before it uses it; torch runs wherever it does not match.
 *
 * norm: torch.linalg.vector_norm(x.to(float32)) of a contiguous vector reduced to one value (the
 * vectorized last-dimension loop of ReduceOpsKernel.cpp, one thread): lane l of one vector of L
 * float lanes sums x[b + l]^2 over the blocks b = 0, L, 2L, ... in order; the lanes are added in
 * order into lane 0; the tail's squares follow one by one; then sqrt. L (8 or 16) is measured.
 * Squares of bfloat16 values are exact in float32.
 *
 * Build with -ffp-contract=off.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#define FTZ_DAZ 0x8040u /* MXCSR: flush-to-zero (bit 15), denormals-are-zero (bit 6) */
#define SAVE_CSR unsigned csr_ = _mm_getcsr(); _mm_setcsr(csr_ | FTZ_DAZ)
#define RESTORE_CSR _mm_setcsr(csr_)
#define HAVE_FTZ 1
#else
#define SAVE_CSR
#define RESTORE_CSR
#define HAVE_FTZ 0
#endif

#define GROUP 32
#define MAXK 64
#define ILP 4 /* groups summed side by side: independent chains */

int ws_dot_abi(void) { return 1; }
int ws_dot_max_units(void) { return MAXK; }
int ws_dot_has_ftz(void) { return HAVE_FTZ; }

/* The sum of group g (entries [32g, 32g + 32) of x·u, zeros past n). */
static float group_tail(const uint16_t *x, const uint16_t *u, int64_t g, int64_t n) {
    float e = 0.0f, o = 0.0f;
    for (int t = 0; t < GROUP; t += 2) {
        const int64_t i = g * GROUP + t;
        const float pe = i < n ? from_bf16(x[i]) * from_bf16(u[i]) : 0.0f;
        const float po = i + 1 < n ? from_bf16(x[i + 1]) * from_bf16(u[i + 1]) : 0.0f;
        e = t ? e + pe : pe;
        o = t ? o + po : po;
    }
    return e + o;
}

/* ILP full groups from g: out[0..ILP) = their sums. */
static inline void groups_ilp(const uint16_t *x, const uint16_t *u, int64_t g, float *out) {
    float e[ILP], o[ILP];
    for (int q = 0; q < ILP; q++) {
        const int64_t i = (g + q) * GROUP;
        e[q] = from_bf16(x[i]) * from_bf16(u[i]);
        o[q] = from_bf16(x[i + 1]) * from_bf16(u[i + 1]);
    }
    for (int t = 2; t < GROUP; t += 2)
        for (int q = 0; q < ILP; q++) {
            const int64_t i = (g + q) * GROUP + t;
            e[q] = e[q] + from_bf16(x[i]) * from_bf16(u[i]);
            o[q] = o[q] + from_bf16(x[i + 1]) * from_bf16(u[i + 1]);
        }
    for (int q = 0; q < ILP; q++) out[q] = e[q] + o[q];
}

/* Chunk sums of x·u_j for the chunks [c0, c1) of cg groups each of an n-entry vector:
 * out[j·ld + c − c0] (each from zero, its group sums added in order); first, when div > 0,
 * x = bf16(x / div) in place over those chunks (torch's bfloat16 tensor divided by a float32
 * scalar, without flushing: a caller's renormalization fused into the pass). */
void ws_dot_chunks(uint16_t *x, const uint16_t *const *u, int32_t k, int64_t n, int64_t cg,
                   int64_t c0, int64_t c1, float div, float *out, int64_t ld) {
    const int64_t groups = (n + GROUP - 1) / GROUP, full = n / GROUP;
    const int64_t g0 = c0 * cg, g1 = c1 * cg < groups ? c1 * cg : groups;
    if (div > 0.0f) {
        const int64_t e = g1 * GROUP < n ? g1 * GROUP : n;
        for (int64_t i = g0 * GROUP; i < e; i++) x[i] = to_bf16(from_bf16(x[i]) / div);
    }
    SAVE_CSR;
    for (int32_t j = 0; j < k; j++)
        for (int64_t c = c0; c < c1; c++) {
            const int64_t e = (c + 1) * cg < groups ? (c + 1) * cg : groups;
            float chunk = 0.0f, g4[ILP];
            int64_t g = c * cg;
            for (; g + ILP <= e && g + ILP <= full; g += ILP) {
                groups_ilp(x, u[j], g, g4);
                for (int q = 0; q < ILP; q++) chunk = chunk + g4[q];
            }
            for (; g < e; g++) chunk = chunk + group_tail(x, u[j], g, n);
            out[j * ld + c - c0] = chunk;
        }
    RESTORE_CSR;
}

/* The total of n chunk sums, added in order from zero. */
float ws_dot_total(const float *s, int64_t n) {
    SAVE_CSR;
    float total = 0.0f;
    for (int64_t c = 0; c < n; c++) total = total + s[c];
    RESTORE_CSR;
    return total;
}

/* The norm as a streaming consumer: values fed in order, in spans of any length (a caller can
 * feed values it computes span by span without storing the whole vector). */
typedef struct {
    int32_t lanes;
    int64_t n, seen;
    float acc[16];
    float tail[16]; /* the last n % lanes values, added one by one after the lanes */
} norm_state;

int64_t ws_dot_norm_state_size(void) { return (int64_t)sizeof(norm_state); }

/* 0, or -1 for a lane count torch's kernels do not have. */
int32_t ws_dot_norm_start(norm_state *st, int64_t n, int32_t lanes) {
    if (lanes != 8 && lanes != 16) return -1;
    memset(st, 0, sizeof *st);
    st->lanes = lanes;
    st->n = n;
    return 0;
}

static void norm_blocks(float *acc, const uint16_t *x, int64_t m, int32_t lanes) {
    if (lanes == 8) {
        for (int64_t b = 0; b < m; b += 8)
            for (int l = 0; l < 8; l++) {
                const float v = from_bf16(x[b + l]);
                acc[l] = acc[l] + v * v;
            }
    } else {
        for (int64_t b = 0; b < m; b += 16)
            for (int l = 0; l < 16; l++) {
                const float v = from_bf16(x[b + l]);
                acc[l] = acc[l] + v * v;
            }
    }
}

void ws_dot_norm_feed(norm_state *st, const uint16_t *x, int64_t m) {
    const int64_t full = st->n - st->n % st->lanes;
    int64_t i = 0;
    for (; i < m && st->seen % st->lanes && st->seen < full; i++, st->seen++) {
        const float v = from_bf16(x[i]);
        st->acc[st->seen % st->lanes] += v * v;
    }
    int64_t run = m - i < full - st->seen ? m - i : full - st->seen;
    run -= run % st->lanes;
    if (run > 0) {
        norm_blocks(st->acc, x + i, run, st->lanes);
        i += run;
        st->seen += run;
    }
    for (; i < m; i++, st->seen++) {
        const float v = from_bf16(x[i]);
        if (st->seen < full)
            st->acc[st->seen % st->lanes] += v * v;
        else
            st->tail[st->seen - full] = v * v;
    }
}

float ws_dot_norm_end(const norm_state *st) {
    float s = st->acc[0];
    for (int l = 1; l < st->lanes; l++) s = s + st->acc[l];
    for (int64_t j = 0; j < st->n % st->lanes; j++) s = s + st->tail[j];
    return sqrtf(s);
}

/* torch.linalg.vector_norm(x.to(float32)) with `lanes` float lanes (-1: unsupported count). */
float ws_dot_norm_f32(const uint16_t *x, int64_t n, int32_t lanes) {
    norm_state st;
    if (ws_dot_norm_start(&st, n, lanes)) return -1.0f;
    ws_dot_norm_feed(&st, x, n);
    return ws_dot_norm_end(&st);
}
