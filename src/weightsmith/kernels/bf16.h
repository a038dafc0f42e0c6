/* bfloat16 <-> float32 as c10::BFloat16 converts, shared by the kernel sources (each is built
 * on its own; kernels/__init__.py hashes this header into every build key). */
#ifndef WS_BF16_H
#define WS_BF16_H

#include <stdint.h>
#include <string.h>

/* float32 -> bfloat16 with round-to-nearest-even and NaN -> 0x7FC0. */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* bfloat16 bits -> float32 (exact). */
static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* f rounded to bfloat16, as a float (what a bfloat16 tensor holds): from_bf16(to_bf16(f)),
 * with a mask instead of the shift down and back. */
static inline float bf16_round(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) rounded = 0x7FC00000u;
    memcpy(&f, &rounded, sizeof f);
    return f;
}

/* bf16_round for values made by arithmetic (finite or inf: the quantizers' scales; the spherical
 * merges' stage loops): the same bits for every value that is not a NaN,
 * and a NaN stays a NaN (not made canonical: to_bf16 does that when it is stored). That keeps
 * every stored bit wherever no code reads an intermediate NaN's bits, provided the NaNs seen
 * have zero low 16 bits (bfloat16 values, bf16_round's NaN, the CPU's default NaN and NaNs
 * propagated from these), which the carry of the rounding cannot then reach. Four operations
 * instead of seven: the stage loops of the spherical merges are arithmetic-bound. */
static inline float bf16_round_arith(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Prefetch the cache lines of [p + ahead, p + ahead + n): a kernel reading a stream forward asks
 * for it ahead of its loads (the hardware prefetchers stop at each 4 KB page). Prefetches do
 * not fault, past the end of a mapping included. */
static inline void prefetch_ahead(const void *p, int64_t n, int64_t ahead) {
    for (int64_t o = 0; o < n; o += 64) __builtin_prefetch((const char *)p + ahead + o);
}

/* 512-bit vectors where GCC would pick 256, for arithmetic-bound loops only (nearswap's: 12 %
 * less CPU; multislerp's stages); memory-bound passes gained nothing or lost. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__AVX512F__)
#define WIDE_VECTORS __attribute__((target("prefer-vector-width=512")))
#else
#define WIDE_VECTORS
#endif

#endif
