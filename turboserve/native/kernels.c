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

/* q[r, :] = round(x[r, :] * inv_smooth / scale[r]), scale[r] = max|x[r, :] * inv_smooth| / 127. */
void quantize_rows_i8(const float *x, const float *inv_smooth, int8_t *q, float *scale,
                      int64_t rows, int64_t cols, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * cols;
        float amax = 0.0f;
        for (int64_t c = 0; c < cols; c++) amax = fmaxf(amax, fabsf(xr[c] * inv_smooth[c]));
        float s = fmaxf(amax, 1e-8f) / 127.0f;
        float inv = 1.0f / s;
        int8_t *qr = q + r * cols;
        for (int64_t c = 0; c < cols; c++) {
            float v = nearbyintf(xr[c] * inv_smooth[c] * inv);
            v = fminf(fmaxf(v, -127.0f), 127.0f);
            qr[c] = (int8_t)v;
        }
        scale[r] = s;
    }
}

/* out[r, c] = acc[r, c] * row_scale[r] * col_scale[c] + bias[c] */
void dequantize_rows(const int32_t *acc, const float *row_scale, const float *col_scale, const float *bias,
                     float *out, int64_t rows, int64_t cols, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const int32_t *ar = acc + r * cols;
        float *orow = out + r * cols;
        const float rs = row_scale[r];
        for (int64_t c = 0; c < cols; c++) orow[c] = (float)ar[c] * rs * col_scale[c] + bias[c];
    }
}

/* out[r, :] = LayerNorm(x[r, :] + res[r, :]) * gamma + beta, statistics in fp32 over two passes. */
void add_layer_norm(const float *x, const float *res, const float *gamma, const float *beta, float eps,
                    float *out, int64_t rows, int64_t cols, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * cols;
        const float *rr = res ? res + r * cols : NULL;
        float *orow = out + r * cols;
        float sum = 0.0f;
        for (int64_t c = 0; c < cols; c++) {
            float v = rr ? xr[c] + rr[c] : xr[c];
            orow[c] = v;
            sum += v;
        }
        const float mean = sum / (float)cols;
        float var = 0.0f;
        for (int64_t c = 0; c < cols; c++) {
            float d = orow[c] - mean;
            var += d * d;
        }
        const float rstd = 1.0f / sqrtf(var / (float)cols + eps);
        for (int64_t c = 0; c < cols; c++) orow[c] = (orow[c] - mean) * rstd * gamma[c] + beta[c];
    }
}

/* Bidirectional attention of each packed sequence over exactly its own tokens.
 * qkv: [T, 3H] rows (Q | K | V, heads of `d` columns each); out: [T, H]. One task per (sequence,
 * head), longest sequences first (`order`) so the last tasks are short. Per task K is copied once,
 * transposed, into a [d, Lp] scratch (Lp = L rounded up to 16, zero-filled) so 16 keys sit in one
 * register; QB query rows share every key load. Softmax covers only the L real keys. */
#define QB 8
static void attend_rows(const float *base, float *out, int64_t row, int64_t H, int64_t h, int64_t d,
                        int64_t L, int64_t Lp, int64_t i0, int64_t nq, const float *kt, float *s,
                        float *acc, float scale) {
    const float *q[QB];
    for (int64_t qi = 0; qi < QB; qi++) q[qi] = base + (i0 + (qi < nq ? qi : 0)) * row + h * d;
#ifdef __AVX512F__
    for (int64_t j0 = 0; j0 < Lp; j0 += 16) {
        __m512 a[QB];
        #pragma GCC unroll 8
        for (int qi = 0; qi < QB; qi++) a[qi] = _mm512_setzero_ps();
        for (int64_t k = 0; k < d; k++) {
            const __m512 kv = _mm512_loadu_ps(kt + k * Lp + j0);
            #pragma GCC unroll 8
            for (int qi = 0; qi < QB; qi++) a[qi] = _mm512_fmadd_ps(_mm512_set1_ps(q[qi][k]), kv, a[qi]);
        }
        #pragma GCC unroll 8
        for (int qi = 0; qi < QB; qi++) _mm512_storeu_ps(s + qi * Lp + j0, a[qi]);
    }
#else
    for (int64_t qi = 0; qi < QB; qi++)
        for (int64_t j = 0; j < Lp; j++) {
            float v = 0.0f;
            for (int64_t k = 0; k < d; k++) v += q[qi][k] * kt[k * Lp + j];
            s[qi * Lp + j] = v;
        }
#endif
    for (int64_t qi = 0; qi < QB; qi++) {
        float *sr = s + qi * Lp;
        float m = -INFINITY;
        for (int64_t j = 0; j < L; j++) m = fmaxf(m, sr[j]);
        float z = 0.0f;
        for (int64_t j = 0; j < L; j++) { sr[j] = expf((sr[j] - m) * scale); z += sr[j]; }
        const float inv = 1.0f / z;
        for (int64_t j = 0; j < L; j++) sr[j] *= inv;
    }
#ifdef __AVX512F__
    if (d % 16 == 0) {
        for (int64_t k0 = 0; k0 < d; k0 += 16) {
            __m512 a[QB];
            #pragma GCC unroll 8
            for (int qi = 0; qi < QB; qi++) a[qi] = _mm512_setzero_ps();
            for (int64_t j = 0; j < L; j++) {
                const __m512 v = _mm512_loadu_ps(base + j * row + 2 * H + h * d + k0);
                #pragma GCC unroll 8
                for (int qi = 0; qi < QB; qi++) a[qi] = _mm512_fmadd_ps(_mm512_set1_ps(s[qi * Lp + j]), v, a[qi]);
            }
            #pragma GCC unroll 8
            for (int qi = 0; qi < QB; qi++) _mm512_storeu_ps(acc + qi * d + k0, a[qi]);
        }
    } else
#endif
    {
        for (int64_t x = 0; x < QB * d; x++) acc[x] = 0.0f;
        for (int64_t j = 0; j < L; j++) {
            const float *vj = base + j * row + 2 * H + h * d;
            for (int64_t qi = 0; qi < QB; qi++)
                for (int64_t k = 0; k < d; k++) acc[qi * d + k] += s[qi * Lp + j] * vj[k];
        }
    }
    for (int64_t qi = 0; qi < nq; qi++)
        memcpy(out + (i0 + qi) * H + h * d, acc + qi * d, sizeof(float) * d);
}

void varlen_attention_f32(const float *qkv, float *out, const int64_t *cu, const int64_t *order,
                          int64_t nseq, int64_t nheads, int64_t d, float scale, int64_t max_len, int nthreads) {
    const int64_t H = nheads * d, row = 3 * H;
    const int64_t max_lp = (max_len + 15) / 16 * 16;
    #pragma omp parallel num_threads(nthreads)
    {
        float *kt = malloc(sizeof(float) * d * max_lp);
        float *s = malloc(sizeof(float) * QB * max_lp);
        float *acc = malloc(sizeof(float) * QB * d);
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
            for (int64_t i0 = 0; i0 < L; i0 += QB)
                attend_rows(base, out + start * H, row, H, h, d, L, Lp, i0, L - i0 < QB ? L - i0 : QB,
                            kt, s, acc, scale);
        }
        free(kt); free(s); free(acc);
    }
}
