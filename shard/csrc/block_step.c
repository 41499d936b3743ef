/* A step of a chain of Llama decoder blocks in one call (shard/block_step.py builds the arguments).
 *
 * A decode step's arithmetic is the quantized matmuls, and they are compiled; what a step spent
 * besides them was about 5 ms a token of issue 16's model in Python and torch dispatch between
 * twelve calls per block. This runs the same kernels in the same order as shard/blocks.py does
 * (RMSNorm, the fused qkv matmul, rotary embedding, the cache write, attention, o_proj and its
 * residual add, RMSNorm, gate/up, SwiGLU, down and its residual add), on the same values, so every
 * output and cache entry has exactly the bits of the module path: what batching, replay and spot
 * checks rely on (tests/shard/test_block_step.py compares them).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

enum { HB_INT8 = 1, HB_INT4 = 2 };

typedef struct {
    int64_t kind, n, k, group;   /* HB_INT8 or HB_INT4; outputs, inputs; int4 group */
    const void *weight;          /* int8 [n, k], or the int4 tiles of qmatmul.c */
    const uint16_t *scales;      /* int8: bf16 [n] */
    const int32_t *wsums;        /* int8: each row's sum */
    const float *bias;           /* [n], or NULL */
} hb_linear;

typedef struct {
    const float *norm1, *norm2;  /* input_layernorm, post_attention_layernorm: fp32 [D] */
    hb_linear qkv, o, gate_up, down;
} hb_block;

/* The shape of a step and where its cache lies. */
typedef struct {
    int64_t B, T, D, heads, kv_heads, hd, past, window;
    float eps, scale;
    const float *cos, *sin;      /* [T, hd] */
    float *keys, *values;        /* [layers, B, KV, max_length, hd] */
    int64_t layer_stride, batch_stride, head_stride;  /* of keys and values, in floats */
} hb_step;

static int linear(const hb_linear *l, const float *x, float *y, int64_t M, int threads) {
    const int failed = l->kind == HB_INT8
        ? hq_i8_linear(x, (const int8_t *)l->weight, l->scales, l->wsums, y, M, l->n, l->k, threads)
        : hq_i4_mm(x, (const uint8_t *)l->weight, y, M, l->n, l->k, l->group, threads);
    if (!failed && l->bias)
        for (int64_t m = 0; m < M; m++)
            for (int64_t i = 0; i < l->n; i++) y[m * l->n + i] = y[m * l->n + i] + l->bias[i];
    return failed;
}

static void add_into(float *x, const float *y, int64_t count) {
    for (int64_t i = 0; i < count; i++) x[i] = x[i] + y[i];
}

/* x [B, T, D] (fp32, rows contiguous) in place through `count` blocks; block j writes the step's
 * keys and values at positions past .. past + T - 1 of cache layer j. Returns 0, or -1 when
 * scratch memory could not be had (x and the cache are then partly written). */
int hb_blocks_step(const hb_block *const *blocks, int64_t count, float *x, const hb_step *s, int threads) {
    const int64_t M = s->B * s->T, D = s->D, hd = s->hd, H = s->heads, KV = s->kv_heads;
    const int64_t q_size = H * hd, kv_size = KV * hd, width = q_size + 2 * kv_size;
    int64_t inner = 0;
    for (int64_t j = 0; j < count; j++)
        inner = blocks[j]->gate_up.n / 2 > inner ? blocks[j]->gate_up.n / 2 : inner;
    float *h = malloc(sizeof(float) * (size_t)(M * D)), *qkv = malloc(sizeof(float) * (size_t)(M * width));
    float *q = malloc(sizeof(float) * (size_t)(M * q_size)), *att = malloc(sizeof(float) * (size_t)(M * q_size));
    float *out = malloc(sizeof(float) * (size_t)(M * D)), *gu = malloc(sizeof(float) * (size_t)(M * 2 * inner));
    float *act = malloc(sizeof(float) * (size_t)(M * inner));
    int failed = !h || !qkv || !q || !att || !out || !gu || !act;
    for (int64_t j = 0; j < count && !failed; j++) {
        const hb_block *b = blocks[j];
        float *keys = s->keys + j * s->layer_stride, *values = s->values + j * s->layer_stride;
        hq_rms_norm(x, b->norm1, h, M, D, s->eps);
        if ((failed = linear(&b->qkv, h, qkv, M, threads)))
            break;
        hb_rope(qkv, M, width, H + KV, hd, s->cos, s->sin, s->T);
        for (int64_t bt = 0; bt < M; bt++) {
            const int64_t batch = bt / s->T, t = bt % s->T;
            const float *row = qkv + bt * width;
            for (int64_t g = 0; g < KV; g++) {
                const int64_t at = batch * s->batch_stride + g * s->head_stride + (s->past + t) * hd;
                memcpy(keys + at, row + q_size + g * hd, sizeof(float) * (size_t)hd);
                memcpy(values + at, row + q_size + kv_size + g * hd, sizeof(float) * (size_t)hd);
            }
            for (int64_t head = 0; head < H; head++)  /* queries as [B, H, T, hd] */
                memcpy(q + ((batch * H + head) * s->T + t) * hd, row + head * hd, sizeof(float) * (size_t)hd);
        }
        if ((failed = ha_attend(q, keys, values, att, s->B, H, KV, s->T, s->past, hd, s->batch_stride,
                                s->head_stride, s->batch_stride, s->head_stride, s->window, s->scale, threads)))
            break;
        if ((failed = linear(&b->o, att, out, M, threads)))
            break;
        add_into(x, out, M * D);
        hq_rms_norm(x, b->norm2, h, M, D, s->eps);
        if ((failed = linear(&b->gate_up, h, gu, M, threads)))
            break;
        hb_silu_mul(gu, act, M, b->gate_up.n / 2);
        if ((failed = linear(&b->down, act, out, M, threads)))
            break;
        add_into(x, out, M * D);
    }
    free(h), free(qkv), free(q), free(att), free(out), free(gu), free(act);
    return failed ? -1 : 0;
}
