/* The tile driver the SIMD kernel files share (internal; include after edgert.h).
 *
 * Rows r0..r1-1 go in tiles of ERT_TILE rows; for each tile the activation rows go in
 * chunks of 4, so a tile's weights are read from memory once and reused from cache
 * for every 4 tokens (the batched path of prefill). The tokens go in groups whose
 * activations (tables: 4 bytes per column) stay in about 128 KB of cache while every
 * tile is run for them. ROWS(t0, t1, j0, NR) computes rows t0..t1-1 for activation rows
 * j0..j0+NR-1; NR is a constant 1..4 in each expansion. Kernels must compute an
 * activation row the same way whatever NR (batch invariance).
 */
#ifndef ERT_TILES_H
#define ERT_TILES_H

#include <math.h> /* ceilf */

/* tokens per group; ERT_FOR_TILES reads w->cols */
#define ERT_TOKEN_GROUP(cols) ((131072 / (4 * (cols))) / 4 * 4 > 4 ? (131072 / (4 * (cols))) / 4 * 4 : 4)

#define ERT_FOR_TILES(r0, r1, n, ROWS)                                                   \
    for (int jg_ = 0, jb_ = ERT_TOKEN_GROUP(w->cols); jg_ < (n); jg_ += jb_) {            \
        const int je_ = jg_ + jb_ < (n) ? jg_ + jb_ : (n);                               \
        for (int rt_ = (r0); rt_ < (r1); rt_ += ERT_TILE) {                              \
            const int re_ = rt_ + ERT_TILE < (r1) ? rt_ + ERT_TILE : (r1);               \
            (void)re_; /* ROWS may not need the end of a whole tile */                   \
            int j_ = jg_;                                                                \
            for (; j_ + 4 <= je_; j_ += 4) ROWS(rt_, re_, j_, 4);                        \
            switch (je_ - j_) {                                                          \
            case 3: ROWS(rt_, re_, j_, 3); break;                                        \
            case 2: ROWS(rt_, re_, j_, 2); break;                                        \
            case 1: ROWS(rt_, re_, j_, 1); break;                                        \
            default: break;                                                              \
            }                                                                            \
        }                                                                                \
    }

/* The ROWS of the q1..q4 kernels, where the file's lut_tile(w, a, t0, j0, y, NR, bits, mult)
 * computes a whole tile: compiled with and without block multipliers, chosen by a->lq. */
#define ERT_LUT_TILE(t0, j0, NR, bits) \
    (a->lq ? lut_tile(w, a, t0, j0, y, NR, bits, 1) : lut_tile(w, a, t0, j0, y, NR, bits, 0))
#define ERT_LUT_ROWS1(t0, t1, j0, NR) ERT_LUT_TILE(t0, j0, NR, 1)
#define ERT_LUT_ROWS2(t0, t1, j0, NR) ERT_LUT_TILE(t0, j0, NR, 2)
#define ERT_LUT_ROWS3(t0, t1, j0, NR) ERT_LUT_TILE(t0, j0, NR, 3)
#define ERT_LUT_ROWS4(t0, t1, j0, NR) ERT_LUT_TILE(t0, j0, NR, 4)

/* The q1..q4 kernels (in a function with w, a and y in scope): whole tiles by ROWS, a
 * last tile of fewer than ERT_TILE rows (rows % 32 != 0) by the scalar reference. */
#define ERT_LUT_MATMUL(r0, r1, ROWS, bits)                                   \
    do {                                                                     \
        const int rf_ = (r0) + ((r1) - (r0)) / ERT_TILE * ERT_TILE;          \
        ERT_FOR_TILES(r0, rf_, a->n, ROWS)                                   \
        if (rf_ < (r1)) ert_lut_matmul_ref(w, a, rf_, r1, y, bits);          \
    } while (0);

/* The activation-table builders' loop (ref.c, avx2.c, neon.c; formats.lut_tables): for
 * activation row j and group g (of group_size columns, the weights' groups), amax = the
 * largest ert_lut_amax of its blocks, inv = 127/amax (0 if amax is 0); for each block b
 * of 32 columns at xb, BLOCK(xb, inv_b, tb) writes the block's 8 sub-group tables
 * rint(T * inv_b) at tb and is the sum of its 32 values (in each file's own order), with
 * inv_b = inv, or with block multipliers (lq not NULL) q = min(32767, ceil((amax_b /
 * amax) * 32768)) (amax_b: the block's ert_lut_amax; q = 0 if amax is 0) stored in lq
 * and inv_b = inv * (32768 / q) (0 if q is 0); the loop stores the table scale amax/127
 * of the group and the sums per group. */
#define ERT_LUT_ACT(x, n, cols, group_size, lut, ls, lq, xsum, BLOCK)                                    \
    do {                                                                                                \
        const int nblk_ = (cols) / ERT_BLOCK, bpg_ = (group_size) / ERT_BLOCK;                          \
        const int ng_ = ((cols) + (group_size) - 1) / (group_size);                                     \
        for (int j_ = 0; j_ < (n); j_++)                                                                \
            for (int g_ = 0; g_ < ng_; g_++) {                                                          \
                const int b0_ = g_ * bpg_, b1_ = b0_ + bpg_ < nblk_ ? b0_ + bpg_ : nblk_;               \
                const float *xg_ = (x) + (size_t)j_ * (cols);                                           \
                float amax_ = 0.0f, sum_ = 0.0f;                                                        \
                for (int b_ = b0_; b_ < b1_; b_++) {                                                    \
                    const float a_ = ert_lut_amax(xg_ + (size_t)b_ * ERT_BLOCK);                        \
                    amax_ = a_ > amax_ ? a_ : amax_;                                                    \
                }                                                                                       \
                const float inv_ = amax_ != 0.0f ? 127.0f / amax_ : 0.0f;                               \
                for (int b_ = b0_; b_ < b1_; b_++) {                                                    \
                    const float *xb_ = xg_ + (size_t)b_ * ERT_BLOCK;                                    \
                    int8_t *tb_ = (lut) + ((size_t)j_ * (cols) / 4 + (size_t)b_ * 8) * 16;              \
                    if (!(lq)) {                                                                        \
                        sum_ += BLOCK(xb_, inv_, tb_);                                                  \
                        continue;                                                                       \
                    }                                                                                   \
                    const float c_ = amax_ != 0.0f ? ceilf(ert_lut_amax(xb_) / amax_ * 32768.0f) : 0.0f; \
                    const int q_ = c_ < 32767.0f ? (int)c_ : 32767;                                     \
                    (lq)[(size_t)j_ * nblk_ + b_] = (int16_t)q_;                                        \
                    sum_ += BLOCK(xb_, q_ ? inv_ * (32768.0f / (float)q_) : 0.0f, tb_);                 \
                }                                                                                       \
                (ls)[(size_t)j_ * ng_ + g_] = amax_ / 127.0f;                                           \
                (xsum)[(size_t)j_ * ng_ + g_] = sum_;                                                   \
            }                                                                                           \
    } while (0)

/* The float formats' entry points of a SIMD file (isa: avx2, neon) whose
 * float_rows(w, a, t0, t1, j0, y, NR, half) computes rows t0..t1-1 of f32 (half = 0) or
 * f16 (half = 1) weights for activation rows j0..j0+NR-1 */
#define ERT_F32_ROWS_(t0, t1, j0, NR) float_rows(w, a, t0, t1, j0, y, NR, 0)
#define ERT_F16_ROWS_(t0, t1, j0, NR) float_rows(w, a, t0, t1, j0, y, NR, 1)
#define ERT_FLOAT_MATMULS(isa)                                                                          \
    void ert_f32_matmul_##isa(const ert_weight *w, const ert_act *a, int r0, int r1, float *y) {         \
        ERT_FOR_TILES(r0, r1, a->n, ERT_F32_ROWS_)                                                      \
    }                                                                                                   \
    void ert_f16_matmul_##isa(const ert_weight *w, const ert_act *a, int r0, int r1, float *y) {         \
        ERT_FOR_TILES(r0, r1, a->n, ERT_F16_ROWS_)                                                      \
    }                                                                                                   \
    void ert_f32_dequant_##isa(const ert_weight *w, const int64_t *rows, int row0, int k, float *out) {  \
        ert_f32_dequant_ref(w, rows, row0, k, out); /* a copy */                                        \
    }

#endif /* ERT_TILES_H */
