/* DeepSeek Sparse Attention on an x86-64 CPU with AVX2 and FMA (see kernels/dsa.py, which sends every
 * CPU call over fp32 caches here through kernels/native.py).
 *
 * At a decode step's sizes the work is tiny (one row of the demo model: 257 keys x 4 heads x 32 dims) and the
 * torch composition of the ops spends its time between ~40 small ATen calls (about 0.2 ms a call);
 * here one call does the row's whole computation.
 *
 *   dsc_indexer_topk: I[t] = sum_h w[h] * ReLU(q[h] . k[t]) over the visible keys t <= limit, then
 *                     the topk largest, ties to the earlier token (an exact radix select on the
 *                     scores' ordered bit patterns), in increasing token order, -1 padding; a row
 *                     that sees at most topk keys selects them all without scoring.
 *   dsc_sparse_mla:   out[h] = sum_j softmax_j(scale * (qa[h] . c_j + qp[h] . r_j)) c_j over the
 *                     row's selected tokens j (indices >= 0); no selected token: zeros.
 *
 * One thread: torch's own OpenMP pool spins between its ops, and a second pool forking beside it on
 * a small machine made a 1K-context decode step of the demo model 24 ms instead of 3.5 (measured); at decode sizes one thread does a
 * call in microseconds, and at prefill sizes it is still faster than the torch composition.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

/* A float's bits as an unsigned key with the float's order (-0 and +0 one key, as they compare equal). */
static inline uint32_t order_key(float f) {
    uint32_t u;
    if (f == 0.0f) f = 0.0f;
    memcpy(&u, &f, sizeof u);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* The k (<= n) largest keys, ties to the earlier index, as indices in increasing order: the k-th
 * largest key K found digit by digit (8 bits a pass, most significant first), then one scan takes
 * every key above K and the first `need` keys equal to it. */
static void select_topk(const uint32_t *key, int64_t n, int64_t k, int64_t *out) {
    uint32_t prefix = 0, mask = 0;
    int64_t need = k, hist[256];
    for (int shift = 24; shift >= 0; shift -= 8) {
        memset(hist, 0, sizeof hist);
        for (int64_t t = 0; t < n; t++)
            if ((key[t] & mask) == prefix) hist[(key[t] >> shift) & 255]++;
        int d = 255;
        while (need > hist[d]) need -= hist[d--];
        prefix |= (uint32_t)d << shift;
        mask |= 255u << shift;
    }
    int64_t j = 0;
    for (int64_t t = 0; t < n && j < k; t++) {
        if (key[t] > prefix)
            out[j++] = t;
        else if (key[t] == prefix && need > 0) {
            out[j++] = t;
            need--;
        }
    }
}

/* q, w: the row's heads padded with zeros to Hp (a multiple of 8) */
static inline void score_keys(const float *q, const float *w, const float *keys, int64_t key_t, int64_t Hp,
                              int64_t D, int64_t n, uint32_t *key) {
    for (int64_t t = 0; t < n; t++) {
        const float *k = keys + t * key_t;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t h = 0; h < Hp; h += 8) {
            const __m256 d = _mm256_max_ps(dot8(q + h * D, D, k, D), _mm256_setzero_ps()); /* ReLU */
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(w + h), d, acc);
        }
        key[t] = order_key(hsum8(acc));
    }
}

/* rows (H, n) -> (Hp, n), zeros below: every head group of dot8 whole */
static float *pad_heads(const float *x, int64_t H, int64_t n, int64_t Hp) {
    float *p = calloc(Hp * n, sizeof *p);
    memcpy(p, x, H * n * sizeof *p);
    return p;
}

/* q (R, H, D), w (R, H), limit (R,) contiguous, R = B * S rows; keys (B, T, D) with strides key_b,
 * key_t (elements), each key contiguous; out (R, topk). */
void dsc_indexer_topk(const float *q, const float *w, const float *keys, const int64_t *limit, int64_t B,
                      int64_t S, int64_t H, int64_t D, int64_t T, int64_t key_b, int64_t key_t, int64_t topk,
                      int64_t *out) {
    const int64_t R = B * S, Hp = (H + 7) / 8 * 8;
    for (int64_t r = 0; r < R; r++) {
        const int64_t b = r / S;
        int64_t n = limit[r] + 1; /* visible keys 0 .. limit */
        n = n < 0 ? 0 : (n > T ? T : n);
        int64_t *o = out + r * topk;
        if (n <= topk) {
            for (int64_t i = 0; i < topk; i++) o[i] = i < n ? i : -1;
            continue;
        }
        uint32_t *key = malloc(n * sizeof *key);
        float *qr = pad_heads(q + r * H * D, H, D, Hp), *wr = pad_heads(w + r * H, H, 1, Hp);
        const float *kb = keys + b * key_b;
        score_keys(qr, wr, kb, key_t, Hp, D, n, key);
        select_topk(key, n, topk, o);
        free(qr);
        free(wr);
        free(key);
    }
}

/* qa (R, H, dc), qp (R, H, dr), idx (R, K) contiguous, R = B * S; latent (B, T, dc) and rope
 * (B, T, dr) with strides (elements) lat_b / lat_t and rope_b / rope_t, each row contiguous; out
 * (R, H, dc). Returns the number of indices >= T (0: all in range; otherwise out is not written).
 * A (row, group of 8 heads) at a time: the group's scores, softmax and output together, its output
 * rows staying in L1 while the selected latents stream past. */
int64_t dsc_sparse_mla(const float *qa, const float *qp, const float *latent, int64_t lat_b, int64_t lat_t,
                       const float *rope, int64_t rope_b, int64_t rope_t, const int64_t *idx, int64_t B, int64_t S,
                       int64_t H, int64_t dc, int64_t dr, int64_t T, int64_t K, float scale, float *out) {
    const int64_t R = B * S, G = (H + 7) / 8;
    int64_t bad = 0;
    for (int64_t i = 0; i < R * K; i++) bad += idx[i] >= T;
    if (bad) return bad;
    for (int64_t task = 0; task < R * G; task++) {
        const int64_t r = task / G, h0 = task % G * 8, hn = H - h0 < 8 ? H - h0 : 8, b = r / S;
        const int64_t *ix = idx + r * K;
        float *o = out + (r * H + h0) * dc;
        memset(o, 0, hn * dc * sizeof *o);
        int64_t nv = 0;
        for (int64_t j = 0; j < K; j++) nv += ix[j] >= 0;
        if (nv == 0) continue; /* no token: zeros */
        float *p = malloc(8 * nv * sizeof *p), sc[8];
        const float **c = malloc(nv * sizeof *c);
        float *qar = pad_heads(qa + (r * H + h0) * dc, hn, dc, 8), *qpr = pad_heads(qp + (r * H + h0) * dr, hn, dr, 8);
        const __m256 vscale = _mm256_set1_ps(scale);
        int64_t j = 0;
        for (int64_t jj = 0; jj < K; jj++) {
            if (ix[jj] < 0) continue;
            c[j] = latent + b * lat_b + ix[jj] * lat_t;
            const float *rr = rope + b * rope_b + ix[jj] * rope_t;
            const __m256 d = _mm256_add_ps(dot8(qar, dc, c[j], dc), dot8(qpr, dr, rr, dr));
            _mm256_storeu_ps(sc, _mm256_mul_ps(vscale, d));
            for (int i = 0; i < 8; i++) p[i * nv + j] = sc[i];
            j++;
        }
        for (int64_t h = 0; h < hn; h++) { /* softmax over the row's tokens, per head */
            float *ph = p + h * nv, m = ph[0], sum = 0.0f;
            for (j = 1; j < nv; j++) m = ph[j] > m ? ph[j] : m;
            for (j = 0; j < nv; j++) sum += (ph[j] = expf(ph[j] - m));
            const float inv = 1.0f / sum;
            for (j = 0; j < nv; j++) ph[j] *= inv;
        }
        for (j = 0; j < nv; j++) /* each selected latent read once for the group's heads */
            for (int64_t h = 0; h < hn; h++) axpy(o + h * dc, p[h * nv + j], c[j], dc);
        free(qar);
        free(qpr);
        free(c);
        free(p);
    }
    return 0;
}
