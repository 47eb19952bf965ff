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
static inline __m512 exp512(__m512 x);
/* erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), vectorized. */
static inline __m512 erf512(__m512 x) {
    const __m512 ax = _mm512_abs_ps(x);
    /* t = 1 / (1 + 0.3275911 |x|): reciprocal estimate plus one Newton step (a divide costs 3x more) */
    const __m512 den = _mm512_fmadd_ps(ax, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f));
    __m512 t = _mm512_rcp14_ps(den);
    t = _mm512_mul_ps(t, _mm512_fnmadd_ps(den, t, _mm512_set1_ps(2.0f)));
    __m512 p = _mm512_set1_ps(1.061405429f);
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
    p = _mm512_mul_ps(p, t);
    const __m512 y = _mm512_fnmadd_ps(p, exp512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(ax, ax))), _mm512_set1_ps(1.0f));
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
            if (q) {
                float amax = 0.0f;
                for (int64_t c = 0; c < cols; c++) amax = fmaxf(amax, fabsf(v[c] * inv_smooth[c]));
                const float scale = fmaxf(amax, 1e-8f) / 127.0f, inv = 1.0f / scale;
                int8_t *qr = q + r * cols;
                for (int64_t c = 0; c < cols; c++) {
                    const float x = fminf(fmaxf(nearbyintf(v[c] * inv_smooth[c] * inv), -127.0f), 127.0f);
                    qr[c] = (int8_t)x;
                }
                qscale[r] = scale;
            }
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
#define MR 4   /* query rows per micro-kernel */

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

/* s[qi][j] = q_qi . k_j for MR query rows and all Lp keys; 4 key vectors x MR rows per step. */
static void scores_avx512(const float *const q[MR], const float *kt, int64_t d, int64_t Lp, float *s) {
    int64_t j0 = 0;
    for (; j0 + 64 <= Lp; j0 += 64) {
        __m512 a[MR][4];
        for (int r = 0; r < MR; r++)
            for (int v = 0; v < 4; v++) a[r][v] = _mm512_setzero_ps();
        for (int64_t k = 0; k < d; k++) {
            const float *kr = kt + k * Lp + j0;
            const __m512 k0 = _mm512_loadu_ps(kr), k1 = _mm512_loadu_ps(kr + 16),
                         k2 = _mm512_loadu_ps(kr + 32), k3 = _mm512_loadu_ps(kr + 48);
            #pragma GCC unroll 4
            for (int r = 0; r < MR; r++) {
                const __m512 qv = _mm512_set1_ps(q[r][k]);
                a[r][0] = _mm512_fmadd_ps(qv, k0, a[r][0]);
                a[r][1] = _mm512_fmadd_ps(qv, k1, a[r][1]);
                a[r][2] = _mm512_fmadd_ps(qv, k2, a[r][2]);
                a[r][3] = _mm512_fmadd_ps(qv, k3, a[r][3]);
            }
        }
        for (int r = 0; r < MR; r++)
            for (int v = 0; v < 4; v++) _mm512_storeu_ps(s + r * Lp + j0 + 16 * v, a[r][v]);
    }
    for (; j0 < Lp; j0 += 16) {
        __m512 a[MR];
        for (int r = 0; r < MR; r++) a[r] = _mm512_setzero_ps();
        for (int64_t k = 0; k < d; k++) {
            const __m512 kv = _mm512_loadu_ps(kt + k * Lp + j0);
            #pragma GCC unroll 4
            for (int r = 0; r < MR; r++) a[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r][k]), kv, a[r]);
        }
        for (int r = 0; r < MR; r++) _mm512_storeu_ps(s + r * Lp + j0, a[r]);
    }
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
        for (int64_t k0 = 0; k0 < d; k0 += 16) {
            __m512 a[MR];
            for (int r = 0; r < MR; r++) a[r] = _mm512_setzero_ps();
            for (int64_t j = 0; j < L; j++) {
                const __m512 v = _mm512_loadu_ps(base + j * row + 2 * H + h * d + k0);
                #pragma GCC unroll 4
                for (int r = 0; r < MR; r++) a[r] = _mm512_fmadd_ps(_mm512_set1_ps(s[r * Lp + j]), v, a[r]);
            }
            for (int r = 0; r < MR; r++) _mm512_storeu_ps(acc + r * d + k0, _mm512_mul_ps(a[r], _mm512_set1_ps(inv[r])));
        }
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
            for (int64_t k = 0; k < d; k++)
                for (int64_t j = L; j < Lp; j++) kt[k * Lp + j] = 0.0f;
            for (int64_t j = 0; j < L; j++) {
                const float *kj = base + j * row + H + h * d;
                for (int64_t k = 0; k < d; k++) kt[k * Lp + j] = kj[k];
            }
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
 *   k_cache, v_cache: [num_blocks, block_size, kv_heads, d]; block_tables: int32 [num_seqs, bt_stride]
 *   sequence s owns query tokens cu_q[s] .. cu_q[s + 1]; its context after this step holds ctx_len[s]
 *   tokens, so its i-th query sits at position p = ctx_len[s] - n_q + i and attends to keys
 *   max(0, p - window + 1) .. p (window <= 0: unbounded).
 *   out:      head h of token t at out + t * out_stride + h * d
 * Work item = (query token, kv head): the group of query heads sharing that kv head reads each K and V
 * row once (grouped-query attention). Scores are exact (two passes: max, then exp and sums). */
void paged_attention_f32(const float *q, int64_t q_stride, const float *k_cache, const float *v_cache,
                         const int32_t *block_tables, int64_t bt_stride, const int64_t *cu_q,
                         const int64_t *ctx_len, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                         int64_t d, int64_t block_size, int64_t window, float scale, float *out,
                         int64_t out_stride, int64_t max_ctx, int threads) {
    const int64_t T = cu_q[num_seqs];
    const int64_t g = num_heads / num_kv_heads;
    int64_t *seq_of = malloc(sizeof(int64_t) * (T > 0 ? T : 1));
    for (int64_t s = 0; s < num_seqs; s++)
        for (int64_t t = cu_q[s]; t < cu_q[s + 1]; t++) seq_of[t] = s;
    const int64_t row = num_kv_heads * d;        /* floats per cached token */
    #pragma omp parallel num_threads(threads)
    {
        float *scores = malloc(sizeof(float) * g * (max_ctx > 0 ? max_ctx : 1));
        float *acc = malloc(sizeof(float) * g * d);
        #pragma omp for schedule(dynamic, 2)
        for (int64_t w = 0; w < T * num_kv_heads; w++) {
            const int64_t t = w / num_kv_heads, kh = w % num_kv_heads, s = seq_of[t];
            const int64_t nq = cu_q[s + 1] - cu_q[s];
            const int64_t p = ctx_len[s] - nq + (t - cu_q[s]);
            const int64_t lo = (window > 0 && p - window + 1 > 0) ? p - window + 1 : 0;
            const int64_t n = p + 1 - lo;
            const int32_t *table = block_tables + s * bt_stride;
            const float *qh = q + t * q_stride + kh * g * d;
            for (int64_t j = 0; j < n; j++) {
                const int64_t pos = lo + j;
                const float *k = k_cache + ((int64_t)table[pos / block_size] * block_size + pos % block_size) * row + kh * d;
                for (int64_t h = 0; h < g; h++) {
                    const float *qq = qh + h * d;
                    float dot = 0.f;
                    for (int64_t x = 0; x < d; x++) dot += qq[x] * k[x];
                    scores[h * n + j] = dot * scale;
                }
            }
            for (int64_t h = 0; h < g; h++) {
                float *sc = scores + h * n, m = -INFINITY, sum = 0.f;
                for (int64_t j = 0; j < n; j++) m = sc[j] > m ? sc[j] : m;
                for (int64_t j = 0; j < n; j++) { sc[j] = expf(sc[j] - m); sum += sc[j]; }
                const float inv = 1.f / sum;
                for (int64_t j = 0; j < n; j++) sc[j] *= inv;
            }
            memset(acc, 0, sizeof(float) * g * d);
            for (int64_t j = 0; j < n; j++) {
                const int64_t pos = lo + j;
                const float *v = v_cache + ((int64_t)table[pos / block_size] * block_size + pos % block_size) * row + kh * d;
                for (int64_t h = 0; h < g; h++) {
                    const float pj = scores[h * n + j];
                    float *a = acc + h * d;
                    for (int64_t x = 0; x < d; x++) a[x] += pj * v[x];
                }
            }
            for (int64_t h = 0; h < g; h++)
                memcpy(out + t * out_stride + (kh * g + h) * d, acc + h * d, sizeof(float) * d);
        }
        free(scores);
        free(acc);
    }
    free(seq_of);
}
