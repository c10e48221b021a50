/* Probe for a faulty float division (BENCHMARKS.md, "A faulty division"). Three operand
 * pairs (quotients kernels_c/layer.c's GELU/SiLU computed on SmolLM2), each in all 8 lanes,
 * divided once a millisecond three ways: one 256-bit vdivps, two 128-bit vdivps, and scalar
 * divss. IEEE division is exact, so no quotient may ever differ from the first one computed;
 * the counts of those that did are printed per way and lane, as one JSON line.
 *
 *   gcc -O2 -mavx2 benchmarks/div_probe.c -o /tmp/div_probe && /tmp/div_probe 600   # seconds
 */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { PAIRS = 3, WAYS = 3 };
static const unsigned OPERANDS[PAIRS][2] = {{0xbf406c3c, 0x4047b642}, {0xbf0a0685, 0x402dbb82}, {0xbf546188, 0x4052b734}};

static __m128 div4(__m128 a, __m128 b) { /* in asm: the compiler would fuse two into one vdivps ymm */
    __m128 q;
    __asm__ volatile("vdivps %2, %1, %0" : "=x"(q) : "x"(a), "x"(b));
    return q;
}

/* q[way][lane] = a / b */
__attribute__((noinline)) static void divide(float a, float b, float q[WAYS][8]) {
    const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
    __m256 y;
    __asm__ volatile("vdivps %2, %1, %0" : "=x"(y) : "x"(va), "x"(vb));
    _mm256_storeu_ps(q[0], y);
    _mm_storeu_ps(q[1], div4(_mm256_castps256_ps128(va), _mm256_castps256_ps128(vb)));
    _mm_storeu_ps(q[1] + 4, div4(_mm256_extractf128_ps(va, 1), _mm256_extractf128_ps(vb, 1)));
    for (int l = 0; l < 8; l++) {
        volatile float x = a, d = b;
        q[2][l] = x / d;
    }
}

int main(int argc, char **argv) {
    const int seconds = argc > 1 ? atoi(argv[1]) : 60;
    float a[PAIRS], b[PAIRS], first[PAIRS][WAYS][8], q[WAYS][8];
    for (int p = 0; p < PAIRS; p++) {
        memcpy(&a[p], &OPERANDS[p][0], 4), memcpy(&b[p], &OPERANDS[p][1], 4);
        divide(a[p], b[p], first[p]);
    }
    long runs = 0, wrong[WAYS][8] = {{0}};
    const time_t t0 = time(NULL);
    while (time(NULL) - t0 < seconds) {
        for (int p = 0; p < PAIRS; p++) {
            divide(a[p], b[p], q);
            for (int w = 0; w < WAYS; w++)
                for (int l = 0; l < 8; l++) wrong[w][l] += q[w][l] != first[p][w][l];
        }
        runs++;
        const struct timespec ms = {0, 1000000};
        nanosleep(&ms, NULL);
    }
    const char *name[WAYS] = {"vdivps_ymm", "vdivps_xmm", "divss"};
    printf("{\"seconds\":%d,\"runs\":%ld,\"divisions_per_way\":%ld,\"wrong_per_lane\":{", seconds, runs, runs * PAIRS * 8);
    for (int w = 0; w < WAYS; w++) {
        printf("%s\"%s\":[", w ? "," : "", name[w]);
        for (int l = 0; l < 8; l++) printf("%s%ld", l ? "," : "", wrong[w][l]);
        printf("]");
    }
    printf("}}\n");
    return 0;
}
