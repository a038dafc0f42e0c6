/* Kernels for mergekit's bfloat16 arithmetic, op by op: its sort-masked task-vector methods
 * (TIES, breadcrumbs: 1 below; their masked arithmetic is ws_narrow_gta in merge_kernels.c) and
 * the Karcher mean's elementwise steps (2).
 *
 * 1. Which entries land in a range of positions when torch sorts a CPU tensor, without sorting.
 *
 * torch's CPU sort with stable=False (what torch.sort / torch.argsort run by default) is
 * libstdc++'s std::sort over (value, index) pairs with a comparator on the value alone, so its
 * pick among equal values is a fixed function of the input: introsort (median-of-three
 * quicksort with Hoare partitioning, ranges of <= 16 left for one final insertion sort, heap
 * sort past a depth limit of 2*floor(log2 n)). mergekit keeps `argsort(|δ|)[:k]` of a bfloat16
 * task vector, whose many equal magnitudes make that pick matter bit for bit.
 *
 * ws_sort_select replays the same partition steps but follows only the ranges that straddle a
 * wanted boundary position: a partition never moves an element across its cut afterwards,
 * and the final insertion sort only reorders each <= 16 range in place (it is stable, and no
 * element is smaller than one in a range to its left), so the set of elements in any range of
 * positions is decided without sorting the rest. Expected O(n) instead of O(n log n). When the
 * depth limit would be reached inside a straddling range (libstdc++ heap-sorts it there; no
 * input seen in practice), it returns 1 and the caller sorts with torch instead.
 *
 * Keys are 16-bit (the magnitude bits of a bfloat16, monotone in the value; a descending sort
 * is an ascending one of 0x7FFF - key), indices 32-bit.
 */
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define THRESHOLD 16

int ws_narrow_abi_version(void) { return 1; }


enum { DT_F32 = 0, DT_BF16 = 1 }; /* storage types read or written directly */


/* Value i of a stored range rounded to bfloat16 (mergekit's load cast), as a float; *bad counts
 * NaN/Inf. */
static inline float load_bf16(const void *p, int32_t dtype, int64_t i, int64_t *bad) {
    if (dtype == DT_BF16) {
        uint16_t h = ((const uint16_t *)p)[i];
        *bad += (h & 0x7F80u) == 0x7F80u;
        return from_bf16(h);
    }
    float f = ((const float *)p)[i];
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    *bad += (u & 0x7F800000u) == 0x7F800000u;
    return bf16_round(f);
}

/* Keys of |x − base| for a stored range (DT_F32 / DT_BF16) at flat `offset`: both rounded to
 * bfloat16, subtracted as torch subtracts bfloat16 (in float32, rounded), magnitude bits
 * (monotone in |δ|; an overflow to Inf stays the largest). `descending` stores 0x7FFF − key.
 * bad[0], bad[1]: NaN/Inf counts of base and x. */
void ws_absdelta_keys(const void *base, const void *x, int32_t dtype, int64_t n, int64_t offset,
                      int32_t descending, uint16_t *keys, uint32_t *idx, int64_t *bad) {
    const int32_t c = descending ? 0x7FFF : 0, sgn = descending ? -1 : 1; /* key: c + sgn·k */
    int64_t bb = 0, bx = 0;
    uint16_t *kk = keys + offset;
    uint32_t *ii = idx + offset;
    if (dtype == DT_BF16) {
        const uint16_t *pb = (const uint16_t *)base, *px = (const uint16_t *)x;
        for (int64_t i = 0; i < n; i++) {
            bb += (pb[i] & 0x7F80u) == 0x7F80u;
            bx += (px[i] & 0x7F80u) == 0x7F80u;
            uint16_t k = to_bf16(from_bf16(px[i]) - from_bf16(pb[i])) & 0x7FFFu;
            kk[i] = (uint16_t)(c + sgn * (int32_t)k);
        }
    } else {
        const float *pb = (const float *)base, *px = (const float *)x;
        for (int64_t i = 0; i < n; i++) {
            float b = load_bf16(pb, DT_F32, i, &bb), v = load_bf16(px, DT_F32, i, &bx);
            uint16_t k = to_bf16(v - b) & 0x7FFFu;
            kk[i] = (uint16_t)(c + sgn * (int32_t)k);
        }
    }
    for (int64_t i = 0; i < n; i++) ii[i] = (uint32_t)(offset + i);
    bad[0] = bb;
    bad[1] = bx;
}

static inline void swap_at(uint16_t *k, uint32_t *ix, int64_t a, int64_t b) {
    uint16_t tk = k[a];
    k[a] = k[b];
    k[b] = tk;
    uint32_t ti = ix[a];
    ix[a] = ix[b];
    ix[b] = ti;
}

/* std::__move_median_to_first(result, a, b, c) with comp = operator<. */
static void median_to_first(uint16_t *k, uint32_t *ix, int64_t r, int64_t a, int64_t b,
                            int64_t c) {
    if (k[a] < k[b]) {
        if (k[b] < k[c]) swap_at(k, ix, r, b);
        else if (k[a] < k[c]) swap_at(k, ix, r, c);
        else swap_at(k, ix, r, a);
    } else if (k[a] < k[c]) swap_at(k, ix, r, a);
    else if (k[b] < k[c]) swap_at(k, ix, r, c);
    else swap_at(k, ix, r, b);
}

#define BLOCK 128

/* std::__unguarded_partition_pivot(first, last), with its scans done a block at a time.
 *
 * Hoare's loop swaps its t-th left stopper (t-th position from the left with !(key < pivot))
 * with its t-th right stopper (from the right, !(pivot < key)) for as long as the left one
 * comes first; both are found in positions no swap has touched yet. So while two blocks of
 * unscanned positions remain, the stoppers of a left and a right block are listed without
 * branches (BlockQuicksort, Edelkamp & Weiß 2016) and swapped pair by pair, in order: the same
 * swaps. The last stretch runs Hoare's own loop from the state after the last swap (left scan
 * just past the last left stopper, right scan just before the last right stopper). */
static int64_t partition_pivot(uint16_t *k, uint32_t *ix, int64_t first, int64_t last) {
    median_to_first(k, ix, first, first + 1, first + (last - first) / 2, last - 1);
    const uint16_t pivot = k[first];
    int64_t lo = first + 1, hi = last;   /* Hoare's state between iterations */
    int64_t lb = lo, rb = hi;            /* unscanned positions: [lb, rb) */
    int64_t lbase = 0, rbase = 0;
    uint8_t offl[BLOCK], offr[BLOCK];
    int nl = 0, nr = 0, sl = 0, sr = 0;  /* stoppers buffered, first unused */
    for (;;) {
        if (nl == 0) {
            if (rb - lb < BLOCK) break;
            lbase = lb;
            sl = 0;
            for (int j = 0; j < BLOCK; j++) {
                offl[nl] = (uint8_t)j;
                nl += !(k[lb + j] < pivot);
            }
            lb += BLOCK;
        }
        if (nr == 0) {
            if (rb - lb < BLOCK) break;
            rbase = rb - 1;
            sr = 0;
            for (int j = 0; j < BLOCK; j++) {
                offr[nr] = (uint8_t)j;
                nr += !(pivot < k[rbase - j]);
            }
            rb -= BLOCK;
        }
        const int m = nl < nr ? nl : nr;
        for (int i = 0; i < m; i++) swap_at(k, ix, lbase + offl[sl + i], rbase - offr[sr + i]);
        if (m > 0) {
            lo = lbase + offl[sl + m - 1] + 1;
            hi = rbase - offr[sr + m - 1];
        }
        nl -= m;
        nr -= m;
        sl += m;
        sr += m;
    }
    for (;;) {
        while (k[lo] < pivot) ++lo;
        --hi;
        while (pivot < k[hi]) --hi;
        if (!(lo < hi)) return lo;
        swap_at(k, ix, lo, hi);
        ++lo;
    }
}

/* Stable insertion sort of [first, last): what std::__final_insertion_sort leaves there. */
static void insertion_sort(uint16_t *k, uint32_t *ix, int64_t first, int64_t last) {
    for (int64_t i = first + 1; i < last; i++) {
        uint16_t vk = k[i];
        uint32_t vi = ix[i];
        int64_t j = i;
        for (; j > first && vk < k[j - 1]; j--) {
            k[j] = k[j - 1];
            ix[j] = ix[j - 1];
        }
        k[j] = vk;
        ix[j] = vi;
    }
}

static inline int straddles(int64_t lo, int64_t hi, int64_t b0, int64_t b1) {
    return (lo < b0 && b0 < hi) || (lo < b1 && b1 < hi);
}

/* std::__introsort_loop(first, last, depth), restricted to ranges that straddle b0 or b1. */
static int introselect(uint16_t *k, uint32_t *ix, int64_t first, int64_t last, int64_t depth,
                       int64_t b0, int64_t b1) {
    while (last - first > THRESHOLD) {
        if (depth == 0) return 1; /* libstdc++ heap-sorts here: not replayed */
        --depth;
        int64_t cut = partition_pivot(k, ix, first, last);
        if (straddles(cut, last, b0, b1) && introselect(k, ix, cut, last, depth, b0, b1))
            return 1;
        if (!straddles(first, cut, b0, b1)) return 0;
        last = cut;
    }
    if (straddles(first, last, b0, b1)) insertion_sort(k, ix, first, last);
    return 0;
}

static int64_t floor_log2(int64_t n) {
    int64_t r = 0;
    while (n >>= 1) r++;
    return r;
}

/* Permute (keys, idx) of length n as std::sort would as far as which elements occupy
 * positions [lo, hi) goes, then set mask[idx[p]] = 1 for p in [lo, hi). `max_depth` < 0 uses
 * libstdc++'s limit (tests pass a small one to reach the fallback). Returns 0, or 1 when the
 * heap-sort fallback would be needed (mask untouched). */
int32_t ws_sort_select(uint16_t *keys, uint32_t *idx, int64_t n, int64_t lo, int64_t hi,
                       int64_t max_depth, uint8_t *mask) {
    if (n <= 0 || lo >= hi) return 0;
    int64_t depth = max_depth >= 0 ? max_depth : 2 * floor_log2(n);
    if (introselect(keys, idx, 0, n, depth, lo, hi)) return 1;
    for (int64_t p = lo; p < hi; p++) mask[idx[p]] = 1;
    return 0;
}

/* 2. mergekit's generalized task arithmetic in bfloat16 with masks, over one range (input 0
 * the base, K − 1 task vectors), every torch rounding step reproduced:
 *   δ_k = bf16(x_k − b); masked: δ_k·m_k (m_k ∈ {0, 1}, exact); scaled: bf16(δ_k·s_k);
 *   p_k = bf16(δ_k·w_k) (w_k bfloat16 values);
 *   consensus: elected = bf16(Σ p_k) >= 0 ? 1 : −1, a_k = sign(p_k) == elected,
 *     mixed = bf16(Σ a_k·p_k), div = bf16(Σ a_k·w_k) (0 -> 1);
 *   otherwise: mixed = bf16(Σ p_k), div = the given scalar;
 *   bf16(mixed / div) when do_div, bf16(mixed·lam) when do_lam, out = bf16(b + mixed).
 * Sums run in float32 from +0 in model order, as torch's sum over the stacked models does.
 * masks[k] (NULL: keep all) and the ranges start at the range's first entry. out is stored as
 * out_dtype; bad[k] counts NaN/Inf of input k; returns the NaN/Inf outputs. */
/* 2. The elementwise steps of mergekit's bfloat16 Karcher mean (merge/methods/karcher.py), each
 * on one range of bfloat16 tensors, every torch rounding reproduced (scalars are given as the
 * float values torch computes with: 0-dim float32 tensors rounded to bfloat16 where torch
 * rounds them, divisors not). */

/* out = bf16(x / s): x / s for a 0-dim float32 s. */
void ws_bf16_div(const uint16_t *x, int64_t n, float s, uint16_t *out) {
    for (int64_t i = 0; i < n; i++) out[i] = to_bf16(from_bf16(x[i]) / s);
}

/* out = bf16(x · s): s · x for a Python float or 0-dim tensor s (as torch rounds it). */
void ws_bf16_scale(const uint16_t *x, int64_t n, float s, uint16_t *out) {
    for (int64_t i = 0; i < n; i++) out[i] = to_bf16(from_bf16(x[i]) * s);
}

/* out[i] = bf16(out[i] + bf16(u[i] · a)) over one tile (out[i] = +0 before the first term);
 * out of line for the reason given at tangent_term. */
#if defined(__GNUC__)
__attribute__((noinline))
#endif
static void wsum_term(uint16_t *restrict out, const uint16_t *restrict u, int64_t len, float a,
                      int first) {
    for (int64_t i = 0; i < len; i++)
        out[i] = to_bf16((first ? 0.0f : from_bf16(out[i])) + bf16_round(from_bf16(u[i]) * a));
}

/* out = 0; out += a_j · u_j for j = 0..k-1 in one pass over tiles (each product and sum rounded
 * to bfloat16, as torch's zeros_like and k in-place adds of a Python float times a tensor). */
void ws_bf16_wsum(uint16_t *out, const uint16_t *const *u, int32_t k, int64_t n, const float *a) {
    enum { TILE = 1024 };
    for (int64_t s = 0; s < n; s += TILE) {
        const int64_t len = n - s < TILE ? n - s : TILE;
        if (k == 0) memset(out + s, 0, (size_t)len * sizeof *out);
        for (int32_t j = 0; j < k; j++) wsum_term(out + s, u[j] + s, len, a[j], j == 0);
    }
}

/* t[i] = bf16(t[i] + bf16(c · bf16(u[i] − bf16(cos · m[i])))) over one tile (t[i] = +0 before
 * the first term). Kept out of line: inlined into the unit loop below, GCC 12 -O3 emits code 6x
 * slower from 3 units on. */
#if defined(__GNUC__)
__attribute__((noinline))
#endif
static void tangent_term(uint16_t *restrict t, const uint16_t *restrict m,
                         const uint16_t *restrict u, int64_t len, float cos, float c, int first) {
    for (int64_t i = 0; i < len; i++) {
        const float d = bf16_round(from_bf16(u[i]) - bf16_round(cos * from_bf16(m[i])));
        t[i] = to_bf16((first ? 0.0f : from_bf16(t[i])) + bf16_round(c * d));
    }
}

/* t = 0; t += c_j · (u_j − cos_j · m) for j = 0..k-1: the tangent of all the units in one pass
 * over tiles (each product, difference and sum rounded to bfloat16, as k in-place adds on
 * zeros; t holds the bfloat16 sums between terms, so storing them is exact). */
enum { KTILE = 1024 }; /* entries per tile of the Karcher passes */

void ws_karcher_tangents(uint16_t *t, const uint16_t *const *u, int32_t k, const uint16_t *m,
                         int64_t n, const float *cos, const float *c) {
    for (int64_t s = 0; s < n; s += KTILE) {
        const int64_t len = n - s < KTILE ? n - s : KTILE;
        if (k == 0) memset(t + s, 0, (size_t)len * sizeof *t);
        for (int32_t j = 0; j < k; j++)
            tangent_term(t + s, m + s, u[j] + s, len, cos[j], c[j], j == 0);
    }
}

/* m = C · m + S · (t / step), each step rounded to bfloat16 (C, S: cos and sin of the step,
 * rounded to bfloat16 as torch rounds 0-dim float32 factors; step as it is). */
static void step_tile(uint16_t *m, const uint16_t *t, int64_t n, float C, float S, float step) {
    for (int64_t i = 0; i < n; i++) {
        const float a = bf16_round(C * from_bf16(m[i]));
        const float b = bf16_round(S * bf16_round(from_bf16(t[i]) / step));
        m[i] = to_bf16(a + b);
    }
}

void ws_karcher_step(uint16_t *m, const uint16_t *t, int64_t n, float C, float S, float step) {
    step_tile(m, t, n, C, S, step);
}

/* The same step with the tangent of the k terms (as ws_karcher_tangents) remade tile by tile
 * instead of read from a stored tangent. */
void ws_karcher_step_terms(uint16_t *m, const uint16_t *const *u, int32_t k, int64_t n,
                           const float *cos, const float *c, float C, float S, float step) {
    uint16_t t[KTILE];
    for (int64_t s = 0; s < n; s += KTILE) {
        const int64_t len = n - s < KTILE ? n - s : KTILE;
        if (k == 0) memset(t, 0, sizeof t);
        for (int32_t j = 0; j < k; j++) tangent_term(t, m + s, u[j] + s, len, cos[j], c[j], j == 0);
        step_tile(m + s, t, len, C, S, step);
    }
}
