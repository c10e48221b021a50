/* Attention at depth, alone (BENCHMARKS.md, "Attention at depth"): layer.c's attention step of
 * one decoded token over SmolLM2-135M's shapes (30 layers; 9 query heads on 3 key/value heads of
 * 64; float16 cache of 1024 positions, `depth` of them attended), each layer's K/V evicted from
 * the caches first by reading 1.4 MB of other memory (a 2-bit SmolLM2 layer's weights). Prints
 * the best of 30 tokens: ms a token and the GB/s of K/V it reads. It includes layer.c to reach
 * its static attention step, so it times the code of the tree it is built from.
 *
 *   gcc -O3 -mavx2 -mfma -mf16c -Ikernels_c/include -DERT_HAVE_AVX2=1 benchmarks/attention_probe.c \
 *       kernels_c/pool.c kernels_c/dispatch.c kernels_c/ref.c kernels_c/x86/avx2.c -lm -lpthread -o /tmp/attention_probe
 *   /tmp/attention_probe 790 1; /tmp/attention_probe 790 2        # depth, threads
 */
#include "../kernels_c/layer.c"

#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static float uniform(void) { return (rand() % 2001 - 1000) / 1000.0f; }

int main(int argc, char **argv) {
    enum { LAYERS = 30, CTX = 1024, H = 9, KV = 3, HD = 64 };
    const int depth = argc > 1 ? atoi(argv[1]) : 790, threads = argc > 2 ? atoi(argv[2]) : 1;
    if (depth < 1 || depth > CTX || threads < 1) return fprintf(stderr, "usage: %s [depth <= %d] [threads]\n", argv[0], CTX), 2;
    ert_layer l = {.d_model = 576, .n_heads = H, .n_kv_heads = KV, .head_dim = HD, .d_ff = 1536, .kv_type = ERT_KV_F16,
                   .attn_scale = 0.125f};
    const size_t values = (size_t)CTX * KV * HD, evict = (size_t)42 << 20;
    half *kc[LAYERS], *vc[LAYERS];
    for (int i = 0; i < LAYERS; i++) {
        kc[i] = malloc(values * sizeof(half)), vc[i] = malloc(values * sizeof(half));
        for (size_t j = 0; j < values; j++) kc[i][j] = f2h(uniform()), vc[i][j] = f2h(uniform());
    }
    long *other = malloc(evict);
    memset(other, 1, evict);
    float q[H * HD], att[H * HD], *scratch = malloc(ert_layer_scratch_bytes(&l, 1, CTX, threads));
    for (int i = 0; i < H * HD; i++) q[i] = uniform();
    ert_layer_select(1);
    double best = 1e9;
    volatile long sink = 0;
    for (int rep = 0; rep < 30; rep++) {
        double t = 0;
        for (int i = 0; i < LAYERS; i++) {
            for (size_t j = i * evict / LAYERS / 8; j < (i + 1) * evict / LAYERS / 8; j += 8) sink += other[j];
            const double t0 = now();
            step s = {.l = &l, .n = 1, .pos0 = depth - 1, .q = q, .att = att, .kc = kc[i], .vc = vc[i], .ctx = CTX};
            attention_setup(&s, scratch, threads);
            run(&s, attention_task, threads);
            t += now() - t0;
        }
        best = t < best ? t : best;
    }
    printf("{\"depth\": %d, \"threads\": %d, \"isa\": \"%s\", \"ms_per_token\": %.3f, \"kv_gb_per_s\": %.2f}\n", depth, threads,
           V.isa, best * 1e3, 2.0 * LAYERS * depth * KV * HD * sizeof(half) / best / 1e9);
    return 0;
}
