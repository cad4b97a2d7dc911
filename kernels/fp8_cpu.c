/* FP8 e4m3 matmuls on an x86-64 CPU with AVX2, FMA and F16C (see kernels/native.py, which builds
 * this file with the system C compiler and calls it through ctypes).
 *
 * The dequantisation happens inside the dot product: 16 e4m3 bytes become 16 fp16 bit patterns
 * (sign to bit 15, exponent and mantissa shifted up by 7: the e4m3 value times 2^-8, subnormals
 * included, since fp16's exponent range holds e4m3's) and F16C widens them to fp32 exactly. The
 * 2^8 is folded into the block scale. A decode step then reads one byte a weight instead of four.
 *
 *   dsc_fp8_rows:    y[m, n] = sum_kb ws[n / 128, kb] * sum_{k in kb} x[m, k] * e4m3(w[n, k])
 *                    (a few rows of fp32 activations against the whole weight, weight read once)
 *   dsc_fp8_dequant: out[r, k] = e4m3(q[r, k]) * s[(r / row_block) * s_stride + k / 128]
 *                    (bit-identical to torch's q.float() * s: the widening is exact, the product
 *                    is rounded once)
 *   dsc_act_quant:   per row and group of 128: s = max(amax, 1e-4) / 448, q = e4m3(clamp(x / s))
 *                    (bit-identical to the torch reference: the same fp32 division, then the
 *                    cast's round-to-nearest-even done on the bits)
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"

#define BLOCK 128

static float LUT[256]; /* e4m3fn byte -> value, for the ragged tail of a row */

static void init_lut(void) {
    for (int i = 0; i < 256; i++) {
        int e = (i >> 3) & 15, m = i & 7;
        float v = e ? ldexpf(1.0f + m / 8.0f, e - 7) : ldexpf((float)m, -9);
        if ((i & 0x7F) == 0x7F) v = NAN;
        LUT[i] = (i & 0x80) ? -v : v;
    }
}

/* 16 e4m3 bytes -> 16 fp32 values times 2^-8 */
static inline void widen16(const uint8_t *p, __m256 *lo, __m256 *hi) {
    /* sign-extended to 16 bits and shifted up by 7: the sign lands on bit 15, exponent and mantissa on
     * bits 13..7, and bit 14 (a copy of the sign) is cleared */
    __m256i h = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
    __m256i f = _mm256_and_si256(_mm256_slli_epi16(h, 7), _mm256_set1_epi16((short)0xBF80));
    *lo = _mm256_cvtph_ps(_mm256_castsi256_si128(f));
    *hi = _mm256_cvtph_ps(_mm256_extracti128_si256(f, 1));
}

/* MB activation rows against NB consecutive weight rows n0 .. n0 + NB - 1. Two accumulators per
 * (row, output) keep enough independent FMA chains in flight for the decode case (MB = 1). */
static inline __attribute__((always_inline)) void tile(const float *x, int64_t ldx, const uint8_t *w,
                                                        const float *ws, float *y, int64_t ldy, int64_t n0,
                                                        int64_t K, const int MB, const int NB) {
    const int64_t nkb = (K + BLOCK - 1) / BLOCK;
    __m256 tot[4][4];
    float tail_tot[4][4];
    for (int m = 0; m < MB; m++)
        for (int j = 0; j < NB; j++) tot[m][j] = _mm256_setzero_ps(), tail_tot[m][j] = 0.0f;
    for (int64_t kb = 0; kb < nkb; kb++) {
        const int64_t k0 = kb * BLOCK, k1 = k0 + BLOCK < K ? k0 + BLOCK : K;
        __m256 a0[4][4], a1[4][4];
        for (int m = 0; m < MB; m++)
            for (int j = 0; j < NB; j++) a0[m][j] = _mm256_setzero_ps(), a1[m][j] = _mm256_setzero_ps();
        int64_t k = k0;
        for (; k + 16 <= k1; k += 16) {
            __m256 xl[4], xh[4];
            for (int m = 0; m < MB; m++) xl[m] = _mm256_loadu_ps(x + m * ldx + k), xh[m] = _mm256_loadu_ps(x + m * ldx + k + 8);
            for (int j = 0; j < NB; j++) {
                __m256 lo, hi;
                widen16(w + (n0 + j) * K + k, &lo, &hi);
                for (int m = 0; m < MB; m++) {
                    a0[m][j] = _mm256_fmadd_ps(lo, xl[m], a0[m][j]);
                    a1[m][j] = _mm256_fmadd_ps(hi, xh[m], a1[m][j]);
                }
            }
        }
        for (int j = 0; j < NB; j++) {
            const float s = ws[((n0 + j) / BLOCK) * nkb + kb];
            const __m256 s8 = _mm256_set1_ps(s * 256.0f);
            for (int m = 0; m < MB; m++) {
                float t = 0.0f;
                for (int64_t kk = k; kk < k1; kk++) t += x[m * ldx + kk] * LUT[w[(n0 + j) * K + kk]];
                tot[m][j] = _mm256_fmadd_ps(_mm256_add_ps(a0[m][j], a1[m][j]), s8, tot[m][j]);
                tail_tot[m][j] += t * s;
            }
        }
    }
    for (int m = 0; m < MB; m++)
        for (int j = 0; j < NB; j++) y[m * ldy + n0 + j] = hsum8(tot[m][j]) + tail_tot[m][j];
}

#define TILE(MB, NB)                                                                                             \
    static void tile_##MB##_##NB(const float *x, int64_t ldx, const uint8_t *w, const float *ws, float *y,     \
                                 int64_t ldy, int64_t n0, int64_t K) {                                          \
        tile(x, ldx, w, ws, y, ldy, n0, K, MB, NB);                                                             \
    }
TILE(1, 4) TILE(1, 1) TILE(2, 2) TILE(2, 1) TILE(3, 1) TILE(4, 1)

typedef void (*tile_fn)(const float *, int64_t, const uint8_t *, const float *, float *, int64_t, int64_t, int64_t);

static int lut_ready = 0;

/* x (M, K) fp32 rows ldx apart, w (N, K) e4m3 contiguous, ws (ceil(N/128), ceil(K/128)) fp32,
 * y (M, N) fp32 rows ldy apart. Rows are taken four at a time, so the weight is read ceil(M / 4)
 * times: meant for decode and verify steps (a long prompt dequantises once and calls a GEMM). */
void dsc_fp8_rows(const float *x, int64_t M, int64_t ldx, const uint8_t *w, const float *ws, float *y,
                  int64_t ldy, int64_t N, int64_t K, int threads) {
    if (!lut_ready) init_lut(), lut_ready = 1;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int mb = M - m0 < 4 ? (int)(M - m0) : 4;
        const int nb = mb == 1 ? 4 : mb == 2 ? 2 : 1;
        tile_fn wide = mb == 1 ? tile_1_4 : mb == 2 ? tile_2_2 : mb == 3 ? tile_3_1 : tile_4_1;
        tile_fn one = mb == 1 ? tile_1_1 : mb == 2 ? tile_2_1 : wide;
        const float *xm = x + m0 * ldx;
        float *ym = y + m0 * ldy;
        const int64_t tiles = N / nb;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && N * K >= (1 << 16))
        for (int64_t t = 0; t < tiles; t++) wide(xm, ldx, w, ws, ym, ldy, t * nb, K);
        for (int64_t n = tiles * nb; n < N; n++) one(xm, ldx, w, ws, ym, ldy, n, K);
    }
}

/* per head: x (M, H, K) rows, w (H, N, K), ws (H, ceil(N/128), ceil(K/128)), y (M, H, N); all contiguous */
void dsc_fp8_rows_heads(const float *x, int64_t M, int64_t H, const uint8_t *w, const float *ws, float *y, int64_t N,
                        int64_t K, int threads) {
    const int64_t nbs = ((N + BLOCK - 1) / BLOCK) * ((K + BLOCK - 1) / BLOCK);
    for (int64_t h = 0; h < H; h++)
        dsc_fp8_rows(x + h * K, M, H * K, w + h * N * K, ws + h * nbs, y + h * N, H * N, N, K, threads);
}

void dsc_fp8_dequant(const uint8_t *q, const float *s, float *out, int64_t R, int64_t K, int64_t row_block,
                     int64_t s_stride, int threads) {
    if (!lut_ready) init_lut(), lut_ready = 1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && R * K >= (1 << 16))
    for (int64_t r = 0; r < R; r++) {
        const uint8_t *qr = q + r * K;
        const float *sr = s + (r / row_block) * s_stride;
        float *o = out + r * K;
        for (int64_t k0 = 0; k0 < K; k0 += BLOCK) {
            const int64_t k1 = k0 + BLOCK < K ? k0 + BLOCK : K;
            const float sc = sr[k0 / BLOCK];
            const __m256 s8 = _mm256_set1_ps(sc * 256.0f);
            int64_t k = k0;
            for (; k + 16 <= k1; k += 16) {
                __m256 lo, hi;
                widen16(qr + k, &lo, &hi);
                _mm256_storeu_ps(o + k, _mm256_mul_ps(lo, s8));
                _mm256_storeu_ps(o + k + 8, _mm256_mul_ps(hi, s8));
            }
            for (; k < k1; k++) o[k] = LUT[qr[k]] * sc;
        }
    }
}

/* fp32 -> e4m3fn, round to nearest even, for |v| <= 448 or NaN (the callers clamp first) */
static inline uint8_t to_e4m3(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    const uint8_t sign = (u >> 24) & 0x80;
    u &= 0x7FFFFFFF;
    if (u > 0x7F800000) return sign | 0x7F;  /* NaN */
    if (u < 0x3C800000) {                     /* below 2^-6: a subnormal m * 2^-9 (m = 8: the smallest normal) */
        float a;
        memcpy(&a, &u, 4);
        return sign | (uint8_t)nearbyintf(a * 512.0f);
    }
    u += 0x7FFFF + ((u >> 20) & 1); /* round the 23-bit mantissa to 3 bits, ties to even; a carry bumps the exponent */
    return sign | (uint8_t)((((u >> 23) - 120) << 3) | ((u >> 20) & 7));
}

/* x (M, K) fp32 rows ldx apart -> q (M, K) e4m3, s (M, ceil(K / 128)) fp32 */
void dsc_act_quant(const float *x, int64_t M, int64_t ldx, int64_t K, uint8_t *q, float *s) {
    const int64_t G = (K + BLOCK - 1) / BLOCK;
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * ldx;
        for (int64_t g = 0; g < G; g++) {
            const int64_t k0 = g * BLOCK, k1 = k0 + BLOCK < K ? k0 + BLOCK : K;
            float amax = 0.0f;
            int nan = 0;
            for (int64_t k = k0; k < k1; k++) {
                const float a = fabsf(xr[k]);
                nan |= a != a;
                amax = a > amax ? a : amax;
            }
            const float sc = nan ? NAN : (amax > 1e-4f ? amax : 1e-4f) / 448.0f;
            s[m * G + g] = sc;
            for (int64_t k = k0; k < k1; k++) {
                float v = xr[k] / sc;
                v = v > 448.0f ? 448.0f : v < -448.0f ? -448.0f : v;
                q[m * K + k] = to_e4m3(v);
            }
        }
    }
}
