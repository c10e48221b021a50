/* edge-rt C kernel library: matrix-vector / matrix-matrix products and row
 * dequantization for the weight formats of edge_rt/formats.py.
 *
 * The C side knows arrays, shapes and a format id; nothing about Python.
 * edge_rt/formats.py is the numpy definition of every format and of the kernels'
 * arithmetic (formats.matmul_reference); this library agrees with it:
 *   - ert_dequantize_rows is bit-exact with formats.<fmt>.dequantize;
 *   - ert_matmul has the same integer parts as matmul_reference and differs only
 *     by float32 rounding / summation order.
 */
#ifndef EDGERT_H
#define EDGERT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define ERT_API __declspec(dllexport)
#elif defined(__GNUC__)
#define ERT_API __attribute__((visibility("default")))
#else
#define ERT_API
#endif

/* Weight formats; the values equal formats.FORMAT_IDS. */
enum ert_format {
    ERT_F32 = 0,
    ERT_F16 = 1,
    ERT_Q1 = 2,
    ERT_Q2 = 3,
    ERT_Q3 = 4,
    ERT_Q4 = 5,
    ERT_Q8 = 6,
    ERT_Q5 = 7,
    ERT_Q6 = 8,
    ERT_NFORMATS
};

#define ERT_BLOCK 32 /* columns per code block (formats.BLOCK) */

/* Error codes (all negative). */
enum ert_status {
    ERT_OK = 0,
    ERT_EINVAL = -1,   /* NULL pointer, negative size */
    ERT_EFORMAT = -2,  /* unknown format id */
    ERT_ESHAPE = -3,   /* cols not a multiple of 32 / bad group size for a group format */
    ERT_ERANGE = -4,   /* row index out of range */
    ERT_ENOMEM = -5,   /* scratch allocation failed */
    ERT_EUNAVAIL = -6  /* ISA not compiled in or not supported by this CPU */
};

/* A weight matrix W[rows][cols]. Read only; the library never keeps pointers. */
typedef struct {
    int format;         /* enum ert_format */
    int rows, cols;
    int group_size;     /* group formats: columns per (scale, min); multiple of 32; ignored for f32/f16 */
    const void *data;   /* f32: float[rows][cols]; f16: uint16 (IEEE half)[rows][cols];
                           group formats: codes uint8[rows][cols*bits/8] */
    const uint16_t *scale; /* group formats: float16 [rows][ngroups], ngroups = ceil(cols/group_size);
                              q5, q6, q8 in row order, q1..q4 in tile order (ert_group_offset) */
    const uint16_t *min;   /* group formats: float16 [rows][ngroups], as scale */
} ert_weight;

/* y[n][rows] = x[n][cols] . W^T (y is overwritten; x and y must not overlap).
 * threads <= 0: the OpenMP default; at most the number of processors is used.
 * Results do not depend on the thread count, nor on n (a row of x gives the same
 * output alone or in a batch). Returns ERT_OK or < 0. */
ERT_API int ert_matmul(const ert_weight *w, const float *x, int n, float *y, int threads);

/* y[i] = x . w[i]^T for nw <= 3 weights of the same input (q, k, v; gate, up): the input
 * is prepared once (tables, int16 codes) and all the products run in one parallel region when
 * the weights take the same kind of input; otherwise one after the other. */
ERT_API int ert_matmul_many(int nw, const ert_weight *const *w, const float *x, int n, float *const *y, int threads);

/* One transformer layer (kernels_c/layer.c; the numpy twin is models/transformer.py
 * `layer`): the sizes and switches of the family's Spec, this layer's weights. */
enum ert_activation { ERT_ACT_SILU = 0, ERT_ACT_GELU_TANH = 1 };
/* KV cache elements: float32; IEEE half (rounded to nearest even); llama.cpp's q8_0 (blocks of
 * 32 values along a head: a half scale d = max|x|/127 and 32 int8 codes round(x/d), 34 bytes;
 * head_dim a multiple of 32) */
enum ert_kv_type { ERT_KV_F32 = 0, ERT_KV_F16 = 1, ERT_KV_Q8_0 = 2 };

typedef struct {
    int d_model, n_heads, n_kv_heads, head_dim, d_ff;
    float norm_eps;
    float attn_scale;          /* scores = q.k * attn_scale */
    int window;                /* 0, or each position sees only the last `window` positions */
    int rope_dim;              /* features rotated per head (even, <= head_dim) */
    int rope_neox;             /* 0: pairs (x[2i], x[2i+1]); 1: pairs (x[i], x[i + rope_dim/2]) */
    float rope_base, rope_scale; /* angle = pos / rope_scale * rope_base^(-2i/rope_dim) / rope_factors[i] */
    const float *rope_factors; /* NULL, or [rope_dim/2] */
    int act;                   /* enum ert_activation: FFN gate activation */
    int kv_type;               /* enum ert_kv_type: the KV cache's elements */
    /* float32 vectors; NULL where the family has none (norms of the attention and FFN inputs are required) */
    const float *attn_norm, *q_bias, *k_bias, *v_bias, *q_norm, *k_norm, *post_attn_norm;
    const float *ffn_norm, *post_ffn_norm;
    ert_weight wq, wk, wv, wo, gate, up, down;
} ert_layer;

/* The layer's RMS norm of n rows of d values: out[i] = x[i] / sqrt(mean(x[i]^2) + eps) * w
 * (the sum of squares in double). Returns ERT_OK or < 0. */
ERT_API int ert_rmsnorm(const float *x, int n, int d, const float *w, float eps, float *out);

/* Scratch a call of ert_layer_forward needs (float aligned), for n tokens and a KV
 * cache of ctx positions. */
ERT_API size_t ert_layer_scratch_bytes(const ert_layer *l, int n, int ctx, int threads);

/* Runs n tokens at positions pos0.. through the layer: x[n][d_model] is updated in
 * place; their keys and values are written to k_cache, v_cache ([n_kv_heads][ctx]
 * [head_dim] of the layer's kv_type, this layer's) at pos0.., and attention reads
 * positions up to each token's own. Returns ERT_OK or < 0. */
ERT_API int ert_layer_forward(const ert_layer *l, float *x, int n, int pos0, int ctx, void *k_cache, void *v_cache,
                              float *scratch, int threads);

/* ert_layer_forward of layers l[0..nl-1] in turn over the same x (a model's layers in one
 * call), layer i with the caches k_caches[i], v_caches[i]; the scratch is the largest of the
 * layers' ert_layer_scratch_bytes. RoPE's angles are computed once for the layers that
 * share them (the same values as layer by layer). out_norm (NULL: none; nl >= 1): x is then
 * ert_rmsnorm'ed by it in place (the model's output norm, in the same call). Returns ERT_OK or < 0. */
ERT_API int ert_layers_forward(const ert_layer *const *l, int nl, float *x, int n, int pos0, int ctx,
                               void *const *k_caches, void *const *v_caches, float *scratch, int threads,
                               const float *out_norm, float out_eps);

/* Drops cache positions keep .. keep+discard-1 of this layer's cache (of ctx positions,
 * filled up to `used`): later positions move down by `discard`, their keys turned back by
 * `discard` positions of RoPE, so they read as if written there (the sink-and-window
 * policy of a full context; q8_0 keys are dequantized, turned and quantized again, values
 * move as they are). row: scratch of n_kv_heads*head_dim floats. */
ERT_API int ert_layer_kv_shift(const ert_layer *l, void *k_cache, void *v_cache, int ctx, int keep, int discard,
                               int used, float *row);

/* out[i][cols] = W[row0 + i] dequantized, i < nrows; bit-exact with formats.py. */
ERT_API int ert_dequantize_rows(const ert_weight *w, int row0, int nrows, float *out);

/* out[i][cols] = W[idx[i]] dequantized, i < k (embedding lookup of k tokens). */
ERT_API int ert_dequantize_gather(const ert_weight *w, const int64_t *idx, int k, float *out);

/* "q4:avx2", "q4:neon-dotprod", "f32:ref", ...: the kernel ert_matmul uses now;
 * "?" for an unknown format. */
ERT_API const char *ert_kernel_name(int format);

/* The CPU features the library detected and uses, e.g. "avx2 fma f16c",
 * "neon dotprod", or "" (scalar only). */
ERT_API const char *ert_cpu_features(void);

/* "ref", "avx2", "neon", "neon-dotprod" forces that instruction set (formats it has
 * no kernel for fall back to the next lower one, finally ref); "auto" or NULL goes
 * back to the best one ("ref" also makes the layer's attention, softmax and GLU the
 * portable C of layer.c). Returns ERT_OK, or ERT_EUNAVAIL (nothing changed) if the
 * ISA is not compiled in or this CPU lacks it. Not thread safe: call it before
 * running kernels. */
ERT_API int ert_force_isa(const char *isa);

/* "avx2", "neon" or "ref": the instruction set of the layer's vector helpers in use now
 * (attention over the KV cache, softmax, GLU; ert_layer_forward). */
ERT_API const char *ert_layer_isa(void);

/* Bytes of W as stored (codes + scales + mins), for bandwidth figures. */
ERT_API size_t ert_weight_nbytes(const ert_weight *w);

/* Threads a call may use: the processors online. */
ERT_API int ert_max_threads(void);

ERT_API int ert_version(void);

/* ------------------------------------------------------------------------------
 * Internal interface between dispatch.c and the kernel files (ref.c, x86/avx2.c,
 * arm/neon.c). Not part of the public API.
 * ---------------------------------------------------------------------------- */
#ifdef ERT_BUILDING

/* pool.c: runs fn(ctx, slot, nth) on the caller (slot 0) and on up to nth-1 workers of a
 * persistent pool (slots 1..), returning when all that joined are done; nth is capped at
 * the processors online. fn must TAKE its work (an atomic counter in ctx), never split it
 * by slot: a worker that joins late may not run at all, and alone (nth <= 1, or called
 * from inside a region) the caller runs fn(ctx, 0, 1) and takes everything. */
typedef void (*ert_task_fn)(void *ctx, int ith, int nth);
void ert_parallel(ert_task_fn fn, void *ctx, int nth);
/* pool.c: a caller's thread count, <= 0 or above ert_max_threads() meaning ert_max_threads() */
int ert_clamp_threads(int threads);

/* layer.c: its vector helpers (attention, softmax, GLU) SIMD where the CPU has them (simd != 0)
 * or portable; dispatch.c calls it with the kernels it selects (portable for "ref") */
void ert_layer_select(int simd);

#define ERT_TILE 32 /* rows per tile of the q1..q4 bit-plane layout (formats.TILE) */
/* 32-column blocks whose table lookups a q1..q4 kernel may sum in int16 (one block's
 * |sum| <= 8*127*(2^bits-1)): 32, 10, 4, 2 at 1..4 bits */
#define ERT_LUT_SPAN(bits) (32767 / (8 * 127 * ((1 << (bits)) - 1)))
/* Block multipliers (formats.lut_block_mult, formats.lut_tables): where a group holds
 * more than one 32-column block, each block's tables have their own step, ls * q/32768
 * with q <= 32767 an int16 of the block, and the kernels weigh a block's int16 sum I by q
 * with one rounding multiply, (I*q + 2^14) >> 15 (_mm256_mulhrs_epi16, vqrdmulhq_s16),
 * before the group's int16 sum (a->lq; NULL for groups of one block, whose q would be
 * 32767). With one step per 64-column group the tables cost SmolLM2 +0.42% perplexity at 4
 * bits (rtn file), +0.33% at 3 and at 2 (GPTQ files), over issue 3's 0.3%; with
 * multipliers +0.17%, +0.17% and +0.24% (BENCHMARKS.md, rounds 13 and 14). */
#define ERT_LUT_BLOCK_MULT(group_size) ((group_size) > ERT_BLOCK)

/* Activations prepared once per ert_matmul call. */
typedef struct {
    int n, cols;
    const float *x;     /* [n][cols], the caller's activations (f32/f16 kernels) */
    /* q1..q4 (table lookups; formats.lut_tables): */
    const int8_t *lut;  /* [n][cols/4][16] int8 tables of the 4-column sub-groups */
    const float *ls;    /* [n][ngroups] table scale of each group */
    const int16_t *lq;  /* [n][nblk] block multipliers (ERT_LUT_BLOCK_MULT), else NULL */
    const float *xsum;  /* [n][ngroups] float32 sum of x over each group */
    /* q5, q6, q8 (integer dot products of int8 weights and int16 activations): */
    int nblk, ngroups, group_size;
    const int16_t *q;   /* [n][cols] int16: rint(x * ERT_ACT_LEVELS/amax), amax per ERT_ACT_SPAN */
    const int8_t *qd;   /* neon-dotprod only, else NULL: q's digits, [n][nblk][2][32] int8:
                           per block h[32] then l[32], q = 128*h + l (dispatch.c act_digits) */
    const float *da;    /* [n][nblk]  amax/ERT_ACT_LEVELS of the block's span (+ 8 readable floats past the end) */
    const int32_t *qsum;/* [n][nblk]  sum of the block's q */
    const float *gsum;  /* [n][ngroups rounded up to a multiple of 8, zero padded]:
                           sum over the group's blocks of da*qsum */
    const int32_t *bgroup; /* [nblk + 8] group of each block (the padding repeats the last) */
} ert_act;

/* Computes y[j][r] for all j < a->n and r0 <= r < r1 (y has w->rows columns). */
typedef void (*ert_matmul_fn)(const ert_weight *w, const ert_act *a, int r0, int r1, float *y);
/* out[i][cols] = dequantized row rows[i] (rows == NULL: row0 + i), i < k. */
typedef void (*ert_dequant_fn)(const ert_weight *w, const int64_t *rows, int row0, int k, float *out);
/* Quantizes x[n][cols] (cols % 32 == 0) into q, da, qsum; bit-exact with
 * formats.quantize_activations in every implementation. */
typedef void (*ert_quant_act_fn)(const float *x, int n, int cols, int16_t *q, float *da, int32_t *qsum);
/* Builds lut, ls, lq (unless NULL: no block multipliers; bit-exact with formats.lut_tables
 * in every implementation) and xsum (float32, any summation order) of x[n][cols]. */
typedef void (*ert_lut_act_fn)(const float *x, int n, int cols, int group_size, int8_t *lut, float *ls, int16_t *lq,
                               float *xsum);
/* The largest ((|x0| + |x1|) + |x2|) + |x3| over the 8 sub-groups of a 32-column block;
 * a group's table scale is the largest of its blocks' /127 (formats.lut_tables); every
 * table builder uses this. */
static inline float ert_lut_amax(const float *xb) {
    float amax = 0.0f;
    for (int q = 0; q < 8; q++) {
        const float *v = xb + 4 * q;
        const float a = ((__builtin_fabsf(v[0]) + __builtin_fabsf(v[1])) + __builtin_fabsf(v[2])) + __builtin_fabsf(v[3]);
        amax = a > amax ? a : amax;
    }
    return amax;
}

/* Whether a group format of this width is in the bit-plane tiles of the table-lookup kernels
 * (q1..q4, formats.LUT_BITS), not in the row layout of the int8 dot products (q5, q6, q8). */
static inline int ert_lut_bits(int bits) { return bits >= 1 && bits <= 4; }

/* Rows r0..r1-1 of a q1..q4 weight by table lookups, scalar (also the SIMD kernels'
 * path for the last tile when it has fewer than ERT_TILE rows). */
void ert_lut_matmul_ref(const ert_weight *w, const ert_act *a, int r0, int r1, float *y, int bits);
/* Offset of the byte holding row r's plane-k nibbles of sub-groups 2s, 2s+1 of block b
 * in a q1..q4 code array (formats.py: tiles of 32 rows; per block, plane pairs (2u,
 * 2u+1) with a row's two planes side by side, an odd plane count ending with a lone
 * plane whose sub-group pairs 2s', 2s'+1 sit side by side). */
static inline size_t ert_lut_offset(const ert_weight *w, int bits, int r, int b, int k, int s) {
    const int t0 = r - r % ERT_TILE, h = w->rows - t0 < ERT_TILE ? w->rows - t0 : ERT_TILE, u = k >> 1;
    const int wu = bits - 2 * u >= 2 ? 2 : 1; /* planes in pair u */
    return (size_t)t0 * w->cols * bits / 8 + ((size_t)b * bits + 2 * u) * 4 * h + 2 * (size_t)h * (wu == 2 ? s : s >> 1) +
           2 * (r - t0) + (wu == 2 ? (k & 1) : (s & 1));
}

/* Index of row r's group g in the scale and min arrays (formats.pack_groups): q5, q6, q8
 * row by row; q1..q4 by tiles of 32 rows (h rows in the last), group by group, the tile's rows
 * in order. */
static inline size_t ert_group_offset(const ert_weight *w, int bits, int r, int g) {
    const int ng = (w->cols + w->group_size - 1) / w->group_size;
    if (!ert_lut_bits(bits)) return (size_t)r * ng + g;
    const int t0 = r - r % ERT_TILE, h = w->rows - t0 < ERT_TILE ? w->rows - t0 : ERT_TILE;
    return (size_t)t0 * ng + (size_t)g * h + (r - t0);
}

typedef struct {
    ert_matmul_fn matmul;
    ert_dequant_fn dequant;
} ert_kernel;

/* bits per code of a group format (0 for f32/f16) */
static inline int ert_format_bits(int format) {
    switch (format) {
    case ERT_Q1: return 1;
    case ERT_Q2: return 2;
    case ERT_Q3: return 3;
    case ERT_Q4: return 4;
    case ERT_Q5: return 5;
    case ERT_Q6: return 6;
    case ERT_Q8: return 8;
    default: return 0;
    }
}

/* The int8 kernels (q5, q6, q8) dot s = c - o with int16 activations: q8's codes 0..255 are
 * shifted into int8 by o = 128; q5, q6 codes (< 64) are int8 as they are (o = 0). (AVX2 dots
 * the codes c themselves, d*c.q + m*sum(q): the same sum; x86/avx2.c says why.) */
static inline int ert_int8_offset(int bits) { return bits == 8 ? 128 : 0; }

/* Levels of the int8 kernels' activations (formats.ACT_LEVELS): q = rint(x * L/amax), amax the
 * largest |x| of the ERT_ACT_SPAN columns sharing the scale (two blocks; a row's last block alone
 * when it has an odd number), |q| <= L = 127*64. With int8 activations (127 levels, as llama.cpp's
 * q8_0) the 8-bit perplexity sat +0.16..0.42% over the float arithmetic of the same weights, its
 * rounding flips amplified by later layers; with 128x finer steps per 32 columns it was +0.001%,
 * on Gemma-3 too (BENCHMARKS.md, round 15), and 64x finer per 64 columns keeps it there. L keeps
 * the properties the kernels rely on: q splits into two int8 digits q = 128*h + l, |h| <= 64,
 * -64 <= l < 64 (act_digits: neon-dotprod's vdotq_s32 on each), and a SIMD lane's partial sum
 * converts to float exactly: 8 products s*q (|s| <= 128, NEON) or c*q (c <= 255; AVX2 sums a
 * pair of blocks, 4 products each, before converting) stay below 2^24. */
#define ERT_ACT_LEVELS 8128
#define ERT_ACT_SPAN 64 /* columns sharing an activation scale: a pair of blocks (formats.ACT_SPAN) */

/* IEEE half -> float, exact (subnormals, inf, NaN payload). */
static inline float ert_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: normalize */
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400u));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3FFu) << 13);
    }
    union { uint32_t u; float f; } v;
    v.u = bits;
    return v.f;
}

/* kernels of each file; see the table in dispatch.c */
#define ERT_DECLARE_KERNELS(isa)                                                          \
    void ert_f32_matmul_##isa(const ert_weight *, const ert_act *, int, int, float *);     \
    void ert_f16_matmul_##isa(const ert_weight *, const ert_act *, int, int, float *);     \
    void ert_q1_matmul_##isa(const ert_weight *, const ert_act *, int, int, float *);      \
    void ert_q2_matmul_##isa(const ert_weight *, const ert_act *, int, int, float *);      \
    void ert_q3_matmul_##isa(const ert_weight *, const ert_act *, int, int, float *);      \
    void ert_q4_matmul_##isa(const ert_weight *, const ert_act *, int, int, float *);      \
    void ert_q5_matmul_##isa(const ert_weight *, const ert_act *, int, int, float *);      \
    void ert_q6_matmul_##isa(const ert_weight *, const ert_act *, int, int, float *);      \
    void ert_q8_matmul_##isa(const ert_weight *, const ert_act *, int, int, float *);      \
    void ert_f32_dequant_##isa(const ert_weight *, const int64_t *, int, int, float *);    \
    void ert_f16_dequant_##isa(const ert_weight *, const int64_t *, int, int, float *);    \
    void ert_q1_dequant_##isa(const ert_weight *, const int64_t *, int, int, float *);     \
    void ert_q2_dequant_##isa(const ert_weight *, const int64_t *, int, int, float *);     \
    void ert_q3_dequant_##isa(const ert_weight *, const int64_t *, int, int, float *);     \
    void ert_q4_dequant_##isa(const ert_weight *, const int64_t *, int, int, float *);     \
    void ert_q5_dequant_##isa(const ert_weight *, const int64_t *, int, int, float *);     \
    void ert_q6_dequant_##isa(const ert_weight *, const int64_t *, int, int, float *);     \
    void ert_q8_dequant_##isa(const ert_weight *, const int64_t *, int, int, float *);     \
    void ert_quant_act_##isa(const float *, int, int, int16_t *, float *, int32_t *);                \
    void ert_lut_act_##isa(const float *, int, int, int, int8_t *, float *, int16_t *, float *);

ERT_DECLARE_KERNELS(ref)
ERT_DECLARE_KERNELS(avx2)
ERT_DECLARE_KERNELS(neon)
ERT_DECLARE_KERNELS(neon_dotprod)

#endif /* ERT_BUILDING */

#ifdef __cplusplus
}
#endif
#endif /* EDGERT_H */
