/* The small element-wise steps of a decoder block, one call each instead of several torch ops (a
 * decode step runs them 16-32 times per token, where dispatch, not arithmetic, is their cost).
 *
 * Both are element-wise: an element's result depends only on its own inputs, never on the row
 * count or its place in a row, so batching, replay and chunking keep their exact bits.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "kernels.h"  /* the prototypes block_step.c calls: the compiler holds them to these definitions */

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HA_SIMD 1
#endif
#include "exp8.h"

/* Rotary embedding in place, the bits of shard/rope.py's apply_rotary (x * cos + rotate_half(x) *
 * sin, two products and a sum, each rounded: compiled with -ffp-contract=off, never fused). Rows of
 * `x` are `stride` floats apart and hold `heads` heads of hd values first; row r uses row r % tables
 * of cos and sin ([tables, hd]). */
void hb_rope(float *x, int64_t rows, int64_t stride, int64_t heads, int64_t hd, const float *cos,
             const float *sin, int64_t tables) {
    const int64_t half = hd / 2;
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos + (r % tables) * hd, *s = sin + (r % tables) * hd;
        for (int64_t h = 0; h < heads; h++) {
            float *p = x + r * stride + h * hd;
            for (int64_t i = 0; i < half; i++) {
                const float a = p[i], b = p[i + half];
                p[i] = a * c[i] + (-b) * s[i];
                p[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    }
}

/* out[r, i] = silu(g) * u with g = gate_up[r, i], u = gate_up[r, inner + i]: SwiGLU's middle.
 * silu(g) = g / (1 + e^-g), e^ by exp8 (clamped, so g below -88 gives 0 and never NaN); the last
 * partial eight of a row go through a padded copy, so every element takes the same path. */
void hb_silu_mul(const float *gate_up, float *out, int64_t rows, int64_t inner) {
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gate_up + r * 2 * inner, *u = g + inner;
        float *o = out + r * inner;
#ifdef HA_SIMD
        const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
        for (int64_t i = 0; i < inner; i += 8) {
            float gp[8] = {0}, up[8] = {0}, op[8];
            const int64_t n = inner - i < 8 ? inner - i : 8;
            const float *gi = g + i, *ui = u + i;
            if (n < 8) {
                memcpy(gp, gi, sizeof(float) * (size_t)n), memcpy(up, ui, sizeof(float) * (size_t)n);
                gi = gp, ui = up;
            }
            const __m256 gv = _mm256_loadu_ps(gi);
            const __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, gv))));
            const __m256 result = _mm256_mul_ps(silu, _mm256_loadu_ps(ui));
            if (n < 8) {
                _mm256_storeu_ps(op, result);
                memcpy(o + i, op, sizeof(float) * (size_t)n);
            } else {
                _mm256_storeu_ps(o + i, result);
            }
        }
#else
        for (int64_t i = 0; i < inner; i++) {
            const float x = fminf(fmaxf(-g[i], -87.0f), 88.0f);
            o[i] = (g[i] / (1.0f + expf(x))) * u[i];
        }
#endif
    }
}
