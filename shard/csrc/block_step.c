/* Steps of a chain of Llama decoder blocks in one call (shard/block_step.py builds the arguments).
 *
 * A decode step's arithmetic is the quantized matmuls, and they are compiled; what a step spent
 * besides them was about 5 ms a token of issue 16's model in Python and torch dispatch between
 * twelve calls per block. This runs the same kernels in the same order as shard/blocks.py does
 * (RMSNorm, the fused qkv matmul, rotary embedding, the cache write, attention, o_proj and its
 * residual add, RMSNorm, gate/up, SwiGLU, down and its residual add), on the same values, so every
 * output and cache entry has exactly the bits of the module path: what batching, replay and spot
 * checks rely on (tests/shard/test_block_step.py compares them).
 *
 * One call takes the steps of several sessions (segments), as shard/batch.py's passes do: at each
 * block the rows of every segment that runs it go through the norms and the linears together (one
 * read of the weights), while rotary embedding, the cache write and attention stay per segment.
 * The kernels compute each row alone, so a segment's bits do not depend on the others.
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

/* What every segment shares: the model's widths. */
typedef struct {
    int64_t D, heads, kv_heads, hd, window;
    float eps, scale;
} hb_shape;

/* One session's step: its rows follow the previous segment's in x. */
typedef struct {
    int64_t B, T, past;          /* sequences, tokens each, positions cached before the step */
    int64_t first, last;         /* the blocks of the chain it runs: [first, last) */
    const float *cos, *sin;      /* [T, hd] */
    float *keys, *values;        /* [last - first, B, KV, max_length, hd]: layer 0 is block first's */
    int64_t layer_stride, batch_stride, head_stride;  /* of keys and values, in floats */
} hb_segment;

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

/* Rotary embedding, the cache write and attention of one segment at block j, its rows at row `at`
 * of qkv (whose rotated queries go to q) and of att. */
static int attend(const hb_shape *s, const hb_segment *g, int64_t j, float *qkv, float *q, float *att,
                  int64_t at, int threads) {
    const int64_t rows = g->B * g->T, hd = s->hd, H = s->heads, KV = s->kv_heads;
    const int64_t q_size = H * hd, kv_size = KV * hd, width = q_size + 2 * kv_size;
    float *keys = g->keys + (j - g->first) * g->layer_stride, *values = g->values + (j - g->first) * g->layer_stride;
    qkv += at * width, q += at * q_size;
    hb_rope(qkv, rows, width, H + KV, hd, g->cos, g->sin, g->T);
    for (int64_t bt = 0; bt < rows; bt++) {
        const int64_t batch = bt / g->T, t = bt % g->T;
        const float *row = qkv + bt * width;
        for (int64_t h = 0; h < KV; h++) {
            const int64_t to = batch * g->batch_stride + h * g->head_stride + (g->past + t) * hd;
            memcpy(keys + to, row + q_size + h * hd, sizeof(float) * (size_t)hd);
            memcpy(values + to, row + q_size + kv_size + h * hd, sizeof(float) * (size_t)hd);
        }
        for (int64_t head = 0; head < H; head++)  /* queries as [B, H, T, hd] */
            memcpy(q + ((batch * H + head) * g->T + t) * hd, row + head * hd, sizeof(float) * (size_t)hd);
    }
    return ha_attend(q, keys, values, att + at * q_size, g->B, H, KV, g->T, g->past, hd, g->batch_stride,
                     g->head_stride, g->batch_stride, g->head_stride, s->window, s->scale, threads);
}

/* Moves the rows of the segments running block j between x (every segment's rows) and xa (theirs
 * alone, in order); `in` gathers, else scatters back. */
static void move_rows(const hb_segment *segs, int64_t count, int64_t j, int64_t D, float *x, float *xa, int in) {
    int64_t at = 0, to = 0;
    for (int64_t i = 0; i < count; i++) {
        const int64_t rows = segs[i].B * segs[i].T;
        if (segs[i].first <= j && j < segs[i].last) {
            if (in)
                memcpy(xa + to * D, x + at * D, sizeof(float) * (size_t)(rows * D));
            else
                memcpy(x + at * D, xa + to * D, sizeof(float) * (size_t)(rows * D));
            to += rows;
        }
        at += rows;
    }
}

/* x [rows of every segment, D] (fp32, rows contiguous) in place through the blocks each segment
 * runs; segment g's block j writes the step's keys and values at positions past .. past + T - 1 of
 * its cache layer j - first. Returns 0, or -1 when scratch memory could not be had (x and the
 * caches are then partly written). */
int hb_blocks_run(const hb_block *const *blocks, int64_t count, float *x, const hb_shape *s,
                  const hb_segment *segs, int64_t nsegs, int threads) {
    const int64_t D = s->D, q_size = s->heads * s->hd, width = q_size + 2 * s->kv_heads * s->hd;
    int64_t inner = 0, M = 0;
    for (int64_t j = 0; j < count; j++)
        inner = blocks[j]->gate_up.n / 2 > inner ? blocks[j]->gate_up.n / 2 : inner;
    for (int64_t i = 0; i < nsegs; i++)
        M += segs[i].B * segs[i].T;
    float *h = malloc(sizeof(float) * (size_t)(M * D)), *qkv = malloc(sizeof(float) * (size_t)(M * width));
    float *q = malloc(sizeof(float) * (size_t)(M * q_size)), *att = malloc(sizeof(float) * (size_t)(M * q_size));
    float *out = malloc(sizeof(float) * (size_t)(M * D)), *gu = malloc(sizeof(float) * (size_t)(M * 2 * inner));
    float *act = malloc(sizeof(float) * (size_t)(M * inner)), *gathered = malloc(sizeof(float) * (size_t)(M * D));
    int failed = !h || !qkv || !q || !att || !out || !gu || !act || !gathered;
    for (int64_t j = 0; j < count && !failed; j++) {
        const hb_block *b = blocks[j];
        int64_t rows = 0, active = 0;
        for (int64_t i = 0; i < nsegs; i++)
            if (segs[i].first <= j && j < segs[i].last)
                rows += segs[i].B * segs[i].T, active++;
        if (!active)
            continue;
        float *xa = active == nsegs ? x : gathered;  /* the active segments' rows, in order */
        if (xa != x)
            move_rows(segs, nsegs, j, D, x, xa, 1);
        hq_rms_norm(xa, b->norm1, h, rows, D, s->eps);
        if ((failed = linear(&b->qkv, h, qkv, rows, threads)))
            break;
        for (int64_t i = 0, at = 0; i < nsegs && !failed; i++)
            if (segs[i].first <= j && j < segs[i].last) {
                failed = attend(s, &segs[i], j, qkv, q, att, at, threads);
                at += segs[i].B * segs[i].T;
            }
        if (failed || (failed = linear(&b->o, att, out, rows, threads)))
            break;
        add_into(xa, out, rows * D);
        hq_rms_norm(xa, b->norm2, h, rows, D, s->eps);
        if ((failed = linear(&b->gate_up, h, gu, rows, threads)))
            break;
        hb_silu_mul(gu, act, rows, b->gate_up.n / 2);
        if ((failed = linear(&b->down, act, out, rows, threads)))
            break;
        add_into(xa, out, rows * D);
        if (xa != x)
            move_rows(segs, nsegs, j, D, x, xa, 0);
    }
    free(h), free(qkv), free(q), free(att), free(out), free(gu), free(act), free(gathered);
    return failed ? -1 : 0;
}
