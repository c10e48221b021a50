/* AVX2 + FMA + F16C kernels (x86-64). Compiled with -mavx2 -mfma -mf16c; only
 * called after dispatch.c has checked the CPU has them.
 *
 * Group formats, per weight row (see group_rows):
 *   - each 32-code block is unpacked once (broadcast + per-lane variable shift + mask)
 *     and dotted with up to 4 activation rows: exact int32 lane sums of s*q with
 *     s = c - 2^(bits-1) (block_dot: maddubs on the unsigned codes minus a per-lane
 *     offset for bits <= 4; the sign trick for 8 bits);
 *   - the lanes are converted to float and accumulated with the block scale d*da
 *     (prepared 8 blocks at a time), even and odd blocks in two FMA chains;
 *   - the min term sum_g (m + d*2^(bits-1)) * sum_{b in g} da*qsum is added per group.
 * Rows are independent, and an activation row's result does not depend on n or on
 * the thread count.
 */
#define ERT_BUILDING
#include "edgert.h"

#include <immintrin.h>
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

void ert_quant_act_avx2(const float *x, int n, int cols, int8_t *q, float *da, int32_t *qsum) {
    const int nblk = cols / ERT_BLOCK;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int j = 0; j < n; j++) {
        for (int b = 0; b < nblk; b++) {
            const float *xb = x + (size_t)j * cols + (size_t)b * ERT_BLOCK;
            __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
            __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
            __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v0, absmask), _mm256_and_ps(v1, absmask)),
                                      _mm256_max_ps(_mm256_and_ps(v2, absmask), _mm256_and_ps(v3, absmask)));
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
            const float amax = _mm_cvtss_f32(m4);
            const float inv = amax != 0.0f ? 127.0f / amax : 0.0f;
            const __m256 vi = _mm256_set1_ps(inv);
            const int rm = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
            __m256i i0 = _mm256_cvttps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, vi), rm));
            __m256i i1 = _mm256_cvttps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, vi), rm));
            __m256i i2 = _mm256_cvttps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, vi), rm));
            __m256i i3 = _mm256_cvttps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, vi), rm));
            __m256i s = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
            __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
            p = _mm256_permutevar8x32_epi32(p, perm);
            _mm256_storeu_si256((__m256i *)(q + (size_t)j * cols + (size_t)b * ERT_BLOCK), p);
            da[(size_t)j * nblk + b] = amax / 127.0f;
            qsum[(size_t)j * nblk + b] = _mm_cvtsi128_si32(s4);
        }
    }
}

/* ---- code unpacking: 32 unsigned codes of one block, in order, one per byte ------------- */

INLINE __m256i unpack_codes(const uint8_t *p, const int bits) {
    switch (bits) {
    case 1: { /* 4 bytes; code i = bit i/4 of byte i%4 */
        uint32_t u;
        memcpy(&u, p, 4);
        __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32((int)u), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        return _mm256_and_si256(v, _mm256_set1_epi8(1));
    }
    case 2: { /* 8 bytes; code i = bits 2*(i/8).. of byte i%8 */
        uint64_t u;
        memcpy(&u, p, 8);
        __m256i v = _mm256_srlv_epi64(_mm256_set1_epi64x((long long)u), _mm256_setr_epi64x(0, 2, 4, 6));
        return _mm256_and_si256(v, _mm256_set1_epi8(3));
    }
    case 3: { /* a 2-bit plane (8 bytes), then a 1-bit plane (4 bytes) shifted by 2 */
        uint64_t u;
        uint32_t h;
        memcpy(&u, p, 8);
        memcpy(&h, p + 8, 4);
        __m256i lo = _mm256_srlv_epi64(_mm256_set1_epi64x((long long)u), _mm256_setr_epi64x(0, 2, 4, 6));
        __m256i hi = _mm256_sllv_epi32(_mm256_set1_epi32((int)h), _mm256_setr_epi32(2, 1, 0, 0, 0, 0, 0, 0));
        hi = _mm256_srlv_epi32(hi, _mm256_setr_epi32(0, 0, 0, 1, 2, 3, 4, 5));
        return _mm256_or_si256(_mm256_and_si256(lo, _mm256_set1_epi8(3)), _mm256_and_si256(hi, _mm256_set1_epi8(4)));
    }
    case 4: { /* 16 bytes; codes 0..15 = low nibbles, 16..31 = high nibbles */
        __m128i x = _mm_loadu_si128((const __m128i *)p);
        __m256i v = _mm256_set_m128i(_mm_srli_epi16(x, 4), x);
        return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
    }
    default: /* 8: 32 bytes */
        return _mm256_loadu_si256((const __m256i *)p);
    }
}

/* 8 int32 partial sums of the block dot s.q, s = c - 2^(bits-1), exact; lane i holds
 * columns 4i..4i+3 (so the lanes are centered sums, not large values that cancel):
 *   bits <= 4: maddubs(c, q) (c unsigned, pairs <= 2*15*127), then minus the
 *              activation's 2^(bits-1) * sum(q[4i..4i+3]) (qoff, prepared per call)
 *   bits == 8: s = c ^ 0x80 and the sign trick maddubs(|s|, sign(q, s)) (pairs <= 32512) */
INLINE __m256i block_dot(__m256i c, const int8_t *q, const int32_t *qoff, const int bits) {
    const __m256i qv = _mm256_loadu_si256((const __m256i *)q), ones = _mm256_set1_epi16(1);
    if (bits == 8) {
        const __m256i s = _mm256_xor_si256(c, _mm256_set1_epi8((char)0x80));
        return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(s), _mm256_sign_epi8(qv, s)), ones);
    }
    const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(c, qv), ones);
    return _mm256_sub_epi32(p, _mm256_loadu_si256((const __m256i *)qoff));
}

/* 8 float16 at p as float; only cnt (1..8) are wanted. Reads 8 unless that could run
 * past the end of the array (safe == 0): then copies. */
INLINE __m256 load8_half(const uint16_t *p, int cnt, int safe) {
    if (cnt == 8 || safe) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    uint16_t t[8] = {0};
    memcpy(t, p, sizeof(uint16_t) * (size_t)cnt);
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)t));
}

static const int32_t LANE_IDX[16] = {0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 0, 0, 0, 0, 0, 0};

/* lanes < cnt set */
INLINE __m256 lane_mask(int cnt) {
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(cnt), _mm256_loadu_si256((const __m256i *)LANE_IDX)));
}

/* ---- group-format matmul ---------------------------------------------------------------- */

#define CHUNK 256 /* blocks whose scales are prepared at a time */

typedef struct {
    const int8_t *q[4];
    const float *da[4], *gsum[4];
    const int32_t *qoff[4];
} act_rows;

/* scl[k][i] = d[group of block c0+i] * da[k][c0+i], i < nb, for weight row r: 8 blocks
 * per vector (the 8 groups' d converted at once, permuted to blocks via a->bgroup) */
INLINE void block_scales(const ert_weight *w, const ert_act *a, const act_rows *ar, int r, int c0, int nb,
                         float (*scl)[CHUNK], const int NR) {
    const int ng = a->ngroups;
    const uint16_t *sc = w->scale + (size_t)r * ng;
    const int safe = (size_t)(w->rows - 1 - r) * ng >= 8; /* 8 halfs past any group are readable */
    for (int i = 0; i < nb; i += 8) {
        const int b0 = c0 + i, gb = a->bgroup[b0];
        const __m256i idx = _mm256_sub_epi32(_mm256_loadu_si256((const __m256i *)(a->bgroup + b0)), _mm256_set1_epi32(gb));
        const __m256 d8 = _mm256_permutevar8x32_ps(load8_half(sc + gb, ng - gb < 8 ? ng - gb : 8, safe), idx);
        for (int k = 0; k < NR; k++) _mm256_store_ps(scl[k] + i, _mm256_mul_ps(d8, _mm256_loadu_ps(ar->da[k] + b0)));
    }
}

/* acc[k] += sum over blocks c0..c0+nb-1 of row r: float(block dot) * scl[k][.]
 * Even blocks go to acc, odd ones to acc2 (two independent FMA chains), whatever NR:
 * an activation row gets the same result whatever the batch it is in. */
INLINE void dot_blocks(const uint8_t *codes, const act_rows *ar, int c0, int nb, float (*scl)[CHUNK], __m256 *acc,
                       __m256 *acc2, const int NR, const int bits) {
    const int bpb = 4 * bits;
    const uint8_t *cp = codes + (size_t)c0 * bpb;
    int i = 0;
    for (; i + 2 <= nb; i += 2) {
        const __m256i ca = unpack_codes(cp + (size_t)i * bpb, bits), cb = unpack_codes(cp + (size_t)(i + 1) * bpb, bits);
        const size_t b = (size_t)c0 + i;
        for (int k = 0; k < NR; k++) {
            __m256i pa = block_dot(ca, ar->q[k] + b * ERT_BLOCK, ar->qoff[k] + b * 8, bits);
            __m256i pb = block_dot(cb, ar->q[k] + (b + 1) * ERT_BLOCK, ar->qoff[k] + (b + 1) * 8, bits);
            acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pa), _mm256_broadcast_ss(scl[k] + i), acc[k]);
            acc2[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pb), _mm256_broadcast_ss(scl[k] + i + 1), acc2[k]);
        }
    }
    if (i < nb) {
        const __m256i c = unpack_codes(cp + (size_t)i * bpb, bits);
        const size_t b = (size_t)c0 + i;
        for (int k = 0; k < NR; k++) {
            __m256i p = block_dot(c, ar->q[k] + b * ERT_BLOCK, ar->qoff[k] + b * 8, bits);
            acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(scl[k] + i), acc[k]);
        }
    }
}

/* acc[k] += the min term of row r: sum_g (m + d*2^(bits-1)) * gsum[k][g], 8 groups per
 * vector (gsum is zero padded to a multiple of 8; lanes past the last group masked) */
INLINE void min_terms(const ert_weight *w, const ert_act *a, const act_rows *ar, int r, __m256 *acc, const int NR,
                      const int bits) {
    const int ng = a->ngroups;
    const uint16_t *sc = w->scale + (size_t)r * ng, *mn = w->min + (size_t)r * ng;
    const int safe = (size_t)(w->rows - 1 - r) * ng >= 8;
    const __m256 off = _mm256_set1_ps((float)(1 << (bits - 1)));
    for (int g0 = 0; g0 < ng; g0 += 8) {
        const int cnt = ng - g0 < 8 ? ng - g0 : 8;
        __m256 mb = _mm256_fmadd_ps(load8_half(sc + g0, cnt, safe), off, load8_half(mn + g0, cnt, safe));
        if (cnt < 8) mb = _mm256_and_ps(mb, lane_mask(cnt));
        for (int k = 0; k < NR; k++) acc[k] = _mm256_fmadd_ps(mb, _mm256_loadu_ps(ar->gsum[k] + g0), acc[k]);
    }
}

/* Rows r0..r1-1 times activation rows j0..j0+NR-1 (NR <= 4): y = block part + min part.
 * When a row fits one chunk, the block scales of row r+1 are prepared before the blocks
 * of row r are summed (double buffer: the stores are long done when read back). */
INLINE void group_rows(const ert_weight *w, const ert_act *a, int r0, int r1, int j0, float *y, const int NR,
                       const int bits) {
    const int nblk = a->nblk, ngp = (a->ngroups + 7) & ~7;
    const size_t rowbytes = (size_t)nblk * 4 * bits;
    act_rows ar;
    for (int k = 0; k < NR; k++) {
        ar.q[k] = a->q + (size_t)(j0 + k) * a->cols;
        ar.da[k] = a->da + (size_t)(j0 + k) * nblk;
        ar.qoff[k] = a->qoff + (size_t)(j0 + k) * nblk * 8;
        ar.gsum[k] = a->gsum + (size_t)(j0 + k) * ngp;
    }
    float scl[2][4][CHUNK] __attribute__((aligned(32)));
    const int one_chunk = nblk <= CHUNK;
    if (one_chunk) block_scales(w, a, &ar, r0, 0, nblk, scl[0], NR);
    for (int r = r0; r < r1; r++) {
        const uint8_t *codes = (const uint8_t *)w->data + (size_t)r * rowbytes;
        __m256 acc[4], acc2[4];
        for (int k = 0; k < NR; k++) acc[k] = acc2[k] = _mm256_setzero_ps();
        min_terms(w, a, &ar, r, acc2, NR, bits);
        if (one_chunk) {
            if (r + 1 < r1) block_scales(w, a, &ar, r + 1, 0, nblk, scl[(r + 1 - r0) & 1], NR);
            dot_blocks(codes, &ar, 0, nblk, scl[(r - r0) & 1], acc, acc2, NR, bits);
        } else {
            for (int c0 = 0; c0 < nblk; c0 += CHUNK) {
                const int nb = nblk - c0 < CHUNK ? nblk - c0 : CHUNK;
                block_scales(w, a, &ar, r, c0, nb, scl[0], NR);
                dot_blocks(codes, &ar, c0, nb, scl[0], acc, acc2, NR, bits);
            }
        }
        for (int k = 0; k < NR; k++) y[(size_t)(j0 + k) * w->rows + r] = hsum(_mm256_add_ps(acc[k], acc2[k]));
    }
}

#define ROWS_PER_TILE 16

INLINE void group_matmul(const ert_weight *w, const ert_act *a, int r0, int r1, float *y, const int bits) {
    for (int rt = r0; rt < r1; rt += ROWS_PER_TILE) {
        const int re = rt + ROWS_PER_TILE < r1 ? rt + ROWS_PER_TILE : r1;
        int j = 0;
        for (; j + 4 <= a->n; j += 4) group_rows(w, a, rt, re, j, y, 4, bits);
        switch (a->n - j) {
        case 3: group_rows(w, a, rt, re, j, y, 3, bits); break;
        case 2: group_rows(w, a, rt, re, j, y, 2, bits); break;
        case 1: group_rows(w, a, rt, re, j, y, 1, bits); break;
        default: break;
        }
    }
}

/* ---- group-format dequantization (bit-exact: d*c is exact, so fma(d, c, m) = d*c + m) ---- */

INLINE void group_dequant(const ert_weight *w, const int64_t *rows, int row0, int k, float *out, const int bits) {
    const int cols = w->cols, nblk = cols / ERT_BLOCK, bpb = 4 * bits, gs = w->group_size;
    const int ng = (cols + gs - 1) / gs;
    for (int i = 0; i < k; i++) {
        const int64_t r = rows ? rows[i] : row0 + i;
        const uint8_t *codes = (const uint8_t *)w->data + (size_t)r * nblk * bpb;
        float *o = out + (size_t)i * cols;
        for (int b = 0; b < nblk; b++) {
            const int g = b * ERT_BLOCK / gs;
            const __m256 d = _mm256_set1_ps(half1(w->scale[(size_t)r * ng + g]));
            const __m256 m = _mm256_set1_ps(half1(w->min[(size_t)r * ng + g]));
            __m256i c = unpack_codes(codes + (size_t)b * bpb, bits);
            __m128i lo = _mm256_castsi256_si128(c), hi = _mm256_extracti128_si256(c, 1);
            float *ob = o + (size_t)b * ERT_BLOCK;
            _mm256_storeu_ps(ob, _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), m));
            _mm256_storeu_ps(ob + 8, _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), m));
            _mm256_storeu_ps(ob + 16, _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), m));
            _mm256_storeu_ps(ob + 24, _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), m));
        }
    }
}

#define GROUP_KERNELS(name, bits)                                                                        \
    void ert_##name##_matmul_avx2(const ert_weight *w, const ert_act *a, int r0, int r1, float *y) {      \
        group_matmul(w, a, r0, r1, y, bits);                                                             \
    }                                                                                                    \
    void ert_##name##_dequant_avx2(const ert_weight *w, const int64_t *rows, int row0, int k, float *out) { \
        group_dequant(w, rows, row0, k, out, bits);                                                      \
    }

GROUP_KERNELS(q1, 1)
GROUP_KERNELS(q2, 2)
GROUP_KERNELS(q3, 3)
GROUP_KERNELS(q4, 4)
GROUP_KERNELS(q8, 8)

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

INLINE void float_matmul(const ert_weight *w, const ert_act *a, int r0, int r1, float *y, const int half) {
    for (int rt = r0; rt < r1; rt += ROWS_PER_TILE) {
        const int re = rt + ROWS_PER_TILE < r1 ? rt + ROWS_PER_TILE : r1;
        int j = 0;
        for (; j + 4 <= a->n; j += 4) float_rows(w, a, rt, re, j, y, 4, half);
        switch (a->n - j) {
        case 3: float_rows(w, a, rt, re, j, y, 3, half); break;
        case 2: float_rows(w, a, rt, re, j, y, 2, half); break;
        case 1: float_rows(w, a, rt, re, j, y, 1, half); break;
        default: break;
        }
    }
}

void ert_f32_matmul_avx2(const ert_weight *w, const ert_act *a, int r0, int r1, float *y) {
    float_matmul(w, a, r0, r1, y, 0);
}

void ert_f16_matmul_avx2(const ert_weight *w, const ert_act *a, int r0, int r1, float *y) {
    float_matmul(w, a, r0, r1, y, 1);
}

void ert_f32_dequant_avx2(const ert_weight *w, const int64_t *rows, int row0, int k, float *out) {
    ert_f32_dequant_ref(w, rows, row0, k, out); /* a copy */
}

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
