/* AArch64 NEON kernels. This file is compiled twice (see CMakeLists.txt):
 *   ERT_NEON_DOTPROD=0 (armv8-a):               ert_*_neon: everything, integer dots
 *                                               with vmull_s8 / vmlal_high_s8 / vpadalq_s16
 *   ERT_NEON_DOTPROD=1 (armv8.2-a+dotprod):     ert_q*_matmul_neon_dotprod: vdotq_s32
 * dispatch.c picks the dotprod build only when getauxval(AT_HWCAP) has HWCAP_ASIMDDP.
 *
 * Same arithmetic as ref.c / avx2.c: s = c - 2^(bits-1) as int8, exact int32 block
 * dots with the int8 activations (|s*q| <= 16256, so a pair fits int16), scaled by
 * d*da in float; the min term per group from the prepared sums of da*qsum.
 */
#define ERT_BUILDING
#include "edgert.h"

#include <arm_neon.h>
#include <string.h>

#ifndef ERT_NEON_DOTPROD
#define ERT_NEON_DOTPROD 0
#endif

#define INLINE static inline __attribute__((always_inline))
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#if ERT_NEON_DOTPROD
#define SFX(name) CAT(name, _neon_dotprod)
#else
#define SFX(name) CAT(name, _neon)
#endif

/* ---- code unpacking: a block's 32 unsigned codes as two 16-byte halves --------------------- */

typedef struct {
    uint8x16_t lo, hi; /* codes 0..15, 16..31 */
} codes32;

INLINE codes32 unpack_codes(const uint8_t *p, const int bits) {
    codes32 c;
    switch (bits) {
    case 1: { /* 4 bytes; code i = bit i/4 of byte i%4 */
        uint32_t u;
        memcpy(&u, p, 4);
        uint8x16_t v = vreinterpretq_u8_u32(vdupq_n_u32(u));
        static const int8_t sh_lo[16] = {0, 0, 0, 0, -1, -1, -1, -1, -2, -2, -2, -2, -3, -3, -3, -3};
        static const int8_t sh_hi[16] = {-4, -4, -4, -4, -5, -5, -5, -5, -6, -6, -6, -6, -7, -7, -7, -7};
        const uint8x16_t one = vdupq_n_u8(1);
        c.lo = vandq_u8(vshlq_u8(v, vld1q_s8(sh_lo)), one);
        c.hi = vandq_u8(vshlq_u8(v, vld1q_s8(sh_hi)), one);
        return c;
    }
    case 2: { /* 8 bytes; code i = bits 2*(i/8).. of byte i%8 */
        uint8x8_t v = vld1_u8(p);
        const uint8x8_t three = vdup_n_u8(3);
        c.lo = vcombine_u8(vand_u8(v, three), vand_u8(vshr_n_u8(v, 2), three));
        c.hi = vcombine_u8(vand_u8(vshr_n_u8(v, 4), three), vshr_n_u8(v, 6));
        return c;
    }
    case 3: { /* 2-bit plane (8 bytes) | 1-bit plane (4 bytes) << 2 */
        codes32 lo = unpack_codes(p, 2), hi = unpack_codes(p + 8, 1);
        c.lo = vorrq_u8(lo.lo, vshlq_n_u8(hi.lo, 2));
        c.hi = vorrq_u8(lo.hi, vshlq_n_u8(hi.hi, 2));
        return c;
    }
    case 4: { /* 16 bytes; low nibbles then high nibbles */
        uint8x16_t v = vld1q_u8(p);
        c.lo = vandq_u8(v, vdupq_n_u8(0x0F));
        c.hi = vshrq_n_u8(v, 4);
        return c;
    }
    default: /* 8 */
        c.lo = vld1q_u8(p);
        c.hi = vld1q_u8(p + 16);
        return c;
    }
}

typedef struct {
    int8x16_t lo, hi;
} signed32;

INLINE signed32 unpack_signed(const uint8_t *p, const int bits) {
    codes32 c = unpack_codes(p, bits);
    const uint8x16_t off = vdupq_n_u8((uint8_t)(1 << (bits - 1)));
    signed32 s;
    s.lo = vreinterpretq_s8_u8(vsubq_u8(c.lo, off));
    s.hi = vreinterpretq_s8_u8(vsubq_u8(c.hi, off));
    return s;
}

/* 4 int32 partial sums of s.q (exact) */
INLINE int32x4_t block_dot(signed32 s, const int8_t *q) {
    int8x16_t q0 = vld1q_s8(q), q1 = vld1q_s8(q + 16);
#if ERT_NEON_DOTPROD
    return vdotq_s32(vdotq_s32(vdupq_n_s32(0), s.lo, q0), s.hi, q1);
#else
    int16x8_t p0 = vmlal_high_s8(vmull_s8(vget_low_s8(s.lo), vget_low_s8(q0)), s.lo, q0);
    int16x8_t p1 = vmlal_high_s8(vmull_s8(vget_low_s8(s.hi), vget_low_s8(q1)), s.hi, q1);
    return vpadalq_s16(vpaddlq_s16(p0), p1);
#endif
}

INLINE float half1(uint16_t h) {
    float16x4_t v = vreinterpret_f16_u16(vdup_n_u16(h));
    return vgetq_lane_f32(vcvt_f32_f16(v), 0);
}

/* ---- group-format matmul ------------------------------------------------------------------- */

#define CHUNK 256 /* blocks whose scales are prepared at a time */

/* Rows r0..r1-1 times activation rows j0..j0+NR-1 (NR <= 4):
 *  - the min term sum_g (m + d*2^(bits-1)) * gsum[g] (scalar, per group);
 *  - per chunk of blocks the block scales scl[k][b] = d[group of b] * da[k][b];
 *  - a flat loop over pairs of blocks, even blocks into acc, odd ones into acc2 (two
 *    FMA chains), whatever NR: an activation row's result does not depend on its batch. */
INLINE void group_rows(const ert_weight *w, const ert_act *a, int r0, int r1, int j0, float *y, const int NR,
                       const int bits) {
    const int nblk = a->nblk, ng = a->ngroups, ngp = (ng + 7) & ~7, bpb = 4 * bits;
    const size_t rowbytes = (size_t)nblk * bpb;
    const float off = (float)(1 << (bits - 1));
    const int8_t *q[4];
    const float *da[4], *gsum[4];
    float scl[4][CHUNK];
    for (int k = 0; k < NR; k++) {
        q[k] = a->q + (size_t)(j0 + k) * a->cols;
        da[k] = a->da + (size_t)(j0 + k) * nblk;
        gsum[k] = a->gsum + (size_t)(j0 + k) * ngp;
    }
    for (int r = r0; r < r1; r++) {
        const uint8_t *codes = (const uint8_t *)w->data + (size_t)r * rowbytes;
        const uint16_t *sc = w->scale + (size_t)r * ng, *mn = w->min + (size_t)r * ng;
        float32x4_t acc[4], acc2[4];
        float accm[4];
        for (int k = 0; k < NR; k++) {
            acc[k] = acc2[k] = vdupq_n_f32(0.0f);
            accm[k] = 0.0f;
        }
        for (int g = 0; g < ng; g++) {
            const float mb = half1(mn[g]) + half1(sc[g]) * off;
            for (int k = 0; k < NR; k++) accm[k] += mb * gsum[k][g];
        }
        for (int c0 = 0; c0 < nblk; c0 += CHUNK) {
            const int nb = nblk - c0 < CHUNK ? nblk - c0 : CHUNK;
            int gprev = -1;
            float d = 0.0f;
            for (int i = 0; i < nb; i++) {
                const int g = a->bgroup[c0 + i];
                if (g != gprev) d = half1(sc[g]), gprev = g;
                for (int k = 0; k < NR; k++) scl[k][i] = d * da[k][c0 + i];
            }
            const uint8_t *cp = codes + (size_t)c0 * bpb;
            int i = 0;
            for (; i + 2 <= nb; i += 2) {
                const signed32 sa = unpack_signed(cp + (size_t)i * bpb, bits), sb = unpack_signed(cp + (size_t)(i + 1) * bpb, bits);
                const size_t b = (size_t)c0 + i;
                for (int k = 0; k < NR; k++) {
                    int32x4_t pa = block_dot(sa, q[k] + b * ERT_BLOCK), pb = block_dot(sb, q[k] + (b + 1) * ERT_BLOCK);
                    acc[k] = vfmaq_n_f32(acc[k], vcvtq_f32_s32(pa), scl[k][i]);
                    acc2[k] = vfmaq_n_f32(acc2[k], vcvtq_f32_s32(pb), scl[k][i + 1]);
                }
            }
            if (i < nb) {
                const signed32 s = unpack_signed(cp + (size_t)i * bpb, bits);
                const size_t b = (size_t)c0 + i;
                for (int k = 0; k < NR; k++)
                    acc[k] = vfmaq_n_f32(acc[k], vcvtq_f32_s32(block_dot(s, q[k] + b * ERT_BLOCK)), scl[k][i]);
            }
        }
        for (int k = 0; k < NR; k++)
            y[(size_t)(j0 + k) * w->rows + r] = vaddvq_f32(vaddq_f32(acc[k], acc2[k])) + accm[k];
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

#define GROUP_MATMUL(name, bits)                                                                     \
    void SFX(ert_##name##_matmul)(const ert_weight *w, const ert_act *a, int r0, int r1, float *y) { \
        group_matmul(w, a, r0, r1, y, bits);                                                         \
    }

GROUP_MATMUL(q1, 1)
GROUP_MATMUL(q2, 2)
GROUP_MATMUL(q3, 3)
GROUP_MATMUL(q4, 4)
GROUP_MATMUL(q8, 8)

#if !ERT_NEON_DOTPROD
/* ---- what does not depend on dotprod: built once, in the plain NEON object ------------------- */

void ert_quant_act_neon(const float *x, int n, int cols, int8_t *q, float *da, int32_t *qsum) {
    const int nblk = cols / ERT_BLOCK;
    for (int j = 0; j < n; j++) {
        for (int b = 0; b < nblk; b++) {
            const float *xb = x + (size_t)j * cols + (size_t)b * ERT_BLOCK;
            float32x4_t v[8];
            for (int t = 0; t < 8; t++) v[t] = vld1q_f32(xb + 4 * t);
            float32x4_t m = vmaxq_f32(vmaxq_f32(vmaxq_f32(vabsq_f32(v[0]), vabsq_f32(v[1])),
                                                vmaxq_f32(vabsq_f32(v[2]), vabsq_f32(v[3]))),
                                      vmaxq_f32(vmaxq_f32(vabsq_f32(v[4]), vabsq_f32(v[5])),
                                                vmaxq_f32(vabsq_f32(v[6]), vabsq_f32(v[7]))));
            const float amax = vmaxvq_f32(m);
            const float inv = amax != 0.0f ? 127.0f / amax : 0.0f;
            int32x4_t i[8], s = vdupq_n_s32(0);
            for (int t = 0; t < 8; t++) {
                i[t] = vcvtnq_s32_f32(vmulq_n_f32(v[t], inv)); /* round to nearest, ties to even */
                s = vaddq_s32(s, i[t]);
            }
            int16x8_t h0 = vcombine_s16(vmovn_s32(i[0]), vmovn_s32(i[1]));
            int16x8_t h1 = vcombine_s16(vmovn_s32(i[2]), vmovn_s32(i[3]));
            int16x8_t h2 = vcombine_s16(vmovn_s32(i[4]), vmovn_s32(i[5]));
            int16x8_t h3 = vcombine_s16(vmovn_s32(i[6]), vmovn_s32(i[7]));
            int8_t *qb = q + (size_t)j * cols + (size_t)b * ERT_BLOCK;
            vst1q_s8(qb, vcombine_s8(vmovn_s16(h0), vmovn_s16(h1)));
            vst1q_s8(qb + 16, vcombine_s8(vmovn_s16(h2), vmovn_s16(h3)));
            da[(size_t)j * nblk + b] = amax / 127.0f;
            qsum[(size_t)j * nblk + b] = vaddvq_s32(s);
        }
    }
}

/* dequantization: d*c is exact, so fma(d, c, m) == d*c + m (bit-exact with numpy) */
INLINE void store_deq(float *o, uint8x16_t c, float32x4_t d, float32x4_t m) {
    uint16x8_t l = vmovl_u8(vget_low_u8(c)), h = vmovl_high_u8(c);
    vst1q_f32(o, vfmaq_f32(m, d, vcvtq_f32_u32(vmovl_u16(vget_low_u16(l)))));
    vst1q_f32(o + 4, vfmaq_f32(m, d, vcvtq_f32_u32(vmovl_high_u16(l))));
    vst1q_f32(o + 8, vfmaq_f32(m, d, vcvtq_f32_u32(vmovl_u16(vget_low_u16(h)))));
    vst1q_f32(o + 12, vfmaq_f32(m, d, vcvtq_f32_u32(vmovl_high_u16(h))));
}

INLINE void group_dequant(const ert_weight *w, const int64_t *rows, int row0, int k, float *out, const int bits) {
    const int cols = w->cols, nblk = cols / ERT_BLOCK, bpb = 4 * bits, gs = w->group_size;
    const int ng = (cols + gs - 1) / gs;
    for (int i = 0; i < k; i++) {
        const int64_t r = rows ? rows[i] : row0 + i;
        const uint8_t *codes = (const uint8_t *)w->data + (size_t)r * nblk * bpb;
        float *o = out + (size_t)i * cols;
        for (int b = 0; b < nblk; b++) {
            const int g = b * ERT_BLOCK / gs;
            const float32x4_t d = vdupq_n_f32(half1(w->scale[(size_t)r * ng + g]));
            const float32x4_t m = vdupq_n_f32(half1(w->min[(size_t)r * ng + g]));
            codes32 c = unpack_codes(codes + (size_t)b * bpb, bits);
            store_deq(o + (size_t)b * ERT_BLOCK, c.lo, d, m);
            store_deq(o + (size_t)b * ERT_BLOCK + 16, c.hi, d, m);
        }
    }
}

#define GROUP_DEQUANT(name, bits)                                                                        \
    void ert_##name##_dequant_neon(const ert_weight *w, const int64_t *rows, int row0, int k, float *out) { \
        group_dequant(w, rows, row0, k, out, bits);                                                      \
    }

GROUP_DEQUANT(q1, 1)
GROUP_DEQUANT(q2, 2)
GROUP_DEQUANT(q3, 3)
GROUP_DEQUANT(q4, 4)
GROUP_DEQUANT(q8, 8)

/* ---- f32 / f16 ----------------------------------------------------------------------------------- */

INLINE float32x4_t load_w(const void *wr, int c, const int half) {
    if (half) return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)wr + c)));
    return vld1q_f32((const float *)wr + c);
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
        float32x4_t acc[4], acc2[4];
        for (int k = 0; k < NR; k++) acc[k] = acc2[k] = vdupq_n_f32(0.0f);
        int c = 0;
        for (; c + 8 <= cols; c += 8) {
            float32x4_t w0 = load_w(wr, c, half), w1 = load_w(wr, c + 4, half);
            for (int k = 0; k < NR; k++) {
                acc[k] = vfmaq_f32(acc[k], w0, vld1q_f32(x[k] + c));
                acc2[k] = vfmaq_f32(acc2[k], w1, vld1q_f32(x[k] + c + 4));
            }
        }
        for (int k = 0; k < NR; k++) {
            float s = vaddvq_f32(vaddq_f32(acc[k], acc2[k]));
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

void ert_f32_matmul_neon(const ert_weight *w, const ert_act *a, int r0, int r1, float *y) {
    float_matmul(w, a, r0, r1, y, 0);
}

void ert_f16_matmul_neon(const ert_weight *w, const ert_act *a, int r0, int r1, float *y) {
    float_matmul(w, a, r0, r1, y, 1);
}

void ert_f32_dequant_neon(const ert_weight *w, const int64_t *rows, int row0, int k, float *out) {
    ert_f32_dequant_ref(w, rows, row0, k, out); /* a copy */
}

void ert_f16_dequant_neon(const ert_weight *w, const int64_t *rows, int row0, int k, float *out) {
    const int cols = w->cols;
    for (int i = 0; i < k; i++) {
        const int64_t r = rows ? rows[i] : row0 + i;
        const uint16_t *src = (const uint16_t *)w->data + (size_t)r * cols;
        float *o = out + (size_t)i * cols;
        int c = 0;
        for (; c + 4 <= cols; c += 4) vst1q_f32(o + c, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(src + c))));
        for (; c < cols; c++) o[c] = ert_half_to_float(src[c]);
    }
}
#endif /* !ERT_NEON_DOTPROD */
