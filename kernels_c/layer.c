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
#include <stdatomic.h>
#include <string.h>

/* the hot loops are cloned for AVX2+FMA on x86 (glibc picks one at load time); the
   baseline build vectorizes them with SSE2 / NEON */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define ERT_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define ERT_CLONES
#endif

/* ---- vector helpers (eight partial sums: vectorized without -ffast-math) ---------- */

ERT_CLONES static float dot(const float *a, const float *b, int n) {
    float s[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) s[k] += a[i + k] * b[i + k];
    for (; i < n; i++) s[0] += a[i] * b[i];
    return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

ERT_CLONES static void axpy(float *y, float a, const float *x, int n) {
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

/* ---- the KV cache: float32, or IEEE half rounded to nearest even (numpy's float16) --- */

#if defined(__FLT16_MAX__) && (defined(__x86_64__) || defined(__aarch64__))
typedef _Float16 half; /* F16C / fcvt conversions where the target has them */
static inline float h2f(half h) { return (float)h; }
static inline half f2h(float f) { return (half)f; }
#else
typedef uint16_t half;
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

ERT_CLONES static float dot_h(const float *a, const half *b, int n) {
    float s[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) s[k] += a[i + k] * h2f(b[i + k]);
    for (; i < n; i++) s[0] += a[i] * h2f(b[i]);
    return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

ERT_CLONES static void axpy_h(float *y, float a, const half *x, int n) {
    for (int i = 0; i < n; i++) y[i] += a * h2f(x[i]);
}

/* row j of a cache (this layer's: [ctx][n_kv_heads * head_dim]), from feature f on */
static const void *kv_row(const ert_layer *l, const void *cache, int j, int f) {
    const size_t at = (size_t)j * l->n_kv_heads * l->head_dim + f;
    return l->kv_f16 ? (const void *)((const half *)cache + at) : (const void *)((const float *)cache + at);
}

static void kv_store(const ert_layer *l, void *cache, int j, const float *x) {
    const int dkv = l->n_kv_heads * l->head_dim;
    if (!l->kv_f16) {
        memcpy((float *)cache + (size_t)j * dkv, x, sizeof(float) * dkv);
        return;
    }
    half *row = (half *)cache + (size_t)j * dkv;
    for (int i = 0; i < dkv; i++) row[i] = f2h(x[i]);
}

static void rmsnorm(float *out, const float *x, const float *w, int n, float eps) {
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    const float r = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

static float silu(float x) { return x / (1.0f + expf(-x)); }

static float gelu_tanh(float x) {
    const float c = 0.7978845608028654f; /* sqrt(2/pi) */
    return 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * x * x * x)));
}

/* rotates the first rope_dim features of each of nh heads of x[nh][hd] by pos */
static void rope(const ert_layer *l, float *x, int nh, int pos) {
    const int half = l->rope_dim / 2;
    for (int i = 0; i < half; i++) {
        double inv_freq = pow(l->rope_base, -2.0 * i / l->rope_dim);
        if (l->rope_factors) inv_freq /= l->rope_factors[i];
        const float angle = (float)(pos / (double)l->rope_scale * inv_freq);
        const float c = cosf(angle), s = sinf(angle);
        for (int h = 0; h < nh; h++) {
            float *v = x + (size_t)h * l->head_dim;
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
    void *kc, *vc; /* this layer's cache [ctx][n_kv_heads][head_dim], float32 or half */
    int scores_stride;
    const float *norm, *post_norm; /* of the half (attention or FFN) being run */
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
        rope(l, q, l->n_heads, s->pos0 + i);
        rope(l, k, l->n_kv_heads, s->pos0 + i);
        kv_store(l, s->kc, s->pos0 + i, k);
        kv_store(l, s->vc, s->pos0 + i, v);
    }
}

static void attention_task(void *ctx, int ith, int nth) {
    step *s = ctx;
    const ert_layer *l = s->l;
    const int hd = l->head_dim, H = l->n_heads, group = H / l->n_kv_heads;
    float *scores = s->scores + (size_t)ith * s->scores_stride;
    for (int t; (t = take(s)) < s->n * H;) { /* one (token, head) pair at a time */
        const int i = t / H, h = t % H, p = s->pos0 + i, g = h / group;
        const int first = l->window && p - l->window + 1 > 0 ? p - l->window + 1 : 0;
        const float *q = s->q + (size_t)i * H * hd + (size_t)h * hd;
        float mx = -INFINITY;
        for (int j = first; j <= p; j++) {
            const void *k = kv_row(l, s->kc, j, g * hd);
            float sc = (l->kv_f16 ? dot_h(q, k, hd) : dot(q, k, hd)) * l->attn_scale;
            scores[j - first] = sc;
            if (sc > mx) mx = sc;
        }
        float sum = 0.0f;
        for (int j = first; j <= p; j++) sum += scores[j - first] = expf(scores[j - first] - mx);
        float *out = s->att + (size_t)i * H * hd + (size_t)h * hd;
        memset(out, 0, sizeof(float) * hd);
        for (int j = first; j <= p; j++) {
            const void *v = kv_row(l, s->vc, j, g * hd);
            if (l->kv_f16) axpy_h(out, scores[j - first] / sum, v, hd);
            else axpy(out, scores[j - first] / sum, v, hd);
        }
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
        for (int j = 0; j < ff; j++) g[j] = (s->l->act == ERT_ACT_GELU_TANH ? gelu_tanh(g[j]) : silu(g[j])) * u[j];
    }
}

/* ---- the layer --------------------------------------------------------------------- */

size_t ert_layer_scratch_bytes(const ert_layer *l, int n, int ctx, int threads) {
    if (threads <= 0 || threads > ert_max_threads()) threads = ert_max_threads();
    const size_t d = l->d_model, dq = (size_t)l->n_heads * l->head_dim, dkv = (size_t)l->n_kv_heads * l->head_dim;
    /* h, q, attention, k, v, o, gate, up; a row of scores per thread */
    return sizeof(float) * ((size_t)n * (2 * d + 2 * dq + 2 * dkv + 2 * (size_t)l->d_ff) + (size_t)threads * ctx);
}

int ert_layer_forward(const ert_layer *l, float *x, int n, int pos0, int ctx, void *k_cache, void *v_cache,
                      float *scratch, int threads) {
    if (!l || !x || !k_cache || !v_cache || !scratch || n < 0 || pos0 < 0 || pos0 + n > ctx) return ERT_EINVAL;
    if (l->n_kv_heads <= 0 || l->n_heads % l->n_kv_heads || l->rope_dim > l->head_dim || l->rope_dim % 2) return ERT_ESHAPE;
    if (!l->attn_norm || !l->ffn_norm || (l->q_norm && !l->k_norm) || (l->q_bias && (!l->k_bias || !l->v_bias)))
        return ERT_EINVAL;
    if (n == 0) return ERT_OK;
    if (threads <= 0 || threads > ert_max_threads()) threads = ert_max_threads();
    const size_t d = l->d_model, dq = (size_t)l->n_heads * l->head_dim, dkv = (size_t)l->n_kv_heads * l->head_dim;
    float *p = scratch;
    step s = {.l = l, .n = n, .pos0 = pos0, .x = x, .kc = k_cache, .vc = v_cache, .scores_stride = ctx};
    s.h = p, p += n * d;
    s.q = p, p += n * dq;
    s.att = p, p += n * dq;
    s.k = p, p += n * dkv;
    s.v = p, p += n * dkv;
    s.o = p, p += n * d;
    s.gate = p, p += n * (size_t)l->d_ff;
    s.up = p, p += n * (size_t)l->d_ff;
    s.scores = p;
    const int per_token = n < threads ? n : threads; /* work taken a token at a time */
    int rc;
#define MATMUL(w, in, out) \
    if ((rc = ert_matmul(&l->w, in, n, out, threads)) != ERT_OK) return rc
    /* attention */
    s.norm = l->attn_norm, s.post_norm = l->post_attn_norm;
    run(&s, norm_task, per_token);
    MATMUL(wq, s.h, s.q);
    MATMUL(wk, s.h, s.k);
    MATMUL(wv, s.h, s.v);
    run(&s, qk_task, per_token);
    run(&s, attention_task, threads);
    MATMUL(wo, s.att, s.o);
    run(&s, residual_task, per_token);
    /* feed-forward */
    s.norm = l->ffn_norm, s.post_norm = l->post_ffn_norm;
    run(&s, norm_task, per_token);
    MATMUL(gate, s.h, s.gate);
    MATMUL(up, s.h, s.up);
    run(&s, glu_task, per_token);
    MATMUL(down, s.gate, s.o);
    run(&s, residual_task, per_token);
#undef MATMUL
    return ERT_OK;
}
