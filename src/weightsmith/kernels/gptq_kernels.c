/* GPTQ's per-column step (Alg. 1 of Frantar et al.) inside one block of columns.
 *
 * The eager torch loop in weightsmith.compress.gptq issues about nine tensor operations per
 * column; here the rows run in tiles of TILE rows (rows are independent: qparams, errors and
 * updates of a row only read that row and the shared inverse-Hessian factor). A tile's
 * columns are copied into a column-major buffer, so each column's step and each rank-1
 * update run across the tile's rows in SIMD lanes, with no chain of dependent divisions per
 * row, while the tile stays in L1.
 *
 * Every value is bit-identical to the eager loop on the same torch build, which the Python
 * side checks on first use: each element sees the same IEEE float32 operations in the same
 * order (the loop order across elements does not change any element's arithmetic), no FMA
 * contraction (-ffp-contract=off). The eager loop's rank-1 update (torch addr_) reads a row
 * of the column-major inverse-Hessian factor, a strided vector, so torch runs its scalar
 * loop: a multiply, then an add.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define TILE 64

int ws_gptq_abi_version(void) { return 2; }

/* Columns [c0, c1) of one tile: T holds the tile's columns c0..B-1, column-major (n rows
 * each, n <= TILE); sv, zv: the current group's scale and zero of each row. */
static void tile_columns(float *restrict T, int64_t n, const float *H1, int64_t B, int64_t c0,
                         int64_t c1, const float *scale, const float *zero, int64_t G,
                         const int64_t *grp, float qmin, float qmax, float *Q1, float *E1) {
    float sv[TILE], zv[TILE], ne[TILE];
    int64_t loaded = -1;
    for (int64_t c = c0; c < c1; c++) {
        if (grp[c] != loaded) {
            loaded = grp[c];
            for (int64_t r = 0; r < n; r++) sv[r] = scale[r * G + loaded], zv[r] = zero[r * G + loaded];
        }
        const float piv = H1[c * B + c];
        float *tc = T + (c - c0) * n;
        for (int64_t r = 0; r < n; r++) {
            const float x = tc[r], s = sv[r], z = zv[r];
            float q = nearbyintf(x / s) + z;
            q = q < qmin ? qmin : q; /* clamp_(qmin, qmax): max first, then min */
            q = q > qmax ? qmax : q;
            const float e = (x - (q - z) * s) / piv;
            Q1[r * B + c] = q;
            E1[r * B + c] = e;
            ne[r] = -e;
        }
        /* w[c:] -= e * H1[c, c:] (torch: addr_ with alpha -1): a multiply, then an add */
        const float *h = H1 + c * B;
        for (int64_t j = c; j < B; j++) {
            float *restrict tj = T + (j - c0) * n;
            const float hj = h[j];
            for (int64_t r = 0; r < n; r++) tj[r] = tj[r] + ne[r] * hj;
        }
    }
}

/* Quantize columns [c0, c1) of the block W1 (rows x B, row-major, updated in place).
 * H1: the block's B x B slice of the upper Cholesky factor of H^-1 (row-major; its diagonal
 * holds the pivots). scale, zero: rows x G (row-major); column c uses group grp[c].
 * Q1 gets the levels (as float), E1 the scaled errors, both rows x B. Returns 0, or -1 when
 * out of memory (nothing written). */
int ws_gptq_columns(float *W1, const float *H1, int64_t rows, int64_t B, int64_t c0,
                    int64_t c1, const float *scale, const float *zero, int64_t G,
                    const int64_t *grp, float qmin, float qmax, float *Q1, float *E1) {
    const int64_t width = B - c0;
    float *T = malloc(sizeof(float) * (size_t)(width * TILE));
    if (!T) return -1;
    for (int64_t r0 = 0; r0 < rows; r0 += TILE) {
        const int64_t n = rows - r0 < TILE ? rows - r0 : TILE;
        float *w = W1 + r0 * B;
        for (int64_t r = 0; r < n; r++)
            for (int64_t j = 0; j < width; j++) T[j * n + r] = w[r * B + c0 + j];
        tile_columns(T, n, H1, B, c0, c1, scale + r0 * G, zero + r0 * G, G, grp, qmin, qmax,
                     Q1 + r0 * B, E1 + r0 * B);
        for (int64_t r = 0; r < n; r++)
            for (int64_t j = 0; j < width; j++) w[r * B + c0 + j] = T[j * n + r];
    }
    free(T);
    return 0;
}
