/* Self-contained check of the SIMD kernels against the scalar reference (ref.c), for
 * running a cross-built library under qemu (tests/test_kernels.py) or natively.
 *
 *   kernel_check            prints the features and the kernel of every format, then
 *                           for every ISA this CPU has (avx2 / neon / neon-dotprod)
 *                           compares ert_matmul and ert_dequantize_rows with "ref"
 *                           on deterministic random inputs of every format, and the
 *                           layer's vector helpers that ISA selects with the portable
 *                           ones (check_layer; "layer: neon" names those in use).
 *   kernel_check --ref-digest
 *                           prints a hash of the reference (ref) outputs of every case
 *                           instead (and checks that 3 threads give the same bits as one):
 *                           builds for different CPUs must print the same lines
 *                           (tests/test_cross_arm32.py: the scalar path of a 32-bit ARM
 *                           build against the native one).
 * Exit status 0 when all agree: dequantization bit for bit, matmul within 1e-5 of
 * the output's scale, and a batch's rows equal (bit for bit) the rows computed alone. Output lines: "features: ...", "kernel: q4:neon-dotprod", ...
 */
#include "edgert.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint32_t next(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 11);
}
static float uni(void) { return (float)(next() % 2000001) / 1000000.0f - 1.0f; } /* [-1, 1] */

/* a normal float16: random sign (when asked), exponent field exp0 + [0, nexp), random
   mantissa; one next() per statement, so every compiler draws the same sequence */
static uint16_t half(int random_sign, int exp0, int nexp) {
    uint16_t h = random_sign && (next() & 1) ? 0x8000 : 0;
    h |= (uint16_t)((exp0 + (int)(next() % nexp)) << 10);
    return (uint16_t)(h | (next() & 0x3FF));
}

static int bits_of(int fmt) {
    switch (fmt) {
    case ERT_F32: return 32;
    case ERT_F16: return 16;
    case ERT_Q1: return 1;
    case ERT_Q2: return 2;
    case ERT_Q3: return 3;
    case ERT_Q4: return 4;
    case ERT_Q5: return 5;
    case ERT_Q6: return 6;
    default: return 8;
    }
}

typedef struct {
    int rows, cols, gs, n;
} shape;

static int failures;
static int digest_only; /* --ref-digest */
static float layer_err; /* largest relative error of check_layer's cases */

static uint64_t fnv1a(const void *p, size_t n, uint64_t h) {
    for (size_t i = 0; i < n; i++) h = (h ^ ((const uint8_t *)p)[i]) * 0x100000001B3ull;
    return h;
}

static void run_case(int fmt, shape s, const char *isa) {
    const int bits = bits_of(fmt), ng = (s.cols + s.gs - 1) / s.gs;
    const size_t nbytes = (size_t)s.rows * s.cols * bits / 8;
    uint8_t *data = malloc(nbytes + 1);
    uint16_t *sc = malloc(2 * (size_t)s.rows * ng + 2), *mn = malloc(2 * (size_t)s.rows * ng + 2);
    float *x = malloc(4 * (size_t)s.n * s.cols), *y0 = malloc(4 * (size_t)s.n * s.rows),
          *y1 = malloc(4 * (size_t)s.n * s.rows);
    float *d0 = malloc(4 * (size_t)s.rows * s.cols), *d1 = malloc(4 * (size_t)s.rows * s.cols);
    if (fmt == ERT_F32)
        for (size_t i = 0; i < (size_t)s.rows * s.cols; i++) ((float *)data)[i] = uni();
    else if (fmt == ERT_F16)
        for (size_t i = 0; i < (size_t)s.rows * s.cols; i++)
            ((uint16_t *)data)[i] = (i % 97 == 5) ? (uint16_t)(next() & 0x83FF) /* subnormal */ : half(1, 8, 8);
    else
        for (size_t i = 0; i < nbytes; i++) data[i] = (uint8_t)next();
    for (size_t i = 0; i < (size_t)s.rows * ng; i++) {
        sc[i] = (i % 13 == 7) ? 0 : half(0, 5, 8);
        mn[i] = half(1, 8, 8);
    }
    for (int j = 0; j < s.n; j++)
        for (int c = 0; c < s.cols; c++) {
            float v = uni();
            v *= (float)(1 << (next() % 6));
            if (c / 32 == 1 && j % 2 == 0) v = 0.0f; /* an all-zero block: amax == 0 */
            if (c % 53 == 3) v = 0.5f * (float)(int)(v * 4); /* some exact values */
            x[(size_t)j * s.cols + c] = v;
        }
    ert_weight w = {fmt, s.rows, s.cols, s.gs, data, sc, mn};

    int rc = ert_force_isa("ref");
    rc |= ert_matmul(&w, x, s.n, y0, 1);
    rc |= ert_dequantize_rows(&w, 0, s.rows, d0);
    if (digest_only) {
        uint64_t h = fnv1a(y0, 4 * (size_t)s.n * s.rows, 0xCBF29CE484222325ull);
        printf("digest: fmt=%d rows=%d cols=%d g=%d n=%d rc=%d %016llx\n", fmt, s.rows, s.cols, s.gs, s.n, rc,
               (unsigned long long)fnv1a(d0, 4 * (size_t)s.rows * s.cols, h));
        rc |= ert_matmul(&w, x, s.n, y1, 3); /* through the thread pool: the same bits as one thread */
        if (memcmp(y0, y1, 4 * (size_t)s.n * s.rows)) printf("FAIL threads=3 differs: fmt=%d rows=%d\n", fmt, s.rows);
        failures += rc != 0 || memcmp(y0, y1, 4 * (size_t)s.n * s.rows) != 0;
        free(data), free(sc), free(mn), free(x), free(y0), free(y1), free(d0), free(d1);
        return;
    }
    rc |= ert_force_isa(isa);
    rc |= ert_matmul(&w, x, s.n, y1, 1);
    rc |= ert_dequantize_rows(&w, 0, s.rows, d1);
    /* batch invariance: each activation row alone gives the same outputs, bit for bit */
    int batch_ok = 1;
    for (int j = 0; j < s.n; j++) {
        rc |= ert_matmul(&w, x + (size_t)j * s.cols, 1, y0 + (size_t)j * s.rows, 1); /* y0: scratch here */
        batch_ok &= memcmp(y0 + (size_t)j * s.rows, y1 + (size_t)j * s.rows, 4 * (size_t)s.rows) == 0;
    }
    rc |= ert_force_isa("ref");
    rc |= ert_matmul(&w, x, s.n, y0, 1);
    rc |= ert_force_isa(isa);
    const char *kname = ert_kernel_name(fmt);
    ert_force_isa("auto");

    float scale = 0.0f, err = 0.0f;
    for (size_t i = 0; i < (size_t)s.n * s.rows; i++) {
        if (fabsf(y0[i]) > scale) scale = fabsf(y0[i]);
        if (!(fabsf(y1[i] - y0[i]) <= err)) err = fabsf(y1[i] - y0[i]);
    }
    int deq_ok = memcmp(d0, d1, 4 * (size_t)s.rows * s.cols) == 0;
    int ok = rc == 0 && deq_ok && batch_ok && err <= 1e-5f * scale;
    if (!ok) {
        failures++;
        printf("FAIL %s fmt=%d rows=%d cols=%d g=%d n=%d rc=%d dequant_exact=%d batch_invariant=%d err=%g scale=%g\n",
               kname, fmt, s.rows, s.cols, s.gs, s.n, rc, deq_ok, batch_ok, err, scale);
    }
    free(data), free(sc), free(mn), free(x), free(y0), free(y1), free(d0), free(d1);
}

/* ---- the layer's vector helpers (layer.c: attention scores and value mix over an f32 / f16 /
 * q8_0 cache, softmax, SiLU / GELU-tanh GLU) ----------------------------------------------------
 * A layer of f32 weights runs a 37-token batch and 4 decode steps under "ref" (the portable
 * helpers) and under the ISA; the layer's output (x_out - x_in) must agree within LAYER_TOL of
 * its scale, the bound tests/test_kv.py holds AVX2 to (ref against auto), for head groups of
 * 1..5 query heads (R = 1..4 per attention item), a sliding window and every cache type.
 * The inputs are +-1 and the norm, q, k and v weights on grids of 1/8 and 1/64, so q, k and v
 * are exact in any summation order: both runs attend over the same cache, bit for bit (a q8_0
 * code that flips with the matmul kernel's rounding would otherwise weigh more than the
 * helpers' differences), and what differs is the helpers and the later products. */
#define LAYER_TOL 1e-5f

typedef struct {
    int heads, kv_heads, head_dim, window, act, kv_type;
} layer_case;

/* n values in [lo, hi]: multiples of step (0: any) */
static float *rand_floats(size_t n, float lo, float hi, float step) {
    float *p = malloc(sizeof(float) * n);
    for (size_t i = 0; i < n; i++) {
        p[i] = lo + (hi - lo) * 0.5f * (uni() + 1.0f);
        if (step) p[i] = step * rintf(p[i] / step);
    }
    return p;
}

/* x (n0 + steps tokens of d values, updated) through the layer: a batch of n0, then one at a time */
static int layer_run(const ert_layer *l, float *x, int n0, int steps, int ctx) {
    const int d = l->d_model;
    size_t cache = (size_t)ctx * l->n_kv_heads * l->head_dim * 4;
    void *kc = calloc(1, cache), *vc = calloc(1, cache);
    float *scratch = malloc(ert_layer_scratch_bytes(l, n0, ctx, 2));
    int rc = ert_layer_forward(l, x, n0, 0, ctx, kc, vc, scratch, 2);
    for (int i = 0; i < steps; i++) /* 2 threads: fewer parts than 4 are cut into runs of chunks */
        rc |= ert_layer_forward(l, x + (size_t)(n0 + i) * d, 1, n0 + i, ctx, kc, vc, scratch, 2);
    free(kc), free(vc), free(scratch);
    return rc;
}

static void layer_case_check(layer_case c, const char *isa) {
    const int d = 96, ff = 200, n0 = 37, steps = 4, n = n0 + steps, hd = c.head_dim;
    const int dq = c.heads * hd, dkv = c.kv_heads * hd;
    ert_layer l;
    memset(&l, 0, sizeof l);
    l.d_model = d, l.n_heads = c.heads, l.n_kv_heads = c.kv_heads, l.head_dim = hd, l.d_ff = ff;
    l.norm_eps = 0.0f, l.attn_scale = 1.0f / sqrtf((float)hd), l.window = c.window;
    l.rope_dim = hd, l.rope_neox = 1, l.rope_base = 10000.0f, l.rope_scale = 1.0f;
    l.act = c.act, l.kv_type = c.kv_type;
    float *norms = rand_floats(2 * (size_t)d, 0.5f, 1.5f, 0.125f);
    l.attn_norm = norms, l.ffn_norm = norms + d;
    float *wq = rand_floats((size_t)dq * d, -0.3f, 0.3f, 1 / 64.0f), *wk = rand_floats((size_t)dkv * d, -0.3f, 0.3f, 1 / 64.0f);
    float *wv = rand_floats((size_t)dkv * d, -0.2f, 0.2f, 1 / 64.0f), *wo = rand_floats((size_t)d * dq, -0.2f, 0.2f, 0);
    float *wg = rand_floats((size_t)ff * d, -0.3f, 0.3f, 0), *wu = rand_floats((size_t)ff * d, -0.2f, 0.2f, 0);
    float *wd = rand_floats((size_t)d * ff, -0.1f, 0.1f, 0);
    const ert_weight W[7] = {{ERT_F32, dq, d, 32, wq, 0, 0}, {ERT_F32, dkv, d, 32, wk, 0, 0}, {ERT_F32, dkv, d, 32, wv, 0, 0},
                             {ERT_F32, d, dq, 32, wo, 0, 0}, {ERT_F32, ff, d, 32, wg, 0, 0}, {ERT_F32, ff, d, 32, wu, 0, 0},
                             {ERT_F32, d, ff, 32, wd, 0, 0}};
    l.wq = W[0], l.wk = W[1], l.wv = W[2], l.wo = W[3], l.gate = W[4], l.up = W[5], l.down = W[6];
    float *x0 = rand_floats((size_t)n * d, -1.0f, 1.0f, 0), *x[2];
    for (size_t i = 0; i < (size_t)n * d; i++) x0[i] = x0[i] < 0 ? -1.0f : 1.0f; /* rmsnorm(x) = x exactly */
    const char *used[2];
    int rc = 0;
    for (int k = 0; k < 2; k++) {
        rc |= ert_force_isa(k ? isa : "ref");
        used[k] = ert_layer_isa();
        x[k] = malloc(sizeof(float) * (size_t)n * d);
        memcpy(x[k], x0, sizeof(float) * (size_t)n * d);
        rc |= layer_run(&l, x[k], n0, steps, 64);
    }
    ert_force_isa("auto");
    float scale = 0.0f, err = 0.0f;
    for (size_t i = 0; i < (size_t)n * d; i++) {
        const float ref = x[0][i] - x0[i], got = x[1][i] - x0[i];
        if (fabsf(ref) > scale) scale = fabsf(ref);
        if (!(fabsf(got - ref) <= err)) err = fabsf(got - ref);
    }
    /* the ISA's helpers were run: avx2 on avx2, neon on both AArch64 kernel sets */
    const int selected = !strcmp(used[0], "ref") && !strncmp(isa, used[1], strlen(used[1])) && strcmp(used[1], "ref");
    if (rc || !selected || !(err <= LAYER_TOL * scale)) {
        failures++;
        printf("FAIL layer %s (helpers %s) heads=%d/%d hd=%d window=%d act=%d kv=%d rc=%d err=%g scale=%g\n", isa, used[1],
               c.heads, c.kv_heads, hd, c.window, c.act, c.kv_type, rc, err, scale);
    }
    if (err > layer_err * scale) layer_err = err / scale;
    free(norms), free(wq), free(wk), free(wv), free(wo), free(wg), free(wu), free(wd), free(x0), free(x[0]), free(x[1]);
}

static void check_layer(const char *isa) {
    static const int groups[][2] = {{4, 4}, {6, 3}, {9, 3}, {8, 2}, {10, 2}}; /* query heads per kv head: 1..5 */
    layer_err = 0.0f;
    for (int kv = ERT_KV_F32; kv <= ERT_KV_Q8_0; kv++)
        for (int act = ERT_ACT_SILU; act <= ERT_ACT_GELU_TANH; act++)
            for (size_t g = 0; g < sizeof groups / sizeof *groups; g++) {
                layer_case c = {groups[g][0], groups[g][1], g % 2 ? 64 : 32, g == 2 ? 16 : 0, act, kv};
                layer_case_check(c, isa);
            }
    printf("checked layer: %s (largest error %.3g of the scale)\n", isa, layer_err);
}

int main(int argc, char **argv) {
    static const shape shapes[] = {{1, 32, 32, 1},    {37, 192, 128, 3}, {64, 256, 64, 17}, {5, 576, 64, 1},
                                   {33, 96, 32, 5},   {16, 2048, 128, 2}, {19, 320, 96, 4}, {3, 8192, 256, 1},
                                   {6, 8224, 32, 5}}; /* 257 blocks: q8's scale chunks of 256 and a last odd block */
    static const shape fshapes[] = {{7, 45, 32, 3}, {1, 1, 32, 1}, {40, 100, 32, 5}, {9, 576, 32, 17}};
    printf("features: %s\n", ert_cpu_features());
    digest_only = argc > 1 && !strcmp(argv[1], "--ref-digest");
    for (int f = 0; f < ERT_NFORMATS; f++) printf("kernel: %s\n", ert_kernel_name(f));
    printf("layer: %s\n", ert_layer_isa()); /* the layer's vector helpers */
    static const char *isas[] = {"avx2", "neon", "neon-dotprod", "ref"};
    int checked = 0;
    for (int i = digest_only ? 3 : 0; i < (digest_only ? 4 : 3); i++) {
        if (ert_force_isa(isas[i]) != 0) continue;
        ert_force_isa("auto");
        checked++;
        for (int f = 0; f < ERT_NFORMATS; f++) {
            if (f == ERT_F32 || f == ERT_F16)
                for (size_t k = 0; k < sizeof fshapes / sizeof *fshapes; k++) run_case(f, fshapes[k], isas[i]);
            for (size_t k = 0; k < sizeof shapes / sizeof *shapes; k++) run_case(f, shapes[k], isas[i]);
        }
        printf("checked: %s\n", isas[i]);
        if (!digest_only) check_layer(isas[i]);
    }
    /* argument checks */
    ert_weight bad = {ERT_Q4, 4, 48, 32, "x", (const uint16_t *)"ab", (const uint16_t *)"cd"};
    float out[4 * 48];
    if (ert_matmul(&bad, out, 1, out, 1) != ERT_ESHAPE) failures++, printf("FAIL: cols %% 32 not rejected\n");
    bad.format = 99;
    if (ert_matmul(&bad, out, 1, out, 1) != ERT_EFORMAT) failures++, printf("FAIL: format not rejected\n");
    printf("%s (%d ISA(s) compared with ref, %d failure(s))\n", failures ? "FAILED" : "PASSED", checked, failures);
    return failures ? 1 : 0;
}
