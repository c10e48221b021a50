/* AArch64 NEON kernels. This file is compiled twice (see CMakeLists.txt):
 *   ERT_NEON_DOTPROD=0 (armv8-a):            ert_*_neon: everything; q1..q4 by table
 *                                            lookups (vqtbl1q_s8), q5, q6, q8 by int16
 *                                            dots (vmull_s16 / vmlal_high_s16)
 *   ERT_NEON_DOTPROD=1 (armv8.2-a+dotprod):  ert_q{5,6,8}_matmul_neon_dotprod: vdotq_s32 on
 *                                            the activations' two int8 digits
 *                                            (the table lookups do not use dot products)
 * dispatch.c picks the dotprod build only when getauxval(AT_HWCAP) has HWCAP_ASIMDDP.
 * Same arithmetic as ref.c / avx2.c (formats.matmul_reference).
 */
#define ERT_BUILDING
#include "edgert.h"
#include "tiles.h"

#include <arm_neon.h>
#include <math.h>
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

/* ---- q5, q6, q8: int8 weights, int16 activations ---------------------------------------------
 * y[j][r] = sum over blocks b of float(s_b . q_b) * (d_g(b) * da_b) + sum_g (m_g + o d_g) gsum_g
 * (s = c - o, o = ert_int8_offset(bits), of row r's codes, unpacked to bytes for q5, q6; q / da / gsum
 * the activation row's), computed for a micro-tile
 * of RM (<= 2) rows x NR (<= 4) activation rows at a time: each weight block is loaded and
 * offset once for the NR tokens, each activation block once for the RM rows. Per (row, token)
 * the arithmetic is the same whatever RM and NR (a token alone, as in decode, or in a prefill
 * batch gives the same bits): the block dots (exact int32 lanes) converted and accumulated with
 * their scale, even blocks into acc and odd ones into acc2 (two FMA chains), then
 * y = sum of the lanes of acc + acc2, plus the min term (groups 4 a vector, the lanes summed,
 * then the last ng % 4 groups by fmaf). */

typedef struct {
    int8x16_t lo, hi;
} signed32;

typedef struct {
    uint8x16_t lo, hi;
} codes32;

/* The 32 codes of an int8-format block at p (formats.py): q8 a byte each; q5, q6 16 bytes of
 * low nibbles (byte i: codes i and i + 16), then the high fields (hb = bits - 4 bits a code)
 * in 4*hb bytes, repeated over the vector (every 4 bytes for q5, 8 for q6) and shifted per
 * byte so that code i's field lands at bit 0: right by hb * (i / (4*hb)) */
INLINE codes32 load_codes(const uint8_t *p, const int bits) {
    codes32 c;
    if (bits == 8) {
        c.lo = vld1q_u8(p), c.hi = vld1q_u8(p + 16);
        return c;
    }
    static const int8_t SHIFT5[32] = {0,  0,  0,  0,  -1, -1, -1, -1, -2, -2, -2, -2, -3, -3, -3, -3,
                                      -4, -4, -4, -4, -5, -5, -5, -5, -6, -6, -6, -6, -7, -7, -7, -7};
    static const int8_t SHIFT6[32] = {0,  0,  0,  0,  0,  0,  0,  0,  -2, -2, -2, -2, -2, -2, -2, -2,
                                      -4, -4, -4, -4, -4, -4, -4, -4, -6, -6, -6, -6, -6, -6, -6, -6};
    const int hb = bits - 4;
    const int8_t *sh = hb == 1 ? SHIFT5 : SHIFT6;
    uint64_t m = 0;
    memcpy(&m, p + 16, (size_t)(4 * hb));
    const uint8x16_t v = vld1q_u8(p), nib = vdupq_n_u8(0x0F), fm = vdupq_n_u8((uint8_t)((1 << hb) - 1));
    const uint8x16_t h = hb == 1 ? vreinterpretq_u8_u32(vdupq_n_u32((uint32_t)m)) : vreinterpretq_u8_u64(vdupq_n_u64(m));
    c.lo = vorrq_u8(vandq_u8(v, nib), vshlq_n_u8(vandq_u8(vshlq_u8(h, vld1q_s8(sh)), fm), 4));
    c.hi = vorrq_u8(vshrq_n_u8(v, 4), vshlq_n_u8(vandq_u8(vshlq_u8(h, vld1q_s8(sh + 16)), fm), 4));
    return c;
}

/* s = c - o of the block at p (q5, q6: o = 0, s = c) */
INLINE signed32 load_signed(const uint8_t *p, const int bits) {
    const uint8x16_t off = vdupq_n_u8((uint8_t)ert_int8_offset(bits));
    const codes32 c = load_codes(p, bits);
    signed32 s = {vreinterpretq_s8_u8(vsubq_u8(c.lo, off)), vreinterpretq_s8_u8(vsubq_u8(c.hi, off))};
    return s;
}

/* The operands of a block dot: w_operand of a row's s, act_operand of a token's block b (an
 * activation row: act_row). Each lane of block_dot is an exact sum of 8 products, below 2^24
 * (ERT_ACT_LEVELS), so its float conversion is exact. */
#if ERT_NEON_DOTPROD
/* s as it is; the activations as their digits q = 128*h + l (ert_act.qd): two vdotq_s32 each,
 * lane i = columns 4i..4i+3 and 16+4i..16+4i+3 */
typedef signed32 w_operand;
typedef struct {
    signed32 h, l;
} a_operand;
typedef const int8_t *act_row;

INLINE act_row act_row_of(const ert_act *a, int j) { return a->qd + (size_t)j * 2 * a->cols; }
INLINE w_operand w_operand_of(signed32 s) { return s; }
INLINE a_operand act_operand(act_row q, size_t b) {
    const int8_t *p = q + 64 * b;
    const a_operand v = {{vld1q_s8(p), vld1q_s8(p + 16)}, {vld1q_s8(p + 32), vld1q_s8(p + 48)}};
    return v;
}
INLINE int32x4_t block_dot(w_operand s, a_operand q) {
    const int32x4_t h = vdotq_s32(vdotq_s32(vdupq_n_s32(0), s.lo, q.h.lo), s.hi, q.h.hi);
    const int32x4_t l = vdotq_s32(vdotq_s32(vdupq_n_s32(0), s.lo, q.l.lo), s.hi, q.l.hi);
    return vmlaq_n_s32(l, h, 128);
}
#else
/* both widened to int16 (columns 8i..8i+7 in v[i]): lane i = columns i, 4+i, ..., 28+i */
typedef struct {
    int16x8_t v[4];
} w_operand, a_operand;
typedef const int16_t *act_row;

INLINE act_row act_row_of(const ert_act *a, int j) { return a->q + (size_t)j * a->cols; }
INLINE w_operand w_operand_of(signed32 s) {
    const w_operand v = {{vmovl_s8(vget_low_s8(s.lo)), vmovl_high_s8(s.lo), vmovl_s8(vget_low_s8(s.hi)), vmovl_high_s8(s.hi)}};
    return v;
}
INLINE a_operand act_operand(act_row q, size_t b) {
    const int16_t *p = q + ERT_BLOCK * b;
    const a_operand v = {{vld1q_s16(p), vld1q_s16(p + 8), vld1q_s16(p + 16), vld1q_s16(p + 24)}};
    return v;
}
INLINE int32x4_t block_dot(w_operand s, a_operand q) {
    int32x4_t acc = vmull_s16(vget_low_s16(s.v[0]), vget_low_s16(q.v[0]));
    acc = vmlal_high_s16(acc, s.v[0], q.v[0]);
    for (int i = 1; i < 4; i++) acc = vmlal_high_s16(vmlal_s16(acc, vget_low_s16(s.v[i]), vget_low_s16(q.v[i])), s.v[i], q.v[i]);
    return acc;
}
#endif

INLINE float half1(uint16_t h) {
    float16x4_t v = vreinterpret_f16_u16(vdup_n_u16(h));
    return vgetq_lane_f32(vcvt_f32_f16(v), 0);
}

INLINE float32x4_t half4(const uint16_t *p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }

#define CHUNK 256 /* blocks whose scales are prepared at a time */

/* acc[r][k] += float(s_r . q_k) * scl[r][k][i] for block b of the rows (at codes[r]) */
INLINE void int8_block(const uint8_t *const *codes, const act_row *q, size_t b, float (*scl)[4][CHUNK + 4], int i,
                       float32x4_t (*acc)[4], const int RM, const int NR, const int bits) {
    w_operand s[2];
    for (int r = 0; r < RM; r++) s[r] = w_operand_of(load_signed(codes[r] + b * bits * 4, bits));
    for (int k = 0; k < NR; k++) {
        const a_operand qk = act_operand(q[k], b);
        for (int r = 0; r < RM; r++) acc[r][k] = vfmaq_n_f32(acc[r][k], vcvtq_f32_s32(block_dot(s[r], qk)), scl[r][k][i]);
    }
}

/* Rows r0..r0+RM-1 times activation rows j0..j0+NR-1 */
INLINE void int8_tile(const ert_weight *w, const ert_act *a, int r0, int j0, float *y, const int RM, const int NR,
                      const int bits) {
    const float o = (float)ert_int8_offset(bits);
    const int nblk = a->nblk, ng = a->ngroups, ngp = (ng + 7) & ~7;
    act_row q[4];
    const float *da[4], *gsum[4];
    for (int k = 0; k < NR; k++) {
        q[k] = act_row_of(a, j0 + k);
        da[k] = a->da + (size_t)(j0 + k) * nblk;
        gsum[k] = a->gsum + (size_t)(j0 + k) * ngp;
    }
    const uint8_t *codes[2];
    float32x4_t acc[2][4], acc2[2][4];
    float accm[2][4], dg[CHUNK], d[CHUNK + 4], scl[2][4][CHUNK + 4];
    for (int r = 0; r < RM; r++) { /* the min terms: 4 groups a vector, the last ng % 4 by fmaf */
        codes[r] = (const uint8_t *)w->data + (size_t)(r0 + r) * w->cols * bits / 8;
        const uint16_t *sc = w->scale + (size_t)(r0 + r) * ng, *mn = w->min + (size_t)(r0 + r) * ng;
        float32x4_t vm[4];
        for (int k = 0; k < NR; k++) acc[r][k] = acc2[r][k] = vm[k] = vdupq_n_f32(0.0f);
        int g = 0;
        for (; g + 4 <= ng; g += 4) {
            const float32x4_t mb = vfmaq_n_f32(half4(mn + g), half4(sc + g), o);
            for (int k = 0; k < NR; k++) vm[k] = vfmaq_f32(vm[k], mb, vld1q_f32(gsum[k] + g));
        }
        for (int k = 0; k < NR; k++) accm[r][k] = vaddvq_f32(vm[k]);
        for (; g < ng; g++) {
            const float mb = fmaf(half1(sc[g]), o, half1(mn[g]));
            for (int k = 0; k < NR; k++) accm[r][k] = fmaf(mb, gsum[k][g], accm[r][k]);
        }
    }
    for (int c0 = 0; c0 < nblk; c0 += CHUNK) {
        const int nb = nblk - c0 < CHUNK ? nblk - c0 : CHUNK;
        const int g0 = a->bgroup[c0], g1 = a->bgroup[c0 + nb - 1] + 1; /* the chunk's groups (<= nb) */
        for (int r = 0; r < RM; r++) { /* scl = d of the block's group * da, 4 at a time (da has 8
                                          readable floats past the last block; those lanes unused) */
            const uint16_t *sc = w->scale + (size_t)(r0 + r) * ng;
            int g = g0;
            for (; g + 4 <= g1; g += 4) vst1q_f32(dg + g - g0, half4(sc + g));
            for (; g < g1; g++) dg[g - g0] = half1(sc[g]);
            for (int i = 0; i < nb; i++) d[i] = dg[a->bgroup[c0 + i] - g0];
            d[nb] = d[nb + 1] = d[nb + 2] = 0.0f;
            for (int k = 0; k < NR; k++)
                for (int i = 0; i < nb; i += 4) vst1q_f32(scl[r][k] + i, vmulq_f32(vld1q_f32(d + i), vld1q_f32(da[k] + c0 + i)));
        }
        int i = 0;
        for (; i + 2 <= nb; i += 2) {
            int8_block(codes, q, (size_t)c0 + i, scl, i, acc, RM, NR, bits);
            int8_block(codes, q, (size_t)c0 + i + 1, scl, i + 1, acc2, RM, NR, bits);
        }
        if (i < nb) int8_block(codes, q, (size_t)c0 + i, scl, i, acc, RM, NR, bits);
    }
    for (int r = 0; r < RM; r++)
        for (int k = 0; k < NR; k++)
            y[(size_t)(j0 + k) * w->rows + r0 + r] = vaddvq_f32(vaddq_f32(acc[r][k], acc2[r][k])) + accm[r][k];
}

/* rows t0..t1-1 two at a time (the last alone) */
#define INT8_ROWS(t0, t1, j0, NR)                                                    \
    for (int r_ = t0; r_ < t1; r_ += 2) {                                            \
        if (r_ + 2 <= t1) int8_tile(w, a, r_, j0, y, 2, NR, bits);                   \
        else int8_tile(w, a, r_, j0, y, 1, NR, bits);                                \
    }

INLINE void int8_matmul(const ert_weight *w, const ert_act *a, int r0, int r1, float *y, const int bits) {
    ERT_FOR_TILES(r0, r1, a->n, INT8_ROWS)
}

void SFX(ert_q5_matmul)(const ert_weight *w, const ert_act *a, int r0, int r1, float *y) { int8_matmul(w, a, r0, r1, y, 5); }
void SFX(ert_q6_matmul)(const ert_weight *w, const ert_act *a, int r0, int r1, float *y) { int8_matmul(w, a, r0, r1, y, 6); }
void SFX(ert_q8_matmul)(const ert_weight *w, const ert_act *a, int r0, int r1, float *y) { int8_matmul(w, a, r0, r1, y, 8); }

#if !ERT_NEON_DOTPROD
/* ---- what does not depend on dotprod: built once, in the plain NEON object ------------------- */

/* the largest |x| of the 32 values at xb */
INLINE float block_amax(const float *xb) {
    float32x4_t m = vabsq_f32(vld1q_f32(xb));
    for (int t = 1; t < 8; t++) m = vmaxq_f32(m, vabsq_f32(vld1q_f32(xb + 4 * t)));
    return vmaxvq_f32(m);
}

void ert_quant_act_neon(const float *x, int n, int cols, int16_t *q, float *da, int32_t *qsum) {
    const int nblk = cols / ERT_BLOCK, per = ERT_ACT_SPAN / ERT_BLOCK;
    for (int j = 0; j < n; j++) {
        for (int b0 = 0; b0 < nblk; b0 += per) { /* a span: blocks b0..b1-1 */
            const int b1 = b0 + per < nblk ? b0 + per : nblk;
            float amax = 0.0f;
            for (int b = b0; b < b1; b++) amax = fmaxf(amax, block_amax(x + (size_t)j * cols + (size_t)b * ERT_BLOCK));
            const float inv = amax != 0.0f ? (float)ERT_ACT_LEVELS / amax : 0.0f;
            for (int b = b0; b < b1; b++) {
                const float *xb = x + (size_t)j * cols + (size_t)b * ERT_BLOCK;
                int32x4_t i[8], s = vdupq_n_s32(0);
                for (int t = 0; t < 8; t++) {
                    i[t] = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(xb + 4 * t), inv)); /* round to nearest, ties to even */
                    s = vaddq_s32(s, i[t]);
                }
                int16_t *qb = q + (size_t)j * cols + (size_t)b * ERT_BLOCK;
                for (int t = 0; t < 4; t++) vst1q_s16(qb + 8 * t, vcombine_s16(vmovn_s32(i[2 * t]), vmovn_s32(i[2 * t + 1])));
                da[(size_t)j * nblk + b] = amax / (float)ERT_ACT_LEVELS;
                qsum[(size_t)j * nblk + b] = vaddvq_s32(s);
            }
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

INLINE void int8_dequant(const ert_weight *w, const int64_t *rows, int row0, int k, float *out, const int bits) {
    const int cols = w->cols, nblk = cols / ERT_BLOCK, gs = w->group_size;
    const int ng = (cols + gs - 1) / gs;
    for (int i = 0; i < k; i++) {
        const int64_t r = rows ? rows[i] : row0 + i;
        const uint8_t *codes = (const uint8_t *)w->data + (size_t)r * cols * bits / 8;
        float *o = out + (size_t)i * cols;
        for (int b = 0; b < nblk; b++) {
            const int g = b * ERT_BLOCK / gs;
            const float32x4_t d = vdupq_n_f32(half1(w->scale[(size_t)r * ng + g]));
            const float32x4_t m = vdupq_n_f32(half1(w->min[(size_t)r * ng + g]));
            const codes32 c = load_codes(codes + (size_t)b * bits * 4, bits);
            store_deq(o + (size_t)b * ERT_BLOCK, c.lo, d, m);
            store_deq(o + (size_t)b * ERT_BLOCK + 16, c.hi, d, m);
        }
    }
}

void ert_q5_dequant_neon(const ert_weight *w, const int64_t *rows, int row0, int k, float *out) { int8_dequant(w, rows, row0, k, out, 5); }
void ert_q6_dequant_neon(const ert_weight *w, const int64_t *rows, int row0, int k, float *out) { int8_dequant(w, rows, row0, k, out, 6); }
void ert_q8_dequant_neon(const ert_weight *w, const int64_t *rows, int row0, int k, float *out) { int8_dequant(w, rows, row0, k, out, 8); }

/* ---- q1..q4: table lookups -------------------------------------------------------------------
 *
 * A tile of 32 rows (formats.py layout), 16 bytes = 8 rows at a time. One vqtbl1q_s8 looks
 * up 16 nibbles in a sub-group's 16-entry int8 table:
 *   plane pair (2u, 2u+1): a row's two planes in adjacent bytes: vpaddlq_s8 (both) plus
 *     the odd byte again (vshrq_n_s16 by 8) gives plane 2u + 2 * plane 2u+1, in int16;
 *   a lone last plane: a row's two sub-group pairs in adjacent bytes, each indexing its
 *     own table: one vqtbl2q_s8 over both tables (odd bytes offset by 16), vpaddlq_s8.
 * The sums are weighted by 2^(2u) (vmlaq_n_s16); a group's blocks are summed in int16
 * (up to ERT_LUT_SPAN(bits) blocks at a time; in groups of several blocks each block's sums
 * first weighed by its multiplier q, vqrdmulhq_s16), then converted and scaled by the group's
 * table scale ls and by d/2 (per row), and the min term (m + d*(2^bits-1)/2) * xsum is
 * added (the group's 32 scales and mins side by side in the file: tile order). */

/* acc[k][h] += int16 sums I_b of rows 8h..8h+7 for token k, block b */
INLINE void lut_block(const uint8_t *vb, const int8_t *const *lut, int b, int16x8_t (*acc)[4], const int NR,
                      const int bits) {
    static const uint8_t ODD16[16] = {0, 16, 0, 16, 0, 16, 0, 16, 0, 16, 0, 16, 0, 16, 0, 16};
    const uint8x16_t nib = vdupq_n_u8(0x0F), odd = vld1q_u8(ODD16);
    for (int p = 0; p < bits; p += 2) {
        const uint8_t *vu = vb + (size_t)p * 4 * ERT_TILE;
        const int16_t wgt = (int16_t)(1 << p);
        if (bits - p >= 2) {
            for (int s = 0; s < 4; s++)
                for (int h = 0; h < 4; h++) {
                    const uint8x16_t v = vld1q_u8(vu + (size_t)s * 2 * ERT_TILE + 16 * h);
                    const uint8x16_t lo = vandq_u8(v, nib), hi = vshrq_n_u8(v, 4);
                    for (int k = 0; k < NR; k++) {
                        const int8_t *t = lut[k] + (size_t)(8 * b + 2 * s) * 16;
                        const int8x16_t r1 = vqtbl1q_s8(vld1q_s8(t), lo), r2 = vqtbl1q_s8(vld1q_s8(t + 16), hi);
                        const int16x8_t both = vpadalq_s8(vpaddlq_s8(r1), r2);
                        const int16x8_t odd2 = vaddq_s16(vshrq_n_s16(vreinterpretq_s16_s8(r1), 8), vshrq_n_s16(vreinterpretq_s16_s8(r2), 8));
                        acc[k][h] = vmlaq_n_s16(acc[k][h], vaddq_s16(both, odd2), wgt);
                    }
                }
        } else { /* the lone last plane: byte 2i + e = row 8h + i, sub-groups 4s + 2e (+1) */
            for (int s = 0; s < 2; s++)
                for (int h = 0; h < 4; h++) {
                    const uint8x16_t v = vld1q_u8(vu + (size_t)s * 2 * ERT_TILE + 16 * h);
                    const uint8x16_t lo = vorrq_u8(vandq_u8(v, nib), odd), hi = vorrq_u8(vshrq_n_u8(v, 4), odd);
                    for (int k = 0; k < NR; k++) {
                        const int8_t *t = lut[k] + (size_t)(8 * b + 4 * s) * 16;
                        const int8x16x2_t ta = {{vld1q_s8(t), vld1q_s8(t + 32)}}, tb = {{vld1q_s8(t + 16), vld1q_s8(t + 48)}};
                        const int16x8_t sum = vpadalq_s8(vpaddlq_s8(vqtbl2q_s8(ta, lo)), vqtbl2q_s8(tb, hi));
                        acc[k][h] = vmlaq_n_s16(acc[k][h], sum, wgt);
                    }
                }
        }
    }
}

/* a whole tile of 32 rows, t0..t0+31, for activation rows j0..j0+NR-1 */
INLINE void lut_tile(const ert_weight *w, const ert_act *a, int t0, int j0, float *y, const int NR, const int bits,
                     const int mult) {
    const int nblk = a->nblk, ng = a->ngroups, bpg = w->group_size / ERT_BLOCK;
    const uint8_t *tile = (const uint8_t *)w->data + (size_t)t0 * w->cols * bits / 8;
    const float off = 0.5f * (float)((1 << bits) - 1);
    const int8_t *lut[4];
    for (int k = 0; k < NR; k++) lut[k] = a->lut + (size_t)(j0 + k) * a->cols / 4 * 16;
    const uint16_t *sc = w->scale + (size_t)t0 * ng, *mn = w->min + (size_t)t0 * ng; /* tile order */
    float32x4_t yacc[4][8];
    for (int k = 0; k < NR; k++)
        for (int q = 0; q < 8; q++) yacc[k][q] = vdupq_n_f32(0.0f);
    for (int g = 0; g < ng; g++) {
        float32x4_t facc[4][8];
        for (int k = 0; k < NR; k++)
            for (int q = 0; q < 8; q++) facc[k][q] = vdupq_n_f32(0.0f);
        const int b1 = (g + 1) * bpg < nblk ? (g + 1) * bpg : nblk;
        for (int b0 = g * bpg; b0 < b1; b0 += ERT_LUT_SPAN(bits)) {
            const int be = b0 + ERT_LUT_SPAN(bits) < b1 ? b0 + ERT_LUT_SPAN(bits) : b1;
            int16x8_t acc[4][4];
            for (int k = 0; k < NR; k++)
                for (int h = 0; h < 4; h++) acc[k][h] = vdupq_n_s16(0);
            for (int b = b0; b < be; b++) {
                const uint8_t *vb = tile + (size_t)b * bits * 4 * ERT_TILE;
                if (!mult) {
                    lut_block(vb, lut, b, acc, NR, bits);
                    continue;
                }
                int16x8_t bacc[4][4]; /* the block's sums, weighed by q into acc: (I*q + 2^14) >> 15 */
                for (int k = 0; k < NR; k++)
                    for (int h = 0; h < 4; h++) bacc[k][h] = vdupq_n_s16(0);
                lut_block(vb, lut, b, bacc, NR, bits);
                for (int k = 0; k < NR; k++) {
                    const int16x8_t q = vdupq_n_s16(a->lq[(size_t)(j0 + k) * nblk + b]);
                    for (int h = 0; h < 4; h++) acc[k][h] = vaddq_s16(acc[k][h], vqrdmulhq_s16(bacc[k][h], q));
                }
            }
            for (int k = 0; k < NR; k++) {
                const float ls = a->ls[(size_t)(j0 + k) * ng + g];
                for (int h = 0; h < 4; h++) {
                    facc[k][2 * h] = vfmaq_n_f32(facc[k][2 * h], vcvtq_f32_s32(vmovl_s16(vget_low_s16(acc[k][h]))), ls);
                    facc[k][2 * h + 1] = vfmaq_n_f32(facc[k][2 * h + 1], vcvtq_f32_s32(vmovl_high_s16(acc[k][h])), ls);
                }
            }
        }
        for (int q = 0; q < 8; q++) {
            const float32x4_t d = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(sc + (size_t)g * ERT_TILE + 4 * q)));
            const float32x4_t m = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(mn + (size_t)g * ERT_TILE + 4 * q)));
            const float32x4_t dh = vmulq_n_f32(d, 0.5f), mb = vfmaq_n_f32(m, d, off);
            for (int k = 0; k < NR; k++) {
                yacc[k][q] = vfmaq_f32(yacc[k][q], facc[k][q], dh);
                yacc[k][q] = vfmaq_n_f32(yacc[k][q], mb, a->xsum[(size_t)(j0 + k) * ng + g]);
            }
        }
    }
    for (int k = 0; k < NR; k++)
        for (int q = 0; q < 8; q++) vst1q_f32(y + (size_t)(j0 + k) * w->rows + t0 + 4 * q, yacc[k][q]);
}

#define LUT_KERNELS(name, bits)                                                                          \
    void ert_##name##_matmul_neon(const ert_weight *w, const ert_act *a, int r0, int r1, float *y) {      \
        ERT_LUT_MATMUL(r0, r1, ERT_LUT_ROWS##bits, bits)                                                 \
    }                                                                                                    \
    void ert_##name##_dequant_neon(const ert_weight *w, const int64_t *rows, int row0, int k, float *out) { \
        ert_##name##_dequant_ref(w, rows, row0, k, out); /* embeddings only: a row per token */          \
    }

LUT_KERNELS(q1, 1)
LUT_KERNELS(q2, 2)
LUT_KERNELS(q3, 3)
LUT_KERNELS(q4, 4)

/* The tables of formats.lut_tables, bit-exact with ert_lut_act_ref: per 4-column
 * sub-group the entries with bit 3 clear, ((+-x0 +- x1) +- x2) - x3, as two vectors (the
 * sign flips are exact, and a + (-b) == a - b), rounded to nearest even like rintf;
 * entries 8..15 are the negated mirror (t[15-p] = -t[p]). */
INLINE float lut_block_neon(const float *xb, float inv, int8_t *tb) {
    static const uint32_t S0[4] = {0x80000000u, 0, 0x80000000u, 0}, S1[4] = {0x80000000u, 0x80000000u, 0, 0};
    const uint32x4_t s0 = vld1q_u32(S0), s1 = vld1q_u32(S1);
    for (int q = 0; q < 8; q++) {
        const float *v = xb + 4 * q;
        const float32x4_t u = vaddq_f32(vreinterpretq_f32_u32(veorq_u32(vreinterpretq_u32_f32(vdupq_n_f32(v[0])), s0)),
                                        vreinterpretq_f32_u32(veorq_u32(vreinterpretq_u32_f32(vdupq_n_f32(v[1])), s1)));
        const float32x4_t e0 = vsubq_f32(vsubq_f32(u, vdupq_n_f32(v[2])), vdupq_n_f32(v[3])); /* p = 0..3 */
        const float32x4_t e1 = vsubq_f32(vaddq_f32(u, vdupq_n_f32(v[2])), vdupq_n_f32(v[3])); /* p = 4..7 */
        const int16x8_t h = vcombine_s16(vmovn_s32(vcvtnq_s32_f32(vmulq_n_f32(e0, inv))),
                                         vmovn_s32(vcvtnq_s32_f32(vmulq_n_f32(e1, inv))));
        const int8x8_t lo = vmovn_s16(h);
        vst1q_s8(tb + 16 * q, vcombine_s8(lo, vneg_s8(vrev64_s8(lo))));
    }
    const float32x4_t sum = vaddq_f32(vaddq_f32(vaddq_f32(vld1q_f32(xb), vld1q_f32(xb + 4)), vaddq_f32(vld1q_f32(xb + 8), vld1q_f32(xb + 12))),
                                      vaddq_f32(vaddq_f32(vld1q_f32(xb + 16), vld1q_f32(xb + 20)), vaddq_f32(vld1q_f32(xb + 24), vld1q_f32(xb + 28))));
    return vaddvq_f32(sum);
}

void ert_lut_act_neon(const float *x, int n, int cols, int group_size, int8_t *lut, float *ls, int16_t *lq,
                      float *xsum) {
    ERT_LUT_ACT(x, n, cols, group_size, lut, ls, lq, xsum, lut_block_neon);
}

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

ERT_FLOAT_MATMULS(neon)

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
