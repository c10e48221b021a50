/* Portable scalar reference of every kernel (the fallback on any CPU, and the
 * oracle the SIMD kernels are tested against). Compiled with -ffp-contract=off:
 * dequantization is d*c + m with a separately rounded add, exactly like numpy.
 *
 * Arithmetic (formats.matmul_reference):
 *   q1..q4, table lookups: per 4 columns a 16-entry int8 table t of the +-1 sums of
 *   the activations, scale ls per group (formats.lut_tables); per group
 *   I = sum_k 2^k sum_j t[j][nibble of plane k] and
 *   y += d/2 * ls * I + (m + d*(2^bits-1)/2) * sum(x)
 *   q5, q6, q8, integer dots: per span of ERT_ACT_SPAN columns amax = max|x|, int16
 *   q = rint(x * L/amax), da = amax/L (L = ERT_ACT_LEVELS) for each 32-block of it;
 *   s = c - o, o = ert_int8_offset(bits); y += da * (d*sum(s*q) + (m + o*d) * sum(q))
 */
#define ERT_BUILDING
#include "edgert.h"
#include "tiles.h"

#include <math.h>
#include <string.h>

/* ---- code unpacking ------------------------------------------------------------- */

/* the 32 codes of block b of row r: q8 one byte per code; q5, q6 from 16 bytes of low
 * nibbles and the packed high fields; q1..q4 from the bit planes of the tile layout
 * (formats.py) */
static void unpack_block(const ert_weight *w, int bits, int r, int b, uint8_t c[ERT_BLOCK]) {
    const uint8_t *data = (const uint8_t *)w->data;
    if (!ert_lut_bits(bits)) {
        const uint8_t *p = data + (size_t)r * w->cols * bits / 8 + (size_t)b * bits * 4;
        if (bits == 8) {
            memcpy(c, p, ERT_BLOCK);
            return;
        }
        const int hb = bits - 4, span = 4 * hb; /* code i's high field: byte 16 + i % span, at bit hb * (i / span) */
        for (int i = 0; i < 16; i++) c[i] = p[i] & 15, c[i + 16] = p[i] >> 4;
        for (int i = 0; i < ERT_BLOCK; i++) c[i] |= (uint8_t)(((p[16 + i % span] >> (hb * (i / span))) & ((1 << hb) - 1)) << 4);
        return;
    }
    memset(c, 0, ERT_BLOCK);
    for (int k = 0; k < bits; k++)
        for (int s = 0; s < 4; s++) {
            const uint8_t v = data[ert_lut_offset(w, bits, r, b, k, s)];
            for (int i = 0; i < 4; i++) {
                c[8 * s + i] |= (uint8_t)(((v >> i) & 1) << k);
                c[8 * s + 4 + i] |= (uint8_t)(((v >> (4 + i)) & 1) << k);
            }
        }
}

/* ---- activations ------------------------------------------------------------------ */

void ert_quant_act_ref(const float *x, int n, int cols, int16_t *q, float *da, int32_t *qsum) {
    const int nblk = cols / ERT_BLOCK, per = ERT_ACT_SPAN / ERT_BLOCK;
    for (int j = 0; j < n; j++) {
        for (int b0 = 0; b0 < nblk; b0 += per) { /* a span: blocks b0..b1-1 */
            const int b1 = b0 + per < nblk ? b0 + per : nblk;
            const float *xs = x + (size_t)j * cols + (size_t)b0 * ERT_BLOCK;
            float amax = 0.0f;
            for (int i = 0; i < (b1 - b0) * ERT_BLOCK; i++) {
                float a = fabsf(xs[i]);
                if (a > amax) amax = a;
            }
            float inv = amax != 0.0f ? (float)ERT_ACT_LEVELS / amax : 0.0f;
            for (int b = b0; b < b1; b++) {
                const float *xb = x + (size_t)j * cols + (size_t)b * ERT_BLOCK;
                int16_t *qb = q + (size_t)j * cols + (size_t)b * ERT_BLOCK;
                int32_t s = 0;
                for (int i = 0; i < ERT_BLOCK; i++) {
                    int v = (int)rintf(xb[i] * inv);
                    qb[i] = (int16_t)v;
                    s += v;
                }
                da[(size_t)j * nblk + b] = amax / (float)ERT_ACT_LEVELS;
                qsum[(size_t)j * nblk + b] = s;
            }
        }
    }
}

/* tables of formats.lut_tables, in the same float32 order (this file is compiled with
 * -ffp-contract=off), and the group sums of x */
static inline float lut_block_ref(const float *xb, float inv, int8_t *tb) {
    for (int q = 0; q < 8; q++) {
        const float *v = xb + 4 * q;
        int8_t *t = tb + 16 * q;
        for (int p = 0; p < 16; p++) {
            float e = (((p & 1) ? v[0] : -v[0]) + ((p & 2) ? v[1] : -v[1])) + ((p & 4) ? v[2] : -v[2]);
            e = e + ((p & 8) ? v[3] : -v[3]);
            t[p] = (int8_t)rintf(e * inv);
        }
    }
    float bsum = 0.0f;
    for (int i = 0; i < ERT_BLOCK; i++) bsum += xb[i];
    return bsum;
}

void ert_lut_act_ref(const float *x, int n, int cols, int group_size, int8_t *lut, float *ls, int16_t *lq,
                     float *xsum) {
    ERT_LUT_ACT(x, n, cols, group_size, lut, ls, lq, xsum, lut_block_ref);
}

/* ---- f32 / f16 -------------------------------------------------------------------- */

static float dot_f32(const float *w, const float *x, int cols) {
    /* four partial sums: lets compilers vectorize without reassociating */
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int c = 0;
    for (; c + 4 <= cols; c += 4) {
        s0 += w[c] * x[c];
        s1 += w[c + 1] * x[c + 1];
        s2 += w[c + 2] * x[c + 2];
        s3 += w[c + 3] * x[c + 3];
    }
    for (; c < cols; c++) s0 += w[c] * x[c];
    return (s0 + s1) + (s2 + s3);
}

void ert_f32_matmul_ref(const ert_weight *w, const ert_act *a, int r0, int r1, float *y) {
    const float *W = (const float *)w->data;
    for (int r = r0; r < r1; r++)
        for (int j = 0; j < a->n; j++)
            y[(size_t)j * w->rows + r] = dot_f32(W + (size_t)r * w->cols, a->x + (size_t)j * a->cols, w->cols);
}

static float dot_f16(const uint16_t *w, const float *x, int cols) {
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int c = 0;
    for (; c + 4 <= cols; c += 4) {
        s0 += ert_half_to_float(w[c]) * x[c];
        s1 += ert_half_to_float(w[c + 1]) * x[c + 1];
        s2 += ert_half_to_float(w[c + 2]) * x[c + 2];
        s3 += ert_half_to_float(w[c + 3]) * x[c + 3];
    }
    for (; c < cols; c++) s0 += ert_half_to_float(w[c]) * x[c];
    return (s0 + s1) + (s2 + s3);
}

void ert_f16_matmul_ref(const ert_weight *w, const ert_act *a, int r0, int r1, float *y) {
    const uint16_t *W = (const uint16_t *)w->data;
    for (int r = r0; r < r1; r++)
        for (int j = 0; j < a->n; j++)
            y[(size_t)j * w->rows + r] = dot_f16(W + (size_t)r * w->cols, a->x + (size_t)j * a->cols, w->cols);
}

void ert_f32_dequant_ref(const ert_weight *w, const int64_t *rows, int row0, int k, float *out) {
    for (int i = 0; i < k; i++) {
        int64_t r = rows ? rows[i] : row0 + i;
        memcpy(out + (size_t)i * w->cols, (const float *)w->data + (size_t)r * w->cols, sizeof(float) * (size_t)w->cols);
    }
}

void ert_f16_dequant_ref(const ert_weight *w, const int64_t *rows, int row0, int k, float *out) {
    for (int i = 0; i < k; i++) {
        int64_t r = rows ? rows[i] : row0 + i;
        const uint16_t *src = (const uint16_t *)w->data + (size_t)r * w->cols;
        for (int c = 0; c < w->cols; c++) out[(size_t)i * w->cols + c] = ert_half_to_float(src[c]);
    }
}

/* ---- group formats ------------------------------------------------------------------ */

#define CHUNK 64 /* blocks unpacked at a time (2048 columns) */

/* q5, q6, q8: integer dot products of int16 activations and s = c - o (ert_int8_offset) */
static void group_matmul(const ert_weight *w, const ert_act *a, int r0, int r1, float *y, int bits) {
    const int nblk = a->nblk, off = ert_int8_offset(bits);
    int8_t s[CHUNK * ERT_BLOCK];
    for (int r = r0; r < r1; r++) {
        for (int j = 0; j < a->n; j++) y[(size_t)j * w->rows + r] = 0.0f;
        for (int b0 = 0; b0 < nblk; b0 += CHUNK) {
            int nb = nblk - b0 < CHUNK ? nblk - b0 : CHUNK;
            for (int b = 0; b < nb; b++) {
                uint8_t c[ERT_BLOCK];
                unpack_block(w, bits, r, b0 + b, c);
                for (int i = 0; i < ERT_BLOCK; i++) s[b * ERT_BLOCK + i] = (int8_t)(c[i] - off);
            }
            for (int j = 0; j < a->n; j++) {
                const int16_t *q = a->q + (size_t)j * a->cols + (size_t)b0 * ERT_BLOCK;
                const float *da = a->da + (size_t)j * nblk + b0;
                const int32_t *qsum = a->qsum + (size_t)j * nblk + b0;
                float acc = 0.0f;
                for (int b = 0; b < nb; b++) {
                    const size_t gi = ert_group_offset(w, bits, r, (b0 + b) * ERT_BLOCK / w->group_size);
                    float d = ert_half_to_float(w->scale[gi]);
                    float m = ert_half_to_float(w->min[gi]);
                    int32_t isum = 0;
                    for (int i = 0; i < ERT_BLOCK; i++) isum += (int32_t)s[b * ERT_BLOCK + i] * q[b * ERT_BLOCK + i];
                    acc += da[b] * (d * (float)isum + (m + d * (float)off) * (float)qsum[b]);
                }
                y[(size_t)j * w->rows + r] += acc;
            }
        }
    }
}

/* q1..q4: y = sum_g d/2 * ls_g * I_g + (m + d*(2^bits-1)/2) * xsum_g,
 * I_g = sum_{b in g} I_b, or with block multipliers sum_{b in g} (I_b * q_b + 2^14) >> 15,
 * I_b = sum_k 2^k sum_{j in b} lut[j][nibble of plane k] (formats.matmul_reference) */
void ert_lut_matmul_ref(const ert_weight *w, const ert_act *a, int r0, int r1, float *y, int bits) {
    const int nblk = a->nblk, ng = a->ngroups, bpg = w->group_size / ERT_BLOCK;
    const float off = 0.5f * (float)((1 << bits) - 1);
    for (int r = r0; r < r1; r++)
        for (int j = 0; j < a->n; j++) {
            const int8_t *lut = a->lut + (size_t)j * a->cols / 4 * 16;
            float acc = 0.0f;
            for (int g = 0; g < ng; g++) {
                const float d = ert_half_to_float(w->scale[ert_group_offset(w, bits, r, g)]);
                const float m = ert_half_to_float(w->min[ert_group_offset(w, bits, r, g)]);
                const int b1 = (g + 1) * bpg < nblk ? (g + 1) * bpg : nblk;
                int32_t isum = 0;
                for (int b = g * bpg; b < b1; b++) {
                    int32_t bsum = 0;
                    for (int k = 0; k < bits; k++)
                        for (int s = 0; s < 4; s++) {
                            const uint8_t v = ((const uint8_t *)w->data)[ert_lut_offset(w, bits, r, b, k, s)];
                            const int8_t *t = lut + (size_t)(8 * b + 2 * s) * 16;
                            bsum += (t[v & 15] + t[16 + (v >> 4)]) * (1 << k);
                        }
                    isum += a->lq ? (bsum * a->lq[(size_t)j * nblk + b] + (1 << 14)) >> 15 : bsum;
                }
                const float fsum = a->ls[(size_t)j * ng + g] * (float)isum;
                acc += 0.5f * d * fsum + (m + d * off) * a->xsum[(size_t)j * ng + g];
            }
            y[(size_t)j * w->rows + r] = acc;
        }
}

static void group_dequant(const ert_weight *w, const int64_t *rows, int row0, int k, float *out, int bits) {
    const int cols = w->cols, nblk = cols / ERT_BLOCK;
    for (int i = 0; i < k; i++) {
        int64_t r = rows ? rows[i] : row0 + i;
        float *o = out + (size_t)i * cols;
        for (int b = 0; b < nblk; b++) {
            const size_t gi = ert_group_offset(w, bits, (int)r, b * ERT_BLOCK / w->group_size);
            float d = ert_half_to_float(w->scale[gi]);
            float m = ert_half_to_float(w->min[gi]);
            uint8_t c[ERT_BLOCK];
            unpack_block(w, bits, (int)r, b, c);
            for (int t = 0; t < ERT_BLOCK; t++) o[b * ERT_BLOCK + t] = d * (float)c[t] + m;
        }
    }
}

#define GROUP_KERNELS(name, bits)                                                                  \
    void ert_##name##_matmul_ref(const ert_weight *w, const ert_act *a, int r0, int r1, float *y) { \
        if (!ert_lut_bits(bits))                                                                   \
            group_matmul(w, a, r0, r1, y, bits);                                                   \
        else                                                                                       \
            ert_lut_matmul_ref(w, a, r0, r1, y, bits);                                             \
    }                                                                                              \
    void ert_##name##_dequant_ref(const ert_weight *w, const int64_t *rows, int row0, int k, float *out) { \
        group_dequant(w, rows, row0, k, out, bits);                                                \
    }

GROUP_KERNELS(q1, 1)
GROUP_KERNELS(q2, 2)
GROUP_KERNELS(q3, 3)
GROUP_KERNELS(q4, 4)
GROUP_KERNELS(q5, 5)
GROUP_KERNELS(q6, 6)
GROUP_KERNELS(q8, 8)
