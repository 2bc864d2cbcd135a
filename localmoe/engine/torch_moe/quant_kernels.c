/* Matrix-vector products and MoE decode with weights kept in their GGUF quantisation (issue #16), included by
 * moe_kernels.c (it uses share(), silu(), UNROLL and dot1 from there, and lm_step_f32 calls it).
 *
 * Supported ggml types: F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, MXFP4. lm_dequant is bit-exact
 * with gguf.quants.dequantize (= llama.cpp's dequantize_row_*): every product and difference is done in float32 in
 * the same order, with contraction to FMA switched off in that code.
 *
 * ACTIVATIONS: 8-bit by default, float32 on request (lm_qset_activations(0); ggml_quants.set_activations("float")).
 * 8-bit: x is quantised once per call to int8 blocks of 32 with a float scale each (llama.cpp's q8_0 rounding) and
 * the weights enter integer dot products (AVX2 maddubs; AVX512-VNNI dpbusd where present), as llama.cpp does: the
 * result is W . x^ (x^: x as quantised) up to float rounding, within |W| . (scale/2) of W . x (~1e-3 of sum|w*x| for
 * Gaussian x). Float32: each weight is unpacked to float in registers and FMA'd with x, so the result is W . x up to
 * summation order (~1e-8 of sum|w*x| measured). Decided by speed, on 2 cores of an AMD EPYC (AVX-512 VNNI) with ~26-37 GB/s
 * of read bandwidth: one thread, matrix in cache, Gweights/s float -> int8: Q4_K 11.3 -> 23.4, Q5_K 9.8 -> 19.8,
 * Q6_K 8.4 -> 14.5, Q8_0 12.5-16.9 -> 19.6-20.4, Q4_0 13.1 -> 19.6. With float activations Q4_K tops out near
 * 13 GB/s on two cores, half the memory bandwidth llama.cpp's kernels reach; 8-bit ones reach it (see
 * benchmarks/RESULTS.md, "Kernels for GGUF-quantised experts"). Types without an integer kernel (F32, F16, Q4_1,
 * Q5_0, Q5_1, MXFP4) always compute with float32 x; so does everything without AVX2.
 */
#include <stdint.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif

enum {
    QT_F32 = 0, QT_F16 = 1, QT_Q4_0 = 2, QT_Q4_1 = 3, QT_Q5_0 = 6, QT_Q5_1 = 7, QT_Q8_0 = 8, QT_Q4_K = 12,
    QT_Q5_K = 13, QT_Q6_K = 14, QT_MXFP4 = 39
};
#define QK_K 256

/* IEEE half to float: exact for every finite value, subnormals included (they are normal in float32). */
static inline float qk_f16(const uint8_t *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    uint32_t bits;
    if (e == 0x1f)
        bits = sign | 0x7f800000u | (m << 13);
    else if (e)
        bits = sign | ((e + 112) << 23) | (m << 13);
    else if (!m)
        bits = sign;
    else {  /* subnormal: m * 2^-24, a small integer times a power of two, exact in float */
        float v = (float)m * 5.9604644775390625e-8f;
        memcpy(&bits, &v, 4);
        bits |= sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* ggml_e8m0_to_fp32_half: 2^(e-128) as float (the MXFP4 values are stored doubled) */
static inline float qk_e8m0_half(uint8_t e)
{
    const uint32_t bits = e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static const int8_t qk_mxfp4[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

/* Q4_K/Q5_K 6-bit scales and mins of the eight 32-weight sub-blocks (llama.cpp's get_scale_min_k4) */
static inline void qk_scale_min(const uint8_t *s, uint8_t sc[8], uint8_t mn[8])
{
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 15) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
}

/* (elements, bytes) of one block, or 0 for a type not handled here */
static int qk_block(int type, int *bytes)
{
    switch (type) {
    case QT_F32: *bytes = 4; return 1;
    case QT_F16: *bytes = 2; return 1;
    case QT_Q4_0: *bytes = 18; return 32;
    case QT_Q4_1: *bytes = 20; return 32;
    case QT_Q5_0: *bytes = 22; return 32;
    case QT_Q5_1: *bytes = 24; return 32;
    case QT_Q8_0: *bytes = 34; return 32;
    case QT_Q4_K: *bytes = 144; return QK_K;
    case QT_Q5_K: *bytes = 176; return QK_K;
    case QT_Q6_K: *bytes = 210; return QK_K;
    case QT_MXFP4: *bytes = 17; return 32;
    default: *bytes = 0; return 0;
    }
}

int lm_qtype_supported(int type)
{
    int bytes;
    return qk_block(type, &bytes) > 0;
}

static size_t qk_row_bytes(int type, int k)
{
    int bytes;
    const int n = qk_block(type, &bytes);
    return n ? (size_t)(k / n) * bytes : 0;
}

/* --- exact dequantisation ------------------------------------------------------------------------------------------
 * gguf (numpy) rounds after every product and difference; an FMA would round once and differ in the last bit. */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

static void qk_dq_block(int type, const uint8_t *b, float *y)
{
    switch (type) {
    case QT_Q4_0: {
        const float d = qk_f16(b);
        for (int j = 0; j < 16; j++) {
            y[j] = d * (float)((b[2 + j] & 15) - 8);
            y[j + 16] = d * (float)((b[2 + j] >> 4) - 8);
        }
        break;
    }
    case QT_Q4_1: {
        const float d = qk_f16(b), m = qk_f16(b + 2);
        for (int j = 0; j < 16; j++) {
            y[j] = d * (float)(b[4 + j] & 15) + m;
            y[j + 16] = d * (float)(b[4 + j] >> 4) + m;
        }
        break;
    }
    case QT_Q5_0: {
        const float d = qk_f16(b);
        uint32_t qh;
        memcpy(&qh, b + 2, 4);
        for (int j = 0; j < 16; j++) {
            y[j] = d * (float)((int)((b[6 + j] & 15) | (((qh >> j) & 1) << 4)) - 16);  /* qh is unsigned */
            y[j + 16] = d * (float)((int)((b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16);
        }
        break;
    }
    case QT_Q5_1: {
        const float d = qk_f16(b), m = qk_f16(b + 2);
        uint32_t qh;
        memcpy(&qh, b + 4, 4);
        for (int j = 0; j < 16; j++) {
            y[j] = d * (float)((b[8 + j] & 15) | (((qh >> j) & 1) << 4)) + m;
            y[j + 16] = d * (float)((b[8 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) + m;
        }
        break;
    }
    case QT_Q8_0: {
        const float d = qk_f16(b);
        for (int j = 0; j < 32; j++)
            y[j] = (float)(int8_t)b[2 + j] * d;
        break;
    }
    case QT_Q4_K:
    case QT_Q5_K: {
        const float d = qk_f16(b), dmin = qk_f16(b + 2);
        uint8_t sc[8], mn[8];
        qk_scale_min(b + 4, sc, mn);
        const uint8_t *qh = b + 16, *q = type == QT_Q5_K ? b + 48 : b + 16;
        for (int c = 0; c < 4; c++, q += 32, y += 64) {
            const float d0 = d * (float)sc[2 * c], m0 = dmin * (float)mn[2 * c];
            const float d1 = d * (float)sc[2 * c + 1], m1 = dmin * (float)mn[2 * c + 1];
            for (int i = 0; i < 32; i++) {
                int lo = q[i] & 15, hi = q[i] >> 4;
                if (type == QT_Q5_K) {
                    lo |= ((qh[i] >> (2 * c)) & 1) << 4;
                    hi |= ((qh[i] >> (2 * c + 1)) & 1) << 4;
                }
                y[i] = d0 * (float)lo - m0;
                y[i + 32] = d1 * (float)hi - m1;
            }
        }
        break;
    }
    case QT_Q6_K: {
        const float d = qk_f16(b + 208);
        for (int h = 0; h < 2; h++, y += 128) {
            const uint8_t *ql = b + 64 * h, *qh = b + 128 + 32 * h;
            const int8_t *sc = (const int8_t *)(b + 192 + 8 * h);
            for (int i = 0; i < 32; i++) {
                const int s = i / 16;
                const int q0 = ((ql[i] & 15) | ((qh[i] & 3) << 4)) - 32;
                const int q1 = ((ql[i + 32] & 15) | (((qh[i] >> 2) & 3) << 4)) - 32;
                const int q2 = ((ql[i] >> 4) | (((qh[i] >> 4) & 3) << 4)) - 32;
                const int q3 = ((ql[i + 32] >> 4) | (((qh[i] >> 6) & 3) << 4)) - 32;
                y[i] = (d * (float)sc[s]) * (float)q0;
                y[i + 32] = (d * (float)sc[s + 2]) * (float)q1;
                y[i + 64] = (d * (float)sc[s + 4]) * (float)q2;
                y[i + 96] = (d * (float)sc[s + 6]) * (float)q3;
            }
        }
        break;
    }
    case QT_MXFP4: {
        const float d = qk_e8m0_half(b[0]);
        for (int j = 0; j < 16; j++) {
            y[j] = d * (float)qk_mxfp4[b[1 + j] & 15];
            y[j + 16] = d * (float)qk_mxfp4[b[1 + j] >> 4];
        }
        break;
    }
    case QT_F16:
        *y = qk_f16(b);
        break;
    case QT_F32:
        memcpy(y, b, 4);
        break;
    }
}

#if defined(__clang__)
#pragma STDC FP_CONTRACT ON
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

/* dst (n floats) = src (n elements of `type`, n a multiple of its block) dequantised */
void lm_dequant(int type, const void *src, float *dst, long n)
{
    int bytes;
    const int be = qk_block(type, &bytes);
    if (!be)
        return;
    const uint8_t *b = src;
    if (type == QT_F32) {
        memcpy(dst, src, sizeof(float) * (size_t)n);
        return;
    }
    for (long i = 0; i < n / be; i++)
        qk_dq_block(type, b + (size_t)i * bytes, dst + (size_t)i * be);
}

/* --- dot products of one packed row with the activations ------------------------------------------------------------
 * Two ways (lm_qset_activations): float activations, each weight unpacked to float32 in registers and FMA'd with x;
 * or 8-bit activations, x quantised once per call to int8 blocks of 32 with a float scale each (llama.cpp's q8_0)
 * and integer dot products (AVX2 maddubs, or AVX512-VNNI dpbusd where there is one). Affine types (scale*q - min)
 * take the min's part from sums of x over each 32 elements (of x as quantised, in 8-bit mode). Without AVX2 every type goes
 * through qk_dot_generic (dequantise a block, then dot1): correct everywhere, fast where it matters. */
typedef struct {
    const float *x;   /* k floats */
    const float *xs;  /* k/32 sums of x (of q*d where x is quantised) over each 32 elements: affine types only */
    const int8_t *q;  /* k int8: x quantised (8-bit activations only) */
    const float *d;   /* k/32 scales of q */
} qk_act;

typedef float (*qk_rowdot)(const uint8_t *w, const qk_act *a, int k);

static int qk_q8_default = 1;  /* lm_qset_activations */

static float qk_dot_generic(int type, const uint8_t *w, const float *x, int k)
{
    int bytes;
    const int be = qk_block(type, &bytes);
    float buf[256], s = 0.f;
    if (be == 1) {  /* F16 */
        for (int i = 0; i < k; i += 256) {
            const int m = k - i < 256 ? k - i : 256;
            for (int j = 0; j < m; j++)
                buf[j] = qk_f16(w + 2 * (size_t)(i + j));
            s += dot1(buf, x + i, m);
        }
        return s;
    }
    for (int i = 0; i < k; i += be, w += bytes) {
        qk_dq_block(type, w, buf);
        s += dot1(buf, x + i, be);
    }
    return s;
}

static float qk_dot_f32(const uint8_t *w, const qk_act *a, int k) { return dot1((const float *)w, a->x, k); }

#define QK_GENERIC(name, type) \
    static float name(const uint8_t *w, const qk_act *a, int k) { return qk_dot_generic(type, w, a->x, k); }
QK_GENERIC(qk_dot_f16, QT_F16)
QK_GENERIC(qk_dot_mxfp4, QT_MXFP4)
QK_GENERIC(qk_gen_q4_0, QT_Q4_0)
QK_GENERIC(qk_gen_q4_1, QT_Q4_1)
QK_GENERIC(qk_gen_q5_0, QT_Q5_0)
QK_GENERIC(qk_gen_q5_1, QT_Q5_1)
QK_GENERIC(qk_gen_q8_0, QT_Q8_0)
QK_GENERIC(qk_gen_q4_k, QT_Q4_K)
QK_GENERIC(qk_gen_q5_k, QT_Q5_K)
QK_GENERIC(qk_gen_q6_k, QT_Q6_K)

#if defined(__AVX2__) && defined(__FMA__)
#define QK_AVX2 1
#include <immintrin.h>

static inline __m256 qk_cvs(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }  /* low 8 int8 */
static inline __m256 qk_cvu(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }  /* low 8 uint8 */
static inline __m128i qk_hi(__m128i v) { return _mm_unpackhi_epi64(v, v); }
static inline __m128i qk_ld16(const void *p) { return _mm_loadu_si128((const __m128i *)p); }
static inline __m256i qk_ld32(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
#define QK_X(p) _mm256_loadu_ps(p)

static inline float qk_hsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 bytes (little-endian in v) as 8 floats */
static inline __m256 qk_cvu64(uint64_t v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)v))); }
/* lane j of v in every lane */
static inline __m256 qk_lane(__m256 v, int j) { return _mm256_permutevar8x32_ps(v, _mm256_set1_epi32(j)); }

/* the eight 6-bit scales and mins of a Q4_K/Q5_K block as 8 bytes each (qk_scale_min, a word at a time) */
static inline void qk_scale_min8(const uint8_t *s, uint64_t *sc, uint64_t *mn)
{
    uint32_t u0, u1, u2;
    memcpy(&u0, s, 4);
    memcpy(&u1, s + 4, 4);
    memcpy(&u2, s + 8, 4);
    const uint32_t lo6 = 0x3f3f3f3fu, lo4 = 0x0f0f0f0fu, lo2 = 0x03030303u;
    *sc = (uint64_t)(u0 & lo6) | (uint64_t)((u2 & lo4) | (((u0 >> 6) & lo2) << 4)) << 32;
    *mn = (uint64_t)(u1 & lo6) | (uint64_t)(((u2 >> 4) & lo4) | (((u1 >> 6) & lo2) << 4)) << 32;
}

/* 16 weights (elements 0-7 and 8-15 of v, int8 or uint8) times x[0..15] */
static inline __m256 qk_fs16(__m128i v, const float *x, __m256 t)
{
    return _mm256_fmadd_ps(qk_cvs(qk_hi(v)), QK_X(x + 8), _mm256_fmadd_ps(qk_cvs(v), QK_X(x), t));
}
static inline __m256 qk_fu16(__m128i v, const float *x, __m256 t)
{
    return _mm256_fmadd_ps(qk_cvu(qk_hi(v)), QK_X(x + 8), _mm256_fmadd_ps(qk_cvu(v), QK_X(x), t));
}

/* float activations ------------------------------------------------------------------------------------------------ */

static float qk_fdot_q8_0(const uint8_t *w, const qk_act *a, int k)
{
    const float *x = a->x;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 64 <= k; i += 64, w += 68) {
        __m256 t0 = qk_fs16(qk_ld16(w + 2), x + i, _mm256_setzero_ps());
        __m256 t1 = qk_fs16(qk_ld16(w + 36), x + i + 32, _mm256_setzero_ps());
        t0 = qk_fs16(qk_ld16(w + 18), x + i + 16, t0);
        t1 = qk_fs16(qk_ld16(w + 52), x + i + 48, t1);
        acc0 = _mm256_fmadd_ps(t0, _mm256_set1_ps(qk_f16(w)), acc0);
        acc1 = _mm256_fmadd_ps(t1, _mm256_set1_ps(qk_f16(w + 34)), acc1);
    }
    if (i < k) {
        const __m256 t = qk_fs16(qk_ld16(w + 18), x + i + 16, qk_fs16(qk_ld16(w + 2), x + i, _mm256_setzero_ps()));
        acc0 = _mm256_fmadd_ps(t, _mm256_set1_ps(qk_f16(w)), acc0);
    }
    return qk_hsum(_mm256_add_ps(acc0, acc1));
}

/* Q4_0 / Q4_1 / Q5_0 / Q5_1: 16 bytes of nibbles, the low ones elements 0-15, the high ones 16-31; Q5 adds a fifth
 * bit per element from a 32-bit word. */
static inline __m256 qk_fdot_b32(const uint8_t *q, uint32_t qh, int five, int offset, const float *x)
{
    const __m128i m4 = _mm_set1_epi8(15), b = qk_ld16(q);
    __m128i lo = _mm_and_si128(b, m4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m4);
    if (five) {  /* bit j of qh -> bit 4 of element j: spread the 32 bits over 32 bytes */
        const __m128i sel = _mm_set1_epi64x((long long)0x8040201008040201LL);
        const __m128i h0 = _mm_shuffle_epi8(_mm_cvtsi32_si128((int)qh), _mm_set_epi64x(0x0101010101010101LL, 0));
        const __m128i h1 = _mm_shuffle_epi8(_mm_cvtsi32_si128((int)qh),
                                            _mm_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL));
        lo = _mm_or_si128(lo, _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(h0, sel), sel), _mm_set1_epi8(16)));
        hi = _mm_or_si128(hi, _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(h1, sel), sel), _mm_set1_epi8(16)));
    }
    if (offset) {
        lo = _mm_sub_epi8(lo, _mm_set1_epi8((char)offset));
        hi = _mm_sub_epi8(hi, _mm_set1_epi8((char)offset));
    }
    return qk_fs16(hi, x + 16, qk_fs16(lo, x, _mm256_setzero_ps()));  /* signed: values within -16..31 */
}

static inline float qk_fdot_small(const uint8_t *w, const qk_act *a, int k, int bytes, int affine, int five)
{
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float mins = 0.f;
    const int qoff = (affine ? 4 : 2) + (five ? 4 : 0), offset = affine ? 0 : five ? 16 : 8;
    for (int i = 0; i < k; i += 32, w += bytes) {
        uint32_t qh = 0;
        if (five)
            memcpy(&qh, w + qoff - 4, 4);
        const __m256 t = qk_fdot_b32(w + qoff, qh, five, offset, a->x + i);
        if ((i / 32) & 1)
            acc1 = _mm256_fmadd_ps(t, _mm256_set1_ps(qk_f16(w)), acc1);
        else
            acc0 = _mm256_fmadd_ps(t, _mm256_set1_ps(qk_f16(w)), acc0);
        if (affine)
            mins += qk_f16(w + 2) * a->xs[i / 32];
    }
    return qk_hsum(_mm256_add_ps(acc0, acc1)) + mins;
}

static float qk_fdot_q4_0(const uint8_t *w, const qk_act *a, int k) { return qk_fdot_small(w, a, k, 18, 0, 0); }
static float qk_fdot_q4_1(const uint8_t *w, const qk_act *a, int k) { return qk_fdot_small(w, a, k, 20, 1, 0); }
static float qk_fdot_q5_0(const uint8_t *w, const qk_act *a, int k) { return qk_fdot_small(w, a, k, 22, 0, 1); }
static float qk_fdot_q5_1(const uint8_t *w, const qk_act *a, int k) { return qk_fdot_small(w, a, k, 24, 1, 1); }

/* Q4_K/Q5_K, chunk c of a block (sub-blocks 2c, 2c+1): the 32 low nibbles, the 32 high ones, each with its fifth bit */
static inline void qk_k45_chunk(const uint8_t *q, const uint8_t *qh, int c, int five, __m256i *lo, __m256i *hi)
{
    const __m256i m4 = _mm256_set1_epi8(15), b = qk_ld32(q);
    *lo = _mm256_and_si256(b, m4);
    *hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m4);
    if (five) {
        const __m256i h = qk_ld32(qh), one = _mm256_set1_epi8(1);
        *lo = _mm256_or_si256(*lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2 * c), one), 4));
        *hi = _mm256_or_si256(*hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2 * c + 1), one), 4));
    }
}

static inline float qk_fdot_k45(const uint8_t *w, const qk_act *a, int k, int five)
{
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), macc = _mm256_setzero_ps();
    const int bytes = five ? 176 : 144;
    for (int i = 0; i < k; i += QK_K, w += bytes) {
        uint64_t sc, mn;
        qk_scale_min8(w + 4, &sc, &mn);
        const __m256 s = _mm256_mul_ps(_mm256_set1_ps(qk_f16(w)), qk_cvu64(sc));  /* d * sc_j, as dequantisation */
        macc = _mm256_fmadd_ps(qk_cvu64(mn), _mm256_mul_ps(_mm256_set1_ps(qk_f16(w + 2)), _mm256_loadu_ps(a->xs + i / 32)),
                               macc);
        const uint8_t *q = w + (five ? 48 : 16);
        for (int c = 0; c < 4; c++) {
            __m256i lo, hi;
            qk_k45_chunk(q + 32 * c, w + 16, c, five, &lo, &hi);
            const float *xc = a->x + i + 64 * c;
            __m256 t0 = qk_fu16(_mm256_castsi256_si128(lo), xc, _mm256_setzero_ps());
            __m256 t1 = qk_fu16(_mm256_castsi256_si128(hi), xc + 32, _mm256_setzero_ps());
            t0 = qk_fu16(_mm256_extracti128_si256(lo, 1), xc + 16, t0);
            t1 = qk_fu16(_mm256_extracti128_si256(hi, 1), xc + 48, t1);
            acc0 = _mm256_fmadd_ps(t0, qk_lane(s, 2 * c), acc0);
            acc1 = _mm256_fmadd_ps(t1, qk_lane(s, 2 * c + 1), acc1);
        }
    }
    return qk_hsum(_mm256_add_ps(acc0, acc1)) - qk_hsum(macc);
}

static float qk_fdot_q4_k(const uint8_t *w, const qk_act *a, int k) { return qk_fdot_k45(w, a, k, 0); }
static float qk_fdot_q5_k(const uint8_t *w, const qk_act *a, int k) { return qk_fdot_k45(w, a, k, 1); }

/* Q6_K, half h of a block: the four quarters' 32 signed values (q - 32), as 32 int8 each */
static inline void qk_q6_half(const uint8_t *w, int h, __m256i q[4])
{
    const __m256i m4 = _mm256_set1_epi8(15), m3 = _mm256_set1_epi8(3), off = _mm256_set1_epi8(32);
    const __m256i l0 = qk_ld32(w + 64 * h), l1 = qk_ld32(w + 64 * h + 32), qh = qk_ld32(w + 128 + 32 * h);
    q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(qh, m3), 4));
    q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4),
                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m3), 4));
    q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m3), 4));
    q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m3), 4));
    for (int i = 0; i < 4; i++)
        q[i] = _mm256_sub_epi8(q[i], off);
}

static float qk_fdot_q6_k(const uint8_t *w, const qk_act *a, int k)
{
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int i = 0; i < k; i += QK_K, w += 210) {
        const float d = qk_f16(w + 208);
        const int8_t *sc = (const int8_t *)(w + 192);
        for (int h = 0; h < 2; h++) {
            __m256i q[4];
            qk_q6_half(w, h, q);
            for (int j = 0; j < 4; j++) {  /* quarter j: elements 32j..32j+31 of the half, scales 2j, 2j+1 */
                const float *xq = a->x + i + 128 * h + 32 * j;
                const __m256 t0 = qk_fs16(_mm256_castsi256_si128(q[j]), xq, _mm256_setzero_ps());
                const __m256 t1 = qk_fs16(_mm256_extracti128_si256(q[j], 1), xq + 16, _mm256_setzero_ps());
                acc0 = _mm256_fmadd_ps(t0, _mm256_set1_ps(d * (float)sc[8 * h + 2 * j]), acc0);
                acc1 = _mm256_fmadd_ps(t1, _mm256_set1_ps(d * (float)sc[8 * h + 2 * j + 1]), acc1);
            }
        }
    }
    return qk_hsum(_mm256_add_ps(acc0, acc1));
}

/* 8-bit activations --------------------------------------------------------------------------------------------- */

/* 32 products u (uint8, < 128) x s (int8) summed in fours: 8 int32 */
static inline __m256i qk_dotus(__m256i u, __m256i s)
{
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* the same for signed w: |w| x (s with w's sign) */
static inline __m256i qk_dotss(__m256i w, __m256i s) { return qk_dotus(_mm256_sign_epi8(w, w), _mm256_sign_epi8(s, w)); }

static float qk_idot_q8_0(const uint8_t *w, const qk_act *a, int k)
{
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 64 <= k; i += 64, w += 68) {
        const __m256i p0 = qk_dotss(qk_ld32(w + 2), qk_ld32(a->q + i));
        const __m256i p1 = qk_dotss(qk_ld32(w + 36), qk_ld32(a->q + i + 32));
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(qk_f16(w) * a->d[i / 32]), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(qk_f16(w + 34) * a->d[i / 32 + 1]), acc1);
    }
    if (i < k) {
        const __m256i p = qk_dotss(qk_ld32(w + 2), qk_ld32(a->q + i));
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(qk_f16(w) * a->d[i / 32]), acc0);
    }
    return qk_hsum(_mm256_add_ps(acc0, acc1));
}

static float qk_idot_q4_0(const uint8_t *w, const qk_act *a, int k)
{
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    const __m128i m4 = _mm_set1_epi8(15);
    for (int i = 0; i < k; i += 32, w += 18) {
        const __m128i b = qk_ld16(w + 2);
        const __m256i q = _mm256_sub_epi8(
            _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m4), _mm_and_si128(b, m4)), _mm256_set1_epi8(8));
        const __m256 p = _mm256_cvtepi32_ps(qk_dotss(q, qk_ld32(a->q + i)));
        const __m256 s = _mm256_set1_ps(qk_f16(w) * a->d[i / 32]);
        if ((i / 32) & 1)
            acc1 = _mm256_fmadd_ps(p, s, acc1);
        else
            acc0 = _mm256_fmadd_ps(p, s, acc0);
    }
    return qk_hsum(_mm256_add_ps(acc0, acc1));
}

static inline float qk_idot_k45(const uint8_t *w, const qk_act *a, int k, int five)
{
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), macc = _mm256_setzero_ps();
    const int bytes = five ? 176 : 144;
    for (int i = 0; i < k; i += QK_K, w += bytes) {
        uint64_t sc, mn;
        qk_scale_min8(w + 4, &sc, &mn);
        /* d * sc_j * (x's scale for sub-block j): the eight sub-blocks are eight activation blocks */
        const __m256 s = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(qk_f16(w)), qk_cvu64(sc)), _mm256_loadu_ps(a->d + i / 32));
        macc = _mm256_fmadd_ps(qk_cvu64(mn), _mm256_mul_ps(_mm256_set1_ps(qk_f16(w + 2)), _mm256_loadu_ps(a->xs + i / 32)),
                               macc);
        const uint8_t *q = w + (five ? 48 : 16);
        const int8_t *xq = a->q + i;
        for (int c = 0; c < 4; c++) {
            __m256i lo, hi;
            qk_k45_chunk(q + 32 * c, w + 16, c, five, &lo, &hi);
            const __m256i p0 = qk_dotus(lo, qk_ld32(xq + 64 * c)), p1 = qk_dotus(hi, qk_ld32(xq + 64 * c + 32));
            acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), qk_lane(s, 2 * c), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), qk_lane(s, 2 * c + 1), acc1);
        }
    }
    return qk_hsum(_mm256_add_ps(acc0, acc1)) - qk_hsum(macc);
}

static float qk_idot_q4_k(const uint8_t *w, const qk_act *a, int k) { return qk_idot_k45(w, a, k, 0); }
static float qk_idot_q5_k(const uint8_t *w, const qk_act *a, int k) { return qk_idot_k45(w, a, k, 1); }

static float qk_idot_q6_k(const uint8_t *w, const qk_act *a, int k)
{
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int i = 0; i < k; i += QK_K, w += 210) {
        const __m256 dd = _mm256_mul_ps(_mm256_set1_ps(qk_f16(w + 208)), _mm256_loadu_ps(a->d + i / 32));
        for (int h = 0; h < 2; h++) {
            /* the half's eight scales as int16, in both 128-bit lanes */
            const __m256i sc = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)(w + 192 + 8 * h))));
            __m256i q[4];
            qk_q6_half(w, h, q);
            for (int j = 0; j < 4; j++) {  /* quarter j is one activation block; its two 16s have scales 2j, 2j+1 */
                const __m256i s16 = _mm256_shuffle_epi8(sc, _mm256_set_m128i(
                    _mm_set1_epi16((short)(((4 * j + 3) << 8) | (4 * j + 2))),
                    _mm_set1_epi16((short)(((4 * j + 1) << 8) | (4 * j)))));
                const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(q[j], q[j]),
                                                         _mm256_sign_epi8(qk_ld32(a->q + i + 128 * h + 32 * j), q[j]));
                const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, s16));
                if (j & 1)
                    acc1 = _mm256_fmadd_ps(p, qk_lane(dd, 4 * h + j), acc1);
                else
                    acc0 = _mm256_fmadd_ps(p, qk_lane(dd, 4 * h + j), acc0);
            }
        }
    }
    return qk_hsum(_mm256_add_ps(acc0, acc1));
}

/* x (k, a multiple of 32) to int8 blocks of 32 with one scale each, rounding to nearest even like llama.cpp's q8_0;
 * xs: the sums of the quantised values (d * sum q), so that a product is W . (x as quantised) up to rounding */
static void qk_quantise8(const float *x, int8_t *q, float *d, float *xs, int k)
{
    const __m256 sign = _mm256_set1_ps(-0.f);
    for (int g = 0; g < k / 32; g++) {
        const float *xg = x + 32 * g;
        __m256 v[4], m = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++) {
            v[j] = _mm256_loadu_ps(xg + 8 * j);
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[j]));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float dg = _mm_cvtss_f32(m4) / 127.f, id = dg != 0.f ? 1.f / dg : 0.f;
        __m256i i32[4];
        for (int j = 0; j < 4; j++)  /* cvtps rounds to nearest even, as lrintf does */
            i32[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], _mm256_set1_ps(id)));
        /* pack 4 x 8 int32 to 32 int8 in order (the packs work per 128-bit lane: permute back) */
        const __m256i p16 = _mm256_packs_epi32(i32[0], i32[1]), p16b = _mm256_packs_epi32(i32[2], i32[3]);
        __m256i p8 = _mm256_packs_epi16(p16, p16b);
        p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(q + 32 * g), p8);
        const __m256i s = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]), _mm256_add_epi32(i32[2], i32[3]));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        d[g] = dg;
        xs[g] = dg * (float)_mm_cvtsi128_si32(s4);
    }
}
#endif /* QK_AVX2 */

/* the row kernel for `type`: with 8-bit activations where q8 and there is one, else with float activations */
static qk_rowdot qk_dot_for(int type, int q8)
{
#if defined(QK_AVX2)
    if (q8) {
        switch (type) {
        case QT_Q8_0: return qk_idot_q8_0;
        case QT_Q4_0: return qk_idot_q4_0;
        case QT_Q4_K: return qk_idot_q4_k;
        case QT_Q5_K: return qk_idot_q5_k;
        case QT_Q6_K: return qk_idot_q6_k;
        default: break;
        }
    }
    switch (type) {
    case QT_Q4_0: return qk_fdot_q4_0;
    case QT_Q4_1: return qk_fdot_q4_1;
    case QT_Q5_0: return qk_fdot_q5_0;
    case QT_Q5_1: return qk_fdot_q5_1;
    case QT_Q8_0: return qk_fdot_q8_0;
    case QT_Q4_K: return qk_fdot_q4_k;
    case QT_Q5_K: return qk_fdot_q5_k;
    case QT_Q6_K: return qk_fdot_q6_k;
    default: break;
    }
#else
    (void)q8;
#endif
    switch (type) {
    case QT_F32: return qk_dot_f32;
    case QT_F16: return qk_dot_f16;
    case QT_Q4_0: return qk_gen_q4_0;
    case QT_Q4_1: return qk_gen_q4_1;
    case QT_Q5_0: return qk_gen_q5_0;
    case QT_Q5_1: return qk_gen_q5_1;
    case QT_Q8_0: return qk_gen_q8_0;
    case QT_Q4_K: return qk_gen_q4_k;
    case QT_Q5_K: return qk_gen_q5_k;
    case QT_Q6_K: return qk_gen_q6_k;
    case QT_MXFP4: return qk_dot_mxfp4;
    default: return NULL;
    }
}

/* whether the kernel qk_dot_for(type, q8) reads x's per-32 sums, and x quantised */
static int qk_needs_sums(int type)
{
    return type == QT_Q4_1 || type == QT_Q5_1 || type == QT_Q4_K || type == QT_Q5_K;
}

static int qk_needs_q8(int type, int q8)
{
#if defined(QK_AVX2)
    return q8 && (type == QT_Q8_0 || type == QT_Q4_0 || type == QT_Q4_K || type == QT_Q5_K || type == QT_Q6_K);
#else
    (void)type;
    (void)q8;
    return 0;
#endif
}

/* Which activations the packed kernels use: 1 8-bit (the default), 0 float32; a negative mode only asks. Returns the
 * mode before the call. Process-wide: set it before computing, not while another thread does. */
int lm_qset_activations(int q8)
{
    const int before = qk_q8_default;
    if (q8 >= 0)
        qk_q8_default = q8 != 0;
    return before;
}

/* 1 where lm_qgemv and lm_moe_decode_q quantise the activations for weights of `type` (8-bit mode and a kernel for
 * it on this CPU: Q8_0, Q4_0, Q4_K, Q5_K, Q6_K with AVX2), else 0: they compute with float32 x */
int lm_qact_int8(int type) { return qk_needs_q8(type, qk_q8_default); }

/* xs[g] = sum of x over elements 32g..32g+31 (g < k/32) */
static void qk_sums32(const float *x, float *xs, int k)
{
    for (int g = 0; g < k / 32; g++) {
        float s = 0.f;
        for (int j = 0; j < 32; j++)
            s += x[32 * g + j];
        xs[g] = s;
    }
}

/* the activations a row kernel of `type` reads, from x (k): sums and quantised copy into the buffers given */
static qk_act qk_prepare(int type, int q8, const float *x, int k, float *xs, int8_t *xq, float *xd)
{
    qk_act a = {x, xs, xq, xd};
    (void)q8;  /* read only where there are 8-bit kernels */
#if defined(QK_AVX2)
    if (qk_needs_q8(type, q8)) {
        qk_quantise8(x, xq, xd, xs, k);
        return a;
    }
#endif
    if (qk_needs_sums(type))
        qk_sums32(x, xs, k);
    return a;
}

/* y (n) = w (n packed rows of k elements of `type`) . x (k) + bias (n, or NULL) */
void lm_qgemv(int type, const void *w, const float *x, const float *bias, float *y, int n, int k, int threads)
{
    const int q8 = qk_q8_default;
    const qk_rowdot dot = qk_dot_for(type, q8);
    if (!dot)
        return;
    const size_t rb = qk_row_bytes(type, k);
    float xs[k / 32 + 1], xd[k / 32 + 1];
    int8_t xq[qk_needs_q8(type, q8) ? k : 1];
    const qk_act a = qk_prepare(type, q8, x, k, xs, xq, xd);
    const uint8_t *base = w;
#pragma omp parallel num_threads(threads)
    {
        int lo, hi;
        share(n, &lo, &hi);
        for (int r = lo; r < hi; r++)
            y[r] = dot(base + (size_t)r * rb, &a, k) + (bias ? bias[r] : 0.f);
    }
}

/* lm_moe_decode_f32 with packed experts: gate_up[e] is 2f rows of k elements of gu_type (the f gate rows, then the
 * f up rows), down[e] k rows of f elements of down_type. out += sum_e scale[e] * down_e . (silu(gate_e . x) *
 * (up_e . x)); h: scratch (n_exp x f). One parallel region, one barrier, experts summed in the given order. */
void lm_moe_decode_q(int n_exp, int gu_type, int down_type, const void *const *gate_up, const void *const *down,
                     const float *scale, const float *x, float *out, float *h, int k, int f, int threads)
{
    const int q8 = qk_q8_default;
    const qk_rowdot gdot = qk_dot_for(gu_type, q8), ddot = qk_dot_for(down_type, q8);
    if (!gdot || !ddot)
        return;
    const size_t grb = qk_row_bytes(gu_type, k), drb = qk_row_bytes(down_type, f);
    const int fg = f / 32 + 1, dq8 = qk_needs_q8(down_type, q8);
    float xs[k / 32 + 1], xd[k / 32 + 1];
    int8_t xq[qk_needs_q8(gu_type, q8) ? k : 1];
    const qk_act ax = qk_prepare(gu_type, q8, x, k, xs, xq, xd);
#pragma omp parallel num_threads(threads)
    {
        int lo, hi;
        share(n_exp * f, &lo, &hi);
        for (int i = lo; i < hi; i++) {
            const int e = i / f, r = i % f;
            const uint8_t *gu = gate_up[e];
            h[(size_t)e * f + r] = silu(gdot(gu + (size_t)r * grb, &ax, k)) * gdot(gu + (size_t)(f + r) * grb, &ax, k);
        }
#pragma omp barrier
        /* each thread prepares every expert's h itself: cheaper than a second barrier */
        float hs[n_exp * fg], hd[n_exp * fg];
        int8_t hq[dq8 ? n_exp * f : 1];
        share(k, &lo, &hi);
        for (int e = 0; e < n_exp; e++) {
            const qk_act ah = qk_prepare(down_type, q8, h + (size_t)e * f, f, hs + (size_t)e * fg,
                                         hq + (dq8 ? (size_t)e * f : 0), hd + (size_t)e * fg);
            const uint8_t *dw = down[e];
            const float s = scale[e];
            for (int r = lo; r < hi; r++)
                out[r] += s * ddot(dw + (size_t)r * drb, &ah, f);
        }
    }
}
