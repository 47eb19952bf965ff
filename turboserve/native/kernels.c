/* turboserve's native CPU kernels: the work between two GEMMs, one pass each, and varlen attention.
 *
 * Plain C with OpenMP, called through ctypes (turboserve/native/__init__.py builds this file on first
 * use with the system's C compiler and caches the library by source hash). ctypes releases the GIL for
 * the call. Every kernel takes the thread count to use, so turboserve never runs more threads than it
 * was given. Row-wise kernels treat each row alone, so a row's result never depends on its batch.
 */
#include <math.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Everything between two GEMMs, one pass per row (TurboTransformers' fusion):
 *   v   = src                                   (fp32 GEMM output, bias already added), or
 *   v   = src_i32 * row_scale[r] * col_scale + bias   (int8 GEMM output)
 *   v   = act(v)                                 act: 0 none, 1 gelu (erf), 2 gelu (tanh), 3 relu
 *   v   = v + residual                           if residual
 *   v   = LayerNorm(v) * gamma + beta            if gamma
 *   out = v                                      if out (may alias src or residual: rows are
 *                                                read whole before they are written)
 *   q, qscale = int8(v * inv_smooth), per row    if q (the next int8 GEMM's input)
 * `row` is a per-thread scratch of `cols` floats. */
enum { ACT_NONE = 0, ACT_GELU = 1, ACT_GELU_TANH = 2, ACT_RELU = 3 };

#ifdef __AVX512F__
/* erf by Abramowitz & Stegun 7.1.28: 1 - (1 + a1 x + ... + a6 x^6)^-16, |error| < 3e-7, vectorized.
 * No exp: a Horner polynomial, four squarings and one reciprocal (estimate plus a Newton step), about
 * 60% of the work of 7.1.26, whose exp made GELU most of fc1's epilogue. For large |x| the power
 * overflows to inf and the reciprocal to 0, so erf -> 1 as it should. */
static inline __m512 erf512(__m512 x) {
    const __m512 ax = _mm512_abs_ps(x);
    __m512 p = _mm512_set1_ps(0.0000430638f);
    p = _mm512_fmadd_ps(p, ax, _mm512_set1_ps(0.0002765672f));
    p = _mm512_fmadd_ps(p, ax, _mm512_set1_ps(0.0001520143f));
    p = _mm512_fmadd_ps(p, ax, _mm512_set1_ps(0.0092705272f));
    p = _mm512_fmadd_ps(p, ax, _mm512_set1_ps(0.0422820123f));
    p = _mm512_fmadd_ps(p, ax, _mm512_set1_ps(0.0705230784f));
    p = _mm512_fmadd_ps(p, ax, _mm512_set1_ps(1.0f));
    p = _mm512_mul_ps(p, p);
    p = _mm512_mul_ps(p, p);
    p = _mm512_mul_ps(p, p);
    p = _mm512_mul_ps(p, p);                                  /* p^16 */
    __m512 t = _mm512_rcp14_ps(p);
    t = _mm512_mul_ps(t, _mm512_fnmadd_ps(p, t, _mm512_set1_ps(2.0f)));
    t = _mm512_mask_mov_ps(t, _mm512_cmp_ps_mask(p, _mm512_set1_ps(INFINITY), _CMP_EQ_OQ), _mm512_setzero_ps());
    const __m512 y = _mm512_sub_ps(_mm512_set1_ps(1.0f), t);
    /* copy the sign of x */
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(y),
        _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32((int)0x80000000u))));
}
#endif

static void activate_row(float *v, int64_t n, int act) {
    int64_t c = 0;
#ifdef __AVX512F__
    if (act == ACT_GELU) {
        for (; c + 16 <= n; c += 16) {
            const __m512 x = _mm512_loadu_ps(v + c);
            const __m512 e = erf512(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f)));
            _mm512_storeu_ps(v + c, _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), _mm512_add_ps(e, _mm512_set1_ps(1.0f))));
        }
    }
#endif
    for (; c < n; c++) {
        const float x = v[c];
        switch (act) {
        case ACT_GELU: v[c] = 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); break;
        case ACT_GELU_TANH: v[c] = 0.5f * x * (1.0f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x))); break;
        case ACT_RELU: v[c] = x > 0.0f ? x : 0.0f; break;
        default: break;
        }
    }
}

/* q = round(v * inv_smooth / scale) in [-127, 127], scale = max|v * inv_smooth| / 127; returns scale.
 * Rounding is to nearest even, as nearbyintf in the default mode (the vector convert uses MXCSR's). The
 * scalar loop did not vectorize (gcc 12) and cost more than the rest of fc1's epilogue. */
static float quantize_row(const float *v, const float *inv_smooth, int8_t *qr, int64_t cols) {
    int64_t c = 0;
    float amax = 0.0f;
#ifdef __AVX512F__
    __m512 m = _mm512_setzero_ps();
    for (; c + 16 <= cols; c += 16)
        m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_mul_ps(_mm512_loadu_ps(v + c), _mm512_loadu_ps(inv_smooth + c))));
    amax = _mm512_reduce_max_ps(m);
#endif
    for (; c < cols; c++) amax = fmaxf(amax, fabsf(v[c] * inv_smooth[c]));
    const float scale = fmaxf(amax, 1e-8f) / 127.0f, inv = 1.0f / scale;
    c = 0;
#ifdef __AVX512F__
    const __m512 vinv = _mm512_set1_ps(inv);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    for (; c + 16 <= cols; c += 16) {
        const __m512 x = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(v + c), _mm512_loadu_ps(inv_smooth + c)), vinv);
        const __m512i n = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(x), lo), hi);
        _mm_storeu_si128((__m128i *)(qr + c), _mm512_cvtepi32_epi8(n));
    }
#endif
    for (; c < cols; c++) qr[c] = (int8_t)fminf(fmaxf(nearbyintf(v[c] * inv_smooth[c] * inv), -127.0f), 127.0f);
    return scale;
}

void row_epilogue(const float *src, const int32_t *src_i32, const float *row_scale, const float *col_scale,
                  const float *bias, int act, const float *residual, const float *gamma, const float *beta,
                  float eps, float *out, const float *inv_smooth, int8_t *q, float *qscale,
                  int64_t rows, int64_t cols, int nthreads) {
    #pragma omp parallel num_threads(nthreads)
    {
        float *v = malloc(sizeof(float) * cols);
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            if (src_i32) {
                const int32_t *ar = src_i32 + r * cols;
                const float rs = row_scale[r];
                for (int64_t c = 0; c < cols; c++) v[c] = (float)ar[c] * rs * col_scale[c] + bias[c];
            } else {
                memcpy(v, src + r * cols, sizeof(float) * cols);
            }
            if (act) activate_row(v, cols, act);
            if (residual) {
                const float *rr = residual + r * cols;
                for (int64_t c = 0; c < cols; c++) v[c] += rr[c];
            }
            if (gamma) {
                float sum = 0.0f, var = 0.0f;
                for (int64_t c = 0; c < cols; c++) sum += v[c];
                const float mean = sum / (float)cols;
                for (int64_t c = 0; c < cols; c++) { const float d = v[c] - mean; var += d * d; }
                const float rstd = 1.0f / sqrtf(var / (float)cols + eps);
                for (int64_t c = 0; c < cols; c++) v[c] = (v[c] - mean) * rstd * gamma[c] + beta[c];
            }
            if (out) memcpy(out + r * cols, v, sizeof(float) * cols);
            if (q) qscale[r] = quantize_row(v, inv_smooth, q + r * cols, cols);
        }
        free(v);
    }
}

/* Bidirectional attention of each packed sequence over exactly its own tokens.
 * qkv: [T, 3H] rows (Q | K | V, heads of `d` columns each); out: [T, H]. One task per (sequence,
 * head), longest sequences first (`order`) so the last tasks are short. Per task K is copied once,
 * transposed, into a [d, Lp] scratch (Lp = L rounded up to 16, zero-filled) so 16 keys sit in one
 * register. Softmax covers only the L real keys; its 1/sum is applied to the d outputs, not the L
 * probabilities. */
#define MR 8   /* query rows per micro-kernel */

#ifdef __AVX512F__
/* exp(x) for x <= 0: 2^n * p(r), r = x - n ln2, degree-6 Taylor polynomial (relative error < 2e-7). */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* s[qi][j] = q_qi . k_j for MR query rows and all Lp keys: 32 keys (two vectors) x MR rows per step,
 * 16 independent accumulators, each q element broadcast straight from memory. With 4 rows x 64 keys
 * the kernel ran at 130-145 GFLOP/s; 8 x 32 keeps both FMA ports busy (load ports have room for the
 * 2 key loads + 8 broadcasts per 16 FMAs). */
static void scores_avx512(const float *const q[MR], const float *kt, int64_t d, int64_t Lp, float *s) {
    int64_t j0 = 0;
    for (; j0 + 32 <= Lp; j0 += 32) {
        __m512 a[MR][2];
        for (int r = 0; r < MR; r++) a[r][0] = a[r][1] = _mm512_setzero_ps();
        for (int64_t k = 0; k < d; k++) {
            const float *kr = kt + k * Lp + j0;
            const __m512 k0 = _mm512_loadu_ps(kr), k1 = _mm512_loadu_ps(kr + 16);
            #pragma GCC unroll 8
            for (int r = 0; r < MR; r++) {
                const __m512 qv = _mm512_set1_ps(q[r][k]);
                a[r][0] = _mm512_fmadd_ps(qv, k0, a[r][0]);
                a[r][1] = _mm512_fmadd_ps(qv, k1, a[r][1]);
            }
        }
        for (int r = 0; r < MR; r++) {
            _mm512_storeu_ps(s + r * Lp + j0, a[r][0]);
            _mm512_storeu_ps(s + r * Lp + j0 + 16, a[r][1]);
        }
    }
    for (; j0 < Lp; j0 += 16) {
        __m512 a[MR];
        for (int r = 0; r < MR; r++) a[r] = _mm512_setzero_ps();
        for (int64_t k = 0; k < d; k++) {
            const __m512 kv = _mm512_loadu_ps(kt + k * Lp + j0);
            #pragma GCC unroll 8
            for (int r = 0; r < MR; r++) a[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r][k]), kv, a[r]);
        }
        for (int r = 0; r < MR; r++) _mm512_storeu_ps(s + r * Lp + j0, a[r]);
    }
}

/* acc[r][c0 .. c0 + 16 * NV) = sum_j s[r][j] * v_j[c0 ..] for MR rows: NV vectors of V per key, MR x NV
 * accumulators (NV = 2: 16 independent FMA chains, enough to hide the FMA latency on both ports). */
static inline void pv_avx512(const float *v0, int64_t row, int64_t L, const float *s, int64_t Lp,
                             const float inv[MR], float *acc, int64_t d, int64_t c0, int nv) {
    __m512 a[MR][2];
    for (int r = 0; r < MR; r++) a[r][0] = a[r][1] = _mm512_setzero_ps();
    if (nv == 2) {
        for (int64_t j = 0; j < L; j++) {
            const float *vj = v0 + j * row + c0;
            const __m512 x0 = _mm512_loadu_ps(vj), x1 = _mm512_loadu_ps(vj + 16);
            #pragma GCC unroll 8
            for (int r = 0; r < MR; r++) {
                const __m512 p = _mm512_set1_ps(s[r * Lp + j]);
                a[r][0] = _mm512_fmadd_ps(p, x0, a[r][0]);
                a[r][1] = _mm512_fmadd_ps(p, x1, a[r][1]);
            }
        }
    } else {
        for (int64_t j = 0; j < L; j++) {
            const __m512 x0 = _mm512_loadu_ps(v0 + j * row + c0);
            #pragma GCC unroll 8
            for (int r = 0; r < MR; r++) a[r][0] = _mm512_fmadd_ps(_mm512_set1_ps(s[r * Lp + j]), x0, a[r][0]);
        }
    }
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < nv; v++)
            _mm512_storeu_ps(acc + r * d + c0 + 16 * v, _mm512_mul_ps(a[r][v], _mm512_set1_ps(inv[r])));
}

/* In place: s[j] = exp(scale * (s[j] - max)) over the L real keys; returns the sum. */
static float softmax_numerators_avx512(float *s, int64_t L, float scale) {
    const int64_t full = L / 16 * 16;
    const __mmask16 tail = (__mmask16)((1u << (L - full)) - 1u);
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < full; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + j));
    if (tail) m = _mm512_mask_max_ps(m, tail, m, _mm512_maskz_loadu_ps(tail, s + full));
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m)), sc = _mm512_set1_ps(scale);
    __m512 z = _mm512_setzero_ps();
    for (int64_t j = 0; j < full; j += 16) {
        const __m512 e = exp512(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(s + j), mx), sc));
        _mm512_storeu_ps(s + j, e);
        z = _mm512_add_ps(z, e);
    }
    if (tail) {
        const __m512 e = exp512(_mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + full), mx), sc));
        _mm512_mask_storeu_ps(s + full, tail, e);
        z = _mm512_mask_add_ps(z, tail, z, e);
    }
    return _mm512_reduce_add_ps(z);
}
#endif

#ifdef __AVX512F__
/* In-register transpose of 16 rows of 16 floats (unpack, then shuffles within and across lanes). */
static inline void transpose16x16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0x88);
        t[4 + i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0xdd);
        t[8 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0x88);
        t[12 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0xdd);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
        r[4 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0x88);
        r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xdd);
        r[12 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0xdd);
    }
}
#endif

/* kt[k * Lp + j] = key j's element k for j < L, 0 for L <= j < Lp. Keys sit `row` floats apart. The
 * scalar version (one strided store per element) took a third of the attention kernel's own time at
 * MiniLM's lengths; 16 x 16 tiles transposed in registers take a quarter of that. */
static void transpose_keys(const float *k0, int64_t row, int64_t L, int64_t Lp, int64_t d, float *kt) {
#ifdef __AVX512F__
    if (d % 16 == 0) {
        for (int64_t j0 = 0; j0 < Lp; j0 += 16)
            for (int64_t c0 = 0; c0 < d; c0 += 16) {
                __m512 r[16];
                for (int i = 0; i < 16; i++)
                    r[i] = j0 + i < L ? _mm512_loadu_ps(k0 + (j0 + i) * row + c0) : _mm512_setzero_ps();
                transpose16x16(r);
                for (int i = 0; i < 16; i++) _mm512_storeu_ps(kt + (c0 + i) * Lp + j0, r[i]);
            }
        return;
    }
#endif
    for (int64_t k = 0; k < d; k++)
        for (int64_t j = L; j < Lp; j++) kt[k * Lp + j] = 0.0f;
    for (int64_t j = 0; j < L; j++)
        for (int64_t k = 0; k < d; k++) kt[k * Lp + j] = k0[j * row + k];
}

static void attend_rows(const float *base, float *out, int64_t row, int64_t H, int64_t h, int64_t d,
                        int64_t L, int64_t Lp, int64_t i0, int64_t nq, const float *kt, float *s,
                        float *acc, float scale) {
    const float *q[MR];
    float inv[MR];
    for (int64_t r = 0; r < MR; r++) q[r] = base + (i0 + (r < nq ? r : 0)) * row + h * d;
#ifdef __AVX512F__
    scores_avx512(q, kt, d, Lp, s);
    for (int64_t r = 0; r < MR; r++) inv[r] = 1.0f / softmax_numerators_avx512(s + r * Lp, L, scale);
    if (d % 16 == 0) {
        const float *v0 = base + 2 * H + h * d;
        int64_t c0 = 0;
        for (; c0 + 32 <= d; c0 += 32) pv_avx512(v0, row, L, s, Lp, inv, acc, d, c0, 2);
        if (c0 < d) pv_avx512(v0, row, L, s, Lp, inv, acc, d, c0, 1);
        for (int64_t r = 0; r < nq; r++) memcpy(out + (i0 + r) * H + h * d, acc + r * d, sizeof(float) * d);
        return;
    }
#else
    for (int64_t r = 0; r < MR; r++)
        for (int64_t j = 0; j < Lp; j++) {
            float v = 0.0f;
            for (int64_t k = 0; k < d; k++) v += q[r][k] * kt[k * Lp + j];
            s[r * Lp + j] = v;
        }
    for (int64_t r = 0; r < MR; r++) {
        float *sr = s + r * Lp, m = -INFINITY, z = 0.0f;
        for (int64_t j = 0; j < L; j++) m = fmaxf(m, sr[j]);
        for (int64_t j = 0; j < L; j++) { sr[j] = expf((sr[j] - m) * scale); z += sr[j]; }
        inv[r] = 1.0f / z;
    }
#endif
    for (int64_t x = 0; x < MR * d; x++) acc[x] = 0.0f;
    for (int64_t j = 0; j < L; j++) {
        const float *vj = base + j * row + 2 * H + h * d;
        for (int64_t r = 0; r < MR; r++)
            for (int64_t k = 0; k < d; k++) acc[r * d + k] += s[r * Lp + j] * vj[k];
    }
    for (int64_t r = 0; r < nq; r++)
        for (int64_t k = 0; k < d; k++) out[(i0 + r) * H + h * d + k] = acc[r * d + k] * inv[r];
}

void varlen_attention_f32(const float *qkv, float *out, const int64_t *cu, const int64_t *order,
                          int64_t nseq, int64_t nheads, int64_t d, float scale, int64_t max_len, int nthreads) {
    const int64_t H = nheads * d, row = 3 * H;
    const int64_t max_lp = (max_len + 15) / 16 * 16;
    #pragma omp parallel num_threads(nthreads)
    {
        float *kt = malloc(sizeof(float) * d * max_lp);
        float *s = malloc(sizeof(float) * MR * max_lp);
        float *acc = malloc(sizeof(float) * MR * d);
        #pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < nseq * nheads; task++) {
            const int64_t seq = order[task / nheads], h = task % nheads;
            const int64_t start = cu[seq], L = cu[seq + 1] - start, Lp = (L + 15) / 16 * 16;
            const float *base = qkv + start * row;
            transpose_keys(base + H + h * d, row, L, Lp, d, kt);
            for (int64_t i0 = 0; i0 < L; i0 += MR)
                attend_rows(base, out + start * H, row, H, h, d, L, Lp, i0, L - i0 < MR ? L - i0 : MR,
                            kt, s, acc, scale);
        }
        free(kt); free(s); free(acc);
    }
}

/* Causal attention of packed query tokens over a paged KV cache: prefill chunks and decode steps of
 * many sequences in one call, each reading exactly its own context (no padding to the longest).
 *   q:        query rows, head h of token t at q + t * q_stride + h * d
 *   k_cache, v_cache: [num_blocks, kv_heads, block_size, d] (head-major inside a block, so one head's
 *   keys are contiguous: with [block_size, kv_heads, d] consecutive keys of a head were 3 KB apart on
 *   GPT-2, fell into a quarter of the cache sets and ran at 4 GB/s); block_tables: int32 [num_seqs, bt_stride]
 *   sequence s owns query tokens cu_q[s] .. cu_q[s + 1]; its context after this step holds ctx_len[s]
 *   tokens, so its i-th query sits at position p = ctx_len[s] - n_q + i and attends to keys
 *   max(0, p - window + 1) .. p (window <= 0: unbounded).
 *   out:      head h of token t at out + t * out_stride + h * d
 * Work item = (sequence, kv head, chunk of up to QCHUNK queries); the query heads sharing the kv head
 * (grouped-query attention) are done together. Scores are AVX-512 dot products straight from the
 * cache blocks (the K rows of one sequence and head stay in L2 across the chunk's queries); an earlier
 * version transposed K into a scratch first and spent most of its time on the scattered stores.
 * Positions walk the block table incrementally (no division per key). Softmax is exact. */
static inline float dot_f32(const float *a, const float *b, int64_t d) {
#ifdef __AVX512F__
    if ((d & 15) == 0) {
        __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b));
        for (int64_t x = 16; x < d; x += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + x), _mm512_loadu_ps(b + x), acc);
        return _mm512_reduce_add_ps(acc);
    }
#endif
    float acc = 0.f;
    for (int64_t x = 0; x < d; x++) acc += a[x] * b[x];
    return acc;
}

#define QCHUNK 16
void paged_attention_f32(const float *q, int64_t q_stride, const float *k_cache, const float *v_cache,
                         const int32_t *block_tables, int64_t bt_stride, const int64_t *cu_q,
                         const int64_t *ctx_len, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                         int64_t d, int64_t block_size, int64_t window, float scale, float *out,
                         int64_t out_stride, int64_t max_ctx, int threads) {
    const int64_t g = num_heads / num_kv_heads;
    const int64_t head_block = block_size * d;   /* floats of one head in one block */
    int64_t n_items = 0;
    for (int64_t s = 0; s < num_seqs; s++) n_items += (cu_q[s + 1] - cu_q[s] + QCHUNK - 1) / QCHUNK;
    int64_t *item_seq = malloc(sizeof(int64_t) * (n_items > 0 ? n_items : 1));
    int64_t *item_q0 = malloc(sizeof(int64_t) * (n_items > 0 ? n_items : 1));
    for (int64_t s = 0, k = 0; s < num_seqs; s++)
        for (int64_t i = 0; i < cu_q[s + 1] - cu_q[s]; i += QCHUNK) { item_seq[k] = s; item_q0[k] = i; k++; }
    const int64_t cap = max_ctx > 0 ? max_ctx : 1;
    #pragma omp parallel num_threads(threads)
    {
        float *sc = malloc(sizeof(float) * cap);
        float *acc = malloc(sizeof(float) * d);
        #pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < n_items * num_kv_heads; w++) {
            const int64_t it = w / num_kv_heads, kh = w % num_kv_heads, s = item_seq[it];
            const int64_t nq = cu_q[s + 1] - cu_q[s], q0 = item_q0[it];
            const int64_t q1 = q0 + QCHUNK < nq ? q0 + QCHUNK : nq;
            const int64_t first = ctx_len[s] - nq;                 /* position of query 0 */
            const int32_t *table = block_tables + s * bt_stride;
            for (int64_t i = q0; i < q1; i++) {
                const int64_t t = cu_q[s] + i, p = first + i;
                const int64_t lo = (window > 0 && p - window + 1 > 0) ? p - window + 1 : 0;
                const int64_t nj = p + 1 - lo;
                for (int64_t h = 0; h < g; h++) {
                    const float *qh = q + t * q_stride + (kh * g + h) * d;
                    float m = -INFINITY, sum = 0.f;
                    for (int64_t j = 0, blk = lo / block_size, off = lo % block_size; j < nj; j++) {
                        const float *k = k_cache + ((int64_t)table[blk] * num_kv_heads + kh) * head_block + off * d;
                        sc[j] = dot_f32(qh, k, d) * scale;
                        m = sc[j] > m ? sc[j] : m;
                        if (++off == block_size) { off = 0; blk++; }
                    }
                    for (int64_t j = 0; j < nj; j++) { sc[j] = expf(sc[j] - m); sum += sc[j]; }
                    const float inv = 1.f / sum;
                    float *dst = out + t * out_stride + (kh * g + h) * d;
#ifdef __AVX512F__
                    if ((d & 15) == 0) {
                        /* the weighted sum of V rows in registers, 64 columns per pass (a plain C loop
                         * kept acc in memory and ran 7x slower than the whole rest of the kernel) */
                        for (int64_t c = 0; c < d; c += 64) {
                            const int64_t w = d - c < 64 ? d - c : 64;
                            const __mmask16 m1 = w > 16 ? 0xFFFF : 0, m2 = w > 32 ? 0xFFFF : 0, m3 = w > 48 ? 0xFFFF : 0;
                            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                            for (int64_t j = 0, blk = lo / block_size, off = lo % block_size; j < nj; j++) {
                                const float *v = v_cache + ((int64_t)table[blk] * num_kv_heads + kh) * head_block + off * d + c;
                                const __m512 pj = _mm512_set1_ps(sc[j] * inv);
                                a0 = _mm512_fmadd_ps(pj, _mm512_loadu_ps(v), a0);
                                a1 = _mm512_fmadd_ps(pj, _mm512_maskz_loadu_ps(m1, v + 16), a1);
                                a2 = _mm512_fmadd_ps(pj, _mm512_maskz_loadu_ps(m2, v + 32), a2);
                                a3 = _mm512_fmadd_ps(pj, _mm512_maskz_loadu_ps(m3, v + 48), a3);
                                if (++off == block_size) { off = 0; blk++; }
                            }
                            _mm512_storeu_ps(dst + c, a0);
                            _mm512_mask_storeu_ps(dst + c + 16, m1, a1);
                            _mm512_mask_storeu_ps(dst + c + 32, m2, a2);
                            _mm512_mask_storeu_ps(dst + c + 48, m3, a3);
                        }
                        continue;
                    }
#endif
                    memset(acc, 0, sizeof(float) * d);
                    for (int64_t j = 0, blk = lo / block_size, off = lo % block_size; j < nj; j++) {
                        const float *v = v_cache + ((int64_t)table[blk] * num_kv_heads + kh) * head_block + off * d;
                        const float pj = sc[j] * inv;
                        for (int64_t x = 0; x < d; x++) acc[x] += pj * v[x];
                        if (++off == block_size) { off = 0; blk++; }
                    }
                    memcpy(dst, acc, sizeof(float) * d);
                }
            }
        }
        free(sc);
        free(acc);
    }
    free(item_seq);
    free(item_q0);
}
