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
 * token, so that the compiler vectorises it: per-head quantities come expanded per channel (the gates,
 * r, 1 / normaliser); a loop that sums over channels says so to the compiler (`omp simd reduction`,
 * which lets it reorder that sum). The softmax normalisers, per token and head, are banded sums of the
 * mask alone.
 *
 * The banded sums over the kernel's W offsets (forward: each output's sources; backward: each source's
 * outputs, and the kernel's gradient) run blocked: for a block of SUB channels and WB offsets, the WB
 * kernel weights and WB accumulators of the kernel's gradient stay in vector registers while one sweep
 * runs over TILE tokens, reading each token's rows once. Rows outside the sequence are zero halos, so
 * every sweep has the same WB offsets and no bounds inside the loop. Memory traffic per token then grows
 * with W / WB, not with W: reading and writing a (W, C) table of the kernel's gradient for every token
 * and offset made the first version of this file slower than the eager path from about 60 offsets at
 * C = 256.
 *
 * Sequences run in parallel (OpenMP), each with its own workspace, and add their parameter gradients
 * to their own row of partials, summed in batch order at the end: the result does not depend on the
 * number of threads.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

/* The channels and heads are compile-time constants: native.py builds one library per (C, H) of the
 * models it meets. Every loop over a token's channels or a head's then has a known trip count, which the
 * compiler unrolls and vectorises whole, with no remainder handling on the many short loops. */
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
    const float *gate_mean, *gate_var;  /* (H), before the sigmoid (gate_mean +inf: dtn_var) */
    const float *weight, *bias;   /* (C) */
    float eps;
    int threads;
} Params;

/* Channels and offsets per block of the banded sums (see the top): with AVX-512, 32 vector registers
 * hold 8 weights, 8 gradient accumulators and the operands of 16 channels; with 16 registers (AVX2),
 * 4 of each for 8 channels. */
#ifdef __AVX512F__
#define SUB 16
#define WB 8
#else
#define SUB 8
#define WB 4
#endif

/* Tokens per sweep of a blocked loop: the rows one sweep touches (TILE and the band's halo, SUB channels
 * of each) stay in the L1/L2 caches whatever the sequence's length and width. */
#define TILE 64

/* The rows the banded sums read and write hold CP >= C channels, whole blocks of SUB, the extra ones
 * zero: no block is ever partial. */
enum { CP = (C + SUB - 1) / SUB * SUB };

/* Floats from one token's pair of rows to the next: 2 CP and one block more, so that successive rows
 * are not a power of two apart (at C = 512, 4 KiB apart, a sweep's rows all fell into the same L1 set). */
enum { ROW = 2 * CP + SUB };

/* SUB channels as one vector value (the GCC/Clang vector extension), readable and writable at any
 * float's address (`may_alias`, alignment 4): the operands the blocked loops keep in registers. */
typedef float lanes __attribute__((vector_size(SUB * sizeof(float)), may_alias, aligned(4)));
#define AT(p) (*(lanes *)(p))

/* The call's shape and its per-head quantities laid out for the loops, built once per call (tables_for). */
typedef struct {
    const Params *p;
    int64_t B, T, W, dmin;
    int64_t blocks;               /* W rounded up to whole blocks of WB offsets, over WB */
    int64_t halo;                 /* zero rows on either side of a sequence's rows (tables_for) */
    float *taps;                  /* (blocks * WB, CP): the kernel weight of each offset per channel, 0 past W */
    float *ktab;                  /* (W, H): the same, per head */
    float *lam_m, *lam_v;         /* (C): the gates after their sigmoid, per channel */
} Shape;

/* One sequence's buffers (pointers into the thread's block). The banded sums' rows are pairs of CP
 * channels, ROW floats apart; v and g_n have `halo` zero rows before and after the T real ones, where a
 * band reads past the sequence. */
typedef struct {
    float *v;                     /* (halo + T + halo rows): the sources' values m xs and m xs^2 */
    float *n;                     /* (TILE rows): one tile's window sums of v, sum_d k(d) v[t - d] */
    float *z;                     /* (T, H): softmax normalisers, sum_d k(d) m[t - d] */
    float *g_n;                   /* backward (halo + T + halo rows): the gradients of n */
    float *adj;                   /* backward (TILE rows): one tile's adjoint sums, sum_d k(d) g_n[i + d] */
    float *g_z;                   /* backward (T, H): the gradients of the normalisers */
    float *g_mu_ln, *g_var_ln;    /* backward: (T) */
    float *g_taps;                /* backward: (blocks * WB, CP) dL/dk per offset and channel */
    float *g_ktab;                /* backward: (W, H) the normalisers' share of dL/dk */
    float *acc;                   /* backward: (4, C) sums over tokens of the weight, bias, lam_m, lam_v gradients */
    float *inv, *rc;              /* (C) each: one token's 1 / normaliser and r, per channel */
    float *scratch;               /* (C) */
} Workspace;

/* Each thread's memory, kept from call to call and grown when a call needs more: a fresh block of
 * megabytes would cost a page fault per 4 KiB on every call (the eager path's _Workspace, for the same
 * reason). Freed when its thread ends (a pthread key's destructor), as Python frees a threading.local. */
typedef struct {
    float *block, *tables;
    size_t block_room, tables_room;
} Buffers;

static pthread_key_t buffers_key;
static pthread_once_t buffers_once = PTHREAD_ONCE_INIT;

static void release(void *held) {
    Buffers *mine = held;
    free(mine->block);
    free(mine->tables);
    free(mine);
}

static void make_key(void) { pthread_key_create(&buffers_key, release); }

/* This thread's Buffers (empty at first); NULL if even they cannot be allocated. */
static Buffers *buffers(void) {
    pthread_once(&buffers_once, make_key);
    Buffers *mine = pthread_getspecific(buffers_key);
    if (!mine && (mine = calloc(1, sizeof *mine)) && pthread_setspecific(buffers_key, mine)) {
        free(mine);
        mine = NULL;
    }
    return mine;
}

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
    const size_t T = s->T, W = s->W, rows = T + 2 * s->halo, padded = s->blocks * WB;
    const size_t need = 2 * rows * ROW + 2 * TILE * ROW + C + 2 * T * H + 2 * T + padded * CP + W * H + 6 * C + 14 * 16;
    Buffers *mine = buffers();
    float *at = mine ? grown(&mine->block, &mine->block_room, need) : NULL;
    if (!at) return 0;
    ws->v = carve(&at, rows * ROW) + s->halo * ROW; ws->g_n = carve(&at, rows * ROW) + s->halo * ROW;
    ws->n = carve(&at, TILE * ROW); ws->adj = carve(&at, TILE * ROW);
    ws->z = carve(&at, T * H); ws->g_z = carve(&at, T * H); ws->g_mu_ln = carve(&at, T); ws->g_var_ln = carve(&at, T);
    ws->g_taps = carve(&at, padded * CP); ws->g_ktab = carve(&at, W * H); ws->acc = carve(&at, 4 * C);
    ws->inv = carve(&at, C); ws->rc = carve(&at, C); ws->scratch = carve(&at, C);
    const size_t halo = sizeof(float) * s->halo * ROW;
    memset(ws->v - s->halo * ROW, 0, halo);
    memset(ws->v + T * ROW, 0, halo);
    memset(ws->g_n - s->halo * ROW, 0, halo);
    memset(ws->g_n + T * ROW, 0, halo);
    if ((int)CP > (int)C)  /* the channels past C stay zero in every row that is written per token */
        for (size_t t = 0; t < T; ++t) {
            memset(ws->v + t * ROW + C, 0, sizeof(float) * (CP - C));
            memset(ws->v + t * ROW + CP + C, 0, sizeof(float) * (CP - C));
            memset(ws->g_n + t * ROW + C, 0, sizeof(float) * (CP - C));
            memset(ws->g_n + t * ROW + CP + C, 0, sizeof(float) * (CP - C));
        }
    return 1;
}

/* The call's Shape, its tables in the calling thread's memory (the other threads only read them):
 * 0, or -1 when they cannot be allocated, -2 when p is not of this library's shape. */
static int tables_for(Shape *s, const Params *p) {
    const int64_t W = p->W, blocks = (W + WB - 1) / WB;
    if (p->C != C || p->H != H) return -2;  /* a library built for another shape: refuse, never misread */
    /* the rows read past the sequence: sources t - dmin - w down to -(dmin + blocks WB - 1) and up to
     * T - 1 - dmin; outputs i + dmin + w down to dmin and up to T - 2 + dmin + blocks WB */
    int64_t halo = -p->dmin > 0 ? -p->dmin : 0;
    if (blocks * WB + p->dmin - 1 > halo) halo = blocks * WB + p->dmin - 1;
    *s = (Shape){p, p->B, p->T, W, p->dmin, blocks, halo, NULL, NULL, NULL, NULL};
    Buffers *mine = buffers();
    float *at = mine ? grown(&mine->tables, &mine->tables_room, blocks * WB * CP + W * H + 2 * C + 64) : NULL;
    if (!at) return -1;
    s->taps = carve(&at, blocks * WB * CP); s->ktab = carve(&at, W * H); s->lam_m = carve(&at, C);
    s->lam_v = carve(&at, C);
    memset(s->taps, 0, sizeof(float) * blocks * WB * CP);
    for (int64_t h = 0; h < H; ++h) {
        const float lam_m = 1.0f / (1.0f + expf(-p->gate_mean[h])), lam_v = 1.0f / (1.0f + expf(-p->gate_var[h]));
        for (int64_t w = 0; w < W; ++w) s->ktab[w * H + h] = (float)p->kernel[h * W + w];
        for (int64_t c = h * D; c < (h + 1) * D; ++c) {
            s->lam_m[c] = lam_m;
            s->lam_v[c] = lam_v;
            for (int64_t w = 0; w < W; ++w) s->taps[w * CP + c] = s->ktab[w * H + h];
        }
    }
    return 0;
}

/* A token's row of the statistics that forward saves for backward, (B, T, H + 2) in all: r of each
 * head, then LayerNorm's mean and (unbiased) variance; like LayerNorm's saved mean and rstd. */
#define R(stats, t) ((stats) + (t) * (H + 2))
#define MU_LN(stats, t) ((stats)[(t) * (H + 2) + H])
#define VAR_LN(stats, t) ((stats)[(t) * (H + 2) + H + 1])

/* Steps 1-2 of the spec for one sequence, into its stats: r = 1/sqrt(mean_head(x^2) + eps) per token and
 * head, and the LayerNorm mean and *unbiased* variance (the authors' torch.var default) of xs = r x over
 * all C channels (two passes: exact for tokens nearly constant across channels). */
static void statistics(const Shape *s, const float *restrict x, float *restrict stats, Workspace *ws) {
    float *restrict xs = ws->scratch;  /* one token */
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
        for (int64_t h = 0; h < H; ++h) r[h] = 1.0f / sqrtf(q[h] * (1.0f / D) + s->p->eps);  /* all heads at once */
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

/* ws->rc: token t's r per channel. */
static const float *scales(const float *restrict stats, Workspace *ws, int64_t t) {
    const float *r = R(stats, t);
    for (int64_t h = 0; h < H; ++h)
        for (int64_t c = h * D; c < (h + 1) * D; ++c) ws->rc[c] = r[h];
    return ws->rc;
}

/* One past the sequence's last real token (T without a mask): the banded sums of the padding after it
 * are skipped (a padded token's inter-token statistics are 0 and it is nobody's source), so a batch
 * padded to its longest sequence pays for its real tokens. */
static int64_t real_end(const Shape *s, const uint8_t *restrict m) {
    int64_t end = s->T;
    if (m)
        while (end > 0 && !m[end - 1]) --end;
    return end;
}

/* A window sum over its normaliser, n * inv, or 0 where inv is 0 (a padded token, whose sums may not
 * have been computed: selected, never multiplied). */
static inline float statistic(float n, float inv) { return inv != 0.0f ? n * inv : 0.0f; }

/* One sequence's sources: v = (m xs, m xs^2) (a padded token is nobody's source), and the softmax
 * normalisers z[t, h] = sum_d k(d) m[t - d]. */
static void sources(const Shape *s, const float *restrict x, const uint8_t *restrict m, const float *stats,
                    Workspace *ws) {
    const int64_t T = s->T, W = s->W, dmin = s->dmin;
    for (int64_t t = 0; t < T; ++t) {
        const float *restrict xt = x + t * C, *restrict rs = scales(stats, ws, t);
        float *restrict v = ws->v + t * ROW;
        const float real = m ? (float)m[t] : 1.0f;
        for (int64_t c = 0; c < C; ++c) {
            v[c] = real != 0.0f ? rs[c] * xt[c] : 0.0f;  /* selected, not multiplied: a pad may hold inf */
            v[CP + c] = v[c] * v[c];
        }
        float z[H] = {0};
        const int64_t lo = t - dmin - (T - 1) > 0 ? t - dmin - (T - 1) : 0;  /* the source t - dmin - w */
        const int64_t hi = t - dmin < W - 1 ? t - dmin : W - 1;             /* must lie in 0 ... T - 1 */
        for (int64_t w = lo; real != 0.0f && w <= hi; ++w) {  /* a pad's z is never used */
            const float source = m ? (float)m[t - dmin - w] : 1.0f;
            for (int64_t h = 0; h < H; ++h) z[h] += s->ktab[w * H + h] * source;
        }
        for (int64_t h = 0; h < H; ++h) ws->z[t * H + h] = z[h];
    }
}

/* A token's running pair of sums at row (and row + CP): zero before the first block of offsets, else
 * what the blocks before b left there. */
static inline void running(const float *row, int64_t b, lanes *first, lanes *second) {
    const lanes zero = {0};
    *first = b ? AT(row) : zero;
    *second = b ? AT(row + CP) : zero;
}

/* Step 3's banded sums of one sequence for the SUB channels from c0 and the offsets of block b:
 * n[t] += sum_w k(w) v[t - dmin - w] over the block's WB offsets, both rows (the first block sets n). */
static void band_block(const Shape *s, Workspace *ws, int64_t c0, int64_t b, int64_t first, int64_t end) {
    lanes k[WB];
    for (int64_t w = 0; w < WB; ++w) k[w] = AT(s->taps + (b * WB + w) * CP + c0);
    const int64_t shift = s->dmin + b * WB;  /* the source of t at offset w is t - shift - w */
    for (int64_t t = first; t < end; ++t) {
        float *n = ws->n + (t - first) * ROW + c0;
        const float *v = ws->v + (t - shift) * ROW + c0;
        lanes n1, n2;
        running(n, b, &n1, &n2);
        #pragma GCC unroll 16
        for (int64_t w = 0; w < WB; ++w) {
            n1 += k[w] * AT(v - w * ROW);
            n2 += k[w] * AT(v - w * ROW + CP);
        }
        AT(n) = n1;
        AT(n + CP) = n2;
    }
}

/* Step 3's banded sums of the tokens first ... end - 1 (at most TILE), into ws->n. */
static void window_sums(const Shape *s, Workspace *ws, int64_t first, int64_t end) {
    for (int64_t c0 = 0; c0 < CP; c0 += SUB)
        for (int64_t b = 0; b < s->blocks; ++b) band_block(s, ws, c0, b, first, end);
}

/* ws->inv: token t's 1 / normaliser per channel, 0 for a padded token or one no source reaches: its
 * inter-token statistics are 0 (cpu.py alike). */
static const float *reciprocals(const uint8_t *restrict m, Workspace *ws, int64_t t) {
    const int reached = !m || m[t];
    for (int64_t h = 0; h < H; ++h) {
        const float z = ws->z[t * H + h], inv = (reached && z > TINY) ? 1.0f / z : 0.0f;
        for (int64_t c = h * D; c < (h + 1) * D; ++c) ws->inv[c] = inv;
    }
    return ws->inv;
}

/* Steps 1-5 for one sequence, a tile of TILE tokens at a time; its statistics go to stats for backward. */
static void forward_sequence(const Shape *s, const float *restrict x, const uint8_t *restrict m,
                             float *restrict y, float *restrict stats, Workspace *ws) {
    const float *restrict lam_m = s->lam_m, *restrict lam_v = s->lam_v;
    const float *restrict weight = s->p->weight, *restrict bias = s->p->bias;
    statistics(s, x, stats, ws);
    sources(s, x, m, stats, ws);
    const int64_t reals = real_end(s, m);
    for (int64_t first = 0; first < s->T; first += TILE) {
        const int64_t end = first + TILE < s->T ? first + TILE : s->T;
        if (first < reals) window_sums(s, ws, first, end < reals ? end : reals);
        for (int64_t t = first; t < end; ++t) {
            const float *restrict inv = reciprocals(m, ws, t);
            const float *restrict n1 = ws->n + (t - first) * ROW, *restrict n2 = n1 + CP;
            const float *restrict r = scales(stats, ws, t), *restrict xt = x + t * C;
            const float mu_ln = MU_LN(stats, t), var_ln = VAR_LN(stats, t);
            float *restrict yt = y + t * C;
            for (int64_t c = 0; c < C; ++c) {
                const float mu_in = statistic(n1[c], inv[c]), second = statistic(n2[c], inv[c]);
                const float spread = second - mu_in * mu_in;
                const float var_in = spread > 0.0f ? spread : 0.0f;  /* rounding can go below 0 */
                const float mu = lam_m[c] * mu_ln + (1.0f - lam_m[c]) * mu_in;
                const float var = lam_v[c] * var_ln + (1.0f - lam_v[c]) * var_in;
                yt[c] = (r[c] * xt[c] - mu) / sqrtf(var + s->p->eps) * weight[c] + bias[c];
            }
        }
    }
}

/* Backward's banded sums over the outputs t = i + dmin + w of each source i, for the SUB channels from
 * c0 and the offsets of block b: the adjoint sums adj[i] += sum_w k(w) g_n[t] (both rows; the first
 * block sets adj), and dL/dk per offset and channel, g_taps[w] += sum_i g_n1[t] v1[i] + g_n2[t] v2[i]. */
static void adjoint_block(const Shape *s, Workspace *ws, int64_t c0, int64_t b, int64_t first, int64_t end) {
    lanes k[WB], g_k[WB];
    for (int64_t w = 0; w < WB; ++w) {
        k[w] = AT(s->taps + (b * WB + w) * CP + c0);
        g_k[w] = (lanes){0};
    }
    const int64_t shift = s->dmin + b * WB;  /* the output of i at offset w is i + shift + w */
    for (int64_t i = first; i < end; ++i) {
        float *adj = ws->adj + (i - first) * ROW + c0;
        const float *v = ws->v + i * ROW + c0, *g = ws->g_n + (i + shift) * ROW + c0;
        const lanes v1 = AT(v), v2 = AT(v + CP);
        lanes s1, s2;
        running(adj, b, &s1, &s2);
        #pragma GCC unroll 16
        for (int64_t w = 0; w < WB; ++w) {
            const lanes a = AT(g + w * ROW), e = AT(g + w * ROW + CP);
            s1 += k[w] * a;
            s2 += k[w] * e;
            g_k[w] += a * v1 + e * v2;
        }
        AT(adj) = s1;
        AT(adj + CP) = s2;
    }
    for (int64_t w = 0; w < WB; ++w) AT(ws->g_taps + (b * WB + w) * CP + c0) += g_k[w];
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
    memset(ws->g_taps, 0, sizeof(float) * s->blocks * WB * CP);
    memset(ws->g_ktab, 0, sizeof(float) * W * H);
    sources(s, x, m, stats, ws);
    const int64_t reals = real_end(s, m);

    /* Pass 1, per output token t, a tile at a time: recompute its statistics; keep in gx the gradient
     * that reaches xs directly, G = gy w rstd, and in g_n, g_z those of the window sums (mu_in = n1 / z,
     * E[xs^2] = n2 / z); the LayerNorm statistics' gradients are per-token scalars. */
    for (int64_t t = 0; t < T; ++t) {
        const int64_t first = t / TILE * TILE;
        if (t == first && first < reals) window_sums(s, ws, first, first + TILE < reals ? first + TILE : reals);
        const float *restrict inv = reciprocals(m, ws, t);
        const float *restrict n1 = ws->n + (t - first) * ROW, *restrict n2 = n1 + CP;
        const float *restrict r = scales(stats, ws, t), *restrict xt = x + t * C, *restrict gyt = gy + t * C;
        const float mu_ln = MU_LN(stats, t), var_ln = VAR_LN(stats, t);
        float *restrict g = gx + t * C, *restrict a = ws->g_n + t * ROW, *restrict b = a + CP;
        float *restrict g_z = ws->scratch;  /* per channel, summed per head below */
        float g_mu_ln = 0.0f, g_var_ln = 0.0f;
        #pragma omp simd reduction(+:g_mu_ln, g_var_ln)
        for (int64_t c = 0; c < C; ++c) {
            const float mu_in = statistic(n1[c], inv[c]), second = statistic(n2[c], inv[c]);
            const float spread = second - mu_in * mu_in, var_in = spread > 0.0f ? spread : 0.0f;
            const float mu = lam_m[c] * mu_ln + (1.0f - lam_m[c]) * mu_in;
            const float var = lam_v[c] * var_ln + (1.0f - lam_v[c]) * var_in;
            const float rstd = 1.0f / sqrtf(var + s->p->eps);
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
            a[c] = inv[c] != 0.0f ? g_mu_in * inv[c] : 0.0f;  /* a pad sends nothing back, even from inf */
            b[c] = inv[c] != 0.0f ? g_second * inv[c] : 0.0f;
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

    /* Pass 2, per source token i, a tile at a time: the adjoint convolution gives dL/dv1[i], dL/dv2[i]
     * (sums over the outputs t = i + d, all done by pass 1), and each pair (t, i) adds its share to
     * dL/dk(d); then the normalisers' share of dL/dk, and back through v1 = m xs, v2 = m xs^2, the
     * LayerNorm statistics and the RMS pre-scaling to x. */
    for (int64_t i = 0; i < T; ++i) {
        const int64_t first = i / TILE * TILE;
        if (i == first && first < reals) {  /* the pad sources after the last real one get nothing back */
            const int64_t end = first + TILE < reals ? first + TILE : reals;
            for (int64_t c0 = 0; c0 < CP; c0 += SUB)
                for (int64_t b = 0; b < s->blocks; ++b) adjoint_block(s, ws, c0, b, first, end);
        }
        const float real = m ? (float)m[i] : 1.0f, mu_ln = MU_LN(stats, i);
        const float g_mean = ws->g_mu_ln[i] * (1.0f / C), g_dev = ws->g_var_ln[i] * (2.0f / (C - 1));
        if (real != 0.0f) {  /* z[t] = sum_w k m[t - dmin - w] */
            const int64_t lo = -i - dmin > 0 ? -i - dmin : 0;                         /* the output i + dmin + w */
            const int64_t hi = T - 1 - i - dmin < W - 1 ? T - 1 - i - dmin : W - 1;  /* must lie in 0 ... T - 1 */
            for (int64_t w = lo; w <= hi; ++w)
                for (int64_t h = 0; h < H; ++h) ws->g_ktab[w * H + h] += ws->g_z[(i + dmin + w) * H + h];
        }
        const float *restrict s1 = ws->adj + (i - first) * ROW, *restrict s2 = s1 + CP, *restrict xi = x + i * C;
        const float *restrict r = R(stats, i);
        float *restrict g = gx + i * C;
        for (int64_t h = 0; h < H; ++h) {
            float along = 0.0f;  /* sum over the head of dL/dxs * x: the gradient of r */
            #pragma omp simd reduction(+:along)
            for (int64_t c = h * D; c < (h + 1) * D; ++c) {
                const float xs = r[h] * xi[c];
                g[c] += (real != 0.0f ? s1[c] + 2.0f * xs * s2[c] : 0.0f) + g_mean + g_dev * (xs - mu_ln);
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
            for (int64_t c = h * D; c < (h + 1) * D; ++c) sum += ws->g_taps[w * CP + c];
            g_kernel[h * W + w] += sum;
        }
}

/* Entry points. Each returns 0, -1 when memory for the tables or a thread's workspace could not be
 * allocated, or -2 when p's shape is not this library's. Threads beyond one per sequence would only
 * allocate a workspace and wait. */

/* The arrays of one call, read by the per-sequence jobs below. */
typedef struct {
    const float *x, *stats, *grad_y;
    const uint8_t *mask;
    float *y, *out_stats, *grad_x;
    double *partials;
    int64_t stride;
} Arrays;

typedef void (*Job)(const Shape *s, const Arrays *a, int64_t b, Workspace *ws);

/* job(b) for every sequence b, in parallel (one thread per sequence at most), each thread with its own
 * workspace: 0, or -1 if some thread could not allocate one. */
static int each_sequence(const Shape *s, const Arrays *a, Job job) {
    const int64_t threads = s->p->threads < s->B ? s->p->threads : s->B;
    int failed = 0;
    #pragma omp parallel num_threads(threads) reduction(|:failed) if (s->B > 0)
    {
        Workspace ws;
        const int ready = workspace_for(&ws, s);
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < s->B; ++b) {
            if (ready)
                job(s, a, b, &ws);
            else
                failed = 1;
        }
    }
    return failed ? -1 : 0;
}

static void forward_job(const Shape *s, const Arrays *a, int64_t b, Workspace *ws) {
    forward_sequence(s, a->x + b * s->T * C, a->mask ? a->mask + b * s->T : NULL, a->y + b * s->T * C,
                     a->out_stats + b * s->T * (H + 2), ws);
}

static void backward_job(const Shape *s, const Arrays *a, int64_t b, Workspace *ws) {
    const int64_t at = b * s->T * C;
    backward_sequence(s, a->x + at, a->mask ? a->mask + b * s->T : NULL, a->stats + b * s->T * (H + 2),
                      a->grad_y + at, a->grad_x + at, a->partials + b * a->stride, ws);
}

/* y: (B, T, C); stats: (B, T, H + 2), what backward reads. */
int dtn_forward(const Params *p, const float *x, const uint8_t *mask, float *y, float *stats) {
    Shape shape;
    const int status = tables_for(&shape, p);
    if (status) return status;
    const Arrays arrays = {.x = x, .mask = mask, .y = y, .out_stats = stats};
    return each_sequence(&shape, &arrays, forward_job);
}

/* grads: (2 C + 4 H) float64, the gradients of weight (C), bias (C), gate_mean (H), gate_var (H) and
 * pos_proj.weight (H, 2): each sequence's sums, added in order of the batch (so the result does not
 * depend on the thread count); the kernel weights' gradient k dL/dk is contracted with the features
 * (d, d^2) of the offsets in float64. (The eager path centres them on a far head's peak, see kernel.py's
 * centred_features; the heads served here are not far, and their centre is d = 0.) */
int dtn_backward(const Params *p, const float *x, const uint8_t *mask, const float *stats, const float *grad_y,
                 float *grad_x, double *grads) {
    Shape shape;
    const int status = tables_for(&shape, p);
    if (status) return status;
    const Shape *s = &shape;
    const int64_t W = s->W, stride = 2 * C + 2 * H + H * W;
    double *partials = calloc((size_t)((s->B > 1 ? s->B : 1) * stride), sizeof(double));  /* B = 0: zeros */
    if (!partials) return -1;
    const Arrays arrays = {.x = x, .stats = stats, .grad_y = grad_y, .mask = mask, .grad_x = grad_x,
                           .partials = partials, .stride = stride};
    const int failed = each_sequence(s, &arrays, backward_job);
    for (int64_t b = 1; b < s->B; ++b)
        for (int64_t j = 0; j < stride; ++j) partials[j] += partials[b * stride + j];
    memcpy(grads, partials, sizeof(double) * 2 * C);  /* weight, bias */
    for (int64_t h = 0; h < H; ++h) {
        const double lam_m = s->lam_m[h * D], lam_v = s->lam_v[h * D];  /* d sigmoid = lam (1 - lam) */
        grads[2 * C + h] = partials[2 * C + h] * lam_m * (1.0 - lam_m);
        grads[2 * C + H + h] = partials[2 * C + H + h] * lam_v * (1.0 - lam_v);
        double g_w1 = 0.0, g_w2 = 0.0;
        for (int64_t w = 0; w < W; ++w) {
            const double d = (double)(s->dmin + w);
            const double g_logit = p->kernel[h * W + w] * partials[2 * C + 2 * H + h * W + w];
            g_w1 += g_logit * d;
            g_w2 += g_logit * d * d;
        }
        grads[2 * C + 2 * H + 2 * h] = g_w1;
        grads[2 * C + 2 * H + 2 * h + 1] = g_w2;
    }
    free(partials);
    return failed;
}
