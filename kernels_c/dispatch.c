/* Public entry points, argument checks, CPU feature detection, threading, and THE
 * table mapping a weight format to its kernels per instruction set.
 *
 * Adding a format: a row in FORMATS below (plus its kernels in ref.c and, when
 * wanted, the SIMD files; a missing SIMD entry falls back to the next lower ISA).
 */
#define ERT_BUILDING
#include "edgert.h"
#include "tiles.h" /* ERT_TOKEN_GROUP */

#include <stdlib.h>
#include <string.h>

#include <stdatomic.h>

#if defined(__x86_64__) || defined(__i386__)
#define ERT_X86 1
#include <cpuid.h>
#endif

#if defined(__aarch64__)
#define ERT_ARM64 1
#if defined(__linux__) || defined(__ANDROID__)
#include <sys/auxv.h>
#ifndef AT_HWCAP
#define AT_HWCAP 16
#endif
#ifndef HWCAP_ASIMD
#define HWCAP_ASIMD (1 << 1)
#endif
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#elif defined(__APPLE__)
#include <sys/sysctl.h>
#endif
#elif defined(__arm__) && defined(__linux__)
/* 32-bit ARM: NEON is optional (ARMv6, as in 32-bit Raspberry Pi OS, has none). It is
   detected and reported, but arm/neon.c is AArch64 code: 32-bit builds run ref.c. */
#define ERT_ARM32 1
#include <sys/auxv.h>
#ifndef AT_HWCAP
#define AT_HWCAP 16
#endif
#ifndef HWCAP_NEON
#define HWCAP_NEON (1 << 12)
#endif
#endif

#ifndef ERT_HAVE_AVX2
#define ERT_HAVE_AVX2 0
#endif
#ifndef ERT_HAVE_NEON
#define ERT_HAVE_NEON 0
#endif
#ifndef ERT_HAVE_NEON_DOTPROD
#define ERT_HAVE_NEON_DOTPROD 0
#endif

/* ---- instruction sets -------------------------------------------------------------- */

enum { ISA_REF, ISA_AVX2, ISA_NEON, ISA_NEON_DOTPROD, ISA_N };
static const char *const ISA_NAME[ISA_N] = {"ref", "avx2", "neon", "neon-dotprod"};
/* where a missing kernel falls back to */
static const int ISA_FALLBACK[ISA_N] = {-1, ISA_REF, ISA_REF, ISA_NEON};

#define K_REF(f) {ert_##f##_matmul_ref, ert_##f##_dequant_ref}
#if ERT_HAVE_AVX2
#define K_AVX2(f) {ert_##f##_matmul_avx2, ert_##f##_dequant_avx2}
#define QA_AVX2 ert_quant_act_avx2
#define LA_AVX2 ert_lut_act_avx2
#else
#define K_AVX2(f) {0, 0}
#define QA_AVX2 0
#define LA_AVX2 0
#endif
#if ERT_HAVE_NEON
#define K_NEON(f) {ert_##f##_matmul_neon, ert_##f##_dequant_neon}
#define QA_NEON ert_quant_act_neon
#define LA_NEON ert_lut_act_neon
#else
#define K_NEON(f) {0, 0}
#define QA_NEON 0
#define LA_NEON 0
#endif
#if ERT_HAVE_NEON_DOTPROD
#define K_NEON_DP(f) {ert_##f##_matmul_neon_dotprod, ert_##f##_dequant_neon}
#else
#define K_NEON_DP(f) {0, 0}
#endif
#define K_NONE {0, 0}

/* THE table: format id -> name, and its kernels {ref, avx2, neon, neon-dotprod}.
 * q1..q4: table lookups (no dot products: neon-dotprod CPUs use the neon kernels).
 * q4 too: on AVX2 (Zen 3, 1 thread) its LUT GEMV measured 1.16-1.26x the int8 kernel
 * of layout 1 on SmolLM2 and 4096x4096 shapes, and level with it on DRAM-bound ones.
 * q5, q6, q8: int8 dot products (q5, q6 unpack their blocks to bytes first). */
static const struct {
    const char *name;
    ert_kernel k[ISA_N];
} FORMATS[ERT_NFORMATS] = {
    [ERT_F32] = {"f32", {K_REF(f32), K_AVX2(f32), K_NEON(f32), K_NONE}}, /* dotprod: nothing to gain */
    [ERT_F16] = {"f16", {K_REF(f16), K_AVX2(f16), K_NEON(f16), K_NONE}},
    [ERT_Q1] = {"q1", {K_REF(q1), K_AVX2(q1), K_NEON(q1), K_NONE}},
    [ERT_Q2] = {"q2", {K_REF(q2), K_AVX2(q2), K_NEON(q2), K_NONE}},
    [ERT_Q3] = {"q3", {K_REF(q3), K_AVX2(q3), K_NEON(q3), K_NONE}},
    [ERT_Q4] = {"q4", {K_REF(q4), K_AVX2(q4), K_NEON(q4), K_NONE}},
    [ERT_Q8] = {"q8", {K_REF(q8), K_AVX2(q8), K_NEON(q8), K_NEON_DP(q8)}},
    [ERT_Q5] = {"q5", {K_REF(q5), K_AVX2(q5), K_NEON(q5), K_NEON_DP(q5)}},
    [ERT_Q6] = {"q6", {K_REF(q6), K_AVX2(q6), K_NEON(q6), K_NEON_DP(q6)}},
};

/* activation quantizers and table builders (bit-exact with each other) */
static const ert_quant_act_fn QUANT_ACT[ISA_N] = {ert_quant_act_ref, QA_AVX2, QA_NEON, 0};
static const ert_lut_act_fn LUT_ACT[ISA_N] = {ert_lut_act_ref, LA_AVX2, LA_NEON, 0};

/* ---- state chosen at start-up --------------------------------------------------------- */

static int g_inited;
static int g_isa_ok[ISA_N];    /* compiled in and supported by this CPU */
static int g_best;             /* best usable ISA */
static struct {
    ert_kernel k;
    int isa;
} g_sel[ERT_NFORMATS];
static ert_quant_act_fn g_quant_act;
static ert_lut_act_fn g_lut_act;
static char g_features[96];
static char g_names[ERT_NFORMATS][32];

static void add_feature(const char *f) {
    size_t len = strlen(g_features);
    if (len + strlen(f) + 2 >= sizeof g_features) return;
    if (len) g_features[len++] = ' ';
    strcpy(g_features + len, f);
}

static void detect_cpu(void) {
    g_isa_ok[ISA_REF] = 1;
#if ERT_X86 && defined(__GNUC__)
    unsigned a, b, c, d;
    int avx = 0, fma = 0, f16c = 0, avx2 = 0, ymm_os = 0;
    if (__get_cpuid(1, &a, &b, &c, &d)) {
        fma = (c >> 12) & 1;
        f16c = (c >> 29) & 1;
        int osxsave = (c >> 27) & 1;
        avx = (c >> 28) & 1;
        if (osxsave && avx) {
            unsigned lo, hi;
            __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
            ymm_os = (lo & 6) == 6; /* the OS saves xmm and ymm state */
        }
        if (__get_cpuid_max(0, 0) >= 7) {
            __cpuid_count(7, 0, a, b, c, d);
            avx2 = (b >> 5) & 1;
        }
    }
    avx = avx && ymm_os;
    avx2 = avx2 && ymm_os;
    if (avx) add_feature("avx");
    if (avx2) add_feature("avx2");
    if (fma && avx) add_feature("fma");
    if (f16c && avx) add_feature("f16c");
    g_isa_ok[ISA_AVX2] = ERT_HAVE_AVX2 && avx2 && fma && f16c;
#elif ERT_ARM64
    int dotprod = 0;
#if defined(__linux__) || defined(__ANDROID__)
    unsigned long hw = getauxval(AT_HWCAP);
    dotprod = (hw & HWCAP_ASIMDDP) != 0;
#elif defined(__APPLE__)
    int v = 0;
    size_t len = sizeof v;
    if (sysctlbyname("hw.optional.arm.FEAT_DotProd", &v, &len, NULL, 0) == 0) dotprod = v != 0;
#endif
    add_feature("neon"); /* Advanced SIMD is mandatory on AArch64 */
    if (dotprod) add_feature("dotprod");
    g_isa_ok[ISA_NEON] = ERT_HAVE_NEON;
    g_isa_ok[ISA_NEON_DOTPROD] = ERT_HAVE_NEON && ERT_HAVE_NEON_DOTPROD && dotprod;
#elif ERT_ARM32
    if (getauxval(AT_HWCAP) & HWCAP_NEON) add_feature("neon"); /* no 32-bit NEON matmul kernels: */
#if defined(__ARM_NEON) /* -mfpu=neon builds: "neon" runs layer.c's NEON helpers, the formats fall back to ref */
    g_isa_ok[ISA_NEON] = (getauxval(AT_HWCAP) & HWCAP_NEON) != 0;
#endif
#endif
}

static void select_kernels(int isa) {
    for (int f = 0; f < ERT_NFORMATS; f++) {
        int i = isa;
        while (i > 0 && (!g_isa_ok[i] || !FORMATS[f].k[i].matmul || !FORMATS[f].k[i].dequant)) i = ISA_FALLBACK[i];
        if (i < 0) i = ISA_REF;
        g_sel[f].k = FORMATS[f].k[i];
        g_sel[f].isa = i;
        strcpy(g_names[f], FORMATS[f].name);
        strcat(g_names[f], ":");
        strcat(g_names[f], ISA_NAME[i]);
    }
    int i = isa;
    while (i > 0 && (!g_isa_ok[i] || !QUANT_ACT[i])) i = ISA_FALLBACK[i];
    g_quant_act = QUANT_ACT[i < 0 ? ISA_REF : i];
    for (i = isa; i > 0 && (!g_isa_ok[i] || !LUT_ACT[i]);) i = ISA_FALLBACK[i];
    g_lut_act = LUT_ACT[i < 0 ? ISA_REF : i];
    ert_layer_select(isa != ISA_REF);
}

static void init(void) {
    if (g_inited) return;
    detect_cpu();
    g_best = ISA_REF;
    for (int i = 0; i < ISA_N; i++)
        if (g_isa_ok[i]) g_best = i; /* later entries are better within their family */
    select_kernels(g_best);
    g_inited = 1;
}

#if defined(__GNUC__)
__attribute__((constructor)) static void init_at_load(void) { init(); }
#endif

/* ---- argument checks ------------------------------------------------------------------- */

static int ngroups(const ert_weight *w) { return (w->cols + w->group_size - 1) / w->group_size; }

static int check_weight(const ert_weight *w) {
    if (!w || !w->data || w->rows < 0 || w->cols <= 0) return ERT_EINVAL;
    if (w->format < 0 || w->format >= ERT_NFORMATS) return ERT_EFORMAT;
    if (ert_format_bits(w->format)) {
        if (!w->scale || !w->min) return ERT_EINVAL;
        if (w->cols % ERT_BLOCK || w->group_size <= 0 || w->group_size % ERT_BLOCK) return ERT_ESHAPE;
    }
    return ERT_OK;
}

/* ---- entry points ---------------------------------------------------------------------- */

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

#define ROW_TILE ERT_TILE /* rows per unit of work: a multiple of it (whole q1..q4 tiles) */

/* Activation rows j0..j0+nj-1 of a prepared input (the arrays are [n][...] token by token) */
static ert_act act_rows(const ert_act *a, int j0, int nj) {
    ert_act s = *a;
    const size_t j = (size_t)j0, ngp = ((size_t)a->ngroups + 7) & ~(size_t)7;
    s.n = nj;
    s.x += j * a->cols;
    if (a->lut) {
        s.lut += j * a->cols / 4 * 16, s.ls += j * a->ngroups, s.xsum += j * a->ngroups;
        if (a->lq) s.lq += j * a->nblk;
    }
    if (a->q) s.q += j * a->cols, s.da += j * a->nblk, s.qsum += j * a->nblk, s.gsum += j * ngp;
    if (a->qd) s.qd += j * 2 * a->cols;
    return s;
}

/* The products of one region: up to 3 weights of the same input. A unit of work is a
 * tile of rows of one weight for a chunk of tokens (all of them in decode); the units
 * go chunk by chunk, so a chunk's activations serve every weight while they are in cache. */
#define MAX_PRODUCTS 3
typedef struct {
    int nw, chunk;                             /* tokens per chunk */
    const ert_weight *w[MAX_PRODUCTS];
    const ert_act *a;
    float *y[MAX_PRODUCTS];
    int tile[MAX_PRODUCTS], end[MAX_PRODUCTS]; /* end[i]: tiles of weights 0..i */
    atomic_int next;                           /* the next unit to take */
} rows_job;

static void rows_task(void *ctx, int ith, int nth) {
    rows_job *j = ctx;
    const int per_chunk = j->end[j->nw - 1], units = per_chunk * ((j->a->n + j->chunk - 1) / j->chunk);
    for (int u; (u = atomic_fetch_add(&j->next, 1)) < units;) {
        const int t = u % per_chunk, j0 = u / per_chunk * j->chunk;
        int i = 0;
        while (t >= j->end[i]) i++;
        const ert_weight *w = j->w[i];
        const int r0 = (t - (i ? j->end[i - 1] : 0)) * j->tile[i], r1 = r0 + j->tile[i] < w->rows ? r0 + j->tile[i] : w->rows;
        const ert_act a = j->chunk < j->a->n ? act_rows(j->a, j0, j->a->n - j0 < j->chunk ? j->a->n - j0 : j->chunk) : *j->a;
        g_sel[w->format].k.matmul(w, &a, r0, r1, j->y[i] + (size_t)j0 * w->rows);
    }
}

static void run_rows(int nw, const ert_weight *const *w, const ert_act *a, float *const *y, int threads) {
    threads = ert_clamp_threads(threads);
    rows_job j = {.nw = nw, .a = a, .chunk = a->n};
    double work = 0.0;
    for (int i = 0; i < nw; i++) work += (double)w[i]->rows * w[i]->cols * a->n;
    /* tiny products: waking threads costs more than it saves (results are identical) */
    if (work < 16384.0) threads = 1;
    /* A few tokens (decode): about 8 tiles per thread and weight, taken dynamically, so a
       slower core (big.LITTLE, or one shared with another process) takes fewer; whole
       32-row tiles measured slower there (each unit's fixed cost). Many tokens (prefill):
       units of one 32-row tile and a chunk of tokens whose tables (~128 KB) stay in cache,
       so the threads end together (units of 64 rows split 576 rows 5:4). A row is computed
       the same way whichever thread computes it, alone or in a batch, so y does not depend
       on the thread count. */
    if (a->n >= 4) j.chunk = ERT_TOKEN_GROUP(a->cols);
    for (int i = 0; i < nw; i++) {
        const int rows = w[i]->rows;
        int tile = a->n >= 4 ? ROW_TILE : (rows + 8 * threads - 1) / (8 * threads);
        tile = (tile + ROW_TILE - 1) / ROW_TILE * ROW_TILE;
        j.w[i] = w[i], j.y[i] = y[i], j.tile[i] = tile;
        j.end[i] = (i ? j.end[i - 1] : 0) + (rows + tile - 1) / tile;
    }
    atomic_init(&j.next, 0);
    const int units = j.end[nw - 1] * ((a->n + j.chunk - 1) / j.chunk);
    ert_parallel(rows_task, &j, threads < units ? threads : units);
}

/* Preparing the activations of many tokens (prefill) is shared by the threads: chunks of
 * PREP_CHUNK tokens, each prepared exactly as alone (the arrays are token by token). */
#define PREP_CHUNK 16
typedef struct {
    const ert_weight *w;
    const float *x;
    ert_act *a;
    void (*fn)(const ert_weight *w, const float *x, ert_act *a, int j0, int nj);
    atomic_int next;
} prep_job;

static void prep_task(void *ctx, int ith, int nth) {
    prep_job *p = ctx;
    for (int j0; (j0 = atomic_fetch_add(&p->next, PREP_CHUNK)) < p->a->n;)
        p->fn(p->w, p->x, p->a, j0, p->a->n - j0 < PREP_CHUNK ? p->a->n - j0 : PREP_CHUNK);
}

static void prepare(const ert_weight *w, const float *x, ert_act *a, int threads,
                    void (*fn)(const ert_weight *w, const float *x, ert_act *a, int j0, int nj)) {
    threads = ert_clamp_threads(threads);
    const int chunks = (a->n + PREP_CHUNK - 1) / PREP_CHUNK;
    prep_job p = {.w = w, .x = x, .a = a, .fn = fn};
    atomic_init(&p.next, 0);
    ert_parallel(prep_task, &p, threads < chunks ? threads : chunks);
}

static void lut_tokens(const ert_weight *w, const float *x, ert_act *a, int j0, int nj) {
    const ert_act s = act_rows(a, j0, nj);
    g_lut_act(x + (size_t)j0 * w->cols, nj, w->cols, w->group_size, (int8_t *)s.lut, (float *)s.ls, (int16_t *)s.lq,
              (float *)s.xsum);
}

/* q1..q4: the activation tables (formats.lut_tables), block multipliers (groups of several
 * blocks) and group sums */
static int prepare_lut(const ert_weight *w, const float *x, int n, ert_act *a, void **scratch, int threads) {
    const int nblk = w->cols / ERT_BLOCK, ng = ngroups(w), mult = ERT_LUT_BLOCK_MULT(w->group_size);
    size_t nl = align64((size_t)n * w->cols * 4), nls = align64(sizeof(float) * (size_t)n * ng);
    size_t nq = mult ? align64(sizeof(int16_t) * (size_t)n * nblk) : 0;
    char *p = malloc(nl + nls + nq + sizeof(float) * (size_t)n * ng);
    if (!p) return ERT_ENOMEM;
    *scratch = p;
    a->lut = (const int8_t *)p;
    a->ls = (const float *)(p + nl);
    a->lq = mult ? (const int16_t *)(p + nl + nls) : NULL;
    a->xsum = (const float *)(p + nl + nls + nq);
    a->nblk = nblk;
    a->ngroups = ng;
    a->group_size = w->group_size;
    prepare(w, x, a, threads, lut_tokens);
    return ERT_OK;
}

/* the digits of activation codes: h = floor((q + 64) / 128), l = q - 128*h */
static void act_digits(const int16_t *q, int nblk, int8_t *qd) {
    for (int b = 0; b < nblk; b++)
        for (int i = 0; i < ERT_BLOCK; i++) {
            const int v = q[b * ERT_BLOCK + i], h = (v + 64) >> 7;
            qd[64 * b + i] = (int8_t)h;
            qd[64 * b + 32 + i] = (int8_t)(v - 128 * h);
        }
}

static void int8_tokens(const ert_weight *w, const float *x, ert_act *a, int j0, int nj) {
    const ert_act s = act_rows(a, j0, nj);
    const int nblk = a->nblk, ngp = (a->ngroups + 7) & ~7, bpg = a->group_size / ERT_BLOCK;
    float *da = (float *)s.da, *gsum = (float *)s.gsum;
    g_quant_act(x + (size_t)j0 * w->cols, nj, w->cols, (int16_t *)s.q, da, (int32_t *)s.qsum);
    if (s.qd)
        for (int j = 0; j < nj; j++) act_digits(s.q + (size_t)j * w->cols, nblk, (int8_t *)s.qd + (size_t)j * 2 * w->cols);
    for (int j = 0; j < nj; j++)
        for (int g = 0; g < ngp; g++) {
            int b1 = (g + 1) * bpg < nblk ? (g + 1) * bpg : nblk;
            float sum = 0.0f;
            for (int b = g * bpg; b < b1; b++) sum += da[(size_t)j * nblk + b] * (float)s.qsum[(size_t)j * nblk + b];
            gsum[(size_t)j * ngp + g] = sum;
        }
}

/* q5, q6, q8: int16 activations per 32-block (and their digits for neon-dotprod) and the
 * sums the int8 kernels use */
static int prepare_int8(const ert_weight *w, const float *x, int n, ert_act *a, void **scratch, int threads) {
    const int nblk = w->cols / ERT_BLOCK, ng = ngroups(w), ngp = (ng + 7) & ~7, bpg = w->group_size / ERT_BLOCK;
    const int digits = g_sel[w->format].isa == ISA_NEON_DOTPROD;
    size_t nq = align64(sizeof(int16_t) * (size_t)n * w->cols), nqd = digits ? align64((size_t)n * 2 * w->cols) : 0;
    size_t nd = align64(sizeof(float) * ((size_t)n * nblk + 8));
    size_t ns = align64(sizeof(int32_t) * (size_t)n * nblk), ngs = align64(sizeof(float) * (size_t)n * ngp);
    size_t nbg = align64(sizeof(int32_t) * ((size_t)nblk + 8));
    char *p = malloc(nq + nqd + nd + ns + ngs + nbg); /* SIMD code loads unaligned */
    if (!p) return ERT_ENOMEM;
    *scratch = p;
    int16_t *q = (int16_t *)p;
    int8_t *qd = digits ? (int8_t *)(p + nq) : NULL;
    float *da = (float *)(p += nq + nqd);
    int32_t *qsum = (int32_t *)(p += nd);
    float *gsum = (float *)(p += ns);
    int32_t *bgroup = (int32_t *)(p += ngs);
    a->nblk = nblk;
    a->ngroups = ng;
    a->group_size = w->group_size;
    a->q = q;
    a->qd = qd;
    a->da = da;
    a->qsum = qsum;
    a->gsum = gsum;
    a->bgroup = bgroup;
    prepare(w, x, a, threads, int8_tokens);
    memset(da + (size_t)n * nblk, 0, 8 * sizeof(float));
    for (int b = 0; b < nblk + 8; b++) bgroup[b] = (b < nblk ? b : nblk - 1) / bpg;
    return ERT_OK;
}

/* weights whose products can share one prepared input: the same kind of activations
 * (tables for q1..q4; int8 for q5, q6, q8; the floats themselves) over the same groups */
static int same_input(const ert_weight *a, const ert_weight *b) {
    const int ba = ert_format_bits(a->format), bb = ert_format_bits(b->format);
    const int ka = ert_lut_bits(ba) ? 1 : ba ? 2 : 0, kb = ert_lut_bits(bb) ? 1 : bb ? 2 : 0;
    return ka == kb && a->cols == b->cols && (!ka || a->group_size == b->group_size);
}

int ert_matmul_many(int nw, const ert_weight *const *w, const float *x, int n, float *const *y, int threads) {
    init();
    if (nw < 1 || nw > MAX_PRODUCTS || !w || !y) return ERT_EINVAL;
    for (int i = 0; i < nw; i++) {
        int rc = check_weight(w[i]);
        if (rc) return rc;
        if (!y[i]) return ERT_EINVAL;
    }
    if (!x || n < 0) return ERT_EINVAL;
    for (int i = 1; i < nw; i++)
        if (!same_input(w[0], w[i])) { /* one region each */
            for (int k = 0; k < nw; k++) {
                int rc = ert_matmul_many(1, w + k, x, n, y + k, threads);
                if (rc) return rc;
            }
            return ERT_OK;
        }
    if (n == 0) return ERT_OK;

    ert_act a;
    memset(&a, 0, sizeof a);
    a.n = n;
    a.cols = w[0]->cols;
    a.x = x;
    void *scratch = NULL;
    const int bits = ert_format_bits(w[0]->format);
    int rc = ERT_OK;
    if (ert_lut_bits(bits)) {
        rc = prepare_lut(w[0], x, n, &a, &scratch, threads);
    } else if (bits) {
        rc = prepare_int8(w[0], x, n, &a, &scratch, threads);
    }
    if (rc) return rc;
    const ert_weight *ws[MAX_PRODUCTS];
    float *ys[MAX_PRODUCTS];
    int m = 0;
    for (int i = 0; i < nw; i++)
        if (w[i]->rows) ws[m] = w[i], ys[m++] = y[i];
    if (m) run_rows(m, ws, &a, ys, threads);
    free(scratch);
    return ERT_OK;
}

int ert_matmul(const ert_weight *w, const float *x, int n, float *y, int threads) {
    return ert_matmul_many(1, &w, x, n, &y, threads);
}

int ert_dequantize_rows(const ert_weight *w, int row0, int nrows, float *out) {
    init();
    int rc = check_weight(w);
    if (rc) return rc;
    if (!out || nrows < 0) return ERT_EINVAL;
    if (row0 < 0 || (long long)row0 + nrows > w->rows) return ERT_ERANGE;
    if (nrows) g_sel[w->format].k.dequant(w, NULL, row0, nrows, out);
    return ERT_OK;
}

int ert_dequantize_gather(const ert_weight *w, const int64_t *idx, int k, float *out) {
    init();
    int rc = check_weight(w);
    if (rc) return rc;
    if (!out || k < 0 || (k && !idx)) return ERT_EINVAL;
    for (int i = 0; i < k; i++)
        if (idx[i] < 0 || idx[i] >= w->rows) return ERT_ERANGE;
    if (k) g_sel[w->format].k.dequant(w, idx, 0, k, out);
    return ERT_OK;
}

const char *ert_kernel_name(int format) {
    init();
    if (format < 0 || format >= ERT_NFORMATS) return "?";
    return g_names[format];
}

const char *ert_cpu_features(void) {
    init();
    return g_features;
}

int ert_force_isa(const char *isa) {
    init();
    if (!isa || !strcmp(isa, "auto") || !*isa) {
        select_kernels(g_best);
        return ERT_OK;
    }
    for (int i = 0; i < ISA_N; i++)
        if (!strcmp(isa, ISA_NAME[i]) || (i == ISA_NEON_DOTPROD && !strcmp(isa, "neon_dotprod"))) {
            if (!g_isa_ok[i]) return ERT_EUNAVAIL;
            select_kernels(i);
            return ERT_OK;
        }
    return ERT_EUNAVAIL;
}

size_t ert_weight_nbytes(const ert_weight *w) {
    if (!w || w->rows < 0 || w->cols < 0) return 0;
    size_t rc = (size_t)w->rows * w->cols;
    switch (w->format) {
    case ERT_F32: return 4 * rc;
    case ERT_F16: return 2 * rc;
    default: {
        int bits = ert_format_bits(w->format);
        if (!bits || w->group_size <= 0) return 0;
        return rc * bits / 8 + (size_t)w->rows * ngroups(w) * 4;
    }
    }
}


int ert_version(void) { return 1; }
