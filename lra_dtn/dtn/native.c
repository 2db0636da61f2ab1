/* DTN's fused CPU kernels: one forward and one backward, each a few passes over a sequence.
 *
 * Why C: the eager path (cpu.py) dispatches ~500 PyTorch ops per call, about 100 of them over tensors of
 * the activations' size, so a small model pays milliseconds per norm where LayerNorm pays half of one.
 * Here each sequence is read and written a few times, from buffers that stay in cache. lra_dtn/dtn/native.py
 * compiles this file with the system C compiler on first use and calls it through ctypes; the numbers
 * are the same as the eager path's (tests hold both to the dense float64 reference).
 *
 * Scope: the kernel's support is a band of W offsets d = dmin ... dmin + W - 1 (d = j - i, output j,
 * source i) whose weights exp(logit - peak) every token can reach without underflow: the plans that the
 * eager path convolves directly without exact rows (kernel.py). Python picks the other paths otherwise.
 *
 * Layout: x, y, grad_y, grad_x are (B, T, C) float32, contiguous; mask (B, T) bytes 0/1 or NULL (no
 * padding); head h owns channels h*D ... h*D + D - 1. Every inner loop runs over the C channels of one
 * token: per-head quantities come expanded per channel (`taps` is the kernel as a (W, C) table; the
 * gates, r and 1 / normaliser are per channel), so that the compiler vectorises it; a loop that sums
 * over channels says so to the compiler (`omp simd reduction`, which lets it reorder that sum). The
 * softmax normalisers, per token and head, are banded sums of the mask alone, done per sequence. Sequences run in parallel (OpenMP),
 * each with its own workspace, and write their parameter gradients to their own row of `partials`, so the
 * result does not depend on the number of threads.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

/* The channels and heads are compile-time constants: native.py builds one library per (C, H) of the
 * models it meets. Every loop over a token's channels or a head's then has a known trip count, which the
 * compiler unrolls and vectorises whole (runtime counts cost remainder handling on every short loop,
 * which was a third of the time at C = 64). */
#if !defined(CHANNELS) || !defined(HEADS)
#error "compile with -DCHANNELS=<C> -DHEADS=<H>"
#endif
enum { C = CHANNELS, H = HEADS, D = CHANNELS / HEADS };

/* Normalisers below this belong to padded tokens no real token reaches (cpu.py's TINY). */
#define TINY 1e-30f

/* What Python passes: the shape, the plan's kernel and the parameters as they are. */
typedef struct {
    int64_t B, T, C, H, W, dmin;
    const double *kernel;         /* (H, W): weights exp(logit - peak) of the offsets dmin ... dmin + W - 1 */
    const double *centre;         /* (H): where each head's pos_proj features are centred (kernel.py) */
    const float *gate_mean, *gate_var;  /* (H), before the sigmoid (gate_mean +inf: dtn_var) */
    const float *weight, *bias;   /* (C) */
    float eps;
    int threads;
} Params;

/* The call's shape and its per-head quantities laid out per channel, built once per call (tables_for). */
typedef struct {
    const Params *p;
    int64_t B, T, W, dmin;
    float eps;
    float *taps;                  /* (W, C): the kernel weight of each offset, per channel */
    float *ktab;                  /* (W, H): the same, per head */
    float *lam_m, *lam_v;         /* (C): the gates after their sigmoid, per channel */
} Shape;

/* One sequence's buffers (pointers into the thread's block). Pairs of rows (T, 2, C) keep what a token's
 * band loops read behind one pointer (with more, they run out of general-purpose registers). */
typedef struct {
    float *v;                     /* (T, 2, C): the sources' values m xs and m xs^2 */
    float *rs;                    /* (T, C): r per channel */
    float *z;                     /* (T, H): softmax normalisers, sum k(d) m[t - d] */
    float *g_n;                   /* backward (T, 2, C): the gradients of the window sums of v */
    float *g_z;                   /* backward (T, H): the gradients of the normalisers */
    float *g_mu_ln, *g_var_ln;    /* backward: (T) */
    float *g_taps;                /* backward: (W, C) dL/dk per offset and channel, summed over tokens */
    float *g_ktab;                /* backward: (W, H) the normalisers' share of dL/dk */
    float *acc;                   /* backward: (4, C) sums over tokens of the weight, bias, lam_m, lam_v gradients */
    float *n, *s;                 /* (2, C): one token's window sums, one source's adjoint sums */
    float *inv;                   /* (C): one token's 1 / normaliser */
} Workspace;

/* Each thread's memory, kept from call to call and grown when a call needs more: a fresh block of
 * megabytes would cost a page fault per 4 KiB on every call (the eager path's _Workspace, for the same
 * reason). */
static _Thread_local float *block = NULL, *tables = NULL;
static _Thread_local size_t capacity = 0, tables_capacity = 0;

/* *buffer with room for n floats (grown, never shrunk); NULL if it cannot be. */
static float *grown(float **buffer, size_t *room, size_t n) {
    if (n > *room) {
        free(*buffer);
        *room = 0;
        *buffer = aligned_alloc(64, sizeof(float) * ((n + 15) & ~(size_t)15));
        if (!*buffer) return NULL;
        *room = n;
    }
    return *buffer;
}

static float *carve(float **at, size_t n) {  /* the next n floats of a block, 64-byte aligned */
    float *start = *at;
    *at += (n + 15) & ~(size_t)15;
    return start;
}

/* Points ws into this thread's block; 0 when it could not be grown. */
static int workspace_for(Workspace *ws, const Shape *s) {
    const size_t T = s->T, W = s->W;
    const size_t need = 5 * T * C + 2 * T * H + 2 * T + W * C + W * H + 9 * C + 13 * 16;
    if (!grown(&block, &capacity, need)) return 0;
    float *at = block;
    ws->v = carve(&at, 2 * T * C); ws->rs = carve(&at, T * C); ws->g_n = carve(&at, 2 * T * C);
    ws->z = carve(&at, T * H); ws->g_z = carve(&at, T * H); ws->g_mu_ln = carve(&at, T); ws->g_var_ln = carve(&at, T);
    ws->g_taps = carve(&at, W * C); ws->g_ktab = carve(&at, W * H); ws->acc = carve(&at, 4 * C);
    ws->n = carve(&at, 2 * C); ws->s = carve(&at, 2 * C); ws->inv = carve(&at, C);
    return 1;
}

/* The call's Shape, its tables in the calling thread's memory (the other threads only read them);
 * 0 when they cannot be allocated or p is not of this library's shape. */
static int tables_for(Shape *s, const Params *p) {
    const int64_t W = p->W;
    if (p->C != C || p->H != H) return 0;  /* a library built for another shape: refuse, never misread */
    *s = (Shape){p, p->B, p->T, W, p->dmin, p->eps, NULL, NULL, NULL, NULL};
    float *at = grown(&tables, &tables_capacity, W * C + W * H + 2 * C + 64);
    if (!at) return 0;
    s->taps = carve(&at, W * C); s->ktab = carve(&at, W * H); s->lam_m = carve(&at, C); s->lam_v = carve(&at, C);
    for (int64_t h = 0; h < H; ++h) {
        const float lam_m = 1.0f / (1.0f + expf(-p->gate_mean[h])), lam_v = 1.0f / (1.0f + expf(-p->gate_var[h]));
        for (int64_t w = 0; w < W; ++w) s->ktab[w * H + h] = (float)p->kernel[h * W + w];
        for (int64_t c = h * D; c < (h + 1) * D; ++c) {
            s->lam_m[c] = lam_m;
            s->lam_v[c] = lam_v;
            for (int64_t w = 0; w < W; ++w) s->taps[w * C + c] = s->ktab[w * H + h];
        }
    }
    return 1;
}

/* A token's row of the statistics that forward saves for backward, (B, T, H + 2) in all: r of each
 * head, then LayerNorm's mean and (unbiased) variance; like LayerNorm's saved mean and rstd. */
#define R(stats, t) ((stats) + (t) * (H + 2))
#define MU_LN(stats, t) ((stats)[(t) * (H + 2) + H])
#define VAR_LN(stats, t) ((stats)[(t) * (H + 2) + H + 1])

/* The offsets w whose source i = t - dmin - w (or output t = i + dmin + w, backwards = 0) lies in
 * 0 ... T - 1, as [*lo, *hi]. */
static void band(const Shape *s, int64_t t, int backwards, int64_t *lo, int64_t *hi) {
    const int64_t T = s->T, W = s->W, dmin = s->dmin;
    if (!backwards) {
        *lo = t - dmin - (T - 1) > 0 ? t - dmin - (T - 1) : 0;
        *hi = t - dmin < W - 1 ? t - dmin : W - 1;
    } else {
        *lo = -t - dmin > 0 ? -t - dmin : 0;
        *hi = T - 1 - t - dmin < W - 1 ? T - 1 - t - dmin : W - 1;
    }
}

/* Steps 1-2 of the spec for one sequence, into its stats: r = 1/sqrt(mean_head(x^2) + eps) per token and
 * head, and the LayerNorm mean and *unbiased* variance (the authors' torch.var default) of xs = r x over
 * all C channels (two passes: exact for tokens nearly constant across channels). */
static void statistics(const Shape *s, const float *restrict x, float *restrict stats, Workspace *ws) {
    float *restrict xs = ws->n;  /* scratch, one token */
    for (int64_t t = 0; t < s->T; ++t) {
        const float *restrict xt = x + t * C;
        float *restrict r = R(stats, t);
        float q[H], sum[H], total = 0.0f;
        for (int64_t h = 0; h < H; ++h) {
            float head_q = 0.0f, head_sum = 0.0f;
            #pragma omp simd reduction(+:head_q, head_sum)
            for (int64_t c = h * D; c < (h + 1) * D; ++c) {
                head_q += xt[c] * xt[c];
                head_sum += xt[c];
            }
            q[h] = head_q;
            sum[h] = head_sum;
        }
        for (int64_t h = 0; h < H; ++h) r[h] = 1.0f / sqrtf(q[h] * (1.0f / D) + s->eps);  /* all heads at once */
        for (int64_t h = 0; h < H; ++h) total += r[h] * sum[h];
        const float mean = total * (1.0f / C);
        float dev = 0.0f;
        for (int64_t h = 0; h < H; ++h)
            for (int64_t c = h * D; c < (h + 1) * D; ++c) xs[c] = r[h] * xt[c] - mean;
        #pragma omp simd reduction(+:dev)
        for (int64_t c = 0; c < C; ++c) dev += xs[c] * xs[c];
        MU_LN(stats, t) = mean;
        VAR_LN(stats, t) = dev * (1.0f / (C - 1));
    }
}

/* One sequence's sources: v = (m xs, m xs^2) (a padded token is nobody's source), r per channel, and
 * the softmax normalisers z[t, h] = sum_w k[w, h] m[t - dmin - w]. */
static void sources(const Shape *s, const float *restrict x, const uint8_t *restrict m, const float *stats,
                    Workspace *ws) {
    const int64_t T = s->T;
    for (int64_t t = 0; t < T; ++t) {
        const float *restrict xt = x + t * C, *restrict r = R(stats, t);
        float *restrict v = ws->v + 2 * t * C, *restrict rs = ws->rs + t * C;
        const float real = m ? (float)m[t] : 1.0f;
        for (int64_t h = 0; h < H; ++h)
            for (int64_t c = h * D; c < (h + 1) * D; ++c) rs[c] = r[h];
        for (int64_t c = 0; c < C; ++c) {
            v[c] = real * rs[c] * xt[c];
            v[C + c] = v[c] * v[c];
        }
        float z[H] = {0};
        int64_t lo, hi;
        band(s, t, 0, &lo, &hi);
        for (int64_t w = lo; w <= hi; ++w) {
            const float source = m ? (float)m[t - s->dmin - w] : 1.0f;
            for (int64_t h = 0; h < H; ++h) z[h] += s->ktab[w * H + h] * source;
        }
        for (int64_t h = 0; h < H; ++h) ws->z[t * H + h] = z[h];
    }
}

/* Channels per block of the banded sums: one block's accumulators stay in vector registers while the
 * loop runs over the band. The forward sums keep two per channel (32 floats: two AVX-512 registers
 * each, four independent chains of multiply-adds), the adjoint two and a table row it updates (16 floats
 * measured faster there). */
#define LANES 32
#define ADJOINT_LANES 16

/* Over `count` offsets w, channels l < width (at most LANES): out[l] = sum_w k[w C + l] v_w[l] and
 * out[C + l] = sum_w k[w C + l] v_w[C + l], for the sources going backwards from v one pair of rows per
 * offset. Always inlined, so that width = LANES is a constant and the loop over l becomes vector
 * instructions. */
static inline __attribute__((always_inline)) void band_block(
        int64_t width, int64_t count, const float *restrict k, const float *restrict v, float *restrict out) {
    float acc1[LANES] = {0}, acc2[LANES] = {0};
    for (int64_t w = 0; w < count; ++w)
        for (int64_t l = 0; l < width; ++l) {
            acc1[l] += k[w * C + l] * v[-2 * w * C + l];
            acc2[l] += k[w * C + l] * v[-2 * w * C + C + l];
        }
    for (int64_t l = 0; l < width; ++l) {
        out[l] = acc1[l];
        out[C + l] = acc2[l];
    }
}

/* Step 3's sums for output token t over its sources i = t - d, per channel: ws->n = (sum k(d) m xs,
 * sum k(d) m xs^2), and ws->inv = 1 / z, 0 for a padded token or one no source reaches: its inter-token
 * statistics are 0 (cpu.py alike). */
static void window_sums(const Shape *s, const uint8_t *restrict m, Workspace *ws, int64_t t) {
    int64_t lo, hi;
    band(s, t, 0, &lo, &hi);
    const float *k = s->taps + lo * C, *v = ws->v + 2 * (t - s->dmin - lo) * C;  /* offset lo and its source */
    int64_t c0 = 0;
    for (; c0 + LANES <= C; c0 += LANES) band_block(LANES, hi - lo + 1, k + c0, v + c0, ws->n + c0);
    if (c0 < C) band_block(C - c0, hi - lo + 1, k + c0, v + c0, ws->n + c0);
    const int reached = !m || m[t];
    for (int64_t h = 0; h < H; ++h) {
        const float z = ws->z[t * H + h], inv = (reached && z > TINY) ? 1.0f / z : 0.0f;
        for (int64_t c = h * D; c < (h + 1) * D; ++c) ws->inv[c] = inv;
    }
}

/* Steps 1-5 for one sequence; its statistics go to stats for backward. */
static void forward_sequence(const Shape *s, const float *restrict x, const uint8_t *restrict m,
                             float *restrict y, float *restrict stats, Workspace *ws) {
    const float *restrict lam_m = s->lam_m, *restrict lam_v = s->lam_v;
    const float *restrict weight = s->p->weight, *restrict bias = s->p->bias;
    statistics(s, x, stats, ws);
    sources(s, x, m, stats, ws);
    for (int64_t t = 0; t < s->T; ++t) {
        window_sums(s, m, ws, t);
        const float *restrict n1 = ws->n, *restrict n2 = ws->n + C, *restrict inv = ws->inv;
        const float *restrict r = ws->rs + t * C, *restrict xt = x + t * C;
        const float mu_ln = MU_LN(stats, t), var_ln = VAR_LN(stats, t);
        float *restrict yt = y + t * C;
        for (int64_t c = 0; c < C; ++c) {
            const float mu_in = n1[c] * inv[c], second = n2[c] * inv[c];
            const float spread = second - mu_in * mu_in;
            const float var_in = spread > 0.0f ? spread : 0.0f;  /* rounding can go below 0 */
            const float mu = lam_m[c] * mu_ln + (1.0f - lam_m[c]) * mu_in;
            const float var = lam_v[c] * var_ln + (1.0f - lam_v[c]) * var_in;
            yt[c] = (r[c] * xt[c] - mu) / sqrtf(var + s->eps) * weight[c] + bias[c];
        }
    }
}

/* Backward's pass 2 for one source and channels l < width (at most ADJOINT_LANES), over `count` offsets
 * w, the outputs going forwards from g one pair of rows per offset (the gradients a, b of their window
 * sums): the adjoint sums out = (sum_w k a_w, sum_w k b_w), and dL/dk per offset and channel,
 * g_k[w C + l] += a_w v1 + b_w v2 (v: the source's pair of rows). Inlined like band_block. */
static inline __attribute__((always_inline)) void adjoint_block(
        int64_t width, int64_t count, const float *restrict k, const float *restrict g, const float *restrict v,
        float *restrict out, float *restrict g_k) {
    float acc1[ADJOINT_LANES] = {0}, acc2[ADJOINT_LANES] = {0}, v1[ADJOINT_LANES], v2[ADJOINT_LANES];
    for (int64_t l = 0; l < width; ++l) {
        v1[l] = v[l];
        v2[l] = v[C + l];
    }
    for (int64_t w = 0; w < count; ++w)
        for (int64_t l = 0; l < width; ++l) {
            const float a = g[2 * w * C + l], b = g[2 * w * C + C + l];
            acc1[l] += k[w * C + l] * a;
            acc2[l] += k[w * C + l] * b;
            g_k[w * C + l] += a * v1[l] + b * v2[l];
        }
    for (int64_t l = 0; l < width; ++l) {
        out[l] = acc1[l];
        out[C + l] = acc2[l];
    }
}

/* Backward of one sequence: grad_x, and the parameter gradients added to its row of partials:
 * weight (C), bias (C), lam_m (H), lam_v (H), then dL/dk of the kernel weights (H, W). */
static void backward_sequence(const Shape *s, const float *restrict x, const uint8_t *restrict m,
                              const float *restrict stats, const float *restrict gy, float *restrict gx,
                              double *partial, Workspace *ws) {
    const int64_t T = s->T, W = s->W, dmin = s->dmin;
    const float *restrict lam_m = s->lam_m, *restrict lam_v = s->lam_v, *restrict weight = s->p->weight;
    float *restrict g_weight = ws->acc, *restrict g_bias = ws->acc + C;
    float *restrict g_lm = ws->acc + 2 * C, *restrict g_lv = ws->acc + 3 * C;
    memset(ws->acc, 0, sizeof(float) * 4 * C);
    memset(ws->g_taps, 0, sizeof(float) * W * C);
    memset(ws->g_ktab, 0, sizeof(float) * W * H);
    sources(s, x, m, stats, ws);

    /* Pass 1, per output token t: recompute its statistics; keep in gx the gradient that reaches xs
     * directly, G = gy w rstd, and in g_n, g_z those of the window sums (mu_in = n1 / z,
     * E[xs^2] = n2 / z); the LayerNorm statistics' gradients are per-token scalars. */
    for (int64_t t = 0; t < T; ++t) {
        window_sums(s, m, ws, t);
        const float *restrict n1 = ws->n, *restrict n2 = ws->n + C, *restrict inv = ws->inv;
        const float *restrict r = ws->rs + t * C, *restrict xt = x + t * C, *restrict gyt = gy + t * C;
        const float mu_ln = MU_LN(stats, t), var_ln = VAR_LN(stats, t);
        float *restrict g = gx + t * C, *restrict a = ws->g_n + 2 * t * C, *restrict b = a + C;
        float *restrict g_z = ws->s;  /* per channel, summed per head below */
        float g_mu_ln = 0.0f, g_var_ln = 0.0f;
        #pragma omp simd reduction(+:g_mu_ln, g_var_ln)
        for (int64_t c = 0; c < C; ++c) {
            const float mu_in = n1[c] * inv[c], second = n2[c] * inv[c];
            const float spread = second - mu_in * mu_in, var_in = spread > 0.0f ? spread : 0.0f;
            const float mu = lam_m[c] * mu_ln + (1.0f - lam_m[c]) * mu_in;
            const float var = lam_v[c] * var_ln + (1.0f - lam_v[c]) * var_in;
            const float rstd = 1.0f / sqrtf(var + s->eps);
            const float xhat = (r[c] * xt[c] - mu) * rstd;
            g_weight[c] += gyt[c] * xhat;
            g_bias[c] += gyt[c];
            const float direct = gyt[c] * weight[c] * rstd;  /* dL/dxs through xhat; dL/dmu = -direct */
            const float v = direct * xhat * rstd;            /* dL/dvar = -v / 2 */
            g[c] = direct;
            g_mu_ln -= lam_m[c] * direct;
            g_var_ln -= 0.5f * lam_v[c] * v;
            g_lm[c] -= direct * (mu_ln - mu_in);
            g_lv[c] -= 0.5f * v * (var_ln - var_in);
            const float g_second = spread > 0.0f ? -0.5f * (1.0f - lam_v[c]) * v : 0.0f;  /* the clamp */
            const float g_mu_in = -(1.0f - lam_m[c]) * direct - 2.0f * mu_in * g_second;
            a[c] = g_mu_in * inv[c];
            b[c] = g_second * inv[c];
            g_z[c] = -(a[c] * mu_in + b[c] * second);
        }
        for (int64_t h = 0; h < H; ++h) {
            float sum = 0.0f;
            #pragma omp simd reduction(+:sum)
            for (int64_t c = h * D; c < (h + 1) * D; ++c) sum += g_z[c];
            ws->g_z[t * H + h] = sum;
        }
        ws->g_mu_ln[t] = g_mu_ln;
        ws->g_var_ln[t] = g_var_ln;
    }

    /* Pass 2, per source token i: the adjoint convolution gives dL/dv1[i], dL/dv2[i] (sums over the
     * outputs t = i + d), and each pair (t, i) adds its share to dL/dk(d); then back through
     * v1 = m xs, v2 = m xs^2, the LayerNorm statistics and the RMS pre-scaling to x. */
    for (int64_t i = 0; i < T; ++i) {
        const float real = m ? (float)m[i] : 1.0f, mu_ln = MU_LN(stats, i);
        const float g_mean = ws->g_mu_ln[i] * (1.0f / C), g_dev = ws->g_var_ln[i] * (2.0f / (C - 1));
        int64_t lo, hi;
        band(s, i, 1, &lo, &hi);
        const float *k = s->taps + lo * C, *g_n = ws->g_n + 2 * (i + dmin + lo) * C, *v = ws->v + 2 * i * C;
        float *g_k = ws->g_taps + lo * C;
        int64_t c0 = 0;
        for (; c0 + ADJOINT_LANES <= C; c0 += ADJOINT_LANES)
            adjoint_block(ADJOINT_LANES, hi - lo + 1, k + c0, g_n + c0, v + c0, ws->s + c0, g_k + c0);
        if (c0 < C)
            adjoint_block(C - c0, hi - lo + 1, k + c0, g_n + c0, v + c0, ws->s + c0, g_k + c0);
        if (real != 0.0f)  /* the normalisers' share: z[t] = sum_w k m[t - dmin - w] */
            for (int64_t w = lo; w <= hi; ++w)
                for (int64_t h = 0; h < H; ++h) ws->g_ktab[w * H + h] += ws->g_z[(i + dmin + w) * H + h];
        const float *restrict s1 = ws->s, *restrict s2 = ws->s + C, *restrict xi = x + i * C, *restrict r = R(stats, i);
        float *restrict g = gx + i * C;
        for (int64_t h = 0; h < H; ++h) {
            float along = 0.0f;  /* sum over the head of dL/dxs * x: the gradient of r */
            #pragma omp simd reduction(+:along)
            for (int64_t c = h * D; c < (h + 1) * D; ++c) {
                const float xs = r[h] * xi[c];
                g[c] += real * (s1[c] + 2.0f * xs * s2[c]) + g_mean + g_dev * (xs - mu_ln);
                along += g[c] * xi[c];
            }
            const float shrink = r[h] * r[h] * r[h] * (1.0f / D) * along;  /* dr/dx = -r^3 x / D */
            for (int64_t c = h * D; c < (h + 1) * D; ++c) g[c] = r[h] * g[c] - shrink * xi[c];
        }
    }

    /* This sequence's parameter gradients, per head where the parameter is. */
    double *g_lam_m = partial + 2 * C, *g_lam_v = g_lam_m + H, *g_kernel = g_lam_v + H;
    for (int64_t c = 0; c < C; ++c) {
        partial[c] += g_weight[c];
        partial[C + c] += g_bias[c];
        g_lam_m[c / D] += g_lm[c];
        g_lam_v[c / D] += g_lv[c];
    }
    for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w) {
            double sum = ws->g_ktab[w * H + h];
            for (int64_t c = h * D; c < (h + 1) * D; ++c) sum += ws->g_taps[w * C + c];
            g_kernel[h * W + w] += sum;
        }
}

/* Entry points. Each returns 0, or -1 when p's shape is not this library's or memory for the tables or a
 * thread's workspace could not be allocated. */

/* y: (B, T, C); stats: (B, T, H + 2), what backward reads. */
int dtn_forward(const Params *p, const float *x, const uint8_t *mask, float *y, float *stats) {
    Shape shape;
    if (!tables_for(&shape, p)) return -1;
    const Shape *s = &shape;
    int failed = 0;
    #pragma omp parallel num_threads(p->threads) reduction(|:failed)
    {
        Workspace ws;
        const int ready = workspace_for(&ws, s);
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < s->B; ++b) {
            if (ready)
                forward_sequence(s, x + b * s->T * C, mask ? mask + b * s->T : NULL, y + b * s->T * C,
                                 stats + b * s->T * (H + 2), &ws);
            else
                failed = 1;
        }
    }
    return failed ? -1 : 0;
}

/* grads: (2 C + 4 H) float64, the gradients of weight (C), bias (C), gate_mean (H), gate_var (H) and
 * pos_proj.weight (H, 2): each sequence's sums, added in order of the batch (so the result does not
 * depend on the thread count); the kernel weights' gradient k dL/dk is contracted with the centred
 * features (d - c, d^2 - c^2) of the offsets in float64 (kernel.py's centred_features). */
int dtn_backward(const Params *p, const float *x, const uint8_t *mask, const float *stats, const float *grad_y,
                 float *grad_x, double *grads) {
    Shape shape;
    if (!tables_for(&shape, p)) return -1;
    const Shape *s = &shape;
    const int64_t W = s->W, stride = 2 * C + 2 * H + H * W;
    double *partials = calloc((size_t)(s->B * stride), sizeof(double));
    if (!partials) return -1;
    int failed = 0;
    #pragma omp parallel num_threads(p->threads) reduction(|:failed)
    {
        Workspace ws;
        const int ready = workspace_for(&ws, s);
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < s->B; ++b) {
            const int64_t at = b * s->T * C;
            if (ready)
                backward_sequence(s, x + at, mask ? mask + b * s->T : NULL, stats + b * s->T * (H + 2),
                                  grad_y + at, grad_x + at, partials + b * stride, &ws);
            else
                failed = 1;
        }
    }
    for (int64_t b = 1; b < s->B; ++b)
        for (int64_t j = 0; j < stride; ++j) partials[j] += partials[b * stride + j];
    memcpy(grads, partials, sizeof(double) * 2 * C);  /* weight, bias */
    for (int64_t h = 0; h < H; ++h) {
        const double lam_m = s->lam_m[h * D], lam_v = s->lam_v[h * D];  /* d sigmoid = lam (1 - lam) */
        grads[2 * C + h] = partials[2 * C + h] * lam_m * (1.0 - lam_m);
        grads[2 * C + H + h] = partials[2 * C + H + h] * lam_v * (1.0 - lam_v);
        double g_w1 = 0.0, g_w2 = 0.0;
        const double centre = p->centre[h];
        for (int64_t w = 0; w < W; ++w) {
            const double d = (double)(s->dmin + w), g_logit = p->kernel[h * W + w] * partials[2 * C + 2 * H + h * W + w];
            g_w1 += g_logit * (d - centre);
            g_w2 += g_logit * (d * d - centre * centre);
        }
        grads[2 * C + 2 * H + 2 * h] = g_w1;
        grads[2 * C + 2 * H + 2 * h + 1] = g_w2;
    }
    free(partials);
    return failed ? -1 : 0;
}
