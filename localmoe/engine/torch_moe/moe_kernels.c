/* The torch engine's native kernels for one-token decode steps: float32 matrix-vector products (the part of a decode
 * step that is all weight reads), a whole MoE layer's experts in one call, and a whole decode step in one call.
 *
 * torch's gemv for one token runs at ~22 GB/s on the 2-core machines we measure on, llama.cpp's at ~26 GB/s: the
 * difference is a fixed cost per call (thread wake-ups, a gemm path for m = 1) on matrices of a few MB. These
 * kernels read each weight row once, one row after another (one sequential stream per thread, with four independent
 * partial sums to keep the FMA units busy; see dot1), and run a whole MoE layer's experts in
 * one parallel region with one barrier, split by rows over torch's own OpenMP threads (this library is loaded after
 * torch, so `libgomp.so.1` resolves to the runtime torch already runs: one thread pool, no oversubscription).
 *
 * Built at first use with the system C compiler for the machine it runs on (`-march=native`) and loaded with
 * ctypes (see kernels.py); without a compiler the engine keeps torch's kernels.
 */
#include <math.h>
#include <stddef.h>
#include <string.h>
#include <omp.h>

#define UNROLL 4  /* threads' shares of rows are cut at multiples of this */

/* w . x for one row: four partial sums over interleaved chunks of 8 keep the FMA units busy, while the thread reads
 * one sequential stream, which the hardware prefetcher follows best. Measured on 2 cores, float32 rows of 512: 30-34
 * GB/s, against 24-27 for four rows read side by side (four short streams), and ~34 for a plain sum over memory. */
static inline float dot1(const float *restrict w, const float *restrict x, int k)
{
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    int i = 0;
    for (; i + 32 <= k; i += 32) {
#pragma omp simd reduction(+ : s0)
        for (int j = 0; j < 8; j++)
            s0 += w[i + j] * x[i + j];
#pragma omp simd reduction(+ : s1)
        for (int j = 8; j < 16; j++)
            s1 += w[i + j] * x[i + j];
#pragma omp simd reduction(+ : s2)
        for (int j = 16; j < 24; j++)
            s2 += w[i + j] * x[i + j];
#pragma omp simd reduction(+ : s3)
        for (int j = 24; j < 32; j++)
            s3 += w[i + j] * x[i + j];
    }
    for (; i < k; i++)
        s0 += w[i] * x[i];
    return (s0 + s1) + (s2 + s3);
}

/* rows [lo, hi) of w (n x k, row-major) times x into y: y[r] = w[r] . x (+ bias[r]) */
static void rows(const float *w, const float *x, const float *bias, float *y, int lo, int hi, int k)
{
    for (int r = lo; r < hi; r++)
        y[r] = dot1(w + (size_t)r * k, x, k) + (bias ? bias[r] : 0.f);
}

/* this thread's share [*lo, *hi) of n rows, cut at multiples of UNROLL */
static void share(int n, int *lo, int *hi)
{
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int blocks = (n + UNROLL - 1) / UNROLL;
    const int b0 = (int)((long)blocks * t / nt), b1 = (int)((long)blocks * (t + 1) / nt);
    *lo = b0 * UNROLL;
    *hi = b1 * UNROLL < n ? b1 * UNROLL : n;
}

/* y (n) = w (n x k) . x (k) + bias (n, or NULL) */
void lm_gemv_f32(const float *w, const float *x, const float *bias, float *y, int n, int k, int threads)
{
#pragma omp parallel num_threads(threads)
    {
        int lo, hi;
        share(n, &lo, &hi);
        rows(w, x, bias, y, lo, hi, k);
    }
}

static inline float silu(float g) { return g / (1.f + expf(-g)); }

#include "quant_kernels.c"  /* GGUF-quantised experts (issue #16) */

/* One token through n_exp experts of an MoE layer, accumulated into out (k):
 *   out += sum_e scale[e] * down[e] . (silu(gate_e . x) * (up_e . x))
 * gate_up[e] is (2f x k): the f gate rows, then the f up rows; down[e] is (k x f); h is scratch (n_exp x f).
 * The experts' hidden rows are split over the threads, then (after the one barrier) the output rows, each thread
 * summing every expert's contribution to its rows in expert order. */
void lm_moe_decode_f32(int n_exp, const float *const *gate_up, const float *const *down, const float *scale,
                       const float *x, float *out, float *h, int k, int f, int threads)
{
#pragma omp parallel num_threads(threads)
    {
        int lo, hi;
        share(n_exp * f, &lo, &hi);
        for (int i = lo; i < hi; i++) {
            const int e = i / f, r = i % f;
            const float *gw = gate_up[e] + (size_t)r * k, *uw = gate_up[e] + (size_t)(f + r) * k;
            h[(size_t)e * f + r] = silu(dot1(gw, x, k)) * dot1(uw, x, k);
        }
#pragma omp barrier
        share(k, &lo, &hi);
        for (int e = 0; e < n_exp; e++) {
            const float *dw = down[e], *he = h + (size_t)e * f;
            const float s = scale[e];
            for (int r = lo; r < hi; r++)
                out[r] += s * dot1(dw + (size_t)r * f, he, f);
        }
    }
}

/* One decode step of a whole float32 MoE model in one call (step.DecodeStep); experts that are not resident are
 * made so through a callback, so only a miss leaves C.
 *
 * Per token, torch's path costs ~2-4 ms of Python and small kernels around ~22 ms of weight reads on the machines we
 * measure on; this is the same step (RMSNorm, q/k norms, rotate-half RoPE, GQA attention over the KV cache, softmax
 * top-k routing, the experts) with no interpreter between the matrix-vector products. Same layouts as the torch
 * model: its weights, KV cache and RoPE tables are used in place. Summation order follows the torch path (experts
 * in ascending id), so results agree to float rounding. */
/* P_WK, P_WV: with packed dense weights, P_WQKV holds the q rows and these the k and v rows (each its own type) */
/* P_SH_*: qwen2_moe's shared expert (gate, up, down, and its sigmoid gate's row), float32; NULL where none */
enum { P_ATTN_NORM, P_WQKV, P_BQKV, P_QNORM, P_KNORM, P_WO, P_FFN_NORM, P_ROUTER, P_KCACHE, P_VCACHE, P_WK, P_WV,
       P_SH_GATE, P_SH_UP, P_SH_DOWN, P_SH_GW, P_N };

/* The model's shape and switches, filled from ModelArgs by kernels.StepConfig (a ctypes mirror of this struct): the
 * loader compares lm_step_config_size() with the mirror's size and keeps torch's kernels when they differ. */
typedef struct {
    int dim, n_heads, n_kv_heads, head_dim, n_experts, top_k, expert_ff, vocab_size, max_seq_length, n_layers;
    int qk_norm;      /* 0: none, 1: per head over head_dim (qwen3), 2: over the whole q and k projections (olmoe) */
    int renormalise;  /* rescale a token's top-k router weights to sum to one */
    int threads;      /* OpenMP threads: torch's own count, set before every call */
    float eps;        /* RMSNorm epsilon */
    float clip;       /* clamp q, k and v to [-clip, clip] (olmoe); 0 for none */
    float top_p;      /* adaptive expert count: keep the fewest top experts whose probabilities reach it; 0 for none */
    /* per layer, the ggml types of the experts' gate/up and down rows (a GGUF's packed experts, quant_kernels.c);
     * NULL: float32 experts */
    const int *gu_types, *down_types;
    /* packed dense weights (a GGUF's): per layer the ggml types of q, k, v and o (n_layers x 4), and the output
     * head's; NULL: float32, q, k and v stacked in P_WQKV */
    const int *dense_types;
    int head_type;
    /* benchmark replay (model.TraceReplay): per layer the top_k experts to use (-1: none) instead of the router's
     * choice, weighted by their router probabilities; NULL: route */
    const int *forced;
    int shared_ff;    /* the shared expert's hidden width (qwen2_moe); 0 for none */
} lm_step_config;

size_t lm_step_config_size(void) { return sizeof(lm_step_config); }

static void rmsnorm(const float *x, const float *w, float *y, int n, float eps)
{
    float ss = 0.f;
    for (int i = 0; i < n; i++)
        ss += x[i] * x[i];
    const float r = 1.f / sqrtf(ss / n + eps);
    for (int i = 0; i < n; i++)
        y[i] = x[i] * r * w[i];
}

static void rope(float *v, const float *cos, const float *sin, int hd)
{
    const int half = hd / 2;
    for (int i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cos[i] - b * sin[i];
        v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* Called when a layer's chosen experts are not all in the address table (a partial cache): it makes them resident,
 * fills their entries and returns 0, or returns non-zero to abandon the step. Only on misses: a step whose experts
 * are all resident runs with no call out of C. */
typedef int (*lm_resolve_fn)(int layer, const int *experts, int n);

/* logits (vocab) for one token at position pos; chosen (n_layers x top_k): each layer's experts, ascending.
 * gate_up/down: (n_layers x n_experts) addresses, NULL where the expert is not resident (then `resolve` is called).
 * Returns 0, or the non-zero code of `resolve` (or -1: an expert still missing after it) with logits unset. */
int lm_step_f32(const lm_step_config *c, const void *const *lp, const float *const *gate_up,
                const float *const *down, const float *embed, const float *final_norm, const float *lm_head,
                const float *cos, const float *sin, int pos, float *logits, int *chosen, float *scratch,
                lm_resolve_fn resolve)
{
    const int dim = c->dim, nh = c->n_heads, nkv = c->n_kv_heads, hd = c->head_dim, ne = c->n_experts,
              k = c->top_k, ff = c->expert_ff, maxseq = c->max_seq_length, nt = c->threads;
    const float eps = c->eps, clip = c->clip;
    const int qo = nh * hd, kvo = nkv * hd, nqkv = qo + 2 * kvo, n = pos + 1;
    float *x = scratch, *xn = x + dim, *xin = xn + dim, *qkv = xin + dim, *att = qkv + nqkv, *probs = att + qo, *h = probs + ne,
          *sc = h + (size_t)k * ff,  /* sc: nh x maxseq scores */
          *hs = sc + (size_t)nh * maxseq, *ys = hs + 2 * (size_t)c->shared_ff;  /* the shared expert's */
    const float scale = 1.f / sqrtf((float)hd);
    memcpy(x, embed, sizeof(float) * dim);
    for (int l = 0; l < c->n_layers; l++) {
        const void *const *p = lp + (size_t)l * P_N;
        float *kc = (float *)p[P_KCACHE], *vc = (float *)p[P_VCACHE];
        rmsnorm(x, p[P_ATTN_NORM], xn, dim, eps);
        const int *dt = c->dense_types ? c->dense_types + 4 * l : NULL;
        if (dt) {
            const float *b = p[P_BQKV];
            lm_qgemv(dt[0], p[P_WQKV], xn, b, qkv, qo, dim, nt);
            lm_qgemv(dt[1], p[P_WK], xn, b ? b + qo : NULL, qkv + qo, kvo, dim, nt);
            lm_qgemv(dt[2], p[P_WV], xn, b ? b + qo + kvo : NULL, qkv + qo + kvo, kvo, dim, nt);
        } else
            lm_gemv_f32(p[P_WQKV], xn, p[P_BQKV], qkv, nqkv, dim, nt);
        float *q = qkv, *kk = qkv + qo, *v = qkv + qo + kvo;
        if (c->qk_norm == 2) {  /* over the whole projections (olmoe) */
            rmsnorm(q, p[P_QNORM], q, qo, eps);
            rmsnorm(kk, p[P_KNORM], kk, kvo, eps);
        }
        if (clip > 0.f)
            for (int i = 0; i < nqkv; i++)
                qkv[i] = qkv[i] < -clip ? -clip : qkv[i] > clip ? clip : qkv[i];
        for (int i = 0; i < nh; i++) {
            if (c->qk_norm == 1)
                rmsnorm(q + i * hd, p[P_QNORM], q + i * hd, hd, eps);
            rope(q + i * hd, cos, sin, hd);
        }
        for (int i = 0; i < nkv; i++) {
            if (c->qk_norm == 1)
                rmsnorm(kk + i * hd, p[P_KNORM], kk + i * hd, hd, eps);
            rope(kk + i * hd, cos, sin, hd);
            memcpy(kc + ((size_t)i * maxseq + pos) * hd, kk + i * hd, sizeof(float) * hd);
            memcpy(vc + ((size_t)i * maxseq + pos) * hd, v + i * hd, sizeof(float) * hd);
        }
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int i = 0; i < nh; i++) {
            const int g = i / (nh / nkv);
            const float *qi = q + i * hd, *kb = kc + (size_t)g * maxseq * hd, *vb = vc + (size_t)g * maxseq * hd;
            float *s = sc + (size_t)i * maxseq, *o = att + i * hd, mx = -INFINITY, sum = 0.f;
            for (int t = 0; t < n; t++) {
                s[t] = dot1(kb + (size_t)t * hd, qi, hd) * scale;
                mx = s[t] > mx ? s[t] : mx;
            }
            for (int t = 0; t < n; t++)
                sum += (s[t] = expf(s[t] - mx));
            for (int d = 0; d < hd; d++)
                o[d] = 0.f;
            for (int t = 0; t < n; t++) {
                const float w = s[t] / sum, *vt = vb + (size_t)t * hd;
                for (int d = 0; d < hd; d++)
                    o[d] += w * vt[d];
            }
        }
        if (dt)
            lm_qgemv(dt[3], p[P_WO], att, NULL, xn, dim, qo, nt);
        else
            lm_gemv_f32(p[P_WO], att, NULL, xn, dim, qo, nt);
        for (int i = 0; i < dim; i++)
            x[i] += xn[i];
        rmsnorm(x, p[P_FFN_NORM], xin, dim, eps);
        /* routing: softmax over all experts, top-k, renormalised (mixtral's softmax over the top-k logits is
         * the same numbers) */
        lm_gemv_f32(p[P_ROUTER], xin, NULL, probs, ne, dim, 1);
        float mx = -INFINITY, sum = 0.f;
        for (int e = 0; e < ne; e++)
            mx = probs[e] > mx ? probs[e] : mx;
        for (int e = 0; e < ne; e++)
            sum += (probs[e] = expf(probs[e] - mx));
        int *ch = chosen + (size_t)l * k;
        float w[64], wsum = 0.f;
        int kept = k;
        if (c->forced) {
            kept = 0;
            for (int j = 0; j < k; j++)
                if (c->forced[(size_t)l * k + j] >= 0)
                    ch[kept++] = c->forced[(size_t)l * k + j];
        } else {
            for (int j = 0; j < k; j++) {  /* k small: selection; ties to the lower id, as torch.topk on CPU */
                int best = -1;
                for (int e = 0; e < ne; e++) {
                    int taken = 0;
                    for (int m = 0; m < j; m++)
                        taken |= ch[m] == e;
                    if (!taken && (best < 0 || probs[e] > probs[best]))
                        best = e;
                }
                ch[j] = best;
            }
            /* with top_p, as MoE.route: slot j stays while the better slots' mass is below it */
            if (c->top_p > 0.f && c->top_p < 1.f) {
                float before = 0.f;
                for (kept = 1; kept < k; kept++) {
                    before += probs[ch[kept - 1]] / sum;
                    if (!(before < c->top_p))
                        break;
                }
            }
        }
        for (int a = 1; a < kept; a++)  /* ascending ids: the torch path's summation order */
            for (int b = a; b > 0 && ch[b] < ch[b - 1]; b--) {
                int t = ch[b]; ch[b] = ch[b - 1]; ch[b - 1] = t;
            }
        for (int j = kept; j < k; j++)
            ch[j] = -1;  /* dropped, as the torch path's -1 ids */
        for (int j = 0; j < kept; j++)
            wsum += (w[j] = probs[ch[j]] / sum);
        if (c->renormalise)
            for (int j = 0; j < kept; j++)
                w[j] /= wsum;
        const float *gu[64], *dn[64];
        int missing = 0;
        for (int j = 0; j < kept; j++)
            missing |= gate_up[(size_t)l * ne + ch[j]] == NULL;
        if (missing) {  /* the table may change in the call: read the addresses after it */
            const int rc = resolve ? resolve(l, ch, kept) : -1;
            if (rc)
                return rc;
        }
        for (int j = 0; j < kept; j++) {
            gu[j] = gate_up[(size_t)l * ne + ch[j]];
            dn[j] = down[(size_t)l * ne + ch[j]];
            if (gu[j] == NULL || dn[j] == NULL)
                return -1;
        }
        for (int i = 0; i < dim; i++)
            xn[i] = 0.f;
        if (c->gu_types)
            lm_moe_decode_q(kept, c->gu_types[l], c->down_types[l], (const void *const *)gu, (const void *const *)dn,
                            w, xin, xn, h, dim, ff, nt);
        else
            lm_moe_decode_f32(kept, gu, dn, w, xin, xn, h, dim, ff, nt);
        if (p[P_SH_GATE]) {  /* a dense expert every token uses, scaled by sigmoid(its own gate), as MoE.forward */
            const int sf = c->shared_ff;
            lm_gemv_f32(p[P_SH_GATE], xin, NULL, hs, sf, dim, nt);
            lm_gemv_f32(p[P_SH_UP], xin, NULL, hs + sf, sf, dim, nt);
            for (int i = 0; i < sf; i++)
                hs[i] = silu(hs[i]) * hs[sf + i];
            lm_gemv_f32(p[P_SH_DOWN], hs, NULL, ys, dim, sf, nt);
            const float g = 1.f / (1.f + expf(-dot1(p[P_SH_GW], xin, dim)));
            for (int i = 0; i < dim; i++)
                xn[i] += g * ys[i];
        }
        for (int i = 0; i < dim; i++)
            x[i] += xn[i];
    }
    rmsnorm(x, final_norm, xn, dim, eps);
    if (c->dense_types)
        lm_qgemv(c->head_type, lm_head, xn, NULL, logits, c->vocab_size, dim, nt);
    else
        lm_gemv_f32(lm_head, xn, NULL, logits, c->vocab_size, dim, nt);
    return 0;
}


/* ---- Prompt processing (prefill): many tokens through the same weights ----------------------------------------
 *
 * torch's float32 matmul reads a 6 MB expert matrix at ~5 GB/s when it multiplies fewer than ~32 rows (a chat's next
 * turn gives each expert a handful of tokens): a quarter of what memory delivers; with ~100 rows it runs at about
 * half the FMA peak. Here the activations of up to 16 tokens are packed transposed (a panel: k x 16 floats), and a
 * tile of 6 weight rows x 16 tokens is 12 vector sums updated by 12 FMAs per step of k from 2 vector loads and 6
 * broadcasts (the layout of BLIS's sgemm micro-kernels): no horizontal sums, FMA-bound with many tokens. A row
 * block's weights stay in L1 while every panel of a chunk passes through it, so each weight is read from memory once
 * per chunk: bandwidth-bound with few tokens. Rows are split over torch's OpenMP threads as in the decode kernels;
 * the tokens of a call share every weight read. */

typedef float lm_v8 __attribute__((vector_size(32)));

enum {
    LM_MR = 6,       /* weight rows per tile */
    LM_NR = 16,      /* tokens per panel (two vectors) */
    LM_CHUNK = 4,    /* panels per pass over the weights: 64 tokens' activations stay in L2 */
};

static inline lm_v8 lm_ld8(const float *p)
{
    lm_v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void lm_st8(float *p, lm_v8 v) { memcpy(p, &v, sizeof v); }

/* The panels of m rows of a (row length k; row i at a + idx[i] * lda, or a + i * lda without idx), transposed:
 * panel p holds element (token p*16 + t, column c) at p[c * 16 + t], zero past the last token. */
static void lm_pack(const float *a, size_t lda, const int *idx, int m, int k, float *panels)
{
    const int np = (m + LM_NR - 1) / LM_NR;
    for (int p = 0; p < np; p++) {
        float *dst = panels + (size_t)p * k * LM_NR;
        for (int t = 0; t < LM_NR; t++) {
            const int i = p * LM_NR + t;
            if (i >= m) {
                for (int c = 0; c < k; c++)
                    dst[(size_t)c * LM_NR + t] = 0.f;
                continue;
            }
            const float *src = a + (size_t)(idx ? idx[i] : i) * lda;
            for (int c = 0; c < k; c++)
                dst[(size_t)c * LM_NR + t] = src[c];
        }
    }
}

/* tile[j][t] = w_j . token t, for the 6 rows w[j] (length k) and one panel; nv: vectors of tokens to compute (1 when
 * the panel holds at most 8 tokens: half the arithmetic) */
static inline void lm_tile(const float *const w[LM_MR], const float *panel, int k, int nv, float tile[LM_MR][LM_NR],
                           const float *next)
{
    lm_v8 c00 = {0}, c01 = {0}, c10 = {0}, c11 = {0}, c20 = {0}, c21 = {0};
    lm_v8 c30 = {0}, c31 = {0}, c40 = {0}, c41 = {0}, c50 = {0}, c51 = {0};
    const float *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3], *w4 = w[4], *w5 = w[5];
    if (nv == 2) {
        for (int i = 0; i < k; i++) {
            if (next && (i & 15) == 0)
                for (int j = 0; j < LM_MR; j++)
                    __builtin_prefetch(next + (size_t)j * k + i, 0, 0);
            const lm_v8 a = lm_ld8(panel + (size_t)i * LM_NR), b = lm_ld8(panel + (size_t)i * LM_NR + 8);
            c00 += w0[i] * a; c01 += w0[i] * b;
            c10 += w1[i] * a; c11 += w1[i] * b;
            c20 += w2[i] * a; c21 += w2[i] * b;
            c30 += w3[i] * a; c31 += w3[i] * b;
            c40 += w4[i] * a; c41 += w4[i] * b;
            c50 += w5[i] * a; c51 += w5[i] * b;
        }
    } else {
        for (int i = 0; i < k; i++) {
            if (next && (i & 15) == 0)
                for (int j = 0; j < LM_MR; j++)
                    __builtin_prefetch(next + (size_t)j * k + i, 0, 0);
            const lm_v8 a = lm_ld8(panel + (size_t)i * LM_NR);
            c00 += w0[i] * a;
            c10 += w1[i] * a;
            c20 += w2[i] * a;
            c30 += w3[i] * a;
            c40 += w4[i] * a;
            c50 += w5[i] * a;
        }
    }
    lm_st8(tile[0], c00); lm_st8(tile[0] + 8, c01);
    lm_st8(tile[1], c10); lm_st8(tile[1] + 8, c11);
    lm_st8(tile[2], c20); lm_st8(tile[2] + 8, c21);
    lm_st8(tile[3], c30); lm_st8(tile[3] + 8, c31);
    lm_st8(tile[4], c40); lm_st8(tile[4] + 8, c41);
    lm_st8(tile[5], c50); lm_st8(tile[5] + 8, c51);
}

/* this thread's share [*lo, *hi) of n rows, cut at multiples of LM_MR */
static void lm_share(int n, int *lo, int *hi)
{
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int blocks = (n + LM_MR - 1) / LM_MR;
    const int b0 = (int)((long)blocks * t / nt), b1 = (int)((long)blocks * (t + 1) / nt);
    *lo = b0 * LM_MR;
    *hi = b1 * LM_MR < n ? b1 * LM_MR : n;
}

/* Pointers to the 6 rows from row r of w (stride ld); past row n they repeat the last row, whose results the
 * callers do not store (a partial tile costs a whole one's arithmetic, never a read out of bounds) */
static inline void lm_rows(const float *w, size_t ld, int r, int n, const float *p[LM_MR])
{
    for (int j = 0; j < LM_MR; j++)
        p[j] = w + (size_t)(r + j < n ? r + j : n - 1) * ld;
}

/* Scratch floats lm_linear_f32 and lm_expert_prefill_f32 need for m tokens, rows of length k, hidden size f */
size_t lm_prefill_scratch(int m, int k, int f)
{
    const size_t np = (size_t)(m + LM_NR - 1) / LM_NR;
    return np * LM_NR * ((size_t)k + (size_t)f);
}

/* y (m x n, row stride ldy) = x (m x k, contiguous) . w^T (w: n x k) + bias (n, or NULL); scratch: see above */
void lm_linear_f32(const float *w, const float *bias, const float *x, float *y, int m, int n, int k, int ldy,
                   float *scratch, int threads)
{
    const int np = (m + LM_NR - 1) / LM_NR;
    lm_pack(x, (size_t)k, NULL, m, k, scratch);
#pragma omp parallel num_threads(threads)
    {
        int lo, hi;
        lm_share(n, &lo, &hi);
        const float *wp[LM_MR];
        float tile[LM_MR][LM_NR];
        for (int p0 = 0; p0 < np; p0 += LM_CHUNK)
            for (int r = lo; r < hi; r += LM_MR) {
                lm_rows(w, (size_t)k, r, hi, wp);
                for (int p = p0; p < np && p < p0 + LM_CHUNK; p++) {
                    const int nt = m - p * LM_NR < LM_NR ? m - p * LM_NR : LM_NR;
                    lm_tile(wp, scratch + (size_t)p * k * LM_NR, k, nt > 8 ? 2 : 1, tile,
                            p == p0 && r + 2 * LM_MR <= hi ? w + (size_t)(r + LM_MR) * k : NULL);
                    for (int j = 0; j < LM_MR && r + j < hi; j++)
                        for (int t = 0; t < nt; t++)
                            y[(size_t)(p * LM_NR + t) * ldy + r + j] = tile[j][t] + (bias ? bias[r + j] : 0.f);
                }
            }
    }
}

/* One expert over the m tokens routed to it (tok: their rows in x and out, rows of length k), added into out:
 *   out[tok[t]] += scale[t] * down . (silu(gate . x[tok[t]]) * (up . x[tok[t]]))
 * gate_up is (2f x k): the f gate rows, then the f up rows; down is (k x f); scratch: lm_prefill_scratch(m, k, f).
 * The hidden rows are split over the threads, then (after one barrier) the output rows: each output element gets
 * one addition per call, so calling a layer's experts in ascending order sums them in that order, as the torch path
 * does. */
void lm_expert_prefill_f32(const float *gate_up, const float *down, const float *x, const int *tok,
                           const float *scale, int m, float *out, int k, int f, float *scratch, int threads)
{
    const int np = (m + LM_NR - 1) / LM_NR;
    float *xp = scratch, *hp = scratch + (size_t)np * LM_NR * k;  /* packed activations, packed hidden */
    lm_pack(x, (size_t)k, tok, m, k, xp);
#pragma omp parallel num_threads(threads)
    {
        int lo, hi;
        const float *gw[LM_MR], *uw[LM_MR];
        float g[LM_MR][LM_NR], u[LM_MR][LM_NR];
        lm_share(f, &lo, &hi);
        for (int p0 = 0; p0 < np; p0 += LM_CHUNK)
            for (int r = lo; r < hi; r += LM_MR) {
                lm_rows(gate_up, (size_t)k, r, hi, gw);
                lm_rows(gate_up + (size_t)f * k, (size_t)k, r, hi, uw);
                for (int p = p0; p < np && p < p0 + LM_CHUNK; p++) {
                    const int nv = m - p * LM_NR > 8 ? 2 : 1;
                    lm_tile(gw, xp + (size_t)p * k * LM_NR, k, nv, g,
                            p == p0 && r + 2 * LM_MR <= hi ? gate_up + (size_t)(r + LM_MR) * k : NULL);
                    lm_tile(uw, xp + (size_t)p * k * LM_NR, k, nv, u,
                            p == p0 && r + 2 * LM_MR <= hi ? gate_up + (size_t)(f + r + LM_MR) * k : NULL);
                    float *hq = hp + (size_t)p * f * LM_NR;  /* written packed: the down projection's panel */
                    for (int j = 0; j < LM_MR && r + j < hi; j++)
                        for (int t = 0; t < LM_NR; t++)
                            hq[(size_t)(r + j) * LM_NR + t] = silu(g[j][t]) * u[j][t];
                }
            }
#pragma omp barrier
        lm_share(k, &lo, &hi);
        for (int p0 = 0; p0 < np; p0 += LM_CHUNK)
            for (int r = lo; r < hi; r += LM_MR) {
                lm_rows(down, (size_t)f, r, hi, gw);
                for (int p = p0; p < np && p < p0 + LM_CHUNK; p++) {
                    const int nt = m - p * LM_NR < LM_NR ? m - p * LM_NR : LM_NR;
                    lm_tile(gw, hp + (size_t)p * f * LM_NR, f, nt > 8 ? 2 : 1, g,
                            p == p0 && r + 2 * LM_MR <= hi ? down + (size_t)(r + LM_MR) * f : NULL);
                    for (int j = 0; j < LM_MR && r + j < hi; j++)
                        for (int t = 0; t < nt; t++)
                            out[(size_t)tok[p * LM_NR + t] * k + r + j] += scale[p * LM_NR + t] * g[j][t];
                }
            }
    }
}
