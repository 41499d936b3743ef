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
 * int4 weights: per group of G columns of an output row a bf16 scale s and zero z, w = (code - 8)
 * * s + z, laid out in tiles of 16 rows (below). Activations are quantized here per block of 32
 * values (as llama.cpp's Q8_0): q = round(x / d), d = absmax / 127.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "kernels.h"  /* the prototypes block_step.c calls: the compiler holds them to these definitions */

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HQ_SIMD 1
#endif

#define QK 32      /* activation block */
#define PREFETCH 4096  /* bytes ahead in a weight stream (int4 decode from memory: 1.4x at one thread) */
#define ROWS 4     /* activation rows sharing one pass over a weight row */

int hq_abi(void) { return 7; }  /* 7: hb_blocks_run (block_step.c): several sessions a call */

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

/* `wsum`, where given, is the row's sum of weights (computed once when the weights load): then
 * the loop does not sum them again, one `vpdpbusd` of two per 32 weights in a decode step. */
static inline __attribute__((always_inline)) void i8_rows(const int8_t *a, const uint8_t *ua,
                                                          const int8_t *wn, int64_t blocks,
                                                          int64_t K, int rows, int32_t *out,
                                                          int64_t ostride, const int32_t *given) {
    (void)a, (void)given; /* a: read only without VNNI; given: only with it */
    __m256i acc[ROWS];
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_si256();
#if I8_OFFSET
    __m256i wsum = _mm256_setzero_si256();
    const __m256i ones = _mm256_set1_epi8(1);
#endif
    for (int64_t b = 0; b < blocks; b++) {
        if (!(b & 1)) _mm_prefetch((const char *)(wn + b * QK + PREFETCH), _MM_HINT_T0);
        const __m256i wb = _mm256_loadu_si256((const __m256i *)(wn + b * QK));
#if I8_OFFSET
        if (!given) wsum = dot_u8s8(wsum, ones, wb);
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
    const int32_t offset = 128 * (given ? *given : hsum_i32(wsum));
#else
    const int32_t offset = 0;
#endif
    for (int r = 0; r < rows; r++) out[r * ostride] = hsum_i32(acc[r]) - offset;
}
#endif

/* out[m, n] = sum_k a[m, k] * w[n, k]; |a| <= 127, K % 32 == 0; wsums: each row's sum of weights,
 * or NULL to compute them. Returns 0, or -1 when scratch memory could not be had. */
int hq_i8_mm(const int8_t *a, const int8_t *w, const int32_t *wsums, int32_t *out, int64_t M,
             int64_t N, int64_t K, int threads) {
#ifdef HQ_SIMD
    uint8_t *ua = malloc((size_t)(M * K));
    if (!ua) return -1;
    for (int64_t i = 0; i < M * K; i++) ua[i] = (uint8_t)(I8_OFFSET ? a[i] + 128 : abs(a[i]));
    const int64_t blocks = K / QK;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
            const int rows = (int)(M - m0 < ROWS ? M - m0 : ROWS);
#define I8_ROWS(R, S) i8_rows(a + m0 * K, ua + m0 * K, w + n * K, blocks, K, R, out + m0 * N + n, N, S)
#define I8_SUMS(S) switch (rows) { \
            case 1: I8_ROWS(1, S); break; case 2: I8_ROWS(2, S); break; \
            case 3: I8_ROWS(3, S); break; default: I8_ROWS(4, S); break; }
            if (wsums) I8_SUMS(wsums + n) else I8_SUMS(NULL)
#undef I8_SUMS
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
int hq_i8_linear(const float *x, const int8_t *w, const uint16_t *scales, const int32_t *wsums,
                 float *y, int64_t M, int64_t N, int64_t K, int threads) {
    int8_t *codes = malloc((size_t)(M * K));
    float *steps = malloc(sizeof(float) * (size_t)M);
    int32_t *products = malloc(sizeof(int32_t) * (size_t)(M * N));
    int status = -1;
    if (codes && steps && products) {
        hq_i8_quantize(x, codes, steps, M, K);
        status = hq_i8_mm(codes, w, wsums, products, M, N, K, threads);
    }
    if (status == 0)
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < N; n++)
                y[m * N + n] = ((float)products[m * N + n] * steps[m]) * bf16_to_f32(scales[n]);
    free(codes), free(steps), free(products);
    return status;
}

/* ---- int4 x int8 -> fp32 ----------------------------------------------------------------- */

/* Weights in tiles of 16 output rows (shard/qkernels.py's `tile_int4` builds them from the
 * portable format and says the byte order): per group of G columns, the tile's 16 bf16 scales and
 * 16 bf16 zeros, then per block of 32 columns four chunks of 64 bytes, chunk k holding for each
 * row i four bytes: byte j = code of column 8k + j (low nibble) | code of column 8k + 4 + j (high).
 * One vector load thus gives the same eight columns of 16 rows, one output per int32 lane: a
 * block's dot products are 8 `vpdpbusd` against broadcast activations, with no horizontal sums,
 * and the scale arithmetic is shared by 16 outputs (llama.cpp repacks Q4_0 the same way).
 *
 * Per output, in this order whatever the row count, tile position and thread count:
 *   acc = 0; per group g (s, z its scale and zero; m = z - 8 s, fused):
 *     per block b of g: acc = fma(float(isum_b), d_b * s, acc)   (isum_b exact in int32)
 *     acc = fma(c_g, m, acc)                                        (c_g = sum of d_b * sum(q_b))
 * which is sum over columns of x * ((code - 8) s + z) with x ~ d q, quantized per block of 32. */

#define TILE 16           /* output rows per weight tile: one int32 lane each */
#define I4_ROWS 4         /* activation rows sharing one pass over a tile */

static inline int32_t load_i32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Per row: q[k] = round(x[k] / d_b) for the block b holding k, d_b = absmax / 127, and per group
 * c_g = sum over its blocks, in order, of d_b * sum(q_b). */
static void quantize_row(const float *x, int64_t K, int64_t group, int8_t *q, float *d, float *c) {
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
            q[b * QK + j] = (int8_t)v;
            sum += (int32_t)v;
        }
        d[b] = db;
        const float contribution = db * (float)sum;
        c[b / per_group] = (b % per_group) ? c[b / per_group] + contribution : contribution;
    }
}

/* Sixteen lanes, one per output row of a tile: one zmm with AVX-512, two ymm with AVX2, an array
 * otherwise. Each lane runs the same scalar operations in all three (fma is fused everywhere). */
#if defined(HQ_SIMD) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
typedef __m512i lanes_i;
typedef __m512 lanes_f;
static inline lanes_f lf_zero(void) { return _mm512_setzero_ps(); }
static inline lanes_f lf_bf16(const uint8_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline lanes_f lf_zero_term(lanes_f s, lanes_f z) { return _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), s, z); }
static inline lanes_f lf_block(lanes_i isum, float d, lanes_f s, lanes_f acc) {
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(_mm512_set1_ps(d), s), acc);
}
static inline lanes_f lf_group(float c, lanes_f m, lanes_f acc) { return _mm512_fmadd_ps(_mm512_set1_ps(c), m, acc); }
static inline void lf_store(float *y, lanes_f v) { _mm512_storeu_ps(y, v); }
static inline lanes_i li_zero(void) { return _mm512_setzero_si512(); }
/* the low and high nibbles of one 64-byte chunk */
static inline void li_chunk(const uint8_t *p, lanes_i *lo, lanes_i *hi) {
    const __m512i raw = _mm512_loadu_si512((const void *)p), low = _mm512_set1_epi8(0x0f);
    *lo = _mm512_and_si512(raw, low);
    *hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
}
/* acc + the four products of each lane's bytes with the four activations at a */
static inline lanes_i li_dot(lanes_i acc, lanes_i w, const int8_t *a) {
    return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(load_i32(a)));
}
#elif defined(HQ_SIMD)
typedef struct { __m256i v[2]; } lanes_i;
typedef struct { __m256 v[2]; } lanes_f;
static inline lanes_f lf_zero(void) { return (lanes_f){{_mm256_setzero_ps(), _mm256_setzero_ps()}}; }
static inline lanes_f lf_bf16(const uint8_t *p) { return (lanes_f){{bf16x8_to_f32((const uint16_t *)p), bf16x8_to_f32((const uint16_t *)p + 8)}}; }
static inline lanes_f lf_zero_term(lanes_f s, lanes_f z) {
    const __m256 eight = _mm256_set1_ps(8.0f);
    return (lanes_f){{_mm256_fnmadd_ps(eight, s.v[0], z.v[0]), _mm256_fnmadd_ps(eight, s.v[1], z.v[1])}};
}
static inline lanes_f lf_block(lanes_i isum, float d, lanes_f s, lanes_f acc) {
    const __m256 dv = _mm256_set1_ps(d);
    return (lanes_f){{_mm256_fmadd_ps(_mm256_cvtepi32_ps(isum.v[0]), _mm256_mul_ps(dv, s.v[0]), acc.v[0]),
                      _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum.v[1]), _mm256_mul_ps(dv, s.v[1]), acc.v[1])}};
}
static inline lanes_f lf_group(float c, lanes_f m, lanes_f acc) {
    const __m256 cv = _mm256_set1_ps(c);
    return (lanes_f){{_mm256_fmadd_ps(cv, m.v[0], acc.v[0]), _mm256_fmadd_ps(cv, m.v[1], acc.v[1])}};
}
static inline void lf_store(float *y, lanes_f v) { _mm256_storeu_ps(y, v.v[0]), _mm256_storeu_ps(y + 8, v.v[1]); }
static inline lanes_i li_zero(void) { return (lanes_i){{_mm256_setzero_si256(), _mm256_setzero_si256()}}; }
static inline void li_chunk(const uint8_t *p, lanes_i *lo, lanes_i *hi) {
    const __m256i low = _mm256_set1_epi8(0x0f);
    for (int h = 0; h < 2; h++) {
        const __m256i raw = _mm256_loadu_si256((const __m256i *)(p + 32 * h));
        lo->v[h] = _mm256_and_si256(raw, low);
        hi->v[h] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
    }
}
static inline lanes_i li_dot(lanes_i acc, lanes_i w, const int8_t *a) {
    const __m256i av = _mm256_set1_epi32(load_i32(a)); /* codes <= 15: maddubs cannot saturate */
    return (lanes_i){{dot_u8s8(acc.v[0], w.v[0], av), dot_u8s8(acc.v[1], w.v[1], av)}};
}
#else
typedef struct { int32_t v[TILE]; } lanes_i;
typedef struct { float v[TILE]; } lanes_f;
static inline lanes_f lf_zero(void) { return (lanes_f){{0}}; }
static inline lanes_f lf_bf16(const uint8_t *p) {
    lanes_f out;
    for (int i = 0; i < TILE; i++) {
        uint16_t raw;
        memcpy(&raw, p + 2 * i, sizeof raw);
        out.v[i] = bf16_to_f32(raw);
    }
    return out;
}
static inline lanes_f lf_zero_term(lanes_f s, lanes_f z) {
    for (int i = 0; i < TILE; i++) z.v[i] = fmaf(-8.0f, s.v[i], z.v[i]);
    return z;
}
static inline lanes_f lf_block(lanes_i isum, float d, lanes_f s, lanes_f acc) {
    for (int i = 0; i < TILE; i++) acc.v[i] = fmaf((float)isum.v[i], d * s.v[i], acc.v[i]);
    return acc;
}
static inline lanes_f lf_group(float c, lanes_f m, lanes_f acc) {
    for (int i = 0; i < TILE; i++) acc.v[i] = fmaf(c, m.v[i], acc.v[i]);
    return acc;
}
static inline void lf_store(float *y, lanes_f v) { memcpy(y, v.v, sizeof v.v); }
static inline lanes_i li_zero(void) { return (lanes_i){{0}}; }
static inline void li_chunk(const uint8_t *p, lanes_i *lo, lanes_i *hi) {
    /* lane i's four bytes, packed as four 8-bit codes in one int32 each */
    for (int i = 0; i < TILE; i++) {
        uint32_t l = 0, h = 0;
        for (int j = 0; j < 4; j++) {
            l |= (uint32_t)(p[4 * i + j] & 15) << (8 * j);
            h |= (uint32_t)(p[4 * i + j] >> 4) << (8 * j);
        }
        lo->v[i] = (int32_t)l, hi->v[i] = (int32_t)h;
    }
}
static inline lanes_i li_dot(lanes_i acc, lanes_i w, const int8_t *a) {
    for (int i = 0; i < TILE; i++)
        for (int j = 0; j < 4; j++) acc.v[i] += (int32_t)(((uint32_t)w.v[i] >> (8 * j)) & 255) * a[j];
    return acc;
}
#endif

static inline lanes_i li_add(lanes_i a, lanes_i b) {
#if defined(HQ_SIMD) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
    return _mm512_add_epi32(a, b);
#elif defined(HQ_SIMD)
    return (lanes_i){{_mm256_add_epi32(a.v[0], b.v[0]), _mm256_add_epi32(a.v[1], b.v[1])}};
#else
    for (int i = 0; i < TILE; i++) a.v[i] += b.v[i];
    return a;
#endif
}

/* One weight tile (16 outputs) against R activation rows (R <= I4_ROWS): each chunk's nibbles are
 * unpacked once for all R rows. Integer sums are split in two per row (chunks 0-1, 2-3) for
 * shorter dependency chains; being exact, the split does not change them. */
static inline __attribute__((always_inline)) void i4_tile(
    const int8_t *q, const float *d, const float *c, int64_t K, int64_t group, const uint8_t *tile,
    const int R, float *y, int64_t N, int64_t cols) {
    const int64_t blocks = K / QK, groups = K / group, per_group = group / QK;
    lanes_f acc[I4_ROWS];
    for (int r = 0; r < R; r++) acc[r] = lf_zero();
    const uint8_t *p = tile;
    for (int64_t g = 0, b = 0; g < groups; g++) {
        const lanes_f s = lf_bf16(p), m = lf_zero_term(s, lf_bf16(p + 2 * TILE));
        p += 4 * TILE;
        for (int64_t i = 0; i < per_group; i++, b++, p += 4 * 64) {
#ifdef HQ_SIMD
            for (int l = 0; l < 4; l++) _mm_prefetch((const char *)(p + PREFETCH + 64 * l), _MM_HINT_T0);
#endif
            lanes_i first[I4_ROWS], second[I4_ROWS];
            for (int r = 0; r < R; r++) first[r] = li_zero(), second[r] = li_zero();
            for (int k = 0; k < 4; k++) {
                lanes_i lo, hi;
                li_chunk(p + 64 * k, &lo, &hi);
                for (int r = 0; r < R; r++) {
                    const int8_t *a = q + r * K + b * QK + 8 * k;
                    lanes_i *sum = k < 2 ? &first[r] : &second[r];
                    *sum = li_dot(li_dot(*sum, lo, a), hi, a + 4);
                }
            }
            for (int r = 0; r < R; r++)
                acc[r] = lf_block(li_add(first[r], second[r]), d[r * blocks + b], s, acc[r]);
        }
        for (int r = 0; r < R; r++) acc[r] = lf_group(c[r * groups + g], m, acc[r]);
    }
    for (int r = 0; r < R; r++) {
        if (cols == TILE) {
            lf_store(y + r * N, acc[r]);
        } else { /* the last tile of a layer whose outputs are not a multiple of 16 */
            float out[TILE];
            lf_store(out, acc[r]);
            memcpy(y + r * N, out, sizeof(float) * (size_t)cols);
        }
    }
}

/* Bytes of one tile: per group 16 scales and 16 zeros (bf16) and 16 x G / 2 bytes of codes. */
int64_t hq_i4_tile_bytes(int64_t K, int64_t group) { return (K / group) * 4 * TILE + TILE * K / 2; }

/* y[m, n] = sum_k x[m, k] * w[n, k] for tiled int4 w (N rows padded to tiles of 16).
 * K % group == 0, group % 32 == 0. Returns 0, or -1 when scratch memory could not be had. */
int hq_i4_mm(const float *x, const uint8_t *tiles, float *y, int64_t M, int64_t N, int64_t K,
             int64_t group, int threads) {
    const int64_t blocks = K / QK, groups = K / group;
    int8_t *q = malloc((size_t)(M * K));
    float *d = malloc(sizeof(float) * (size_t)(M * blocks));
    float *c = malloc(sizeof(float) * (size_t)(M * groups));
    if (!q || !d || !c) {
        free(q), free(d), free(c);
        return -1;
    }
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && M > 1)
    for (int64_t m = 0; m < M; m++)
        quantize_row(x + m * K, K, group, q + m * K, d + m * blocks, c + m * groups);
    const int64_t count = (N + TILE - 1) / TILE, stride = hq_i4_tile_bytes(K, group);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t t = 0; t < count; t++) {
        const int64_t n = t * TILE, cols = N - n < TILE ? N - n : TILE;
        for (int64_t m0 = 0; m0 < M; m0 += I4_ROWS) {
            const int rows = (int)(M - m0 < I4_ROWS ? M - m0 : I4_ROWS);
#define I4_TILE(R) i4_tile(q + m0 * K, d + m0 * blocks, c + m0 * groups, K, group, tiles + t * stride, \
                           R, y + m0 * N + n, N, cols)
            switch (rows) { /* constant row counts keep the accumulators in registers */
            case 1: I4_TILE(1); break;
            case 2: I4_TILE(2); break;
            case 3: I4_TILE(3); break;
            default: I4_TILE(4); break;
            }
#undef I4_TILE
        }
    }
    free(q), free(d), free(c);
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
