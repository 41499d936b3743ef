/* The compiled kernels other C files of shard/_qkernels call (qmatmul.c, attention.c, block_ops.c). */
#ifndef HEARTH_KERNELS_H
#define HEARTH_KERNELS_H
#include <stdint.h>

int hq_i8_linear(const float *x, const int8_t *w, const uint16_t *scales, const int32_t *wsums,
                 float *y, int64_t M, int64_t N, int64_t K, int threads);
int hq_i4_mm(const float *x, const uint8_t *tiles, float *y, int64_t M, int64_t N, int64_t K,
             int64_t group, int threads);
void hq_rms_norm(const float *x, const float *w, float *y, int64_t rows, int64_t n, float eps);
int ha_attend(const float *q, const float *keys, const float *values, float *out, int64_t B, int64_t H,
              int64_t KV, int64_t T, int64_t past, int64_t hd, int64_t k_batch, int64_t k_head,
              int64_t v_batch, int64_t v_head, int64_t window, float scale, int threads);
void hb_rope(float *x, int64_t rows, int64_t stride, int64_t heads, int64_t hd, const float *cos,
             const float *sin, int64_t tables);
void hb_silu_mul(const float *gate_up, float *out, int64_t rows, int64_t inner);

#endif
