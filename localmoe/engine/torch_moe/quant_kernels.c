/* Matrix-vector products and MoE decode with weights kept in their GGUF quantisation (issue #16), included by
 * moe_kernels.c (it uses share(), silu(), UNROLL and dot1 from there, and lm_step_f32 calls it).
 *
 * Supported ggml types: F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, MXFP4. lm_dequant is bit-exact
 * with gguf.quants.dequantize (= llama.cpp's dequantize_row_*): every product and difference is done in float32 in
 * the same order, with contraction to FMA switched off in that code.
 *
 * ACTIVATIONS: float. Each weight block is unpacked to floats in registers and multiplied with the float32
 * activations, so lm_qgemv equals (dequantised matrix) @ x up to summation order (and FMA rounding); the affine
 * types (scale * q - min) take the min's part from per-32 sums of x computed once per call. llama.cpp instead
 * quantises x to 8 bits per block and uses integer dot products: less arithmetic per weight, at the cost of an
 * activation error of ~0.4% per block. The measured numbers that decided it are in the comment before lm_qgemv.
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

/* GCC vector extensions (gcc and clang): one source for AVX2/AVX-512 machines and plain SSE2 ones alike. */
typedef float qk_v8f __attribute__((vector_size(32)));
typedef int32_t qk_v8i __attribute__((vector_size(32)));
typedef uint8_t qk_v8b __attribute__((vector_size(8)));
typedef int8_t qk_v8c __attribute__((vector_size(8)));

static inline qk_v8f qk_ldf(const float *p)
{
    qk_v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline qk_v8b qk_ldb(const uint8_t *p)
{
    qk_v8b v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline qk_v8f qk_u2f(qk_v8b b) { return __builtin_convertvector(__builtin_convertvector(b, qk_v8i), qk_v8f); }
static inline qk_v8f qk_s2f(qk_v8c b) { return __builtin_convertvector(__builtin_convertvector(b, qk_v8i), qk_v8f); }

static inline float qk_hsum(qk_v8f v)
{
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

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

/* --- dot products of one packed row with float activations --------------------------------------------------------
 * x: k floats; xs: sums of x over each 32 elements (only the affine types, scale * q + min, read it). */
typedef float (*qk_rowdot)(const uint8_t *w, const float *x, const float *xs, int k);

static float qk_dot_f32(const uint8_t *w, const float *x, const float *xs, int k)
{
    (void)xs;
    return dot1((const float *)w, x, k);
}

static float qk_dot_f16(const uint8_t *w, const float *x, const float *xs, int k)
{
    (void)xs;
    float buf[256], s = 0.f;
    for (int i = 0; i < k; i += 256) {
        const int m = k - i < 256 ? k - i : 256;
        for (int j = 0; j < m; j++)
            buf[j] = qk_f16(w + 2 * (size_t)(i + j));
        s += dot1(buf, x + i, m);
    }
    return s;
}

static float qk_dot_q8_0(const uint8_t *w, const float *x, const float *xs, int k)
{
    (void)xs;
    qk_v8f acc0 = {0}, acc1 = {0};
    for (int i = 0; i < k; i += 64, w += 68, x += 64) {
        const int8_t *q = (const int8_t *)(w + 2), *r = (const int8_t *)(w + 36);
        qk_v8f t0 = {0}, t1 = {0};
        for (int j = 0; j < 32; j += 8) {
            qk_v8c a, c;
            memcpy(&a, q + j, 8);
            memcpy(&c, r + j, 8);
            t0 += qk_s2f(a) * qk_ldf(x + j);
            t1 += qk_s2f(c) * qk_ldf(x + 32 + j);
        }
        acc0 += t0 * qk_f16(w);
        acc1 += t1 * qk_f16(w + 34);
    }
    if (k % 64) {  /* one last block of 32 */
        const int8_t *q = (const int8_t *)(w + 2);
        qk_v8f t0 = {0};
        for (int j = 0; j < 32; j += 8) {
            qk_v8c a;
            memcpy(&a, q + j, 8);
            t0 += qk_s2f(a) * qk_ldf(x + j);
        }
        acc0 += t0 * qk_f16(w);
    }
    return qk_hsum(acc0 + acc1);
}

/* Q4_0 and Q4_1: 16 bytes of nibbles, the low ones are elements 0-15, the high ones 16-31 */
static float qk_dot_q4_0(const uint8_t *w, const float *x, const float *xs, int k)
{
    (void)xs;
    qk_v8f acc = {0};
    const qk_v8b lo = {15, 15, 15, 15, 15, 15, 15, 15};
    const qk_v8c eight = {8, 8, 8, 8, 8, 8, 8, 8};
    for (int i = 0; i < k; i += 32, w += 18, x += 32) {
        qk_v8f t0 = {0}, t1 = {0};
        for (int j = 0; j < 16; j += 8) {
            const qk_v8b b = qk_ldb(w + 2 + j);
            t0 += qk_s2f((qk_v8c)(b & lo) - eight) * qk_ldf(x + j);
            t1 += qk_s2f((qk_v8c)(b >> 4) - eight) * qk_ldf(x + 16 + j);
        }
        acc += (t0 + t1) * qk_f16(w);
    }
    return qk_hsum(acc);
}

static float qk_dot_q4_1(const uint8_t *w, const float *x, const float *xs, int k)
{
    qk_v8f acc = {0};
    float mins = 0.f;
    const qk_v8b lo = {15, 15, 15, 15, 15, 15, 15, 15};
    for (int i = 0; i < k; i += 32, w += 20, x += 32) {
        qk_v8f t0 = {0}, t1 = {0};
        for (int j = 0; j < 16; j += 8) {
            const qk_v8b b = qk_ldb(w + 4 + j);
            t0 += qk_u2f(b & lo) * qk_ldf(x + j);
            t1 += qk_u2f(b >> 4) * qk_ldf(x + 16 + j);
        }
        acc += (t0 + t1) * qk_f16(w);
        mins += qk_f16(w + 2) * xs[i / 32];
    }
    return qk_hsum(acc) + mins;
}

/* the fifth bits of Q5_0/Q5_1 elements j0..j0+7, at bit 4 */
static inline qk_v8i qk_bit5(uint32_t qh, int j0)
{
    const qk_v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
    const qk_v8i h = {0, 0, 0, 0, 0, 0, 0, 0};
    return (((h + (int32_t)(qh >> j0)) >> lane) & 1) << 4;
}

static float qk_dot_q5(const uint8_t *w, const float *x, const float *xs, int k, int affine)
{
    qk_v8f acc = {0};
    float mins = 0.f;
    const qk_v8b lo = {15, 15, 15, 15, 15, 15, 15, 15};
    const int hb = affine ? 4 : 2, bytes = affine ? 24 : 22;
    const float off = affine ? 0.f : 16.f;
    for (int i = 0; i < k; i += 32, w += bytes, x += 32) {
        uint32_t qh;
        memcpy(&qh, w + hb, 4);
        const uint8_t *q = w + hb + 4;
        qk_v8f t0 = {0}, t1 = {0};
        for (int j = 0; j < 16; j += 8) {
            const qk_v8b b = qk_ldb(q + j);
            const qk_v8i a = __builtin_convertvector(b & lo, qk_v8i) | qk_bit5(qh, j);
            const qk_v8i c = __builtin_convertvector(b >> 4, qk_v8i) | qk_bit5(qh, j + 16);
            t0 += (__builtin_convertvector(a, qk_v8f) - off) * qk_ldf(x + j);
            t1 += (__builtin_convertvector(c, qk_v8f) - off) * qk_ldf(x + 16 + j);
        }
        acc += (t0 + t1) * qk_f16(w);
        if (affine)
            mins += qk_f16(w + 2) * xs[i / 32];
    }
    return qk_hsum(acc) + mins;
}

static float qk_dot_q5_0(const uint8_t *w, const float *x, const float *xs, int k) { return qk_dot_q5(w, x, xs, k, 0); }
static float qk_dot_q5_1(const uint8_t *w, const float *x, const float *xs, int k) { return qk_dot_q5(w, x, xs, k, 1); }

/* Q4_K and Q5_K: y = sum over sub-blocks of d*sc * (q . x) - dmin*m * sum(x) */
static inline float qk_dot_k45(const uint8_t *w, const float *x, const float *xs, int k, int five)
{
    qk_v8f acc = {0};
    float mins = 0.f;
    const qk_v8b lo = {15, 15, 15, 15, 15, 15, 15, 15}, one = {1, 1, 1, 1, 1, 1, 1, 1};
    const int bytes = five ? 176 : 144;
    for (int i = 0; i < k; i += QK_K, w += bytes, xs += 8) {
        const float d = qk_f16(w), dmin = qk_f16(w + 2);
        uint8_t sc[8], mn[8];
        qk_scale_min(w + 4, sc, mn);
        const uint8_t *qh = w + 16, *q = five ? w + 48 : w + 16;
        float m = 0.f;
        for (int s = 0; s < 8; s++)
            m += (float)mn[s] * xs[s];
        mins += dmin * m;
        for (int c = 0; c < 4; c++, q += 32, x += 64) {
            qk_v8f t0 = {0}, t1 = {0};
            for (int j = 0; j < 32; j += 8) {
                const qk_v8b b = qk_ldb(q + j);
                qk_v8b a = b & lo, e = b >> 4;
                if (five) {
                    const qk_v8b h = qk_ldb(qh + j);
                    a |= ((h >> (2 * c)) & one) << 4;
                    e |= ((h >> (2 * c + 1)) & one) << 4;
                }
                t0 += qk_u2f(a) * qk_ldf(x + j);
                t1 += qk_u2f(e) * qk_ldf(x + 32 + j);
            }
            acc += t0 * (d * (float)sc[2 * c]) + t1 * (d * (float)sc[2 * c + 1]);
        }
    }
    return qk_hsum(acc) - mins;
}

static float qk_dot_q4_k(const uint8_t *w, const float *x, const float *xs, int k) { return qk_dot_k45(w, x, xs, k, 0); }
static float qk_dot_q5_k(const uint8_t *w, const float *x, const float *xs, int k) { return qk_dot_k45(w, x, xs, k, 1); }

static float qk_dot_q6_k(const uint8_t *w, const float *x, const float *xs, int k)
{
    (void)xs;
    qk_v8f acc = {0};
    const qk_v8b lo = {15, 15, 15, 15, 15, 15, 15, 15}, three = {3, 3, 3, 3, 3, 3, 3, 3};
    const qk_v8c off = {32, 32, 32, 32, 32, 32, 32, 32};
    for (int i = 0; i < k; i += QK_K, w += 210) {
        const float d = qk_f16(w + 208);
        for (int h = 0; h < 2; h++, x += 128) {
            const uint8_t *ql = w + 64 * h, *qh = w + 128 + 32 * h;
            const int8_t *sc = (const int8_t *)(w + 192 + 8 * h);
            for (int s = 0; s < 2; s++) {  /* elements 16s..16s+15 of each of the four 32-element quarters */
                qk_v8f t0 = {0}, t1 = {0}, t2 = {0}, t3 = {0};
                for (int j = 16 * s; j < 16 * s + 16; j += 8) {
                    const qk_v8b a = qk_ldb(ql + j), b = qk_ldb(ql + 32 + j), c = qk_ldb(qh + j);
                    t0 += qk_s2f((qk_v8c)((a & lo) | ((c & three) << 4)) - off) * qk_ldf(x + j);
                    t1 += qk_s2f((qk_v8c)((b & lo) | (((c >> 2) & three) << 4)) - off) * qk_ldf(x + 32 + j);
                    t2 += qk_s2f((qk_v8c)((a >> 4) | (((c >> 4) & three) << 4)) - off) * qk_ldf(x + 64 + j);
                    t3 += qk_s2f((qk_v8c)((b >> 4) | ((c >> 6) << 4)) - off) * qk_ldf(x + 96 + j);
                }
                acc += t0 * (d * (float)sc[s]) + t1 * (d * (float)sc[s + 2]) + t2 * (d * (float)sc[s + 4])
                       + t3 * (d * (float)sc[s + 6]);
            }
        }
    }
    return qk_hsum(acc);
}

/* anything else: a block at a time dequantised into a buffer, then dot1 */
static float qk_dot_generic(int type, const uint8_t *w, const float *x, int k)
{
    int bytes;
    const int be = qk_block(type, &bytes);
    float buf[256], s = 0.f;
    for (int i = 0; i < k; i += be, w += bytes) {
        qk_dq_block(type, w, buf);
        s += dot1(buf, x + i, be);
    }
    return s;
}

static float qk_dot_mxfp4(const uint8_t *w, const float *x, const float *xs, int k)
{
    (void)xs;
    return qk_dot_generic(QT_MXFP4, w, x, k);
}

static qk_rowdot qk_dot_for(int type)
{
    switch (type) {
    case QT_F32: return qk_dot_f32;
    case QT_F16: return qk_dot_f16;
    case QT_Q4_0: return qk_dot_q4_0;
    case QT_Q4_1: return qk_dot_q4_1;
    case QT_Q5_0: return qk_dot_q5_0;
    case QT_Q5_1: return qk_dot_q5_1;
    case QT_Q8_0: return qk_dot_q8_0;
    case QT_Q4_K: return qk_dot_q4_k;
    case QT_Q5_K: return qk_dot_q5_k;
    case QT_Q6_K: return qk_dot_q6_k;
    case QT_MXFP4: return qk_dot_mxfp4;
    default: return NULL;
    }
}

static int qk_needs_sums(int type)
{
    return type == QT_Q4_1 || type == QT_Q5_1 || type == QT_Q4_K || type == QT_Q5_K;
}

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

/* y (n) = w (n packed rows of k elements of `type`) . x (k) + bias (n, or NULL) */
void lm_qgemv(int type, const void *w, const float *x, const float *bias, float *y, int n, int k, int threads)
{
    const qk_rowdot dot = qk_dot_for(type);
    if (!dot)
        return;
    const size_t rb = qk_row_bytes(type, k);
    float xs[k / 32 + 1];
    if (qk_needs_sums(type))
        qk_sums32(x, xs, k);
    const uint8_t *base = w;
#pragma omp parallel num_threads(threads)
    {
        int lo, hi;
        share(n, &lo, &hi);
        for (int r = lo; r < hi; r++)
            y[r] = dot(base + (size_t)r * rb, x, xs, k) + (bias ? bias[r] : 0.f);
    }
}

/* lm_moe_decode_f32 with packed experts: gate_up[e] is 2f rows of k elements of gu_type (the f gate rows, then the
 * f up rows), down[e] k rows of f elements of down_type. out += sum_e scale[e] * down_e . (silu(gate_e . x) *
 * (up_e . x)); h: scratch (n_exp x f). One parallel region, one barrier, experts summed in the given order. */
void lm_moe_decode_q(int n_exp, int gu_type, int down_type, const void *const *gate_up, const void *const *down,
                     const float *scale, const float *x, float *out, float *h, int k, int f, int threads)
{
    const qk_rowdot gdot = qk_dot_for(gu_type), ddot = qk_dot_for(down_type);
    if (!gdot || !ddot)
        return;
    const size_t grb = qk_row_bytes(gu_type, k), drb = qk_row_bytes(down_type, f);
    const int gsums = qk_needs_sums(gu_type), dsums = qk_needs_sums(down_type), fg = f / 32 + 1;
    float xs[k / 32 + 1];
    if (gsums)
        qk_sums32(x, xs, k);
#pragma omp parallel num_threads(threads)
    {
        int lo, hi;
        share(n_exp * f, &lo, &hi);
        for (int i = lo; i < hi; i++) {
            const int e = i / f, r = i % f;
            const uint8_t *gu = gate_up[e];
            h[(size_t)e * f + r] = silu(gdot(gu + (size_t)r * grb, x, xs, k)) * gdot(gu + (size_t)(f + r) * grb, x, xs, k);
        }
#pragma omp barrier
        float hs[dsums ? n_exp * fg : 1];  /* each thread its own copy: cheaper than a second barrier */
        if (dsums) {
            for (int e = 0; e < n_exp; e++)
                qk_sums32(h + (size_t)e * f, hs + (size_t)e * fg, f);
        }
        share(k, &lo, &hi);
        for (int e = 0; e < n_exp; e++) {
            const uint8_t *dw = down[e];
            const float *he = h + (size_t)e * f, *hse = hs + (size_t)e * fg;
            const float s = scale[e];
            for (int r = lo; r < hi; r++)
                out[r] += s * ddot(dw + (size_t)r * drb, he, hse, f);
        }
    }
}
