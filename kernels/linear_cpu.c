/* fp32 linear layers of a few rows (decode, verify, draft) on an x86-64 CPU with AVX2 and FMA (see
 * kernels/linear.py, which calls this through kernels/native.py):
 *
 *   dsc_f32_rows: y[m, n] = sum_k x[m, k] * w[n, k] (+ b[n])
 *
 * The weight is read once, 8 rows at a time, and each block is dotted with every activation row
 * while it is in cache. torch's GEMM reads the weight once per activation row at these shapes: a
 * verify step's 2 rows cost twice a decode step's 1 (3.79 / 7.99 ms for a 4096x4096 weight; 1.56 /
 * 1.68 ms here), where speculative decoding needs them to cost about the same. Each output is the
 * same dot product whatever M is, so a row's numbers do not depend on how many rows share the call.
 * moe_cpu.c's expert GEMVs are this with M = 1.
 */
#include <stdint.h>

#include "simd.h"

/* outputs 8 nb .. 8 nb + 7 of every row */
static inline void block8(const float *x, int64_t M, int64_t ldx, int64_t K, const float *w, const float *b, float *y,
                          int64_t N, int64_t nb) {
    const float *wb = w + nb * 8 * K;
    for (int64_t m = 0; m < M; m++) {
        __m256 s = dot8(wb, K, x + m * ldx, K);
        if (b) s = _mm256_add_ps(s, _mm256_loadu_ps(b + nb * 8));
        _mm256_storeu_ps(y + m * N + nb * 8, s);
    }
}

/* x (M, K) rows ldx apart, w (N, K) contiguous, b (N) or NULL, y (M, N) contiguous. One thread never
 * enters OpenMP (moe_cpu.c calls this a few dozen times a decode step). */
void dsc_f32_rows(const float *x, int64_t M, int64_t ldx, int64_t K, const float *w, const float *b, float *y,
                  int64_t N, int threads) {
    const int64_t N8 = N / 8;
    if (threads > 1) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t nb = 0; nb < N8; nb++) block8(x, M, ldx, K, w, b, y, N, nb);
    } else {
        for (int64_t nb = 0; nb < N8; nb++) block8(x, M, ldx, K, w, b, y, N, nb);
    }
    for (int64_t n = N8 * 8; n < N; n++)
        for (int64_t m = 0; m < M; m++) y[m * N + n] = b ? dot1(w + n * K, x + m * ldx, K) + b[n] : dot1(w + n * K, x + m * ldx, K);
}
