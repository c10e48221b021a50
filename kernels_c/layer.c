/* One transformer layer, the C twin of models/transformer.py `layer()`:
 *
 *   h = rmsnorm(x) ; q, k, v = h Wq, h Wk, h Wv (+ biases) ; per-head rmsnorm of q, k
 *   RoPE(q, k) ; K, V cache <- k, v ; a = softmax(q K^T * scale, causal, window) V
 *   x += post_norm(a Wo)
 *   h = rmsnorm(x) ; x += post_norm(act(h Wgate) * (h Wup) Wdown)
 *
 * for n tokens at positions pos0 .. pos0+n-1 at once (n = 1 in decode). The switches
 * (biases, q/k norms, post-norms, RoPE pairing, activation, window) are the family's
 * Spec, set by edge_rt/layer.py. Products go through ert_matmul; everything between
 * them runs here, threaded on the same pool, so a decoded token costs one C call per
 * layer. Float arithmetic follows the numpy twin except for summation order and libm. */
#define ERT_BUILDING
#include "edgert.h"

#include <math.h>
#include <stdlib.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

/* ---- vector helpers ----------------------------------------------------------------
 * Portable C (eight partial sums: compilers vectorize them without -ffast-math), and SIMD
 * twins chosen at load time (AVX2+FMA+F16C on x86-64, NEON on ARM; below). The KV
 * cache holds float32, IEEE half (rounded to nearest even like numpy's float16) or q8_0
 * (enum ert_kv_type). */

typedef uint16_t half;

#if defined(__aarch64__)
static inline float h2f(half h) { __fp16 f; memcpy(&f, &h, 2); return f; } /* one fcvt */
static inline half f2h(float x) { __fp16 f = (__fp16)x; half h; memcpy(&h, &f, 2); return h; }
#else
static inline float h2f(half h) { return ert_half_to_float(h); }
static half f2h(float f) {
    union { float f; uint32_t u; } v = {f};
    const uint32_t sign = (v.u >> 16) & 0x8000u, a = v.u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return (half)(sign | 0x7E00u);  /* NaN */
    if (a >= 0x477FF000u) return (half)(sign | 0x7C00u); /* rounds to infinity (>= 65520) */
    if (a < 0x38800000u) return (half)(sign | (uint32_t)rintf(fabsf(f) * 16777216.0f)); /* subnormal: units of 2^-24 */
    const uint32_t r = a - 0x38000000u;                 /* exponent rebiased from 127 to 15 */
    return (half)(sign | ((r + 0xFFFu + ((r >> 13) & 1u)) >> 13));
}
#endif

/* llama.cpp's block_q8_0: 32 values x ~ d * qs */
typedef struct {
    half d;
    int8_t qs[32];
} block_q8_0;
_Static_assert(sizeof(block_q8_0) == 34, "q8_0 blocks are 34 bytes");

/* bytes of n values of a cache row (q8_0: n a multiple of 32) */
static size_t kv_bytes(int type, size_t n) {
    return type == ERT_KV_Q8_0 ? n / 32 * sizeof(block_q8_0) : n * (type == ERT_KV_F16 ? sizeof(half) : sizeof(float));
}

/* n values of a cache row as float32: the row itself (float32), or converted into x */
static const float *kv_to_f32(int type, const void *row, int n, float *x) {
    if (type == ERT_KV_F32) return row;
    if (type == ERT_KV_F16)
        for (int i = 0; i < n; i++) x[i] = h2f(((const half *)row)[i]);
    else
        for (int b = 0; b < n / 32; b++) {
            const block_q8_0 *blk = (const block_q8_0 *)row + b;
            const float d = h2f(blk->d);
            for (int i = 0; i < 32; i++) x[32 * b + i] = d * blk->qs[i];
        }
    return x;
}

/* n values x into a cache row; q8_0 as llama.cpp's quantize_row_q8_0_ref (and gguf-py):
 * d = max|x| / 127, codes roundf(x / d) (halves away from zero) with the float32 d */
static void kv_from_f32(int type, const float *x, int n, void *row) {
    if (type == ERT_KV_F32) memcpy(row, x, sizeof(float) * n);
    else if (type == ERT_KV_F16)
        for (int i = 0; i < n; i++) ((half *)row)[i] = f2h(x[i]);
    else
        for (int b = 0; b < n / 32; b++) {
            block_q8_0 *blk = (block_q8_0 *)row + b;
            const float *xb = x + 32 * b;
            float amax = 0.0f;
            for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(xb[i]));
            const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
            blk->d = f2h(d);
            for (int i = 0; i < 32; i++) blk->qs[i] = (int8_t)roundf(xb[i] * id);
        }
}

/* The attention of one token for R query heads that share a key/value head (R <= 4):
 *   scores(type, q, R, K, stride, L, hd, scale, s, ss):  s[r ss + j] = scale * q[r hd ..] . K[j]   (j < L)
 *   expsum(s, L, &m):                                    m = max s, s = exp(s - m) (in place); returns sum s
 *   mix(type, out, R, p, ps, V, stride, L, hd):          out[r hd ..] = sum_j p[r ps + j] V[j]
 * K[j] = K + j * stride bytes, a row of hd values of the cache's type; the R query (and
 * output) rows follow each other. Each key and value row is read (and converted) once for
 * the R heads. */
typedef void (*scores_fn)(int type, const float *q, int R, const void *k, size_t stride, int L, int hd, float scale,
                          float *s, size_t ss);
typedef void (*mix_fn)(int type, float *out, int R, const float *p, size_t ps, const void *v, size_t stride, int L,
                       int hd);

static void scores_c(int type, const float *q, int R, const void *k, size_t stride, int L, int hd, float scale,
                     float *sc, size_t ss) {
    float buf[hd];
    for (int j = 0; j < L; j++) {
        const float *kj = kv_to_f32(type, (const char *)k + j * stride, hd, buf);
        for (int r = 0; r < R; r++) {
            const float *qr = q + (size_t)r * hd;
            float s[8] = {0};
            int i = 0;
            for (; i + 8 <= hd; i += 8)
                for (int u = 0; u < 8; u++) s[u] += qr[i + u] * kj[i + u];
            for (; i < hd; i++) s[0] += qr[i] * kj[i];
            sc[r * ss + j] = (((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]))) * scale;
        }
    }
}

static void mix_c(int type, float *out, int R, const float *p, size_t ps, const void *v, size_t stride, int L, int hd) {
    float buf[hd];
    memset(out, 0, sizeof(float) * R * hd);
    for (int j = 0; j < L; j++) {
        const float *vj = kv_to_f32(type, (const char *)v + j * stride, hd, buf);
        for (int r = 0; r < R; r++)
            for (int i = 0; i < hd; i++) out[r * hd + i] += p[r * ps + j] * vj[i];
    }
}

static float expsum_c(float *s, int L, float *max) {
    float mx = -INFINITY, sum = 0.0f;
    for (int j = 0; j < L; j++) mx = s[j] > mx ? s[j] : mx;
    for (int j = 0; j < L; j++) sum += s[j] = expf(s[j] - mx);
    *max = mx;
    return sum;
}

static float silu(float x) { return x / (1.0f + expf(-x)); }

static float gelu_tanh(float x) {
    const float c = 0.7978845608028654f; /* sqrt(2/pi) */
    return 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * x * x * x)));
}

/* g = act(g) * u, n values */
static void glu_c(float *g, const float *u, int n, int act) {
    for (int j = 0; j < n; j++) g[j] = (act == ERT_ACT_GELU_TANH ? gelu_tanh(g[j]) : silu(g[j])) * u[j];
}

/* ---- SIMD twins ------------------------------------------------------------------------
 * Written once, over vectors of 8 floats (vec8), for the one instruction set a build has
 * primitives for (below): x86-64 AVX2+FMA+F16C (functions with target attributes: the
 * library's baseline is SSE2), chosen when the CPU has them; ARM NEON, a vec8 being two
 * float32x4_t: always on AArch64, and on 32-bit ARM when the build enables it (-mfpu=neon),
 * chosen by dispatch.c when HWCAP_NEON says the CPU has it. They differ from the portable
 * helpers by summation order, the exp polynomial and (32-bit NEON, which has no division)
 * a refined reciprocal. */
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define SIMD_ISA avx2
#define SIMD __attribute__((target("avx2,fma,f16c")))
#define SIMD_INLINE SIMD __attribute__((always_inline)) static inline
typedef __m256 vec8;
SIMD_INLINE vec8 v_set1(float x) { return _mm256_set1_ps(x); }
SIMD_INLINE vec8 v_load(const float *p) { return _mm256_loadu_ps(p); }
SIMD_INLINE void v_store(float *p, vec8 v) { _mm256_storeu_ps(p, v); }
SIMD_INLINE vec8 v_add(vec8 a, vec8 b) { return _mm256_add_ps(a, b); }
SIMD_INLINE vec8 v_sub(vec8 a, vec8 b) { return _mm256_sub_ps(a, b); }
SIMD_INLINE vec8 v_mul(vec8 a, vec8 b) { return _mm256_mul_ps(a, b); }
/* Two 128-bit divisions, not one 256-bit vdivps (the same IEEE quotients): on the shared Zen 3
 * host the tests and benchmarks run on, vdivps ymm returned some quotients 1 ulp toward zero in
 * lane 5, in bursts of seconds, while divps xmm and divss on the same operands never did
 * (benchmarks/div_probe.c, BENCHMARKS.md "A faulty division"): runs of one model differed. */
SIMD_INLINE __m128 div4(__m128 a, __m128 b) { /* in asm: GCC fuses two _mm_div_ps into one vdivps ymm */
    __m128 q;
    __asm__("vdivps %2, %1, %0" : "=x"(q) : "x"(a), "x"(b));
    return q;
}
SIMD_INLINE vec8 v_div(vec8 a, vec8 b) {
    return _mm256_set_m128(div4(_mm256_extractf128_ps(a, 1), _mm256_extractf128_ps(b, 1)),
                           div4(_mm256_castps256_ps128(a), _mm256_castps256_ps128(b)));
}
SIMD_INLINE vec8 v_max(vec8 a, vec8 b) { return _mm256_max_ps(a, b); }
SIMD_INLINE vec8 v_min(vec8 a, vec8 b) { return _mm256_min_ps(a, b); }
SIMD_INLINE vec8 v_fma(vec8 a, vec8 b, vec8 c) { return _mm256_fmadd_ps(a, b, c); }  /* a b + c */
SIMD_INLINE vec8 v_fnma(vec8 a, vec8 b, vec8 c) { return _mm256_fnmadd_ps(a, b, c); } /* c - a b */
SIMD_INLINE vec8 v_round(vec8 x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
SIMD_INLINE vec8 v_exp2i(vec8 n) { /* 2^n, n integral in [-126, 127] */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}

SIMD_INLINE float v_hsum(vec8 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

SIMD_INLINE float v_hmax(vec8 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

/* the KB (1, 2 or 4) sums of a[0..KB-1], times scale, stored at s[0..KB-1] */
SIMD_INLINE void v_hsums(const vec8 *a, int KB, float scale, float *s) {
    if (KB == 1) {
        s[0] = v_hsum(a[0]) * scale;
        return;
    }
    const __m256 t0 = _mm256_hadd_ps(a[0], a[1]); /* a0 01 23, a1 01 23 | a0 45 67, a1 45 67 */
    const __m256 t = KB == 4 ? _mm256_hadd_ps(t0, _mm256_hadd_ps(a[2], a[3])) : _mm256_hadd_ps(t0, t0);
    const __m128 r = _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)), _mm_set1_ps(scale));
    if (KB == 4) _mm_storeu_ps(s, r);
    else _mm_storel_pi((__m64 *)s, r);
}

/* values c..c+7 of a cache row (c a multiple of 8) */
SIMD_INLINE vec8 load_f16(const half *row, int c) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + c))); }

SIMD_INLINE vec8 load_q8_0(const block_q8_0 *row, int c) {
    const block_q8_0 *b = row + c / 32;
    const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b->qs + c % 32))));
    return _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(b->d)), q); /* d q: exact in float32 */
}

#elif defined(__GNUC__) && (defined(__aarch64__) || defined(__ARM_NEON))
#include <arm_neon.h>
#define SIMD_ISA neon
#define SIMD
#define SIMD_INLINE __attribute__((always_inline)) static inline
typedef struct {
    float32x4_t lo, hi;
} vec8;
#define V8(f, a, b) ((vec8){f((a).lo, (b).lo), f((a).hi, (b).hi)})
SIMD_INLINE vec8 v_set1(float x) { return (vec8){vdupq_n_f32(x), vdupq_n_f32(x)}; }
SIMD_INLINE vec8 v_load(const float *p) { return (vec8){vld1q_f32(p), vld1q_f32(p + 4)}; }
SIMD_INLINE void v_store(float *p, vec8 v) { vst1q_f32(p, v.lo), vst1q_f32(p + 4, v.hi); }
SIMD_INLINE vec8 v_add(vec8 a, vec8 b) { return V8(vaddq_f32, a, b); }
SIMD_INLINE vec8 v_sub(vec8 a, vec8 b) { return V8(vsubq_f32, a, b); }
SIMD_INLINE vec8 v_mul(vec8 a, vec8 b) { return V8(vmulq_f32, a, b); }
SIMD_INLINE vec8 v_max(vec8 a, vec8 b) { return V8(vmaxq_f32, a, b); }
SIMD_INLINE vec8 v_min(vec8 a, vec8 b) { return V8(vminq_f32, a, b); }
#if defined(__ARM_FEATURE_FMA) /* AArch64, -mfpu=neon-vfpv4 */
SIMD_INLINE vec8 v_fma(vec8 a, vec8 b, vec8 c) { return (vec8){vfmaq_f32(c.lo, a.lo, b.lo), vfmaq_f32(c.hi, a.hi, b.hi)}; }
SIMD_INLINE vec8 v_fnma(vec8 a, vec8 b, vec8 c) { return (vec8){vfmsq_f32(c.lo, a.lo, b.lo), vfmsq_f32(c.hi, a.hi, b.hi)}; }
#else /* -mfpu=neon: a b rounded, then added */
SIMD_INLINE vec8 v_fma(vec8 a, vec8 b, vec8 c) { return (vec8){vmlaq_f32(c.lo, a.lo, b.lo), vmlaq_f32(c.hi, a.hi, b.hi)}; }
SIMD_INLINE vec8 v_fnma(vec8 a, vec8 b, vec8 c) { return (vec8){vmlsq_f32(c.lo, a.lo, b.lo), vmlsq_f32(c.hi, a.hi, b.hi)}; }
#endif
#if defined(__aarch64__)
SIMD_INLINE vec8 v_div(vec8 a, vec8 b) { return V8(vdivq_f32, a, b); }
SIMD_INLINE vec8 v_round(vec8 x) { return (vec8){vrndnq_f32(x.lo), vrndnq_f32(x.hi)}; }
SIMD_INLINE float v_hsum(vec8 v) { return vaddvq_f32(vaddq_f32(v.lo, v.hi)); }
SIMD_INLINE float v_hmax(vec8 v) { return vmaxvq_f32(vmaxq_f32(v.lo, v.hi)); }
#else /* 32-bit NEON has no division, rounding to integral or across-vector sums */
SIMD_INLINE float32x4_t recip4(float32x4_t b) { /* the estimate and two Newton steps: about 1 ulp */
    float32x4_t r = vrecpeq_f32(b);
    r = vmulq_f32(vrecpsq_f32(b, r), r);
    return vmulq_f32(vrecpsq_f32(b, r), r);
}
SIMD_INLINE vec8 v_div(vec8 a, vec8 b) { return (vec8){vmulq_f32(a.lo, recip4(b.lo)), vmulq_f32(a.hi, recip4(b.hi))}; }
SIMD_INLINE vec8 v_round(vec8 x) { /* |x| < 2^22: NEON adds rounding to nearest even */
    const vec8 m = v_set1(12582912.0f); /* 1.5 * 2^23 */
    return v_sub(v_add(x, m), m);
}
SIMD_INLINE float v_hsum(vec8 v) {
    const float32x4_t s = vaddq_f32(v.lo, v.hi);
    const float32x2_t t = vadd_f32(vget_low_f32(s), vget_high_f32(s));
    return vget_lane_f32(vpadd_f32(t, t), 0);
}
SIMD_INLINE float v_hmax(vec8 v) {
    const float32x4_t s = vmaxq_f32(v.lo, v.hi);
    const float32x2_t t = vmax_f32(vget_low_f32(s), vget_high_f32(s));
    return vget_lane_f32(vpmax_f32(t, t), 0);
}
#endif
SIMD_INLINE vec8 v_exp2i(vec8 n) { /* 2^n, n integral in [-126, 127] */
    const int32x4_t bias = vdupq_n_s32(127);
    return (vec8){vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n.lo), bias), 23)),
                  vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n.hi), bias), 23))};
}

SIMD_INLINE void v_hsums(const vec8 *a, int KB, float scale, float *s) {
    for (int b = 0; b < KB; b++) s[b] = v_hsum(a[b]) * scale;
}

#if defined(__aarch64__) || ((__ARM_FP & 2) && defined(__ARM_FP16_FORMAT_IEEE)) /* 32-bit: -mfpu=neon-fp16 -mfp16-format=ieee */
SIMD_INLINE vec8 load_f16(const half *row, int c) {
    const uint16x8_t h = vld1q_u16(row + c);
    return (vec8){vcvt_f32_f16(vreinterpret_f16_u16(vget_low_u16(h))), vcvt_f32_f16(vreinterpret_f16_u16(vget_high_u16(h)))};
}
#else
SIMD_INLINE vec8 load_f16(const half *row, int c) {
    float x[8];
    for (int i = 0; i < 8; i++) x[i] = h2f(row[c + i]);
    return v_load(x);
}
#endif

SIMD_INLINE vec8 load_q8_0(const block_q8_0 *row, int c) {
    const block_q8_0 *b = row + c / 32;
    const int16x8_t q = vmovl_s8(vld1_s8(b->qs + c % 32));
    const float32x4_t d = vdupq_n_f32(h2f(b->d)); /* d q: exact in float32 */
    return (vec8){vmulq_f32(d, vcvtq_f32_s32(vmovl_s16(vget_low_s16(q)))), vmulq_f32(d, vcvtq_f32_s32(vmovl_s16(vget_high_s16(q))))};
}
#endif

#ifdef SIMD_ISA
#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define ISA(name) CAT(name, SIMD_ISA) /* expsum -> expsum_avx2, expsum_neon */
#define STR_(a) #a
#define STR(a) STR_(a)
#define UNROLL _Pragma("GCC unroll 4")

SIMD_INLINE vec8 load_f32(const float *row, int c) { return v_load(row + c); }

/* e^x to about 2 ulp (Cephes expf: x = n ln2 + r, |r| <= ln2/2, a degree-7 polynomial in r,
 * times 2^n); x is clamped to [-87.3, 88.4], the range of normal results */
SIMD_INLINE vec8 v_exp(vec8 x) {
    x = v_min(v_max(x, v_set1(-87.33654f)), v_set1(88.37626f));
    const vec8 n = v_round(v_mul(x, v_set1(1.44269504088896341f)));
    vec8 r = v_fnma(n, v_set1(0.693359375f), x);
    r = v_fnma(n, v_set1(-2.12194440e-4f), r);
    vec8 y = v_set1(1.9875691500e-4f);
    y = v_fma(y, r, v_set1(1.3981999507e-3f));
    y = v_fma(y, r, v_set1(8.3334519073e-3f));
    y = v_fma(y, r, v_set1(4.1665795894e-2f));
    y = v_fma(y, r, v_set1(1.6666665459e-1f));
    y = v_fma(y, r, v_set1(5.0000001201e-1f));
    y = v_fma(y, v_mul(r, r), v_add(r, v_set1(1.0f)));
    return v_mul(y, v_exp2i(n));
}

SIMD static float ISA(expsum)(float *s, int L, float *max) {
    int j = 0;
    vec8 vm = v_set1(-INFINITY);
    for (; j + 8 <= L; j += 8) vm = v_max(vm, v_load(s + j));
    float mx = v_hmax(vm);
    for (; j < L; j++) mx = s[j] > mx ? s[j] : mx;
    vm = v_set1(mx);
    vec8 vs = v_set1(0.0f);
    for (j = 0; j + 8 <= L; j += 8) {
        const vec8 e = v_exp(v_sub(v_load(s + j), vm));
        v_store(s + j, e);
        vs = v_add(vs, e);
    }
    float sum = v_hsum(vs);
    for (; j < L; j++) sum += s[j] = expf(s[j] - mx);
    *max = mx;
    return sum;
}

/* act(x) = x sigmoid(k): SiLU k = x; GELU (tanh form) k = 2 sqrt(2/pi) (x + 0.044715 x^3),
 * as 0.5 (1 + tanh(z)) = sigmoid(2z) */
SIMD static void ISA(glu)(float *g, const float *u, int n, int act) {
    const vec8 one = v_set1(1.0f), c2 = v_set1(-2.0f * 0.7978845608028654f), c3 = v_set1(0.044715f);
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        const vec8 x = v_load(g + j);
        const vec8 mk = act == ERT_ACT_GELU_TANH ? v_mul(c2, v_fma(v_mul(c3, x), v_mul(x, x), x))
                                                 : v_sub(v_set1(0.0f), x); /* -k */
        const vec8 a = v_div(x, v_add(one, v_exp(mk)));
        v_store(g + j, v_mul(a, v_load(u + j)));
    }
    glu_c(g + j, u + j, n - j, act);
}

/* Scores: R heads x KB keys of accumulators (R KB <= 12), each chunk of a key row converted
 * once. Mix: out chunks of R heads += KB keys' weighted value chunks. Both are specialized
 * for each R (the switches), so the accumulator arrays are registers. */
#define SIMD_ATTENTION(name, T, LOAD)                                                           \
    SIMD_INLINE void scores##name##_block(const float *q, const int R, const int KB, const T *k, size_t stride, \
                                          int hd, float scale, float *s, size_t ss) {           \
        vec8 acc[4][4];                                                                         \
        UNROLL for (int r = 0; r < R; r++) UNROLL for (int b = 0; b < KB; b++) acc[r][b] = v_set1(0.0f); \
        for (int c = 0; c < hd; c += 8) {                                                       \
            UNROLL for (int b = 0; b < KB; b++) {                                               \
                const vec8 kv = LOAD(k + b * stride, c);                                        \
                UNROLL for (int r = 0; r < R; r++) acc[r][b] = v_fma(kv, v_load(q + r * hd + c), acc[r][b]); \
            }                                                                                   \
        }                                                                                       \
        UNROLL for (int r = 0; r < R; r++) v_hsums(acc[r], KB, scale, s + r * ss);              \
    }                                                                                           \
    SIMD_INLINE void scores##name##_rows(const float *q, const int R, const T *k, size_t stride, int L, int hd, \
                                         float scale, float *s, size_t ss) {                    \
        const int KB = R <= 3 ? 4 : 2;                                                          \
        int j = 0;                                                                              \
        for (; j + KB <= L; j += KB) scores##name##_block(q, R, KB, k + j * stride, stride, hd, scale, s + j, ss); \
        for (; j < L; j++) scores##name##_block(q, R, 1, k + j * stride, stride, hd, scale, s + j, ss); \
    }                                                                                           \
    SIMD static void ISA(scores##name)(const float *q, int R, const void *k, size_t stride, int L, int hd, \
                                       float scale, float *s, size_t ss) {                      \
        stride /= sizeof(T);                                                                    \
        switch (R) {                                                                            \
        case 1: scores##name##_rows(q, 1, k, stride, L, hd, scale, s, ss); break;               \
        case 2: scores##name##_rows(q, 2, k, stride, L, hd, scale, s, ss); break;               \
        case 3: scores##name##_rows(q, 3, k, stride, L, hd, scale, s, ss); break;               \
        default: scores##name##_rows(q, 4, k, stride, L, hd, scale, s, ss); break;              \
        }                                                                                       \
    }                                                                                           \
    SIMD_INLINE void mix##name##_block(float *out, const int R, const int KB, const float *p, size_t ps, \
                                       const T *v, size_t stride, int hd) {                     \
        vec8 w[4][4];                                                                           \
        UNROLL for (int r = 0; r < R; r++) UNROLL for (int b = 0; b < KB; b++) w[r][b] = v_set1(p[r * ps + b]); \
        for (int c = 0; c < hd; c += 8) {                                                       \
            vec8 acc[4];                                                                        \
            UNROLL for (int r = 0; r < R; r++) acc[r] = v_load(out + r * hd + c);               \
            UNROLL for (int b = 0; b < KB; b++) {                                               \
                const vec8 vv = LOAD(v + b * stride, c);                                        \
                UNROLL for (int r = 0; r < R; r++) acc[r] = v_fma(w[r][b], vv, acc[r]);         \
            }                                                                                   \
            UNROLL for (int r = 0; r < R; r++) v_store(out + r * hd + c, acc[r]);               \
        }                                                                                       \
    }                                                                                           \
    SIMD_INLINE void mix##name##_rows(float *out, const int R, const float *p, size_t ps, const T *v, size_t stride, \
                                      int L, int hd) {                                          \
        const int KB = R <= 2 ? 4 : 2;                                                          \
        memset(out, 0, sizeof(float) * R * hd);                                                 \
        int j = 0;                                                                              \
        for (; j + KB <= L; j += KB) mix##name##_block(out, R, KB, p + j, ps, v + j * stride, stride, hd); \
        for (; j < L; j++) mix##name##_block(out, R, 1, p + j, ps, v + j * stride, stride, hd); \
    }                                                                                           \
    SIMD static void ISA(mix##name)(float *out, int R, const float *p, size_t ps, const void *v, size_t stride, \
                                    int L, int hd) {                                            \
        stride /= sizeof(T);                                                                    \
        switch (R) {                                                                            \
        case 1: mix##name##_rows(out, 1, p, ps, v, stride, L, hd); break;                       \
        case 2: mix##name##_rows(out, 2, p, ps, v, stride, L, hd); break;                       \
        case 3: mix##name##_rows(out, 3, p, ps, v, stride, L, hd); break;                       \
        default: mix##name##_rows(out, 4, p, ps, v, stride, L, hd); break;                      \
        }                                                                                       \
    }
SIMD_ATTENTION(_f32, float, load_f32)
SIMD_ATTENTION(_f16, half, load_f16)
SIMD_ATTENTION(_q8_0, block_q8_0, load_q8_0)

/* the cache's type picks the instance (head_dim a multiple of 8) */
SIMD static void ISA(scores)(int type, const float *q, int R, const void *k, size_t stride, int L, int hd, float scale,
                             float *s, size_t ss) {
    (type == ERT_KV_F32 ? ISA(scores_f32) : type == ERT_KV_F16 ? ISA(scores_f16) : ISA(scores_q8_0))(q, R, k, stride, L,
                                                                                                  hd, scale, s, ss);
}

SIMD static void ISA(mix)(int type, float *out, int R, const float *p, size_t ps, const void *v, size_t stride, int L,
                          int hd) {
    (type == ERT_KV_F32 ? ISA(mix_f32) : type == ERT_KV_F16 ? ISA(mix_f16) : ISA(mix_q8_0))(out, R, p, ps, v, stride, L, hd);
}

/* whether this CPU runs the SIMD twins (dispatch.c asks for them, simd != 0, only where
 * its ISA is usable: on ARM, AArch64 or a 32-bit CPU with HWCAP_NEON) */
static int simd_usable(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return 1;
#endif
}
#endif /* SIMD_ISA */

static struct {
    const char *isa;  /* "ref", or the ISA of the SIMD twins */
    scores_fn scores; /* for head_dim a multiple of 8 */
    mix_fn mix;
    float (*expsum)(float *, int, float *);
    void (*glu)(float *, const float *, int, int);
} V = {"ref", scores_c, mix_c, expsum_c, glu_c};

void ert_layer_select(int simd) { /* dispatch.c, at load and by ert_force_isa */
    V.isa = "ref", V.scores = scores_c, V.mix = mix_c, V.expsum = expsum_c, V.glu = glu_c;
#ifdef SIMD_ISA
    if (simd && simd_usable())
        V.isa = STR(SIMD_ISA), V.scores = ISA(scores), V.mix = ISA(mix), V.expsum = ISA(expsum), V.glu = ISA(glu);
#endif
}

const char *ert_layer_isa(void) { return V.isa; }

/* a cache (this layer's: [n_kv_heads][ctx][head_dim], each head's positions one after the
 * other, so attention reads a head's keys and values as one run): head h's row j */
static void *kv_row(const ert_layer *l, const void *cache, int ctx, int h, int j) {
    return (char *)cache + kv_bytes(l->kv_type, ((size_t)h * ctx + j) * l->head_dim);
}

/* x[n_kv_heads * head_dim] <-> position j of every head */
static void kv_load(const ert_layer *l, const void *cache, int ctx, int j, float *x) {
    const int hd = l->head_dim;
    for (int h = 0; h < l->n_kv_heads; h++) {
        const float *row = kv_to_f32(l->kv_type, kv_row(l, cache, ctx, h, j), hd, x + h * hd);
        if (row != x + h * hd) memcpy(x + h * hd, row, sizeof(float) * hd);
    }
}

static void kv_store(const ert_layer *l, void *cache, int ctx, int j, const float *x) {
    for (int h = 0; h < l->n_kv_heads; h++) kv_from_f32(l->kv_type, x + h * l->head_dim, l->head_dim, kv_row(l, cache, ctx, h, j));
}

/* ERT_OK, or why the layer's cache type cannot be used */
static int kv_check(const ert_layer *l) {
    if (l->kv_type < ERT_KV_F32 || l->kv_type > ERT_KV_Q8_0) return ERT_EINVAL;
    return l->kv_type == ERT_KV_Q8_0 && l->head_dim % 32 ? ERT_ESHAPE : ERT_OK; /* q8_0: blocks of 32 along a head */
}

static void rmsnorm(float *out, const float *x, const float *w, int n, float eps) {
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    const float r = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

int ert_rmsnorm(const float *x, int n, int d, const float *w, float eps, float *out) {
    if (!x || !w || !out || n < 0 || d <= 0) return ERT_EINVAL;
    for (int i = 0; i < n; i++) rmsnorm(out + (size_t)i * d, x + (size_t)i * d, w, d, eps);
    return ERT_OK;
}

/* the cosines and sines of RoPE's angles at positions pos0..pos0+n-1: cs[j][i] = (cos, sin)
 * of (pos0 + j) / rope_scale * rope_base^(-2i/rope_dim) / rope_factors[i], i < rope_dim/2 */
static void rope_angles(const ert_layer *l, int pos0, int n, float *cs) {
    const int half = l->rope_dim / 2;
    for (int i = 0; i < half; i++) {
        double inv_freq = pow(l->rope_base, -2.0 * i / l->rope_dim);
        if (l->rope_factors) inv_freq /= l->rope_factors[i];
        for (int j = 0; j < n; j++) {
            const float angle = (float)((pos0 + j) / (double)l->rope_scale * inv_freq);
            cs[2 * ((size_t)j * half + i)] = cosf(angle), cs[2 * ((size_t)j * half + i) + 1] = sinf(angle);
        }
    }
}

/* layers whose RoPE turns by the same angles */
static int same_angles(const ert_layer *a, const ert_layer *b) {
    return a->rope_dim == b->rope_dim && a->rope_base == b->rope_base && a->rope_scale == b->rope_scale &&
           a->rope_factors == b->rope_factors;
}

/* rotates the first rope_dim features of each head of x[nh][hd] and of x2[nh2][hd] (the
 * keys of the same position) by the angles cs of one position (rope_angles) */
static void rope(const ert_layer *l, const float *cs, float *x, int nh, float *x2, int nh2) {
    const int half = l->rope_dim / 2;
    for (int i = 0; i < half; i++) {
        const float c = cs[2 * i], s = cs[2 * i + 1];
        for (int h = 0; h < nh + nh2; h++) {
            float *v = h < nh ? x + (size_t)h * l->head_dim : x2 + (size_t)(h - nh) * l->head_dim;
            float *a = l->rope_neox ? v + i : v + 2 * i, *b = l->rope_neox ? v + i + half : v + 2 * i + 1;
            const float a0 = *a, b0 = *b;
            *a = a0 * c - b0 * s;
            *b = a0 * s + b0 * c;
        }
    }
}

/* ---- parallel pieces ------------------------------------------------------------------ */

typedef struct {
    const ert_layer *l;
    int n, pos0;
    float *x, *h, *q, *k, *v, *att, *o, *gate, *up, *scores;
    void *kc, *vc; /* this layer's cache [n_kv_heads][ctx][head_dim] of its kv_type */
    int ctx, parts;   /* parts: of the heads of a key/value head, at most 4 heads each */
    int spans;        /* attention items: a token's part (0), or a run of its chunks, `spans` runs a part */
    float *chunks;    /* spans: NCHUNK records of each token's part */
    atomic_int *done; /* spans: the chunks of each token's part done */
    const float *norm, *post_norm; /* of the half (attention or FFN) being run */
    const float *angles;           /* rope_angles of the n tokens, or NULL: each token computes its own */
    atomic_int next;               /* the next item to take (pool.c: work is taken, not split) */
} step;

static int take(step *s) { return atomic_fetch_add(&s->next, 1); }

static void run(step *s, ert_task_fn fn, int nth) {
    atomic_store(&s->next, 0);
    ert_parallel(fn, s, nth);
}

static void norm_task(void *ctx, int ith, int nth) { /* h = rmsnorm(x) */
    step *s = ctx;
    const ert_layer *l = s->l;
    for (int i; (i = take(s)) < s->n;)
        rmsnorm(s->h + (size_t)i * l->d_model, s->x + (size_t)i * l->d_model, s->norm, l->d_model, l->norm_eps);
}

static void qk_task(void *ctx, int ith, int nth) { /* biases, q/k norms, RoPE; k, v into the cache */
    step *s = ctx;
    const ert_layer *l = s->l;
    const int hd = l->head_dim, dq = l->n_heads * hd, dkv = l->n_kv_heads * hd;
    for (int i; (i = take(s)) < s->n;) {
        float *q = s->q + (size_t)i * dq, *k = s->k + (size_t)i * dkv, *v = s->v + (size_t)i * dkv;
        if (l->q_bias) {
            for (int j = 0; j < dq; j++) q[j] += l->q_bias[j];
            for (int j = 0; j < dkv; j++) k[j] += l->k_bias[j], v[j] += l->v_bias[j];
        }
        if (l->q_norm) {
            for (int h = 0; h < l->n_heads; h++) rmsnorm(q + h * hd, q + h * hd, l->q_norm, hd, l->norm_eps);
            for (int h = 0; h < l->n_kv_heads; h++) rmsnorm(k + h * hd, k + h * hd, l->k_norm, hd, l->norm_eps);
        }
        float own[l->rope_dim + 2];
        if (!s->angles) rope_angles(l, s->pos0 + i, 1, own);
        rope(l, s->angles ? s->angles + (size_t)i * l->rope_dim : own, q, l->n_heads, k, l->n_kv_heads);
        kv_store(l, s->kc, s->ctx, s->pos0 + i, k);
        kv_store(l, s->vc, s->ctx, s->pos0 + i, v);
    }
}

/* ---- attention, in chunks of positions ----------------------------------------------
 * A token attends over L positions in chunks (as flash-decoding does): for each of R heads
 * (those of a part), a chunk's scores s give m = max s, l = sum e^(s - m) and o = sum
 * e^(s - m) V (not yet divided), its record; the records are folded in order, (M, S, O) =
 * (m, l, o) of the first, then M' = max(M, m), S = S e^(M - M') + l e^(m - M'), O likewise,
 * and the output is O / S. The chunks depend only on L (at most NCHUNK of at most CHUNK
 * positions, longer ones past NCHUNK * CHUNK), so a token's attention is the same arithmetic
 * whether one thread runs its chunks in turn (enough tokens and heads to share out) or the
 * threads take runs of them (decode), at any thread count. */
enum { CHUNK = 32, NCHUNK = 16 };

static int n_chunks(int L) { return L <= NCHUNK * CHUNK ? (L + CHUNK - 1) / CHUNK : NCHUNK; }
static int chunk_start(int L, int c) { return (int)((int64_t)L * c / n_chunks(L)); }
static int chunk_max(int ctx) { return ctx <= NCHUNK * CHUNK ? CHUNK : (ctx + NCHUNK - 1) / NCHUNK; } /* positions */
static size_t record_floats(int hd) { return 8 + 4 * (size_t)hd; } /* m[4], l[4], o[4][hd] */
/* a thread's attention scratch: 4 rows of a chunk's scores, then a part's records */
static size_t thread_floats(const ert_layer *l, int ctx) {
    return 4 * (size_t)chunk_max(ctx) + NCHUNK * record_floats(l->head_dim);
}

/* the record of positions [a, b) for R heads (their queries q; keys k and values v from the
 * token's first position on, rows stride bytes apart); sc: 4 rows of ss scores */
static void attend_chunk(const ert_layer *l, const float *q, int R, const char *k, const char *v, size_t stride, int a,
                         int b, float *sc, size_t ss, float *rec) {
    const int hd = l->head_dim, type = l->kv_type;
    const scores_fn scores = hd % 8 == 0 ? V.scores : scores_c;
    const mix_fn mix = hd % 8 == 0 ? V.mix : mix_c;
    scores(type, q, R, k + a * stride, stride, b - a, hd, l->attn_scale, sc, ss);
    for (int r = 0; r < R; r++) rec[4 + r] = V.expsum(sc + r * ss, b - a, rec + r);
    mix(type, rec + 8, R, sc, ss, v + a * stride, stride, b - a, hd);
}

/* out[R][hd] = the nc records folded in order, O / S */
static void fold(int R, int hd, const float *rec, int nc, float *out) {
    const size_t rf = record_floats(hd);
    for (int r = 0; r < R; r++) {
        float M = rec[r], S = rec[4 + r], *O = out + (size_t)r * hd;
        memcpy(O, rec + 8 + (size_t)r * hd, sizeof(float) * hd);
        for (int c = 1; c < nc; c++) {
            const float *rc = rec + c * rf, *o = rc + 8 + (size_t)r * hd;
            const float m = fmaxf(M, rc[r]), a = expf(M - m), b = expf(rc[r] - m);
            S = S * a + rc[4 + r] * b;
            for (int i = 0; i < hd; i++) O[i] = O[i] * a + o[i] * b;
            M = m;
        }
        const float inv = 1.0f / S;
        for (int i = 0; i < hd; i++) O[i] *= inv;
    }
}

/* An item is a token and a part of the heads sharing a key/value head (each key and value row
 * is read once for the part), all its chunks, or a run of consecutive ones when there are fewer
 * parts than two per thread (one run of memory a thread: its reads stay one stream); the item
 * that completes the part's chunks folds them. */
static void attention_task(void *ctx, int ith, int nth) {
    step *s = ctx;
    const ert_layer *l = s->l;
    const int hd = l->head_dim, H = l->n_heads, KV = l->n_kv_heads, G = H / KV, P = s->parts, per = s->spans ? s->spans : 1;
    const size_t stride = kv_bytes(l->kv_type, hd), ss = chunk_max(s->ctx), rf = record_floats(hd);
    float *sc = s->scores + (size_t)ith * thread_floats(l, s->ctx), *own = sc + 4 * ss;
    for (int t; (t = take(s)) < s->n * KV * P * per;) {
        const int u = t / per, i = u / (KV * P), g = u / P % KV, part = u % P, p = s->pos0 + i;
        const int h0 = g * G + part * G / P, R = g * G + (part + 1) * G / P - h0; /* R <= 4 */
        const int first = l->window && p - l->window + 1 > 0 ? p - l->window + 1 : 0, L = p - first + 1;
        const int nc = n_chunks(L), c0 = t % per * nc / per, c1 = (t % per + 1) * nc / per;
        if (c0 == c1) continue;
        const size_t at = ((size_t)i * H + h0) * hd;
        const char *k = kv_row(l, s->kc, s->ctx, g, first), *v = kv_row(l, s->vc, s->ctx, g, first);
        float *rec = s->spans ? s->chunks + (size_t)u * NCHUNK * rf : own;
        for (int c = c0; c < c1; c++)
            attend_chunk(l, s->q + at, R, k, v, stride, chunk_start(L, c), chunk_start(L, c + 1), sc, ss, rec + c * rf);
        if (!s->spans || atomic_fetch_add(&s->done[u], c1 - c0) + c1 - c0 == nc) fold(R, hd, rec, nc, s->att + at);
    }
}

static void residual_task(void *ctx, int ith, int nth) { /* x += post_norm(o) */
    step *s = ctx;
    const ert_layer *l = s->l;
    const int d = l->d_model;
    for (int i; (i = take(s)) < s->n;) {
        float *o = s->o + (size_t)i * d, *x = s->x + (size_t)i * d;
        if (s->post_norm) rmsnorm(o, o, s->post_norm, d, l->norm_eps);
        for (int j = 0; j < d; j++) x[j] += o[j];
    }
}

static void glu_task(void *ctx, int ith, int nth) { /* gate = act(gate) * up, a token at a time */
    step *s = ctx;
    const int ff = s->l->d_ff;
    for (int i; (i = take(s)) < s->n;) {
        float *g = s->gate + (size_t)i * ff;
        const float *u = s->up + (size_t)i * ff;
        V.glu(g, u, ff, s->l->act);
    }
}

/* ---- the layer --------------------------------------------------------------------- */

/* the parts of a key/value head's query heads (at most 4 heads each); of n tokens' parts, how
 * many attention items cut into runs of chunks: all of them when they are fewer than two per
 * thread, else 0; and into how many runs each: two items a thread or more, a multiple of the
 * threads where one is at most NCHUNK runs */
static int parts(const ert_layer *l) { return (l->n_heads / l->n_kv_heads + 3) / 4; }
static int chunked_parts(const ert_layer *l, int n, int threads) {
    const int items = n * l->n_kv_heads * parts(l);
    return items < 2 * threads ? items : 0;
}
static int spans(int items, int threads) {
    const int least = (2 * threads + items - 1) / items;
    for (int s = least; s <= NCHUNK; s++)
        if (items * s % threads == 0) return s;
    return least < NCHUNK ? least : NCHUNK;
}

/* s's attention items for its n tokens, and their scratch from p on: each thread's, then the
 * records and counts of the parts cut into runs of chunks */
static void attention_setup(step *s, float *p, int threads) {
    const int chunked = chunked_parts(s->l, s->n, threads);
    s->parts = parts(s->l), s->spans = chunked ? spans(chunked, threads) : 0;
    s->scores = p, p += (size_t)threads * thread_floats(s->l, s->ctx);
    s->chunks = p, p += (size_t)chunked * NCHUNK * record_floats(s->l->head_dim);
    s->done = (atomic_int *)p;
    for (int u = 0; u < chunked; u++) atomic_init(&s->done[u], 0);
}

size_t ert_layer_scratch_bytes(const ert_layer *l, int n, int ctx, int threads) {
    threads = ert_clamp_threads(threads);
    const size_t d = l->d_model, dq = (size_t)l->n_heads * l->head_dim, dkv = (size_t)l->n_kv_heads * l->head_dim;
    const int per_token = l->n_kv_heads * parts(l), most = (2 * threads - 1) / per_token; /* tokens, when chunked */
    const size_t rf = record_floats(l->head_dim), chunked = (size_t)(n < most ? n : most) * per_token;
    /* h, q, attention, k, v, o, gate, up; per thread, four rows of scores and a part's records; the
     * records of the parts of a call of up to n tokens that takes chunks, and their counts */
    return sizeof(float) * ((size_t)n * (2 * d + 2 * dq + 2 * dkv + 2 * (size_t)l->d_ff) +
                            (size_t)threads * thread_floats(l, ctx) + chunked * NCHUNK * rf) +
           sizeof(atomic_int) * chunked;
}

static int check_layer(const ert_layer *l, int n, int pos0, int ctx, const void *k_cache, const void *v_cache) {
    if (!l || !k_cache || !v_cache || n < 0 || pos0 < 0 || pos0 + n > ctx) return ERT_EINVAL;
    if (l->n_kv_heads <= 0 || l->n_heads % l->n_kv_heads || l->rope_dim > l->head_dim || l->rope_dim % 2) return ERT_ESHAPE;
    if (kv_check(l) != ERT_OK) return kv_check(l);
    if (!l->attn_norm || !l->ffn_norm || (l->q_norm && !l->k_norm) || (l->q_bias && (!l->k_bias || !l->v_bias)))
        return ERT_EINVAL;
    return ERT_OK;
}

/* ert_layer_forward of a checked layer, n > 0; angles: rope_angles of the n tokens or NULL */
static int layer_forward(const ert_layer *l, float *x, int n, int pos0, int ctx, void *k_cache, void *v_cache,
                         float *scratch, int threads, const float *angles) {
    const size_t d = l->d_model, dq = (size_t)l->n_heads * l->head_dim, dkv = (size_t)l->n_kv_heads * l->head_dim;
    float *p = scratch;
    step s = {.l = l, .n = n, .pos0 = pos0, .x = x, .kc = k_cache, .vc = v_cache, .ctx = ctx, .angles = angles};
    s.h = p, p += n * d;
    s.q = p, p += n * dq;
    s.att = p, p += n * dq;
    s.k = p, p += n * dkv;
    s.v = p, p += n * dkv;
    s.o = p, p += n * d;
    s.gate = p, p += n * (size_t)l->d_ff;
    s.up = p, p += n * (size_t)l->d_ff;
    attention_setup(&s, p, threads);
    const int per_token = n < threads ? n : threads; /* work taken a token at a time */
    int rc;
#define MATMUL(w, in, out) \
    if ((rc = ert_matmul(&l->w, in, n, out, threads)) != ERT_OK) return rc
    /* attention */
    s.norm = l->attn_norm, s.post_norm = l->post_attn_norm;
    run(&s, norm_task, per_token);
    const ert_weight *qkv[3] = {&l->wq, &l->wk, &l->wv}, *gate_up[2] = {&l->gate, &l->up};
    float *qkv_out[3] = {s.q, s.k, s.v}, *gate_up_out[2] = {s.gate, s.up};
    if ((rc = ert_matmul_many(3, qkv, s.h, n, qkv_out, threads)) != ERT_OK) return rc;
    run(&s, qk_task, per_token);
    run(&s, attention_task, threads);
    MATMUL(wo, s.att, s.o);
    run(&s, residual_task, per_token);
    /* feed-forward */
    s.norm = l->ffn_norm, s.post_norm = l->post_ffn_norm;
    run(&s, norm_task, per_token);
    if ((rc = ert_matmul_many(2, gate_up, s.h, n, gate_up_out, threads)) != ERT_OK) return rc;
    run(&s, glu_task, per_token);
    MATMUL(down, s.gate, s.o);
    run(&s, residual_task, per_token);
#undef MATMUL
    return ERT_OK;
}

int ert_layer_forward(const ert_layer *l, float *x, int n, int pos0, int ctx, void *k_cache, void *v_cache,
                      float *scratch, int threads) {
    if (!x || !scratch) return ERT_EINVAL;
    int rc = check_layer(l, n, pos0, ctx, k_cache, v_cache);
    if (rc || n == 0) return rc;
    threads = ert_clamp_threads(threads);
    return layer_forward(l, x, n, pos0, ctx, k_cache, v_cache, scratch, threads, NULL);
}

int ert_layers_forward(const ert_layer *const *l, int nl, float *x, int n, int pos0, int ctx, void *const *k_caches,
                       void *const *v_caches, float *scratch, int threads, const float *out_norm, float out_eps) {
    if (!l || nl < 0 || !x || !k_caches || !v_caches || !scratch || (out_norm && nl == 0)) return ERT_EINVAL;
    for (int i = 0; i < nl; i++) {
        int rc = check_layer(l[i], n, pos0, ctx, k_caches[i], v_caches[i]);
        if (rc) return rc;
    }
    if (n == 0 || nl == 0) return ERT_OK;
    threads = ert_clamp_threads(threads);
    /* the angles of the tokens, computed once for the layers that share them (two kinds at
     * most in a model: Gemma-3's local and global layers) */
    enum { KINDS = 2 };
    float *angles[KINDS] = {NULL, NULL};
    const ert_layer *kind[KINDS] = {NULL, NULL};
    int rc = ERT_OK;
    for (int i = 0; i < nl && rc == ERT_OK; i++) {
        int k = 0;
        while (k < KINDS && kind[k] && !same_angles(kind[k], l[i])) k++;
        if (k == KINDS) { /* a third kind takes the first one's place */
            k = 0;
            free(angles[0]), kind[0] = NULL;
        }
        if (!kind[k]) {
            if (!(angles[k] = malloc(sizeof(float) * ((size_t)n * l[i]->rope_dim + 1)))) {
                rc = ERT_ENOMEM;
                break;
            }
            kind[k] = l[i];
            rope_angles(l[i], pos0, n, angles[k]);
        }
        rc = layer_forward(l[i], x, n, pos0, ctx, k_caches[i], v_caches[i], scratch, threads, angles[k]);
    }
    for (int k = 0; k < KINDS; k++) free(angles[k]);
    if (rc == ERT_OK && out_norm) ert_rmsnorm(x, n, l[nl - 1]->d_model, out_norm, out_eps, x);
    return rc;
}

int ert_layer_kv_shift(const ert_layer *l, void *k_cache, void *v_cache, int ctx, int keep, int discard, int used,
                       float *row) {
    if (!l || !k_cache || !v_cache || !row || keep < 0 || discard < 0 || keep + discard > used || used > ctx)
        return ERT_EINVAL;
    if (kv_check(l) != ERT_OK) return kv_check(l);
    float angles[l->rope_dim + 2];
    rope_angles(l, -discard, 1, angles);
    for (int j = keep + discard; j < used; j++) {
        kv_load(l, k_cache, ctx, j, row);
        rope(l, angles, row, l->n_kv_heads, NULL, 0); /* RoPE turns by an angle linear in the position */
        kv_store(l, k_cache, ctx, j - discard, row);
    }
    for (int h = 0; h < l->n_kv_heads; h++)
        memmove(kv_row(l, v_cache, ctx, h, keep), kv_row(l, v_cache, ctx, h, keep + discard),
                kv_bytes(l->kv_type, (size_t)(used - keep - discard) * l->head_dim));
    return ERT_OK;
}
