/* AVX2 + FMA helpers shared by the native CPU kernels (fp8_cpu.c, dsa_cpu.c, moe_cpu.c, linear_cpu.c). */
#ifndef DSC_SIMD_H
#define DSC_SIMD_H
#include <immintrin.h>
#include <stdint.h>

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* a . x over n values */
static inline float dot1(const float *a, const float *x, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(x + i), acc);
    float s = hsum8(acc);
    for (; i < n; i++) s += a[i] * x[i];
    return s;
}

/* The 8 dots q[h] . x (h = 0..7, rows ld apart) over n values, as one vector: 8 independent FMA
 * chains share each load of x, and one transpose-add replaces 8 horizontal sums. */
static inline __m256 dot8(const float *q, int64_t ld, const float *x, int64_t n) {
    __m256 a[8];
    for (int h = 0; h < 8; h++) a[h] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 xv = _mm256_loadu_ps(x + i);
        for (int h = 0; h < 8; h++) a[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * ld + i), xv, a[h]);
    }
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    __m256 s = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
    if (i < n) {
        float tail[8];
        for (int h = 0; h < 8; h++) {
            tail[h] = 0.0f;
            for (int64_t j = i; j < n; j++) tail[h] += q[h * ld + j] * x[j];
        }
        s = _mm256_add_ps(s, _mm256_loadu_ps(tail));
    }
    return s;
}

/* y += a * x over n values */
static inline void axpy(float *y, float a, const float *x, int64_t n) {
    __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

#endif
