/* AVX2 + FMA + F16C kernels (x86-64). Compiled with -mavx2 -mfma -mf16c; only
 * called after dispatch.c has checked the CPU has them.
 *   q1..q4: table lookups over the bit-plane tiles (lut_tile below);
 *   q5, q6, q8: integer dots of the codes and int16 activations (int8_rows); f32/f16: FMA (float_rows).
 * Rows are independent, and an activation row's result does not depend on n or on
 * the thread count.
 */
#define ERT_BUILDING
#include "edgert.h"
#include "tiles.h"

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

INLINE float half1(uint16_t h) { return _cvtsh_ss(h); }

/* ---- activations -------------------------------------------------------------------- */

/* the largest |x| of the 32 values at xb */
INLINE float block_amax(const float *xb) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 mx = _mm256_and_ps(_mm256_loadu_ps(xb), absmask);
    for (int t = 8; t < ERT_BLOCK; t += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(xb + t), absmask));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    return _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
}

void ert_quant_act_avx2(const float *x, int n, int cols, int16_t *q, float *da, int32_t *qsum) {
    const int nblk = cols / ERT_BLOCK, per = ERT_ACT_SPAN / ERT_BLOCK;
    const int rm = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    for (int j = 0; j < n; j++) {
        for (int b0 = 0; b0 < nblk; b0 += per) { /* a span: blocks b0..b1-1 */
            const int b1 = b0 + per < nblk ? b0 + per : nblk;
            float amax = 0.0f;
            for (int b = b0; b < b1; b++) amax = fmaxf(amax, block_amax(x + (size_t)j * cols + (size_t)b * ERT_BLOCK));
            const __m256 vi = _mm256_set1_ps(amax != 0.0f ? (float)ERT_ACT_LEVELS / amax : 0.0f);
            for (int b = b0; b < b1; b++) {
                const float *xb = x + (size_t)j * cols + (size_t)b * ERT_BLOCK;
                __m256i i[4];
                for (int t = 0; t < 4; t++)
                    i[t] = _mm256_cvttps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xb + 8 * t), vi), rm));
                __m256i s = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
                __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
                s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
                s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
                int16_t *qb = q + (size_t)j * cols + (size_t)b * ERT_BLOCK; /* (packs works per 128-bit lane) */
                _mm256_storeu_si256((__m256i *)qb, _mm256_permute4x64_epi64(_mm256_packs_epi32(i[0], i[1]), 0xD8));
                _mm256_storeu_si256((__m256i *)(qb + 16), _mm256_permute4x64_epi64(_mm256_packs_epi32(i[2], i[3]), 0xD8));
                da[(size_t)j * nblk + b] = amax / (float)ERT_ACT_LEVELS;
                qsum[(size_t)j * nblk + b] = _mm_cvtsi128_si32(s4);
            }
        }
    }
}

/* 8 float16 at p as float; only cnt (1..8) are wanted. Reads 8 unless that could run
 * past the end of the array (safe == 0): then copies. */
INLINE __m256 load8_half(const uint16_t *p, int cnt, int safe) {
    if (cnt == 8 || safe) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    uint16_t t[8] = {0};
    memcpy(t, p, sizeof(uint16_t) * (size_t)cnt);
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)t));
}

/* The tables of formats.lut_tables, bit-exact with ert_lut_act_ref: per 4-column
 * sub-group the 8 entries with bit 3 clear, ((+-x0 +- x1) +- x2) - x3, one vector (the
 * sign flips are exact, and a + (-b) == a - b), scaled and rounded like rintf; entries
 * 8..15 are the negated mirror (t[15-p] = -t[p]). Four sub-groups are packed and
 * stored at a time. */
INLINE float lut_block_avx2(const float *xb, float inv, int8_t *tb) {
    const __m256 s0 = _mm256_castsi256_ps(_mm256_setr_epi32(INT32_MIN, 0, INT32_MIN, 0, INT32_MIN, 0, INT32_MIN, 0));
    const __m256 s1 = _mm256_castsi256_ps(_mm256_setr_epi32(INT32_MIN, INT32_MIN, 0, 0, INT32_MIN, INT32_MIN, 0, 0));
    const __m256 s2 = _mm256_castsi256_ps(_mm256_setr_epi32(INT32_MIN, INT32_MIN, INT32_MIN, INT32_MIN, 0, 0, 0, 0));
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256i rev = _mm256_setr_epi8(7, 6, 5, 4, 3, 2, 1, 0, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 15,
                                         14, 13, 12, 11, 10, 9, 8);
    const int rm = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m256 vinv = _mm256_set1_ps(inv);
    __m256i e[8];
    for (int q = 0; q < 8; q++) {
        const float *v = xb + 4 * q;
        __m256 t = _mm256_add_ps(_mm256_xor_ps(_mm256_set1_ps(v[0]), s0), _mm256_xor_ps(_mm256_set1_ps(v[1]), s1));
        t = _mm256_add_ps(t, _mm256_xor_ps(_mm256_set1_ps(v[2]), s2));
        t = _mm256_sub_ps(t, _mm256_set1_ps(v[3]));
        e[q] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(t, vinv), rm));
    }
    for (int q = 0; q < 8; q += 4) {
        /* bytes: entries 0..7 of sub-groups q, q+1 (lane 0) and q+2, q+3 (lane 1) */
        __m256i lo = _mm256_packs_epi16(_mm256_packs_epi32(e[q], e[q + 1]), _mm256_packs_epi32(e[q + 2], e[q + 3]));
        lo = _mm256_permutevar8x32_epi32(lo, perm); /* 8 bytes per sub-group, in order */
        const __m256i hi = _mm256_sub_epi8(_mm256_setzero_si256(), _mm256_shuffle_epi8(lo, rev));
        const __m256i a = _mm256_unpacklo_epi64(lo, hi), c = _mm256_unpackhi_epi64(lo, hi);
        _mm_storeu_si128((__m128i *)(tb + 16 * q), _mm256_castsi256_si128(a));
        _mm_storeu_si128((__m128i *)(tb + 16 * (q + 1)), _mm256_castsi256_si128(c));
        _mm_storeu_si128((__m128i *)(tb + 16 * (q + 2)), _mm256_extracti128_si256(a, 1));
        _mm_storeu_si128((__m128i *)(tb + 16 * (q + 3)), _mm256_extracti128_si256(c, 1));
    }
    return hsum(_mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(xb), _mm256_loadu_ps(xb + 8)),
                              _mm256_add_ps(_mm256_loadu_ps(xb + 16), _mm256_loadu_ps(xb + 24))));
}

void ert_lut_act_avx2(const float *x, int n, int cols, int group_size, int8_t *lut, float *ls, int16_t *lq,
                      float *xsum) {
    ERT_LUT_ACT(x, n, cols, group_size, lut, ls, lq, xsum, lut_block_avx2);
}

/* ---- q1..q4: table lookups ------------------------------------------------------------------
 *
 * A tile of 32 rows (formats.py layout). A sub-group's 16-entry int8 table, broadcast to
 * both 128-bit lanes, is indexed by 32 nibbles with one _mm256_shuffle_epi8.
 *   plane pair (2u, 2u+1): a 32-byte vector holds 16 rows x 2 planes (a row's planes in
 *     adjacent bytes) for sub-groups 2s (low nibbles) and 2s+1 (high): after the lookup,
 *     maddubs with the unsigned weights (2^2u, 2^(2u+1)) sums a row's two planes into
 *     int16 (widening and weighing in one instruction);
 *   a lone last plane k: a vector holds 16 rows x 2 pairs of sub-groups (a row's in
 *     adjacent bytes): looked up in both pairs' tables, maddubs with (2^k, 0) and (0, 2^k)
 *     keeps each byte's own and sums a row's two into int16.
 * A group's blocks are summed in int16 (up to ERT_LUT_SPAN(bits) blocks at a time; in groups
 * of several blocks each block's sums first weighed by its multiplier q, _mm256_mulhrs_epi16), then
 * the sums of the 32 rows (rows in order) are converted and scaled by the group's table
 * scale ls and by d/2 (per row), and the min term (m + d*(2^bits-1)/2) * xsum is added:
 * the group's 32 scales and mins are side by side in the file (tile order), 4 F16C loads
 * each. */

/* Software prefetch distances (bytes) for the weight codes (q1..q4 tiles, q8 rows) and
 * for the q1..q4 scales and mins: the hardware prefetchers do not cross 4 KB pages, and a
 * tile of 4096 columns spans 8 (2 bits) to 16 (4 bits) pages of codes. Measured
 * (bench_gemv shapes, 1 thread, NOISY machine): +25% GB/s at 2 and 4 bits with 2048 or
 * 4096, +18% with 1024; q8 rows (decode): +9-15% (BENCHMARKS.md). */
#define PREFETCH_CODES 2048
#define PREFETCH_SCALES 512

INLINE __m256i bcast_table(const int8_t *t) { return _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)t)); }

/* the low and high nibbles of 32 bytes at p */
INLINE void nibbles(const uint8_t *p, __m256i *lo, __m256i *hi) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)p), nib = _mm256_set1_epi8(0x0F);
    *lo = _mm256_and_si256(v, nib);
    *hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
}

/* An empty asm that takes and gives back v in a vector register: the sums into acc stay
 * in program order. Without it GCC reassociates a block's int16 additions into a tree
 * whose partial results spill to the stack (~10% slower at 1 thread). */
#define ACC_IN_ORDER(v) __asm__("" : "+x"(v))

/* acc[k][h] += the int16 sums I_b of rows 16h..16h+15 of the tile, token k, block b */
INLINE void lut_block(const uint8_t *vb, const int8_t *const *lut, int b, __m256i (*acc)[2], const int NR,
                      const int bits) {
    for (int p = 0; p < bits; p += 2) {
        const uint8_t *vu = vb + (size_t)p * 4 * ERT_TILE;
        if (bits - p >= 2) {
            const __m256i wp = _mm256_set1_epi16((short)((1 << p) | (2 << p) << 8));
            for (int s = 0; s < 4; s++)
                for (int h = 0; h < 2; h++) {
                    __m256i lo, hi;
                    nibbles(vu + (size_t)(2 * s + h) * ERT_TILE, &lo, &hi);
                    for (int k = 0; k < NR; k++) {
                        const int8_t *t = lut[k] + (size_t)(8 * b + 2 * s) * 16;
                        const __m256i r1 = _mm256_shuffle_epi8(bcast_table(t), lo), r2 = _mm256_shuffle_epi8(bcast_table(t + 16), hi);
                        acc[k][h] = _mm256_add_epi16(acc[k][h], _mm256_add_epi16(_mm256_maddubs_epi16(wp, r1), _mm256_maddubs_epi16(wp, r2)));
                        ACC_IN_ORDER(acc[k][h]);
                    }
                }
        } else { /* the lone last plane: byte 2i + e of a vector = row 16h + i, sub-groups 4s + 2e (+1) */
            const __m256i we = _mm256_set1_epi16((short)(1 << p)), wo = _mm256_set1_epi16((short)(1 << (p + 8)));
            for (int s = 0; s < 2; s++)
                for (int h = 0; h < 2; h++) {
                    __m256i lo, hi;
                    nibbles(vu + (size_t)(2 * s + h) * ERT_TILE, &lo, &hi);
                    for (int k = 0; k < NR; k++) {
                        const int8_t *t = lut[k] + (size_t)(8 * b + 4 * s) * 16;
                        const __m256i e0 = _mm256_add_epi16(_mm256_maddubs_epi16(we, _mm256_shuffle_epi8(bcast_table(t), lo)),
                                                            _mm256_maddubs_epi16(we, _mm256_shuffle_epi8(bcast_table(t + 16), hi)));
                        const __m256i e1 = _mm256_add_epi16(_mm256_maddubs_epi16(wo, _mm256_shuffle_epi8(bcast_table(t + 32), lo)),
                                                            _mm256_maddubs_epi16(wo, _mm256_shuffle_epi8(bcast_table(t + 48), hi)));
                        acc[k][h] = _mm256_add_epi16(acc[k][h], _mm256_add_epi16(e0, e1));
                        ACC_IN_ORDER(acc[k][h]);
                    }
                }
        }
    }
}

/* a whole tile of 32 rows, t0..t0+31, for activation rows j0..j0+NR-1; the tile's
 * scales and mins are in tile order (a group's 32 rows side by side) */
INLINE void lut_tile(const ert_weight *w, const ert_act *a, int t0, int j0, float *y, const int NR, const int bits,
                     const int mult) {
    const int nblk = a->nblk, ng = a->ngroups, bpg = w->group_size / ERT_BLOCK;
    const uint8_t *tile = (const uint8_t *)w->data + (size_t)t0 * w->cols * bits / 8;
    const uint16_t *sc = w->scale + (size_t)t0 * ng, *mn = w->min + (size_t)t0 * ng;
    const __m256 off = _mm256_set1_ps(0.5f * (float)((1 << bits) - 1)), half = _mm256_set1_ps(0.5f);
    const int8_t *lut[4];
    for (int k = 0; k < NR; k++) lut[k] = a->lut + (size_t)(j0 + k) * a->cols / 4 * 16;
    __m256 yacc[4][4];
    for (int k = 0; k < NR; k++)
        for (int q = 0; q < 4; q++) yacc[k][q] = _mm256_setzero_ps();
    for (int g = 0; g < ng; g++) {
        __m256 facc[4][4];
        for (int k = 0; k < NR; k++)
            for (int q = 0; q < 4; q++) facc[k][q] = _mm256_setzero_ps();
        const int b1 = (g + 1) * bpg < nblk ? (g + 1) * bpg : nblk;
        for (int b0 = g * bpg; b0 < b1; b0 += ERT_LUT_SPAN(bits)) {
            const int be = b0 + ERT_LUT_SPAN(bits) < b1 ? b0 + ERT_LUT_SPAN(bits) : b1;
            __m256i acc[4][2];
            for (int k = 0; k < NR; k++) acc[k][0] = acc[k][1] = _mm256_setzero_si256();
            for (int b = b0; b < be; b++) {
                const uint8_t *vb = tile + (size_t)b * bits * 4 * ERT_TILE;
                for (int l = 0; l < bits * 4 * ERT_TILE; l += 64) _mm_prefetch((const char *)vb + PREFETCH_CODES + l, _MM_HINT_T0);
                if (!mult) {
                    lut_block(vb, lut, b, acc, NR, bits);
                    continue;
                }
                __m256i bacc[4][2]; /* the block's sums, weighed by q into acc: (I*q + 2^14) >> 15 */
                for (int k = 0; k < NR; k++) bacc[k][0] = bacc[k][1] = _mm256_setzero_si256();
                lut_block(vb, lut, b, bacc, NR, bits);
                for (int k = 0; k < NR; k++) {
                    const __m256i q = _mm256_set1_epi16(a->lq[(size_t)(j0 + k) * nblk + b]);
                    acc[k][0] = _mm256_add_epi16(acc[k][0], _mm256_mulhrs_epi16(bacc[k][0], q));
                    acc[k][1] = _mm256_add_epi16(acc[k][1], _mm256_mulhrs_epi16(bacc[k][1], q));
                }
            }
            for (int k = 0; k < NR; k++) {
                const __m256 ls = _mm256_set1_ps(a->ls[(size_t)(j0 + k) * ng + g]);
                const __m128i part[4] = {_mm256_castsi256_si128(acc[k][0]), _mm256_extracti128_si256(acc[k][0], 1),
                                         _mm256_castsi256_si128(acc[k][1]), _mm256_extracti128_si256(acc[k][1], 1)};
                for (int q = 0; q < 4; q++)
                    facc[k][q] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(part[q])), ls, facc[k][q]);
            }
        }
        _mm_prefetch((const char *)(sc + (size_t)g * ERT_TILE) + PREFETCH_SCALES, _MM_HINT_T0);
        _mm_prefetch((const char *)(mn + (size_t)g * ERT_TILE) + PREFETCH_SCALES, _MM_HINT_T0);
        for (int q = 0; q < 4; q++) {
            const size_t at = (size_t)g * ERT_TILE + 8 * q;
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + at)));
            const __m256 dh = _mm256_mul_ps(d, half), mb = _mm256_fmadd_ps(d, off, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mn + at))));
            for (int k = 0; k < NR; k++) {
                const __m256 xs = _mm256_set1_ps(a->xsum[(size_t)(j0 + k) * ng + g]);
                yacc[k][q] = _mm256_fmadd_ps(mb, xs, _mm256_fmadd_ps(facc[k][q], dh, yacc[k][q]));
            }
        }
    }
    for (int k = 0; k < NR; k++)
        for (int q = 0; q < 4; q++) _mm256_storeu_ps(y + (size_t)(j0 + k) * w->rows + t0 + 8 * q, yacc[k][q]);
}

#define LUT_KERNELS(name, bits)                                                                          \
    void ert_##name##_matmul_avx2(const ert_weight *w, const ert_act *a, int r0, int r1, float *y) {      \
        ERT_LUT_MATMUL(r0, r1, ERT_LUT_ROWS##bits, bits)                                                 \
    }                                                                                                    \
    void ert_##name##_dequant_avx2(const ert_weight *w, const int64_t *rows, int row0, int k, float *out) { \
        ert_##name##_dequant_ref(w, rows, row0, k, out); /* embeddings only: a row per token */          \
    }

LUT_KERNELS(q1, 1)
LUT_KERNELS(q2, 2)
LUT_KERNELS(q3, 3)
LUT_KERNELS(q4, 4)

/* ---- q5, q6, q8: int8 codes, int16 activations ----------------------------------------------
 * formats.matmul_reference's sum over a group d * s.q + (m + o*d) * sum(q), s = c - o, is here
 * d * c.q + m * sum(q), the same number: the codes c (0..255) are dotted as they are.
 *   - each 32-code block (unpacked to bytes for q5, q6) is widened to int16 in two halves and
 *     dotted with up to 4 activation rows by madd: lane i holds columns 2i, 2i+1, 16+2i, 17+2i,
 *     an int32 sum of 4 products (a 2048x2048 q8 GEMV in cache, best of 60: 164-172 us, against
 *     243-248 us with s = c - 128 sign-extended from a register; BENCHMARKS.md, round 15);
 *   - where a weight group holds whole activation spans, the lanes of a span's two blocks are
 *     summed (unit_dot): 8 products, below 2^24 (8*255*ERT_ACT_LEVELS), so the float is exact;
 *   - the lanes are converted to float and accumulated with the scale d*da (prepared 8 blocks
 *     at a time), even and odd units in two FMA chains;
 *   - the min term sum_g m * sum_{b in g} da*qsum is added per group. */

/* The 32 codes of an int8-format block at p (formats.py): q8 a byte each; q5, q6 16 bytes
 * of low nibbles (byte i: codes i and i + 16) in both halves, the upper half shifted right
 * by 4; then the high fields (hb = bits - 4 bits a code) in 4*hb bytes, broadcast to every
 * 32-bit (q5) or 64-bit (q6) lane: lane q shifted right by hb*q has the fields of its own
 * codes at bit 0 of their bytes (bits shifted in from the next byte are masked off) */
INLINE __m256i block_codes(const uint8_t *p, const int bits) {
    if (bits == 8) return _mm256_loadu_si256((const __m256i *)p);
    const int hb = bits - 4;
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    const __m256i c = _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(0x0F));
    uint64_t m = 0;
    memcpy(&m, p + 16, (size_t)(4 * hb));
    const __m256i h = hb == 1 ? _mm256_srlv_epi32(_mm256_set1_epi32((int)m), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
                              : _mm256_srlv_epi64(_mm256_set1_epi64x((long long)m), _mm256_setr_epi64x(0, 2, 4, 6));
    return _mm256_or_si256(c, _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi8((char)((1 << hb) - 1))), 4));
}

/* the codes of the block at p widened to int16: columns 0..15 in lo, 16..31 in hi (q8's bytes
 * zero-extended straight from memory) */
typedef struct {
    __m256i lo, hi;
} wide32;

INLINE wide32 block_c16(const uint8_t *p, const int bits) {
    wide32 v;
    if (bits == 8) {
        v.lo = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
        v.hi = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(p + 16)));
    } else {
        const __m256i c = block_codes(p, bits);
        v.lo = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(c));
        v.hi = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(c, 1));
    }
    return v;
}

/* 8 int32 partial sums of the block dot c.q; lane i holds columns 2i, 2i+1, 16+2i, 17+2i */
INLINE __m256i block_dot(wide32 c, const int16_t *q) {
    return _mm256_add_epi32(_mm256_madd_epi16(c.lo, _mm256_loadu_si256((const __m256i *)q)),
                            _mm256_madd_epi16(c.hi, _mm256_loadu_si256((const __m256i *)(q + 16))));
}

static const int32_t LANE_IDX[16] = {0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 0, 0, 0, 0, 0, 0};

/* lanes < cnt set */
INLINE __m256 lane_mask(int cnt) {
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(cnt), _mm256_loadu_si256((const __m256i *)LANE_IDX)));
}

/* ---- group-format matmul ---------------------------------------------------------------- */

#define CHUNK 256 /* blocks whose scales are prepared at a time */

typedef struct {
    const int16_t *q[4];
    const float *da[4], *gsum[4];
} act_rows;

/* scl[k][i] = d[group of block c0+i] * da[k][c0+i], i < nb, for weight row r: 8 blocks
 * per vector (the 8 groups' d converted at once, permuted to blocks via a->bgroup) */
/* 8 halfs past any of row r's groups are readable */
INLINE int scales_safe(const ert_weight *w, int ng, int r) { return (size_t)(w->rows - 1 - r) * ng >= 8; }

/* row r's scales d of blocks b0..b0+7 (each its group's) */
INLINE __m256 block_d8(const ert_weight *w, const ert_act *a, int r, int b0, int safe) {
    const int ng = a->ngroups, gb = a->bgroup[b0];
    const __m256i idx = _mm256_sub_epi32(_mm256_loadu_si256((const __m256i *)(a->bgroup + b0)), _mm256_set1_epi32(gb));
    return _mm256_permutevar8x32_ps(load8_half(w->scale + (size_t)r * ng + gb, ng - gb < 8 ? ng - gb : 8, safe), idx);
}

/* row r's m of groups g0..g0+7 (zero past the last group) */
INLINE __m256 group_m8(const ert_weight *w, int ng, int r, int g0, int safe) {
    const int cnt = ng - g0 < 8 ? ng - g0 : 8;
    const __m256 m = load8_half(w->min + (size_t)r * ng + g0, cnt, safe);
    return cnt < 8 ? _mm256_and_ps(m, lane_mask(cnt)) : m;
}

INLINE void block_scales(const ert_weight *w, const ert_act *a, const act_rows *ar, int r, int c0, int nb,
                         float (*scl)[CHUNK], const int NR) {
    const int safe = scales_safe(w, a->ngroups, r);
    for (int i = 0; i < nb; i += 8) {
        const __m256 d8 = block_d8(w, a, r, c0 + i, safe);
        for (int k = 0; k < NR; k++) _mm256_store_ps(scl[k] + i, _mm256_mul_ps(d8, _mm256_loadu_ps(ar->da[k] + c0 + i)));
    }
}

/* The int32 lanes of a unit's dot with the activations at q: m (1 or 2) blocks, widened in c.
 * Where the weights' groups hold whole activation spans (group size a multiple of ERT_ACT_SPAN),
 * a span's two blocks share d and da: they are one unit (P = 2), their lanes summed before the
 * one conversion (8 products c*q a lane, below 2^24: exact); else a unit is a block (P = 1). */
INLINE __m256i unit_dot(const wide32 *c, const int16_t *q, const int m) {
    const __m256i p = block_dot(c[0], q);
    return m == 2 ? _mm256_add_epi32(p, block_dot(c[1], q + ERT_BLOCK)) : p;
}

/* blocks a unit (unit_dot) of w: 2 where its groups hold whole activation spans, else 1 */
INLINE int unit_blocks(const ert_weight *w) { return w->group_size % ERT_ACT_SPAN ? 1 : 2; }

/* The units of blocks 0..nb-1 (a chunk; nb a multiple of 2P but at a row's end): even units
 * into acc, odd ones into acc2 (two independent FMA chains); fewer than 2P blocks left, a unit
 * into acc and a block into acc2. UNIT(i, into, m) adds the unit of m blocks at block i, m a
 * constant in each expansion (so the accumulators stay in registers); STEP(i) begins each pair. */
#define FOR_UNITS(nb, P, STEP, UNIT, acc, acc2)                        \
    do {                                                               \
        int i_ = 0;                                                    \
        for (; i_ + 2 * (P) <= (nb); i_ += 2 * (P)) {                  \
            STEP(i_);                                                  \
            UNIT(i_, acc, P);                                          \
            UNIT(i_ + (P), acc2, P);                                   \
        }                                                              \
        if (i_ < (nb)) {                                               \
            const int m_ = (nb) - i_ < (P) ? (nb) - i_ : (P);          \
            if (m_ == 2) UNIT(i_, acc, 2);                             \
            else UNIT(i_, acc, 1);                                     \
            if (i_ + m_ < (nb)) UNIT(i_ + m_, acc2, 1);                \
        }                                                              \
    } while (0)

/* acc[k] += float(unit dot of the m blocks at cp, block b of the activations) * scl[k][i] */
INLINE void add_unit(const uint8_t *cp, const act_rows *ar, size_t b, float (*scl)[CHUNK], int i, __m256 *acc,
                     const int NR, const int bits, const int m) {
    wide32 c[2];
    for (int t = 0; t < m; t++) c[t] = block_c16(cp + (size_t)t * bits * 4, bits);
    for (int k = 0; k < NR; k++)
        acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(unit_dot(c, ar->q[k] + b * ERT_BLOCK, m)), _mm256_broadcast_ss(scl[k] + i),
                                 acc[k]);
}

/* acc, acc2 += the units of blocks c0..c0+nb-1 of row r (c0 a multiple of 2P), float(unit dot) *
 * scl[k][its first block]: an activation row gets the same result whatever NR, the batch it is in */
INLINE void dot_blocks(const uint8_t *codes, const act_rows *ar, int c0, int nb, float (*scl)[CHUNK], __m256 *acc,
                       __m256 *acc2, const int NR, const int bits, const int P) {
    const size_t bb = (size_t)bits * 4; /* bytes per block */
    const uint8_t *cp = codes + (size_t)c0 * bb;
#define PREFETCH(i) \
    for (int u = 0; u < 2 * P; u += 2) _mm_prefetch((const char *)cp + (size_t)((i) + u) * bb + PREFETCH_CODES, _MM_HINT_T0)
#define DOT_UNIT(i, into, m) add_unit(cp + (size_t)(i) * bb, ar, (size_t)c0 + (i), scl, i, into, NR, bits, m)
    FOR_UNITS(nb, P, PREFETCH, DOT_UNIT, acc, acc2);
#undef PREFETCH
#undef DOT_UNIT
}

/* acc[k] += the min term of row r: sum_g m * gsum[k][g], 8 groups per
 * vector (gsum is zero padded to a multiple of 8; lanes past the last group masked) */
INLINE void min_terms(const ert_weight *w, const ert_act *a, const act_rows *ar, int r, __m256 *acc, const int NR) {
    const int ng = a->ngroups, safe = scales_safe(w, ng, r);
    for (int g0 = 0; g0 < ng; g0 += 8) {
        const __m256 mb = group_m8(w, ng, r, g0, safe);
        for (int k = 0; k < NR; k++) acc[k] = _mm256_fmadd_ps(mb, _mm256_loadu_ps(ar->gsum[k] + g0), acc[k]);
    }
}

/* Rows r0..r1-1 times activation rows j0..j0+NR-1 (NR <= 4): y = block part + min part.
 * When a row fits one chunk, the block scales of row r+1 are prepared before the blocks
 * of row r are summed (double buffer: the stores are long done when read back). */
INLINE void int8_rows(const ert_weight *w, const ert_act *a, int r0, int r1, int j0, float *y, const int NR,
                      const int bits, const int P) {
    const int nblk = a->nblk, ngp = (a->ngroups + 7) & ~7;
    const size_t rowbytes = (size_t)w->cols * bits / 8;
    act_rows ar;
    for (int k = 0; k < NR; k++) {
        ar.q[k] = a->q + (size_t)(j0 + k) * a->cols;
        ar.da[k] = a->da + (size_t)(j0 + k) * nblk;
        ar.gsum[k] = a->gsum + (size_t)(j0 + k) * ngp;
    }
    float scl[2][4][CHUNK] __attribute__((aligned(32)));
    const int one_chunk = nblk <= CHUNK;
    if (one_chunk) block_scales(w, a, &ar, r0, 0, nblk, scl[0], NR);
    for (int r = r0; r < r1; r++) {
        const uint8_t *codes = (const uint8_t *)w->data + (size_t)r * rowbytes;
        __m256 acc[4], acc2[4];
        for (int k = 0; k < NR; k++) acc[k] = acc2[k] = _mm256_setzero_ps();
        min_terms(w, a, &ar, r, acc2, NR);
        if (one_chunk) {
            if (r + 1 < r1) block_scales(w, a, &ar, r + 1, 0, nblk, scl[(r + 1 - r0) & 1], NR);
            dot_blocks(codes, &ar, 0, nblk, scl[(r - r0) & 1], acc, acc2, NR, bits, P);
        } else {
            for (int c0 = 0; c0 < nblk; c0 += CHUNK) {
                const int nb = nblk - c0 < CHUNK ? nblk - c0 : CHUNK;
                block_scales(w, a, &ar, r, c0, nb, scl[0], NR);
                dot_blocks(codes, &ar, c0, nb, scl[0], acc, acc2, NR, bits, P);
            }
        }
        for (int k = 0; k < NR; k++) y[(size_t)(j0 + k) * w->rows + r] = hsum(_mm256_add_ps(acc[k], acc2[k]));
    }
}

#define INT8_ROWS(t0, t1, j0, NR) \
    (unit_blocks(w) == 2 ? int8_rows(w, a, t0, t1, j0, y, NR, bits, 2) : int8_rows(w, a, t0, t1, j0, y, NR, bits, 1))

/* ---- q5, q6, q8 prefill: int16 madd micro-tiles ---------------------------------------------
 * The same arithmetic as int8_rows (a token's result is bit-identical alone or in a batch): per
 * (row, token) the min term then the odd units into one accumulator, the even units into
 * another, float(unit dot) * (d*da) each, y = hsum of their sum. With 4 tokens or more, the
 * codes of 4 rows are widened to int16 once per token group (widen_block), so a
 * block dot is 2 madd and an add, and the rows' scales are converted once per 4 rows and
 * token group. */

#define INT8_MAXBLK 1024 /* blocks per row (32768 columns); longer rows: int8_rows */
/* tokens per group: ~96 KB of int16 activations, kept in cache while every row passes */
#define INT8_TOKENS(cols) ((49152 / (cols)) < 64 ? ((49152 / (cols)) > 1 ? 49152 / (cols) : 1) : 64)

/* the rows' float scales: d[r][b] of block b (its group's), mb[r][g] = m (zero past ng) */
typedef struct {
    float d[4][INT8_MAXBLK + 8] __attribute__((aligned(32)));
    float mb[4][INT8_MAXBLK + 16] __attribute__((aligned(32))); /* rows not 4 KB apart */
} int8_rowscales;

/* as block_scales and min_terms: 8 blocks (groups) per vector */
INLINE void int8_prepare_rows(const ert_weight *w, const ert_act *a, int r0, int rm, int8_rowscales *rs) {
    const int ng = a->ngroups;
    for (int r = 0; r < rm; r++) {
        const int safe = scales_safe(w, ng, r0 + r);
        for (int g0 = 0; g0 < ng; g0 += 8) _mm256_store_ps(rs->mb[r] + g0, group_m8(w, ng, r0 + r, g0, safe));
        for (int b0 = 0; b0 < a->nblk; b0 += 8) _mm256_store_ps(rs->d[r] + b0, block_d8(w, a, r0 + r, b0, safe));
    }
}

/* a block's widened codes (block_dot's operand) into out[32], and back */
INLINE void widen_block(wide32 v, int16_t *out) {
    _mm256_store_si256((__m256i *)out, v.lo);
    _mm256_store_si256((__m256i *)(out + 16), v.hi);
}
INLINE wide32 widened_block(const int16_t *p) {
    return (wide32){_mm256_load_si256((const __m256i *)p), _mm256_load_si256((const __m256i *)(p + 16))};
}

/* acc[r] += float(unit_dot of row r's m widened blocks and the token's, at `at`) * scl[r][i] */
INLINE void int8_wide_unit(const int16_t *const *w16, const int16_t *q16, size_t at, float (*scl)[CHUNK], int i,
                           __m256 *acc, const int RM, const int m) {
    for (int r = 0; r < RM; r++) {
        wide32 c[2];
        for (int t = 0; t < m; t++) c[t] = widened_block(w16[r] + at + t * ERT_BLOCK);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(unit_dot(c, q16 + at, m)), _mm256_broadcast_ss(scl[r] + i), acc[r]);
    }
}

/* y of rows r0..r0+RM-1 (RM <= 4) for token j: w16[r] the rows' widened codes, q16 the token's
 * q, rs the rows' scales; units of P blocks (unit_dot) */
INLINE void int8_wide(const ert_weight *w, const ert_act *a, const int8_rowscales *rs, int r0, int j, float *y,
                      const int16_t *const *w16, const int16_t *q16, const int RM, const int P) {
    const int nblk = a->nblk, ngp = (a->ngroups + 7) & ~7;
    const float *da = a->da + (size_t)j * nblk;
    __m256 acc[4], acc2[4];
    for (int r = 0; r < RM; r++) acc[r] = acc2[r] = _mm256_setzero_ps();
    for (int g0 = 0; g0 < ngp; g0 += 8) { /* the min terms */
        const __m256 gs = _mm256_loadu_ps(a->gsum + (size_t)j * ngp + g0);
        for (int r = 0; r < RM; r++) acc2[r] = _mm256_fmadd_ps(_mm256_load_ps(rs->mb[r] + g0), gs, acc2[r]);
    }
    float scl[4][CHUNK] __attribute__((aligned(32)));
    for (int c0 = 0; c0 < nblk; c0 += CHUNK) {
        const int nb = nblk - c0 < CHUNK ? nblk - c0 : CHUNK;
        for (int i = 0; i < nb; i += 8) /* (da has 8 readable floats past the end; lanes past nb unused) */
            for (int r = 0; r < RM; r++)
                _mm256_store_ps(scl[r] + i, _mm256_mul_ps(_mm256_load_ps(rs->d[r] + c0 + i), _mm256_loadu_ps(da + c0 + i)));
#define NO_STEP(i) (void)(i) /* the widened codes are in cache */
#define WIDE_UNIT(i, into, m) int8_wide_unit(w16, q16, (size_t)(c0 + (i)) * ERT_BLOCK, scl, i, into, RM, m)
        FOR_UNITS(nb, P, NO_STEP, WIDE_UNIT, acc, acc2); /* (CHUNK is a multiple of 2P) */
#undef NO_STEP
#undef WIDE_UNIT
    }
    for (int r = 0; r < RM; r++) y[(size_t)j * w->rows + r0 + r] = hsum(_mm256_add_ps(acc[r], acc2[r]));
}

/* Decode (n < 4): int8_rows. Prefill: per group of up to INT8_TOKENS tokens, per 4 rows (widened,
 * their scales converted), every token of the group; last rows one by one. */
INLINE void int8_matmul(const ert_weight *w, const ert_act *a, int r0, int r1, float *y, const int bits) {
    const int cols = w->cols, jb = INT8_TOKENS(cols);
    int16_t *buf = a->n >= 4 && a->nblk <= INT8_MAXBLK ? aligned_alloc(32, (size_t)4 * cols * sizeof(int16_t)) : NULL;
    if (!buf) { /* the same results */
        ERT_FOR_TILES(r0, r1, a->n, INT8_ROWS)
        return;
    }
    int8_rowscales rs_, *rs = &rs_; /* (int8_prepare_rows writes what is read) */
    int16_t *w16[4];
    for (int r = 0; r < 4; r++) w16[r] = buf + (size_t)r * cols;
    for (int j0 = 0; j0 < a->n; j0 += jb) {
        const int j1 = j0 + jb < a->n ? j0 + jb : a->n;
        for (int r = r0; r < r1;) {
            const int rm = r + 4 <= r1 ? 4 : 1;
            int8_prepare_rows(w, a, r, rm, rs);
            for (int i = 0; i < rm; i++) {
                const uint8_t *codes = (const uint8_t *)w->data + (size_t)(r + i) * cols * bits / 8;
                for (int b = 0; b < a->nblk; b++)
                    widen_block(block_c16(codes + (size_t)b * bits * 4, bits), w16[i] + (size_t)b * ERT_BLOCK);
            }
            for (int j = j0; j < j1; j++) {
                const int16_t *q16 = a->q + (size_t)j * cols;
                const int16_t *const *w16c = (const int16_t *const *)w16;
                if (unit_blocks(w) == 2)
                    rm == 4 ? int8_wide(w, a, rs, r, j, y, w16c, q16, 4, 2) : int8_wide(w, a, rs, r, j, y, w16c, q16, 1, 2);
                else
                    rm == 4 ? int8_wide(w, a, rs, r, j, y, w16c, q16, 4, 1) : int8_wide(w, a, rs, r, j, y, w16c, q16, 1, 1);
            }
            r += rm;
        }
    }
    free(buf);
}

/* dequantization (bit-exact: d*c is exact, so fma(d, c, m) = d*c + m) */
INLINE void int8_dequant(const ert_weight *w, const int64_t *rows, int row0, int k, float *out, const int bits) {
    const int cols = w->cols, nblk = cols / ERT_BLOCK, gs = w->group_size;
    const int ng = (cols + gs - 1) / gs;
    for (int i = 0; i < k; i++) {
        const int64_t r = rows ? rows[i] : row0 + i;
        const uint8_t *codes = (const uint8_t *)w->data + (size_t)r * cols * bits / 8;
        float *o = out + (size_t)i * cols;
        for (int b = 0; b < nblk; b++) {
            const int g = b * ERT_BLOCK / gs;
            const __m256 d = _mm256_set1_ps(half1(w->scale[(size_t)r * ng + g]));
            const __m256 m = _mm256_set1_ps(half1(w->min[(size_t)r * ng + g]));
            const __m256i c = block_codes(codes + (size_t)b * bits * 4, bits);
            const __m128i h[2] = {_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1)};
            for (int t = 0; t < ERT_BLOCK; t += 8) {
                const __m256i c8 = _mm256_cvtepu8_epi32(t % 16 ? _mm_srli_si128(h[t / 16], 8) : h[t / 16]);
                _mm256_storeu_ps(o + (size_t)b * ERT_BLOCK + t, _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(c8), m));
            }
        }
    }
}

#define INT8_KERNELS(name, bits)                                                                          \
    void ert_##name##_matmul_avx2(const ert_weight *w, const ert_act *a, int r0, int r1, float *y) {       \
        int8_matmul(w, a, r0, r1, y, bits);                                                               \
    }                                                                                                     \
    void ert_##name##_dequant_avx2(const ert_weight *w, const int64_t *rows, int row0, int k, float *out) { \
        int8_dequant(w, rows, row0, k, out, bits);                                                        \
    }

INT8_KERNELS(q5, 5)
INT8_KERNELS(q6, 6)
INT8_KERNELS(q8, 8)

/* ---- f32 / f16 ------------------------------------------------------------------------------ */

INLINE __m256 load_w(const void *wr, int c, const int half) {
    if (half) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)wr + c)));
    return _mm256_loadu_ps((const float *)wr + c);
}

INLINE float load_w1(const void *wr, int c, const int half) {
    return half ? half1(((const uint16_t *)wr)[c]) : ((const float *)wr)[c];
}

INLINE void float_rows(const ert_weight *w, const ert_act *a, int r0, int r1, int j0, float *y, const int NR,
                       const int half) {
    const int cols = w->cols;
    const float *x[4];
    for (int k = 0; k < NR; k++) x[k] = a->x + (size_t)(j0 + k) * a->cols;
    for (int r = r0; r < r1; r++) {
        const void *wr = half ? (const void *)((const uint16_t *)w->data + (size_t)r * cols)
                              : (const void *)((const float *)w->data + (size_t)r * cols);
        __m256 acc[4], acc2[4];
        for (int k = 0; k < NR; k++) acc[k] = acc2[k] = _mm256_setzero_ps();
        int c = 0;
        for (; c + 16 <= cols; c += 16) {
            __m256 w0 = load_w(wr, c, half), w1 = load_w(wr, c + 8, half);
            for (int k = 0; k < NR; k++) {
                acc[k] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x[k] + c), acc[k]);
                acc2[k] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x[k] + c + 8), acc2[k]);
            }
        }
        for (; c + 8 <= cols; c += 8) {
            __m256 w0 = load_w(wr, c, half);
            for (int k = 0; k < NR; k++) acc[k] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x[k] + c), acc[k]);
        }
        for (int k = 0; k < NR; k++) {
            float s = hsum(_mm256_add_ps(acc[k], acc2[k]));
            for (int t = c; t < cols; t++) s += load_w1(wr, t, half) * x[k][t];
            y[(size_t)(j0 + k) * w->rows + r] = s;
        }
    }
}

ERT_FLOAT_MATMULS(avx2)

void ert_f16_dequant_avx2(const ert_weight *w, const int64_t *rows, int row0, int k, float *out) {
    const int cols = w->cols;
    for (int i = 0; i < k; i++) {
        const int64_t r = rows ? rows[i] : row0 + i;
        const uint16_t *src = (const uint16_t *)w->data + (size_t)r * cols;
        float *o = out + (size_t)i * cols;
        int c = 0;
        for (; c + 8 <= cols; c += 8) _mm256_storeu_ps(o + c, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + c))));
        for (; c < cols; c++) o[c] = ert_half_to_float(src[c]);
    }
}
