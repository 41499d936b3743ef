/* Quantized matmuls for shard/quant.py: int8 x int8 and int4 x int8, fp32 out, on CPU.
 *
 * Built by setup.py into shard/_qkernels*.so and called through ctypes (shard/qkernels.py checks
 * every shape, dtype and layout before a pointer reaches this file; nothing here validates).
 * Threads come from the OpenMP runtime torch already loaded (same soname, so one thread pool);
 * the caller passes torch's thread count.
 *
 * Exactness (what batching and failover rely on): an output y[m, n] is computed by the same
 * sequence of operations whatever the row count M, the row's position in a tile and the thread
 * count. Integer sums are exact; every float operation is an explicit intrinsic or a scalar
 * operation compiled with -ffp-contract=off, so the compiler cannot re-associate or fuse them
 * differently in different tile sizes.
 *
 * int4 weights are shard/quant.py's portable format: per output row, bytes holding column 2j in
 * the low nibble and 2j+1 in the high one; per group of G columns a bf16 scale s and zero z;
 * w = (code - 8) * s + z. Activations are quantized here per block of 32 values (as llama.cpp's
 * Q8_0): q = round(x / d), d = absmax / 127. With isum = sum(code * q) and qsum = sum(q) over a
 * block, the block contributes d * s * isum + d * qsum * (z - 8 s).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HQ_SIMD 1
#endif

#define QK 32      /* activation block */
#define ROWS 4     /* activation rows sharing one pass over a weight row */

int hq_abi(void) { return 3; }  /* 3: with attention.c's ha_attend */

const char *hq_isa(void) {
#if defined(HQ_SIMD) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return "avx2+avx512vnni";
#elif defined(HQ_SIMD) && defined(__AVXVNNI__)
    return "avx2+avxvnni";
#elif defined(HQ_SIMD)
    return "avx2";
#else
    return "portable C";
#endif
}

static inline float bf16_to_f32(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

#ifdef HQ_SIMD
/* acc + sum over pairs of u8 x s8 products, 4 per int32 lane. Without VNNI, maddubs saturates at
 * 32767 per pair: callers keep u <= 127 (int8 path: |q|) or u <= 15 (int4 codes). */
static inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s),
                                                   _mm256_set1_epi16(1)));
#endif
}

static inline int32_t hsum_i32(__m256i v) {
    __m128i x = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0x4e));
    x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0xb1));
    return _mm_cvtsi128_si32(x);
}

static inline float hsum_f32(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

static inline __m256 bf16x8_to_f32(const uint16_t *p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
#endif

/* ---- int8 x int8 -> int32 ---------------------------------------------------------------- */

#ifdef HQ_SIMD
#if defined(__AVX512VNNI__) || defined(__AVXVNNI__)
/* With VNNI: u8 x s8 products summed exactly in int32, so the activations go in offset by 128
 * (a + 128 in 1..255, prepared once per row as `ua`) and 128 * sum(w) comes off at the end. */
#define I8_OFFSET 1
#else
/* Without: maddubs would saturate at 255 * 127 * 2, so |a| goes in and the sign moves onto w. */
#define I8_OFFSET 0
#endif

static inline __attribute__((always_inline)) void i8_rows(const int8_t *a, const uint8_t *ua,
                                                          const int8_t *wn, int64_t blocks,
                                                          int64_t K, int rows, int32_t *out,
                                                          int64_t ostride) {
    (void)a; /* read only without VNNI */
    __m256i acc[ROWS];
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_si256();
#if I8_OFFSET
    __m256i wsum = _mm256_setzero_si256();
    const __m256i ones = _mm256_set1_epi8(1);
#endif
    for (int64_t b = 0; b < blocks; b++) {
        const __m256i wb = _mm256_loadu_si256((const __m256i *)(wn + b * QK));
#if I8_OFFSET
        wsum = dot_u8s8(wsum, ones, wb);
#endif
        for (int r = 0; r < rows; r++) {
            const __m256i u = _mm256_loadu_si256((const __m256i *)(ua + r * K + b * QK));
#if I8_OFFSET
            acc[r] = dot_u8s8(acc[r], u, wb);
#else
            const __m256i sa = _mm256_loadu_si256((const __m256i *)(a + r * K + b * QK));
            acc[r] = dot_u8s8(acc[r], u, _mm256_sign_epi8(wb, sa));
#endif
        }
    }
#if I8_OFFSET
    const int32_t offset = 128 * hsum_i32(wsum);
#else
    const int32_t offset = 0;
#endif
    for (int r = 0; r < rows; r++) out[r * ostride] = hsum_i32(acc[r]) - offset;
}
#endif

/* out[m, n] = sum_k a[m, k] * w[n, k]; |a| <= 127, K % 32 == 0. Returns 0, or -1 when scratch
 * memory could not be had. */
int hq_i8_mm(const int8_t *a, const int8_t *w, int32_t *out, int64_t M, int64_t N, int64_t K,
              int threads) {
#ifdef HQ_SIMD
    uint8_t *ua = malloc((size_t)(M * K));
    if (!ua) return -1;
    for (int64_t i = 0; i < M * K; i++) ua[i] = (uint8_t)(I8_OFFSET ? a[i] + 128 : abs(a[i]));
    const int64_t blocks = K / QK;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
            const int rows = (int)(M - m0 < ROWS ? M - m0 : ROWS);
#define I8_ROWS(R) i8_rows(a + m0 * K, ua + m0 * K, w + n * K, blocks, K, R, out + m0 * N + n, N)
            switch (rows) {
            case 1: I8_ROWS(1); break;
            case 2: I8_ROWS(2); break;
            case 3: I8_ROWS(3); break;
            default: I8_ROWS(4); break;
            }
#undef I8_ROWS
        }
    }
    free(ua);
#else
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++) {
            int32_t s = 0;
            for (int64_t k = 0; k < K; k++) s += (int32_t)a[m * K + k] * w[n * K + k];
            out[m * N + n] = s;
        }
#endif
    return 0;
}

/* Per-row int8 activations exactly as shard/quant.py's torch code computes them:
 * step = max(absmax, 1e-20) / 127 and code = round-half-even(x / step), in fp32. */
void hq_i8_quantize(const float *x, int8_t *codes, float *steps, int64_t M, int64_t K) {
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        float amax = 0.0f;
        for (int64_t k = 0; k < K; k++) amax = fmaxf(amax, fabsf(xm[k]));
        const float step = fmaxf(amax, 1e-20f) / 127.0f;
        for (int64_t k = 0; k < K; k++) {
            float v = nearbyintf(xm[k] / step);
            v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : (v == v ? v : 0.0f));
            codes[m * K + k] = (int8_t)v;
        }
        steps[m] = step;
    }
}

/* y[m, n] = float(sum_k code[m, k] * w[n, k]) * step[m] * scale[n], the products in exact int32
 * and the two fp32 multiplications in that order, as quant.py does after torch's _int_mm. */
int hq_i8_linear(const float *x, const int8_t *w, const uint16_t *scales, float *y, int64_t M,
                 int64_t N, int64_t K, int threads) {
    int8_t *codes = malloc((size_t)(M * K));
    float *steps = malloc(sizeof(float) * (size_t)M);
    int32_t *products = malloc(sizeof(int32_t) * (size_t)(M * N));
    int status = -1;
    if (codes && steps && products) {
        hq_i8_quantize(x, codes, steps, M, K);
        status = hq_i8_mm(codes, w, products, M, N, K, threads);
    }
    if (status == 0)
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < N; n++)
                y[m * N + n] = ((float)products[m * N + n] * steps[m]) * bf16_to_f32(scales[n]);
    free(codes), free(steps), free(products);
    return status;
}

/* ---- int4 x int8 -> fp32 ----------------------------------------------------------------- */

/* Activations are laid out for the weights' nibbles, two blocks (a "pair", 64 columns) at a time:
 * [even columns of block 2p | even of 2p+1 | odd of 2p | odd of 2p+1], 16 bytes each, so that one
 * 32-byte load of weights (two blocks of packed nibbles) gives the matching low nibbles with one
 * mask and the high ones with one shift and mask. A last unpaired block is [even | odd].
 * dv holds, per pair, [d(2p) x4, d(2p+1) x4]: the int32 lanes 0-3 of a pair's dot product belong
 * to block 2p, lanes 4-7 to 2p+1. c[g] = sum over the group's blocks of d * sum(q). */
static inline int64_t q_offset(int64_t b, int j, int64_t blocks) {
    const int64_t pair = b / 2;
    if (b == blocks - 1 && blocks % 2)
        return pair * 64 + (j & 1) * 16 + (j >> 1);
    return pair * 64 + (j & 1) * 32 + (b & 1) * 16 + (j >> 1);
}

static void quantize_row(const float *x, int64_t K, int64_t group, int8_t *q, float *dv, float *c) {
    const int64_t blocks = K / QK, per_group = group / QK;
    for (int64_t b = 0; b < blocks; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float db = amax / 127.0f;
        const float inv = db > 0.0f ? 1.0f / db : 0.0f;
        int32_t sum = 0;
        for (int j = 0; j < QK; j++) {
            float v = nearbyintf(xb[j] * inv);
            v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : (v == v ? v : 0.0f));
            q[q_offset(b, j, blocks)] = (int8_t)v;
            sum += (int32_t)v;
        }
        for (int l = 0; l < 4; l++) dv[b * 4 + l] = db;
        const float contribution = db * (float)sum;
        c[b / per_group] = (b % per_group) ? c[b / per_group] + contribution : contribution;
    }
}

#ifdef HQ_SIMD
static inline __m128i dot_u8s8_128(__m128i acc, __m128i u, __m128i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
    return _mm_dpbusd_avx_epi32(acc, u, s);
#else
    return _mm_add_epi32(acc, _mm_madd_epi16(_mm_maddubs_epi16(u, s), _mm_set1_epi16(1)));
#endif
}

/* The weight scales of one pair as [s(2p) x4, s(2p+1) x4]. */
static inline __m256 pair_scale(const uint16_t *s, int64_t pair, int64_t per_group) {
    const float lo = bf16_to_f32(s[(2 * pair) / per_group]), hi = bf16_to_f32(s[(2 * pair + 1) / per_group]);
    return _mm256_setr_ps(lo, lo, lo, lo, hi, hi, hi, hi);
}

/* Weight rows (outputs) per tile when there are at least ROWS activation rows: measured on
 * issue 16's model, four make a 128-token prefill 1.3x faster, while a decode step (one row) runs
 * fastest with one (two to four weight streams at once cost up to 1.5x). */
#define COLS 4

#ifdef HQ_SIMD
/* The weight scales pairs p..p+3 use (groups of 32: eight, of 64: four, of 128: two), as floats
 * in the low lanes; loads never reach past the row's last scale. */
static inline __m256 scales_of_four_pairs(const uint16_t *s, int64_t p, int64_t per_group) {
    __m128i raw;
    if (per_group == 1) {
        raw = _mm_loadu_si128((const __m128i *)(s + 2 * p));
    } else if (per_group == 2) {
        raw = _mm_loadl_epi64((const __m128i *)(s + p));
    } else {
        int32_t two;
        memcpy(&two, s + p / 2, sizeof two);
        raw = _mm_cvtsi32_si128(two);
    }
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

/* One pair (64 columns) of one weight row against R activation rows: acc[r][j] += the pair's
 * int32 dot products, as floats, times sp * d (sp: the pair's weight scales, d: the activations'). */
static inline __attribute__((always_inline)) void pair_step(
    const int8_t *q, const float *dv, int64_t K, int64_t dstride, const uint8_t *wrow, int64_t p,
    __m256 sp, const int R, __m256 acc[][COLS], int j) {
    const __m256i low = _mm256_set1_epi8(0x0f);
    const __m256i raw = _mm256_loadu_si256((const __m256i *)(wrow + p * 32));
    const __m256i lo = _mm256_and_si256(raw, low);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
    for (int r = 0; r < R; r++) {
        const int8_t *qp = q + r * K + p * 64;
        __m256i isum = dot_u8s8(_mm256_setzero_si256(), lo, _mm256_loadu_si256((const __m256i *)qp));
        isum = dot_u8s8(isum, hi, _mm256_loadu_si256((const __m256i *)(qp + 32)));
        const __m256 scale = _mm256_mul_ps(sp, _mm256_loadu_ps(dv + r * dstride + p * 8));
        acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, acc[r][j]);
    }
}
#endif
#endif

/* A tile: `rows` activation rows (R <= ROWS) against `cols` weight rows (C <= COLS), each output
 * accumulated over the pairs in order into one vector, so an output's operations do not depend on
 * R, C or where the tile lies. Activations are loaded once per pair for all C outputs, weights
 * unpacked once for all R rows. */
static inline __attribute__((always_inline)) void i4_tile(
    const int8_t *q, const float *dv, const float *c, int64_t K, int64_t group, const uint8_t *wq,
    const uint16_t *s, const uint16_t *z, const int R, const int C, float *y, int64_t N) {
    const int64_t blocks = K / QK, per_group = group / QK, groups = K / group;
    const int64_t pairs = blocks / 2, dstride = blocks * 4, wstride = K / 2;
    float out[ROWS][COLS];
#ifdef HQ_SIMD
    __m256 acc[ROWS][COLS];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < C; j++) acc[r][j] = _mm256_setzero_ps();
    /* Four pairs at a time: their weight scales come from one small load, spread to each pair as
     * [s(first block) x4, s(second block) x4] by a permute with a fixed index per pair. */
    __m256i spread[4];
    for (int i = 0; i < 4; i++)
        spread[i] = per_group == 1 ? _mm256_setr_epi32(2 * i, 2 * i, 2 * i, 2 * i, 2 * i + 1, 2 * i + 1, 2 * i + 1, 2 * i + 1)
                                   : _mm256_set1_epi32(per_group == 2 ? i : i / 2);
    int64_t p = 0;
    for (; p + 4 <= pairs; p += 4) {
        __m256 four[COLS];
        for (int j = 0; j < C; j++) four[j] = scales_of_four_pairs(s + j * groups, p, per_group);
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < C; j++)
                pair_step(q, dv, K, dstride, wq + j * wstride, p + i,
                          _mm256_permutevar8x32_ps(four[j], spread[i]), R, acc, j);
    }
    for (; p < pairs; p++) { /* the last pairs, fewer than four */
        for (int j = 0; j < C; j++)
            pair_step(q, dv, K, dstride, wq + j * wstride, p, pair_scale(s + j * groups, p, per_group), R, acc, j);
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < C; j++) out[r][j] = hsum_f32(acc[r][j]);
    if (blocks % 2) { /* the unpaired last block, four lanes */
        const int64_t b = blocks - 1;
        const __m128i low4 = _mm_set1_epi8(0x0f);
        for (int j = 0; j < C; j++) {
            const __m128i raw = _mm_loadu_si128((const __m128i *)(wq + j * wstride + b * 16));
            const __m128i lo = _mm_and_si128(raw, low4), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low4);
            const __m128 sb = _mm_set1_ps(bf16_to_f32(s[j * groups + b / per_group]));
            for (int r = 0; r < R; r++) {
                const int8_t *qp = q + r * K + pairs * 64;
                __m128i isum = dot_u8s8_128(_mm_setzero_si128(), lo, _mm_loadu_si128((const __m128i *)qp));
                isum = dot_u8s8_128(isum, hi, _mm_loadu_si128((const __m128i *)(qp + 16)));
                __m128 part = _mm_mul_ps(_mm_cvtepi32_ps(isum), _mm_mul_ps(sb, _mm_loadu_ps(dv + r * dstride + b * 4)));
                part = _mm_add_ps(part, _mm_movehl_ps(part, part));
                part = _mm_add_ss(part, _mm_movehdup_ps(part));
                out[r][j] += _mm_cvtss_f32(part);
            }
        }
    }
    /* sum over groups of c * (z - 8 s), eight groups at a time, then the rest in order */
    const int64_t vec = groups / 8 * 8;
    for (int j = 0; j < C; j++) {
        __m256 cacc[ROWS];
        for (int r = 0; r < R; r++) cacc[r] = _mm256_setzero_ps();
        for (int64_t g = 0; g < vec; g += 8) {
            const __m256 m = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), bf16x8_to_f32(s + j * groups + g),
                                              bf16x8_to_f32(z + j * groups + g));
            for (int r = 0; r < R; r++)
                cacc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(c + r * groups + g), m, cacc[r]);
        }
        for (int r = 0; r < R; r++) out[r][j] += hsum_f32(cacc[r]);
    }
#else
    for (int r = 0; r < R; r++)
        for (int j = 0; j < C; j++) {
            float sum = 0.0f;
            for (int64_t b = 0; b < blocks; b++) {
                int32_t isum = 0;
                for (int k = 0; k < QK; k++) {
                    const uint8_t byte = wq[j * wstride + b * (QK / 2) + k / 2];
                    isum += ((k & 1) ? byte >> 4 : byte & 15) * q[r * K + q_offset(b, k, blocks)];
                }
                sum += (float)isum * (dv[r * dstride + b * 4] * bf16_to_f32(s[j * groups + b / per_group]));
            }
            out[r][j] = sum;
        }
    const int64_t vec = 0;
#endif
    for (int r = 0; r < R; r++)
        for (int j = 0; j < C; j++) {
            float tail = out[r][j];
            for (int64_t g = vec; g < groups; g++) {
                const float sg = bf16_to_f32(s[j * groups + g]);
                tail += c[r * groups + g] * (bf16_to_f32(z[j * groups + g]) - 8.0f * sg);
            }
            y[r * N + j] = tail;
        }
}

/* y[m, n] = sum_k x[m, k] * w[n, k] for portable int4 w. K % group == 0, group % 32 == 0.
 * Returns 0, or -1 when scratch memory could not be had. */
int hq_i4_mm(const float *x, const uint8_t *qweight, const uint16_t *scales, const uint16_t *zeros,
             float *y, int64_t M, int64_t N, int64_t K, int64_t group, int threads) {
    const int64_t blocks = K / QK, groups = K / group;
    int8_t *q = malloc((size_t)(M * K));
    float *dv = malloc(sizeof(float) * (size_t)(M * blocks * 4));
    float *c = malloc(sizeof(float) * (size_t)(M * groups));
    if (!q || !dv || !c) {
        free(q), free(dv), free(c);
        return -1;
    }
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && M > 1)
    for (int64_t m = 0; m < M; m++)
        quantize_row(x + m * K, K, group, q + m * K, dv + m * blocks * 4, c + m * groups);
    const int64_t width = M >= ROWS ? COLS : 1, tiles = (N + width - 1) / width;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t n = t * width;
        const int cols = (int)(N - n < width ? N - n : width);
        for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
            const int rows = (int)(M - m0 < ROWS ? M - m0 : ROWS);
#define I4_TILE(R, C) i4_tile(q + m0 * K, dv + m0 * blocks * 4, c + m0 * groups, K, group, \
                              qweight + n * (K / 2), scales + n * groups, zeros + n * groups, R, C, \
                              y + m0 * N + n, N)
#define I4_COLS(R) switch (cols) { \
            case 1: I4_TILE(R, 1); break; case 2: I4_TILE(R, 2); break; \
            case 3: I4_TILE(R, 3); break; default: I4_TILE(R, 4); break; }
            /* constant tile sizes keep the accumulators in registers */
            switch (rows) {
            case 1: I4_COLS(1); break;
            case 2: I4_COLS(2); break;
            case 3: I4_COLS(3); break;
            default: I4_COLS(4); break;
            }
#undef I4_COLS
#undef I4_TILE
        }
    }
    free(q), free(dv), free(c);
    return 0;
}

/* ---- RMSNorm ------------------------------------------------------------------------------ */

/* y[r] = w * (x[r] * 1 / sqrt(mean(x[r]^2) + eps)), row by row in one pass each: the norm of a
 * decode step is a handful of microseconds of arithmetic, and torch's decomposed op costs ~50 us
 * a call once the weights streamed through the caches have evicted its code and tables. The sum
 * runs in a fixed order per row, so a row's result does not depend on the others. */
void hq_rms_norm(const float *x, const float *w, float *y, int64_t rows, int64_t n, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float *yr = y + r * n;
        float squares = 0.0f;
        int64_t i = 0;
#ifdef HQ_SIMD
        __m256 acc = _mm256_setzero_ps();
        for (; i + 8 <= n; i += 8) {
            const __m256 v = _mm256_loadu_ps(xr + i);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        squares = hsum_f32(acc);
#endif
        for (; i < n; i++) squares += xr[i] * xr[i];
        const float scale = 1.0f / sqrtf(squares / (float)n + eps);
        for (i = 0; i < n; i++) yr[i] = w[i] * (xr[i] * scale);
    }
}
