/* GPTQ's per-column step (Alg. 1 of Frantar et al.) inside one block of columns.
 *
 * The eager torch loop in weightsmith.compress.gptq issues about nine tensor operations per
 * column; here each row runs its columns in one pass (rows are independent: qparams, errors
 * and updates of a row only read that row and the shared inverse-Hessian factor).
 *
 * Every value is bit-identical to the eager loop on the same torch build, which the Python
 * side checks on first use: the same IEEE float32 operations in the same order, no FMA
 * contraction (-ffp-contract=off). The eager loop's rank-1 update (torch addr_) reads a row of
 * the column-major inverse-Hessian factor, a strided vector, so torch runs its scalar loop:
 * a multiply, then an add.
 */
#include <math.h>
#include <stdint.h>

int ws_gptq_abi_version(void) { return 1; }

/* Quantize columns [c0, c1) of the block W1 (rows x B, row-major, updated in place).
 * H1: the block's B x B slice of the upper Cholesky factor of H^-1 (row-major; its diagonal
 * holds the pivots). scale, zero: rows x G (row-major); column c uses group grp[c].
 * Q1 gets the levels (as float), E1 the scaled errors, both rows x B. */
void ws_gptq_columns(float *W1, const float *H1, int64_t rows, int64_t B, int64_t c0,
                     int64_t c1, const float *scale, const float *zero, int64_t G,
                     const int64_t *grp, float qmin, float qmax, float *Q1, float *E1) {
    for (int64_t r = 0; r < rows; r++) {
        float *w = W1 + r * B;
        const float *s_row = scale + r * G, *z_row = zero + r * G;
        for (int64_t c = c0; c < c1; c++) {
            const float s = s_row[grp[c]], z = z_row[grp[c]];
            const float x = w[c];
            float q = nearbyintf(x / s) + z;
            q = q < qmin ? qmin : q; /* clamp_(qmin, qmax): max first, then min */
            q = q > qmax ? qmax : q;
            float e = (q - z) * s;
            e = (x - e) / H1[c * B + c];
            Q1[r * B + c] = q;
            E1[r * B + c] = e;
            /* w[c:] -= e * H1[c, c:] (torch: addr_ with alpha -1) */
            const float ne = -e, *h = H1 + c * B;
            for (int64_t j = c; j < B; j++) w[j] = w[j] + ne * h[j];
        }
    }
}
