/* fp32 linear layers of a few rows (decode, verify, draft) on an x86-64 CPU with AVX2 and FMA (see
 * kernels/linear.py, which calls this through kernels/native.py):
 *
 *   dsc_f32_rows: y[m, n] = sum_k x[m, k] * w[n, k] (+ b[n])
 *
 * The weight is read once, 8 rows at a time, and each block is dotted with every activation row
 * while it is in cache. torch's GEMM reads the weight once per activation row at these shapes: a
 * verify step's 2 rows cost twice a decode step's 1 (measured 6.6 against 3.3 µs for a 192x96
 * weight), where speculative decoding needs them to cost about the same. Each output is the same
 * dot product whatever M is, so a row's numbers do not depend on how many rows share the call.
 */
#include <stdint.h>

#include "simd.h"

/* x (M, K) rows ldx apart, w (N, K) contiguous, b (N) or NULL, y (M, N) contiguous */
void dsc_f32_rows(const float *x, int64_t M, int64_t ldx, int64_t K, const float *w, const float *b, float *y,
                  int64_t N, int threads) {
    const int64_t N8 = N / 8;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t nb = 0; nb < N8; nb++) {
        const float *wb = w + nb * 8 * K;
        const __m256 bias = b ? _mm256_loadu_ps(b + nb * 8) : _mm256_setzero_ps();
        for (int64_t m = 0; m < M; m++)
            _mm256_storeu_ps(y + m * N + nb * 8, _mm256_add_ps(dot8(wb, K, x + m * ldx, K), bias));
    }
    for (int64_t n = N8 * 8; n < N; n++)
        for (int64_t m = 0; m < M; m++) y[m * N + n] = dot1(w + n * K, x + m * ldx, K) + (b ? b[n] : 0.0f);
}
