/* Float32 matrix-vector products for one-token decode steps, the part of a decode step that is all weight reads.
 *
 * torch's gemv for one token runs at ~22 GB/s on the 2-core machines we measure on, llama.cpp's at ~26 GB/s: the
 * difference is a fixed cost per call (thread wake-ups, a gemm path for m = 1) on matrices of a few MB. These
 * kernels read each weight row once, four rows at a time against the same activations (four independent sums keep
 * the FMA units busy and four sequential streams keep the prefetchers busy), and run a whole MoE layer's experts in
 * one parallel region with one barrier, split by rows over torch's own OpenMP threads (this library is loaded after
 * torch, so `libgomp.so.1` resolves to the runtime torch already runs: one thread pool, no oversubscription).
 *
 * Built at first use with the system C compiler for the machine it runs on (`-march=native`) and loaded with
 * ctypes (see native.py); without a compiler the engine keeps torch's kernels.
 */
#include <math.h>
#include <stddef.h>
#include <omp.h>

#define UNROLL 4

/* out[j] = w[j] . x for the 4 rows starting at w (row stride ld) */
static inline void dot4(const float *restrict w, size_t ld, const float *restrict x, int k, float *restrict out)
{
    const float *restrict w0 = w, *restrict w1 = w + ld, *restrict w2 = w + 2 * ld, *restrict w3 = w + 3 * ld;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int i = 0; i < k; i++) {
        const float xi = x[i];
        s0 += w0[i] * xi;
        s1 += w1[i] * xi;
        s2 += w2[i] * xi;
        s3 += w3[i] * xi;
    }
    out[0] = s0;
    out[1] = s1;
    out[2] = s2;
    out[3] = s3;
}

static inline float dot1(const float *restrict w, const float *restrict x, int k)
{
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < k; i++)
        s += w[i] * x[i];
    return s;
}

/* rows [lo, hi) of w (n x k, row-major) times x into y: y[r] = w[r] . x (+ bias[r]) */
static void rows(const float *w, const float *x, const float *bias, float *y, int lo, int hi, int k)
{
    int r = lo;
    float acc[UNROLL];
    for (; r + UNROLL <= hi; r += UNROLL) {
        dot4(w + (size_t)r * k, (size_t)k, x, k, acc);
        for (int j = 0; j < UNROLL; j++)
            y[r + j] = bias ? acc[j] + bias[r + j] : acc[j];
    }
    for (; r < hi; r++)
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
        float g[UNROLL], u[UNROLL];
        for (int i = lo; i < hi;) {
            const int e = i / f, r = i % f;
            const float *gw = gate_up[e] + (size_t)r * k, *uw = gate_up[e] + (size_t)(f + r) * k;
            float *he = h + (size_t)e * f;
            if (r + UNROLL <= f && i + UNROLL <= hi) {
                dot4(gw, (size_t)k, x, k, g);
                dot4(uw, (size_t)k, x, k, u);
                for (int j = 0; j < UNROLL; j++)
                    he[r + j] = silu(g[j]) * u[j];
                i += UNROLL;
            } else {
                he[r] = silu(dot1(gw, x, k)) * dot1(uw, x, k);
                i += 1;
            }
        }
#pragma omp barrier
        share(k, &lo, &hi);
        float acc[UNROLL];
        for (int e = 0; e < n_exp; e++) {
            const float *dw = down[e], *he = h + (size_t)e * f;
            const float s = scale[e];
            int r = lo;
            for (; r + UNROLL <= hi; r += UNROLL) {
                dot4(dw + (size_t)r * f, (size_t)f, he, f, acc);
                for (int j = 0; j < UNROLL; j++)
                    out[r + j] += s * acc[j];
            }
            for (; r < hi; r++)
                out[r] += s * dot1(dw + (size_t)r * f, he, f);
        }
    }
}
