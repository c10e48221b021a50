/* Portable scalar reference of every kernel (the fallback on any CPU, and the
 * oracle the SIMD kernels are tested against). Compiled with -ffp-contract=off:
 * dequantization is d*c + m with a separately rounded add, exactly like numpy.
 *
 * Arithmetic (formats.matmul_reference):
 *   activations, per 32-block: amax = max|x|, q = rint(x * 127/amax), da = amax/127
 *   codes c -> s = c - 2^(bits-1); per block isum = sum(s*q), qsum = sum(q)
 *   y += da * (d*isum + (m + d*2^(bits-1)) * qsum)
 */
#define ERT_BUILDING
#include "edgert.h"

#include <math.h>
#include <string.h>

/* ---- code unpacking ------------------------------------------------------------- */

/* sub-plane widths of a bits-bit code (formats.PLANES) */
static int planes(int bits, int width[2]) {
    if (bits == 3) { width[0] = 2; width[1] = 1; return 2; }
    width[0] = bits;
    return 1;
}

/* the 32 codes of one block (4*bits bytes at p) */
static void unpack_block(int bits, const uint8_t *p, uint8_t c[ERT_BLOCK]) {
    int width[2], np = planes(bits, width), shift = 0;
    memset(c, 0, ERT_BLOCK);
    for (int k = 0; k < np; k++) {
        int wdt = width[k], nb = 4 * wdt, mask = (1 << wdt) - 1;
        for (int i = 0; i < ERT_BLOCK; i++)
            c[i] |= (uint8_t)(((p[i % nb] >> (wdt * (i / nb))) & mask) << shift);
        p += nb;
        shift += wdt;
    }
}

/* ---- activations ------------------------------------------------------------------ */

void ert_quant_act_ref(const float *x, int n, int cols, int8_t *q, float *da, int32_t *qsum) {
    int nblk = cols / ERT_BLOCK;
    for (int j = 0; j < n; j++) {
        for (int b = 0; b < nblk; b++) {
            const float *xb = x + (size_t)j * cols + (size_t)b * ERT_BLOCK;
            int8_t *qb = q + (size_t)j * cols + (size_t)b * ERT_BLOCK;
            float amax = 0.0f;
            for (int i = 0; i < ERT_BLOCK; i++) {
                float a = fabsf(xb[i]);
                if (a > amax) amax = a;
            }
            float inv = amax != 0.0f ? 127.0f / amax : 0.0f;
            int32_t s = 0;
            for (int i = 0; i < ERT_BLOCK; i++) {
                int v = (int)rintf(xb[i] * inv);
                qb[i] = (int8_t)v;
                s += v;
            }
            da[(size_t)j * nblk + b] = amax / 127.0f;
            qsum[(size_t)j * nblk + b] = s;
        }
    }
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

static void group_matmul(const ert_weight *w, const ert_act *a, int r0, int r1, float *y, int bits) {
    const int nblk = a->nblk, ng = a->ngroups, bpb = 4 * bits, off = 1 << (bits - 1);
    const size_t rowbytes = (size_t)nblk * bpb;
    int8_t s[CHUNK * ERT_BLOCK];
    for (int r = r0; r < r1; r++) {
        const uint8_t *codes = (const uint8_t *)w->data + (size_t)r * rowbytes;
        for (int j = 0; j < a->n; j++) y[(size_t)j * w->rows + r] = 0.0f;
        for (int b0 = 0; b0 < nblk; b0 += CHUNK) {
            int nb = nblk - b0 < CHUNK ? nblk - b0 : CHUNK;
            for (int b = 0; b < nb; b++) {
                uint8_t c[ERT_BLOCK];
                unpack_block(bits, codes + (size_t)(b0 + b) * bpb, c);
                for (int i = 0; i < ERT_BLOCK; i++) s[b * ERT_BLOCK + i] = (int8_t)(c[i] - off);
            }
            for (int j = 0; j < a->n; j++) {
                const int8_t *q = a->q + (size_t)j * a->cols + (size_t)b0 * ERT_BLOCK;
                const float *da = a->da + (size_t)j * nblk + b0;
                const int32_t *qsum = a->qsum + (size_t)j * nblk + b0;
                float acc = 0.0f;
                for (int b = 0; b < nb; b++) {
                    int g = (b0 + b) * ERT_BLOCK / w->group_size;
                    float d = ert_half_to_float(w->scale[(size_t)r * ng + g]);
                    float m = ert_half_to_float(w->min[(size_t)r * ng + g]);
                    int32_t isum = 0;
                    for (int i = 0; i < ERT_BLOCK; i++) isum += (int32_t)s[b * ERT_BLOCK + i] * q[b * ERT_BLOCK + i];
                    acc += da[b] * (d * (float)isum + (m + d * (float)off) * (float)qsum[b]);
                }
                y[(size_t)j * w->rows + r] += acc;
            }
        }
    }
}

static void group_dequant(const ert_weight *w, const int64_t *rows, int row0, int k, float *out, int bits) {
    const int cols = w->cols, nblk = cols / ERT_BLOCK, bpb = 4 * bits;
    const int ng = (cols + w->group_size - 1) / w->group_size;
    for (int i = 0; i < k; i++) {
        int64_t r = rows ? rows[i] : row0 + i;
        const uint8_t *codes = (const uint8_t *)w->data + (size_t)r * nblk * bpb;
        float *o = out + (size_t)i * cols;
        for (int b = 0; b < nblk; b++) {
            int g = b * ERT_BLOCK / w->group_size;
            float d = ert_half_to_float(w->scale[(size_t)r * ng + g]);
            float m = ert_half_to_float(w->min[(size_t)r * ng + g]);
            uint8_t c[ERT_BLOCK];
            unpack_block(bits, codes + (size_t)b * bpb, c);
            for (int t = 0; t < ERT_BLOCK; t++) o[b * ERT_BLOCK + t] = d * (float)c[t] + m;
        }
    }
}

#define GROUP_KERNELS(name, bits)                                                                  \
    void ert_##name##_matmul_ref(const ert_weight *w, const ert_act *a, int r0, int r1, float *y) { \
        group_matmul(w, a, r0, r1, y, bits);                                                       \
    }                                                                                              \
    void ert_##name##_dequant_ref(const ert_weight *w, const int64_t *rows, int row0, int k, float *out) { \
        group_dequant(w, rows, row0, k, out, bits);                                                \
    }

GROUP_KERNELS(q1, 1)
GROUP_KERNELS(q2, 2)
GROUP_KERNELS(q3, 3)
GROUP_KERNELS(q4, 4)
GROUP_KERNELS(q8, 8)
