/* Attention over a KV cache, one query row at a time, for shard/blocks.py (through shard/qkernels.py).
 *
 * Exactness (what prefix reuse, speculation and failover replay rely on): the output of query row
 * t (position past + t) is computed from that row's query and the keys and values it sees (causal,
 * within the sliding window) by the same sequence of operations whatever the step's token count T,
 * the cache's length, the row's place in the step and the thread count. So a position computed in a
 * 1,000-token prefill has the bits it has when computed alone in a decode step, and a conversation
 * prefilled in other chunks (another turn, a replay) gives the same caches.
 *
 * Per row: scores s_j = dot(q, k_j) * scale over the visible keys j, in key order (each dot in a
 * fixed lane order); m = max s_j; e_j = e^(s_j - m) (eight at a time, `exp8`); the output is
 * (sum_j e_j v_j) / (sum_j e_j), both sums in key order. Every float operation is an explicit intrinsic or a scalar operation
 * compiled with -ffp-contract=off.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include "kernels.h"  /* the prototypes block_step.c calls: the compiler holds them to these definitions */

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HA_SIMD 1
#endif

/* dot(a, b) over n values: four lanes of eight in turn (four independent sums), then added in a
 * fixed order; the n % 32 rest in the first sum, the n % 8 rest in scalar. */
static float dot_f32(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float sum = 0.0f;
#ifdef HA_SIMD
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    const __m256 acc = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
    __m128 lo = _mm256_castps256_ps128(acc), hi = _mm256_extractf128_ps(acc, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    sum = _mm_cvtss_f32(lo);
#endif
    for (; i < n; i++)
        sum += a[i] * b[i];
    return sum;
}

/* out[d] = (sum_j e[j] v[j][d]) / total over j in [0, n), the sum in key order (one fused
 * multiply-add per key and value), 32 values of d at a time in registers. */
static void weighted_sum(const float *e, const float *v, int64_t n, int64_t hd, float total, float *out) {
    int64_t d = 0;
#ifdef HA_SIMD
    const __m256 divisor = _mm256_set1_ps(total);
    for (; d + 32 <= hd; d += 32) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        for (int64_t j = 0; j < n; j++) {
            const __m256 w = _mm256_set1_ps(e[j]);
            const float *vj = v + j * hd + d;
            a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(vj), a0);
            a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(vj + 8), a1);
            a2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(vj + 16), a2);
            a3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(vj + 24), a3);
        }
        _mm256_storeu_ps(out + d, _mm256_div_ps(a0, divisor));
        _mm256_storeu_ps(out + d + 8, _mm256_div_ps(a1, divisor));
        _mm256_storeu_ps(out + d + 16, _mm256_div_ps(a2, divisor));
        _mm256_storeu_ps(out + d + 24, _mm256_div_ps(a3, divisor));
    }
#endif
    for (; d < hd; d++) {
        float a = 0.0f;
        for (int64_t j = 0; j < n; j++)
            a += e[j] * v[j * hd + d];
        out[d] = a / total;
    }
}

#include "exp8.h"

/* scores[j] = e^(scores[j] - best) for j in [0, n): eight at a time, the last (partial) eight
 * through a padded copy, so each j's value depends only on n and its own score. */
static void exp_shifted(float *scores, int64_t n, float best) {
#ifdef HA_SIMD
    const __m256 shift = _mm256_set1_ps(best);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(scores + j, exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + j), shift)));
    if (j < n) {
        float tail[8] = {0};
        for (int64_t i = 0; i < n - j; i++)
            tail[i] = scores[j + i];
        _mm256_storeu_ps(tail, exp8(_mm256_sub_ps(_mm256_loadu_ps(tail), shift)));
        for (int64_t i = 0; i < n - j; i++)
            scores[j + i] = tail[i];
    }
#else
    for (int64_t j = 0; j < n; j++)
        scores[j] = expf(scores[j] - best);
#endif
}

/* q: [B, H, T, hd] contiguous; keys and values: [B, KV, >= past + T, hd] with rows of hd
 * contiguous (strides per batch and per kv head given, in floats); out: [B, T, H, hd] contiguous.
 * Query head h reads kv head h / (H / KV). window > 0: a row sees the
 * last `window` positions. Returns 0, or -1 when scratch memory cannot be had (out is then
 * unspecified). */
int ha_attend(const float *q, const float *keys, const float *values, float *out, int64_t B, int64_t H,
              int64_t KV, int64_t T, int64_t past, int64_t hd, int64_t k_batch, int64_t k_head,
              int64_t v_batch, int64_t v_head, int64_t window, float scale, int threads) {
    const int64_t group = H / KV, tasks = B * H * T, length = past + T;
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1 && tasks > 1 && tasks * length * hd * group > (1 << 16))
    {
        float *scores = malloc(sizeof(float) * (size_t)length);
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; task++) {
            if (scores == NULL)
                continue;
            const int64_t b = task / (H * T), h = (task / T) % H, t = task % T;
            const int64_t position = past + t;
            const int64_t first = window > 0 && position + 1 > window ? position + 1 - window : 0;
            const int64_t seen = position + 1 - first;
            const float *kb = keys + b * k_batch + (h / group) * k_head + first * hd;
            const float *vb = values + b * v_batch + (h / group) * v_head + first * hd;
            const float *qr = q + task * hd;
            float best = -INFINITY;
            for (int64_t j = 0; j < seen; j++) {
                scores[j] = dot_f32(qr, kb + j * hd, hd) * scale;
                best = scores[j] > best ? scores[j] : best;
            }
            exp_shifted(scores, seen, best);
            float total = 0.0f;
            for (int64_t j = 0; j < seen; j++)
                total += scores[j];
            weighted_sum(scores, vb, seen, hd, total, out + ((b * T + t) * H + h) * hd);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
