/* The routed experts of a decode step's few tokens on an x86-64 CPU with AVX2 and FMA (see
 * kernels/moe.py, which calls this through kernels/native.py):
 *
 *   dsc_moe_rows: y[n] = sum_i wts[n, i] * down_e(silu(gate_e x[n]) * up_e x[n]),  e = idx[n, i]
 *
 * each token's experts in increasing id order (the order of the torch path's sum), every matmul a
 * GEMV of 8 weight rows at a time against the token's row. A step of the demo model was ~20 small
 * ATen calls per expert in torch (0.18 ms an MoE layer); here it is one call, on one thread (see
 * dsa_cpu.c).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

/* linear_cpu.c: y (M, N) = x (M, K) w (N, K)^T (+ b); here one row, y = W x, on this thread */
void dsc_f32_rows(const float *x, int64_t M, int64_t ldx, int64_t K, const float *w, const float *b, float *y,
                  int64_t N, int threads);

static void gemv(const float *W, int64_t M, int64_t n, const float *x, float *y) {
    dsc_f32_rows(x, 1, n, n, W, NULL, y, M, 1);
}

/* x (N, D), idx (N, K), wts (N, K), y (N, D) contiguous; gate / up / down: the weights of the expert
 * of each slot n * K + i, gate and up (F, D), down (D, F), contiguous. */
void dsc_moe_rows(const float *x, int64_t N, int64_t D, int64_t F, int64_t K, const int64_t *idx,
                  const float *wts, const float *const *gate, const float *const *up, const float *const *down,
                  float *y) {
    float *g = malloc(F * sizeof *g), *u = malloc(F * sizeof *u), *o = malloc(D * sizeof *o);
    int64_t *order = malloc(K * sizeof *order);
    for (int64_t n = 0; n < N; n++) {
        const float *xn = x + n * D;
        float *yn = y + n * D;
        for (int64_t d = 0; d < D; d++) yn[d] = 0.0f;
        for (int64_t i = 0; i < K; i++) { /* the token's slots by expert id, stable */
            int64_t j = i;
            for (; j > 0 && idx[n * K + order[j - 1]] > idx[n * K + i]; j--) order[j] = order[j - 1];
            order[j] = i;
        }
        for (int64_t i = 0; i < K; i++) {
            const int64_t s = n * K + order[i];
            gemv(gate[s], F, D, xn, g);
            gemv(up[s], F, D, xn, u);
            for (int64_t f = 0; f < F; f++) g[f] = g[f] / (1.0f + expf(-g[f])) * u[f]; /* silu(g) * u */
            gemv(down[s], D, F, g, o);
            axpy(yn, wts[s], o, D);
        }
    }
    free(g);
    free(u);
    free(o);
    free(order);
}
