/* turboserve's native CPU kernels: the work between two GEMMs, one pass each, and varlen attention.
 *
 * Plain C with OpenMP, called through ctypes (turboserve/native/__init__.py builds this file on first
 * use with the system's C compiler and caches the library by source hash). ctypes releases the GIL for
 * the call. Every kernel takes the thread count to use, so turboserve never runs more threads than it
 * was given. Row-wise kernels treat each row alone, so a row's result never depends on its batch.
 */
#include <math.h>
#include <omp.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* bf16 is the upper half of an fp32: widening is a shift; narrowing rounds to nearest even, as torch
 * does, and keeps a NaN a NaN (quiet). The row loops vectorize. */
static inline float bf16_to_f32(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u = (u & 0x7fffffffu) > 0x7f800000u ? (u | 0x00400000u) : u + 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static void bf16_to_f32_row(const uint16_t *s, float *d, int64_t n) {
    for (int64_t i = 0; i < n; i++) d[i] = bf16_to_f32(s[i]);
}
static void f32_to_bf16_row(const float *s, uint16_t *d, int64_t n) {
    for (int64_t i = 0; i < n; i++) d[i] = f32_to_bf16(s[i]);
}

#ifdef __AVX2__
/* Horizontal max / sum of 8 fp32 lanes, and the 8 column sums of two int32 vectors whose lanes hold
 * pairs of partial sums (lanes 2c, 2c + 1 of a: column c of 0-3, of b: column 4 + c), as vpmaddwd
 * leaves them; hadd interleaves the 128-bit halves, the permute puts the columns back in order. */
static inline float hmax8(__m256 v) {
    float lane[8];
    _mm256_storeu_ps(lane, v);
    float m = lane[0];
    for (int u = 1; u < 8; u++) m = lane[u] > m ? lane[u] : m;
    return m;
}

static inline float hsum8(__m256 v) {
    float lane[8], z = 0.0f;
    _mm256_storeu_ps(lane, v);
    for (int u = 0; u < 8; u++) z += lane[u];
    return z;
}

static inline __m256i pair_sums8(__m256i a, __m256i b) {
    return _mm256_permute4x64_epi64(_mm256_hadd_epi32(a, b), 0xD8);
}

/* the first min(n, 8) int32 lanes of v (n > 0) at o */
static inline void store_i32_lanes(int32_t *o, __m256i v, int64_t n) {
    if (n >= 8) {
        _mm256_storeu_si256((__m256i *)o, v);
    } else {
        int32_t lane[8];
        _mm256_storeu_si256((__m256i *)lane, v);
        memcpy(o, lane, sizeof(int32_t) * (size_t)n);
    }
}
#endif

/* Everything between two GEMMs, one pass per row (TurboTransformers' fusion):
 *   v   = src                                   (fp32 GEMM output, bias already added), or
 *   v   = src_i32 * row_scale[r] * col_scale + bias   (int8 GEMM output)
 *   v   = act(v)                                 act: 0 none, 1 gelu (erf), 2 gelu (tanh), 3 relu,
 *                                                4 silu, 5 silu-and-multiply: the row is gate | up,
 *                                                v = silu(gate) * up, cols / 2 wide from here on;
 *                                                6 gelu-and-multiply (erf GELU: ModernBERT's GeGLU),
 *                                                7 the same with tanh GELU (Gemma's)
 *   v   = v + residual                           if residual
 *   v   = LayerNorm(v) * gamma + beta            if gamma (beta may be NULL; rms: RMSNorm(v) * gamma)
 *   out = v                                      if out (may alias src or residual: rows are
 *                                                read whole before they are written)
 *   q, qscale = int8(v * inv_smooth), per row    if q (the next int8 GEMM's input)
 * With bf16 set, src, residual, gamma, beta and out are bf16 (a bf16 model's activations): rows are
 * widened on load and rounded once on store, the arithmetic between is fp32 as above (torch's own
 * version took four passes over the rows, 1.8 ms against 0.4 for MiniLM's LayerNorm of 4k tokens).
 * `v` is a per-thread scratch of `cols` floats. */
enum { ACT_NONE = 0, ACT_GELU = 1, ACT_GELU_TANH = 2, ACT_RELU = 3, ACT_SILU = 4, ACT_SILU_MUL = 5, ACT_GELU_MUL = 6,
       ACT_GELU_TANH_MUL = 7 };

#ifdef __AVX512F__
/* exp(x): 2^n * p(r), r = x - n ln2, degree-6 Taylor polynomial (relative error < 2e-7); exactly 0 below
 * -87, large x overflow to inf. The exact 0 matters: exp(-87) = 1.6e-38 sits at the edge of the normal
 * range, and softmax over masked keys (ModernBERT's window, a -1e30 bias) turned it into denormal
 * products in P.V, each a microcode assist wherever FTZ / DAZ are off (40% of ModernBERT's forward). */
static inline __m512 exp512(__m512 x) {
    const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
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
    return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n));
}

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
#elif defined(__AVX2__)
/* The same two functions in 8 lanes for AVX2-only CPUs (AMD Zen 1-3, Intel before Ice Lake), where
 * the scalar expf / erff loops made fc1's GELU epilogue cost as much as fc1 itself. No scalef: 2^n is
 * built in the exponent bits, so x is clamped to [-87, 88] (exp(88) = 1.7e38 instead of inf above);
 * below -87 the result is exactly 0, as exp512's. */
static inline __m256 exp256(__m256 x) {
    const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860682030941723212e-6f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(keep, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

static inline __m256 erf256(__m256 x) {          /* A & S 7.1.28, as erf512 */
    const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u));
    const __m256 ax = _mm256_andnot_ps(sign, x);
    __m256 p = _mm256_set1_ps(0.0000430638f);
    p = _mm256_fmadd_ps(p, ax, _mm256_set1_ps(0.0002765672f));
    p = _mm256_fmadd_ps(p, ax, _mm256_set1_ps(0.0001520143f));
    p = _mm256_fmadd_ps(p, ax, _mm256_set1_ps(0.0092705272f));
    p = _mm256_fmadd_ps(p, ax, _mm256_set1_ps(0.0422820123f));
    p = _mm256_fmadd_ps(p, ax, _mm256_set1_ps(0.0705230784f));
    p = _mm256_fmadd_ps(p, ax, _mm256_set1_ps(1.0f));
    p = _mm256_mul_ps(p, p);
    p = _mm256_mul_ps(p, p);
    p = _mm256_mul_ps(p, p);
    p = _mm256_mul_ps(p, p);                                  /* p^16 */
    __m256 t = _mm256_rcp_ps(p);
    t = _mm256_mul_ps(t, _mm256_fnmadd_ps(p, t, _mm256_set1_ps(2.0f)));
    t = _mm256_blendv_ps(t, _mm256_setzero_ps(), _mm256_cmp_ps(p, _mm256_set1_ps(INFINITY), _CMP_EQ_OQ));
    const __m256 y = _mm256_sub_ps(_mm256_set1_ps(1.0f), t);
    return _mm256_or_ps(y, _mm256_and_ps(x, sign));
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
    } else if (act == ACT_SILU) {
        for (; c + 16 <= n; c += 16) {          /* x / (1 + e^-x), -x clamped at 80 as in GELU-tanh */
            const __m512 x = _mm512_loadu_ps(v + c);
            const __m512 e = exp512(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), x), _mm512_set1_ps(80.0f)));
            _mm512_storeu_ps(v + c, _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e)));
        }
    } else if (act == ACT_GELU_TANH) {
        /* 0.5 x (1 + tanh u) = x / (1 + exp(-2u)), u = sqrt(2 / pi) (x + 0.044715 x^3): one exp, no
         * tanh (the scalar tanhf loop made GPT-2's fc1 epilogue its most expensive step); -2u is
         * clamped at 80, so for very negative x the result is x / e^80, i.e. 0 */
        for (; c + 16 <= n; c += 16) {
            const __m512 x = _mm512_loadu_ps(v + c);
            const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
            const __m512 u2 = _mm512_min_ps(_mm512_mul_ps(_mm512_fmadd_ps(x3, _mm512_set1_ps(0.044715f), x),
                                                          _mm512_set1_ps(-2.0f * 0.79788456080286536f)),
                                            _mm512_set1_ps(80.0f));
            _mm512_storeu_ps(v + c, _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(u2))));
        }
    }
#elif defined(__AVX2__)
    const __m256 one = _mm256_set1_ps(1.0f);
    if (act == ACT_GELU) {
        for (; c + 8 <= n; c += 8) {
            const __m256 x = _mm256_loadu_ps(v + c);
            const __m256 e = erf256(_mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f)));
            _mm256_storeu_ps(v + c, _mm256_mul_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.5f)), _mm256_add_ps(e, one)));
        }
    } else if (act == ACT_SILU) {
        for (; c + 8 <= n; c += 8) {
            const __m256 x = _mm256_loadu_ps(v + c);
            const __m256 e = exp256(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), x), _mm256_set1_ps(80.0f)));
            _mm256_storeu_ps(v + c, _mm256_div_ps(x, _mm256_add_ps(one, e)));
        }
    } else if (act == ACT_GELU_TANH) {
        for (; c + 8 <= n; c += 8) {
            const __m256 x = _mm256_loadu_ps(v + c);
            const __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
            const __m256 u2 = _mm256_min_ps(_mm256_mul_ps(_mm256_fmadd_ps(x3, _mm256_set1_ps(0.044715f), x),
                                                          _mm256_set1_ps(-2.0f * 0.79788456080286536f)),
                                            _mm256_set1_ps(80.0f));
            _mm256_storeu_ps(v + c, _mm256_div_ps(x, _mm256_add_ps(one, exp256(u2))));
        }
    }
#endif
    for (; c < n; c++) {
        const float x = v[c];
        switch (act) {
        case ACT_GELU: v[c] = 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); break;
        case ACT_GELU_TANH: v[c] = 0.5f * x * (1.0f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x))); break;
        case ACT_RELU: v[c] = x > 0.0f ? x : 0.0f; break;
        case ACT_SILU: v[c] = x / (1.0f + expf(-x)); break;
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
#elif defined(__AVX2__)
    const __m256 nosign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 m = _mm256_setzero_ps();
    for (; c + 8 <= cols; c += 8)
        m = _mm256_max_ps(m, _mm256_and_ps(nosign, _mm256_mul_ps(_mm256_loadu_ps(v + c), _mm256_loadu_ps(inv_smooth + c))));
    amax = fmaxf(amax, hmax8(m));
#endif
    for (; c < cols; c++) amax = fmaxf(amax, fabsf(v[c] * inv_smooth[c]));
    /* max ignores NaN (and -ffast-math assumes none): look for non-finite values explicitly, so a
     * NaN or inf row gets a NaN scale, as torch's quantization gives, instead of a finite one that
     * hides it as -127s */
    int finite = 1;
    for (int64_t j = 0; j < cols; j++) {
        uint32_t u;
        memcpy(&u, &v[j], 4);
        finite &= (u & 0x7f800000u) != 0x7f800000u;
    }
    if (!finite) amax = __builtin_nanf("");
    const float scale = finite ? fmaxf(amax, 1e-8f) / 127.0f : amax, inv = 1.0f / scale;
    c = 0;
#ifdef __AVX512F__
    const __m512 vinv = _mm512_set1_ps(inv);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    for (; c + 16 <= cols; c += 16) {
        const __m512 x = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(v + c), _mm512_loadu_ps(inv_smooth + c)), vinv);
        const __m512i n = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(x), lo), hi);
        _mm_storeu_si128((__m128i *)(qr + c), _mm512_cvtepi32_epi8(n));
    }
#elif defined(__AVX2__)
    const __m256 vinv = _mm256_set1_ps(inv);
    for (; c + 16 <= cols; c += 16) {      /* 16 values -> 2 x 8 int32 -> 16 int16 -> 16 int8 (saturating packs) */
        const __m256i n0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(v + c), _mm256_loadu_ps(inv_smooth + c)), vinv));
        const __m256i n1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(v + c + 8), _mm256_loadu_ps(inv_smooth + c + 8)), vinv));
        const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(n0, n1), 0xD8);   /* undo the per-lane pack order */
        __m128i b8 = _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
        b8 = _mm_max_epi8(b8, _mm_set1_epi8(-127));                                     /* -128 -> -127 */
        _mm_storeu_si128((__m128i *)(qr + c), b8);
    }
#endif
    for (; c < cols; c++) qr[c] = (int8_t)fminf(fmaxf(nearbyintf(v[c] * inv_smooth[c] * inv), -127.0f), 127.0f);
    return scale;
}

void row_epilogue(const void *src, const int32_t *src_i32, const float *row_scale, const float *col_scale,
                  const float *bias, int act, const void *residual, const void *gamma_in, const void *beta_in,
                  float eps, int rms, void *out, const float *inv_smooth, int8_t *q, float *qscale,
                  int64_t rows, int64_t cols, int bf16, int nthreads) {
    /* act(first half) * second half */
    const int gated = act == ACT_SILU_MUL || act == ACT_GELU_MUL || act == ACT_GELU_TANH_MUL;
    const int64_t oc = gated ? cols / 2 : cols;                       /* output columns */
    #pragma omp parallel num_threads(nthreads)
    {
        float *v = malloc(sizeof(float) * (bf16 ? 4 * cols : cols));
        const float *gamma = gamma_in, *beta = beta_in;
        if (bf16) {                        /* the norm's weights widened once per thread */
            float *g = v + cols, *b = v + 2 * cols;
            if (gamma) { bf16_to_f32_row(gamma_in, g, oc); gamma = g; }
            if (beta) { bf16_to_f32_row(beta_in, b, oc); beta = b; }
        }
        float *res = v + 3 * cols;         /* a bf16 residual row, widened */
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            if (src_i32) {
                const int32_t *ar = src_i32 + r * cols;
                const float rs = row_scale[r];
                for (int64_t c = 0; c < cols; c++) v[c] = (float)ar[c] * rs * col_scale[c] + bias[c];
            } else if (bf16) {
                bf16_to_f32_row((const uint16_t *)src + r * cols, v, cols);
            } else {
                memcpy(v, (const float *)src + r * cols, sizeof(float) * cols);
            }
            if (gated) {
                activate_row(v, oc, act == ACT_SILU_MUL ? ACT_SILU : act == ACT_GELU_MUL ? ACT_GELU : ACT_GELU_TANH);
                for (int64_t c = 0; c < oc; c++) v[c] *= v[oc + c];
            } else if (act) {
                activate_row(v, cols, act);
            }
            if (residual) {
                const float *rr = (const float *)residual + r * oc;
                if (bf16) {
                    bf16_to_f32_row((const uint16_t *)residual + r * oc, res, oc);
                    rr = res;
                }
                for (int64_t c = 0; c < oc; c++) v[c] += rr[c];
            }
            if (gamma && rms) {
                float ss = 0.0f;
                for (int64_t c = 0; c < oc; c++) ss += v[c] * v[c];
                const float rstd = 1.0f / sqrtf(ss / (float)oc + eps);
                for (int64_t c = 0; c < oc; c++) v[c] = v[c] * rstd * gamma[c];
            } else if (gamma) {
                float sum = 0.0f, var = 0.0f;
                for (int64_t c = 0; c < oc; c++) sum += v[c];
                const float mean = sum / (float)oc;
                for (int64_t c = 0; c < oc; c++) { const float d = v[c] - mean; var += d * d; }
                const float rstd = 1.0f / sqrtf(var / (float)oc + eps);
                for (int64_t c = 0; c < oc; c++) v[c] = (v[c] - mean) * rstd * gamma[c] + (beta ? beta[c] : 0.0f);
            }
            if (out && bf16) f32_to_bf16_row(v, (uint16_t *)out + r * oc, oc);
            else if (out) memcpy((float *)out + r * oc, v, sizeof(float) * oc);
            if (q) qscale[r] = quantize_row(v, inv_smooth, q + r * oc, oc);
        }
        free(v);
    }
}

/* Bidirectional attention of each packed sequence over exactly its own tokens.
 * qkv: [T, 3H] rows (Q | K | V, heads of `d` columns each); out: [T, H]. One task per (sequence,
 * head), longest sequences first (`order`) so the last tasks are short. Per task K is copied once,
 * transposed, into a [d, Lp] scratch (Lp = L rounded up to 16, zero-filled) so 16 keys sit in one
 * register. Softmax covers only the L real keys; its 1/sum is applied to the d outputs, not the L
 * probabilities. A relative position bias (MPNet's, T5's: one value per head and key - query offset)
 * comes as `bias`: [nheads, bias_stride] floats, head h's bias of key j for query i at
 * bias[h * bias_stride + bias_center + j - i], already divided by `scale` (the softmax scales raw
 * q.k scores), added to the scores before the softmax; NULL for none. window > 0 bounds attention
 * to keys |j - i| < window (ModernBERT's and EmbeddingGemma's sliding layers): each block of MR
 * query rows reads only the keys its rows' windows cover, so a sliding layer costs O(L * window),
 * not O(L^2). bf16 qkv / out (a bf16 model): each task widens its head's rows to fp32 first and
 * rounds its output once, so the arithmetic is the fp32 kernel's (against torch's bf16 SDPA: 7 ms
 * against 16 for a 64-sequence MiniLM batch on a Zen 4 CPU without AMX). */
#define MR 8   /* query rows per micro-kernel */

#ifdef __AVX512F__
/* s[qi][j] = q_qi . k_j for MR query rows and n keys (a multiple of 16; kt's and s's rows Lp apart):
 * 32 keys (two vectors) x MR rows per step, 16 independent accumulators, each q element broadcast
 * straight from memory. With 4 rows x 64 keys
 * the kernel ran at 130-145 GFLOP/s; 8 x 32 keeps both FMA ports busy (load ports have room for the
 * 2 key loads + 8 broadcasts per 16 FMAs). */
static void scores_avx512(const float *const q[MR], const float *kt, int64_t d, int64_t n, int64_t Lp, float *s) {
    int64_t j0 = 0;
    for (; j0 + 32 <= n; j0 += 32) {
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
    for (; j0 < n; j0 += 16) {
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

#if defined(__AVX2__) && !defined(__AVX512F__)
/* The attention micro-kernels in 8 lanes (AVX2-only CPUs). 16 ymm registers: scores and P.V take the
 * MR rows four at a time (8 accumulators, 2 key / value loads and a broadcast in flight), with every
 * pointer a named local and the functions kept out of line: inlined into the attention loop with the
 * rows' pointers in an array, GCC kept the key pointer on the stack and added to it there every
 * iteration, a store-to-load chain that held scores to 0.7 FMAs a cycle (2.2x slower than this form
 * in a micro-benchmark at MiniLM's d = 32; P.V 1.5x). */
/* a00 .. a31 += the 4 scalars at e0 .. e3 (rows), each times the 16 values in x0 | x1 */
#define FMA_4X16(x0, x1, e0, e1, e2, e3) do { __m256 b_ = _mm256_broadcast_ss(e0); \
        a00 = _mm256_fmadd_ps(b_, x0, a00); a01 = _mm256_fmadd_ps(b_, x1, a01); b_ = _mm256_broadcast_ss(e1); \
        a10 = _mm256_fmadd_ps(b_, x0, a10); a11 = _mm256_fmadd_ps(b_, x1, a11); b_ = _mm256_broadcast_ss(e2); \
        a20 = _mm256_fmadd_ps(b_, x0, a20); a21 = _mm256_fmadd_ps(b_, x1, a21); b_ = _mm256_broadcast_ss(e3); \
        a30 = _mm256_fmadd_ps(b_, x0, a30); a31 = _mm256_fmadd_ps(b_, x1, a31); } while (0)
static __attribute__((noinline)) void scores_avx2(const float *const q[MR], const float *kt, int64_t d, int64_t n,
                                                  int64_t Lp, float *s) {
    for (int r0 = 0; r0 < MR; r0 += 4) {
        const float *q0 = q[r0], *q1 = q[r0 + 1], *q2 = q[r0 + 2], *q3 = q[r0 + 3];
        for (int64_t j0 = 0; j0 < n; j0 += 16) {            /* n is a multiple of 16 */
            __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
            const float *kr = kt + j0;
            #pragma GCC unroll 4
            for (int64_t k = 0; k < d; k++, kr += Lp) {
                const __m256 k0 = _mm256_loadu_ps(kr), k1 = _mm256_loadu_ps(kr + 8);
                FMA_4X16(k0, k1, q0 + k, q1 + k, q2 + k, q3 + k);
            }
            float *o = s + r0 * Lp + j0;
            _mm256_storeu_ps(o, a00); _mm256_storeu_ps(o + 8, a01);
            _mm256_storeu_ps(o + Lp, a10); _mm256_storeu_ps(o + Lp + 8, a11);
            _mm256_storeu_ps(o + 2 * Lp, a20); _mm256_storeu_ps(o + 2 * Lp + 8, a21);
            _mm256_storeu_ps(o + 3 * Lp, a30); _mm256_storeu_ps(o + 3 * Lp + 8, a31);
        }
    }
}

/* acc[r][c0 .. c0 + 16) = inv[r] * sum_j s[r][j] * v_j[c0 ..], rows r0 .. r0 + 4 */
static __attribute__((noinline)) void pv_avx2(const float *v0, int64_t row, int64_t L, const float *s, int64_t Lp,
                                              const float inv[MR], float *acc, int64_t d, int64_t c0, int r0) {
    const float *s0 = s + r0 * Lp, *s1 = s0 + Lp, *s2 = s1 + Lp, *s3 = s2 + Lp;
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
    const float *vj = v0 + c0;
    #pragma GCC unroll 4
    for (int64_t j = 0; j < L; j++, vj += row) {
        const __m256 x0 = _mm256_loadu_ps(vj), x1 = _mm256_loadu_ps(vj + 8);
        FMA_4X16(x0, x1, s0 + j, s1 + j, s2 + j, s3 + j);
    }
    float *o = acc + r0 * d + c0;
    const __m256 i0 = _mm256_set1_ps(inv[r0]), i1 = _mm256_set1_ps(inv[r0 + 1]);
    const __m256 i2 = _mm256_set1_ps(inv[r0 + 2]), i3 = _mm256_set1_ps(inv[r0 + 3]);
    _mm256_storeu_ps(o, _mm256_mul_ps(a00, i0)); _mm256_storeu_ps(o + 8, _mm256_mul_ps(a01, i0));
    _mm256_storeu_ps(o + d, _mm256_mul_ps(a10, i1)); _mm256_storeu_ps(o + d + 8, _mm256_mul_ps(a11, i1));
    _mm256_storeu_ps(o + 2 * d, _mm256_mul_ps(a20, i2)); _mm256_storeu_ps(o + 2 * d + 8, _mm256_mul_ps(a21, i2));
    _mm256_storeu_ps(o + 3 * d, _mm256_mul_ps(a30, i3)); _mm256_storeu_ps(o + 3 * d + 8, _mm256_mul_ps(a31, i3));
}
#undef FMA_4X16

/* In place: s[j] = exp(scale * (s[j] - max)) over the L real keys, returns their sum; the lanes of
 * the last vector past L (s is Lp >= L rounded up to 16 long) are set to 0. The tail in the vector
 * with a lane mask: a scalar expf per key past the last multiple of 8 had cost about as much as the
 * vector part at MiniLM's lengths. */
static float softmax_numerators_avx2(float *s, int64_t L, float scale) {
    const int64_t full = L / 8 * 8;
    const __m256 tail = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(L - full)),
                                                               _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
    __m256 m = _mm256_set1_ps(-INFINITY);
    for (int64_t j = 0; j < full; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + j));
    if (full < L) m = _mm256_max_ps(m, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_loadu_ps(s + full), tail));
    const __m256 vmx = _mm256_set1_ps(hmax8(m)), sc = _mm256_set1_ps(scale);
    __m256 vz = _mm256_setzero_ps();
    for (int64_t j = 0; j < full; j += 8) {
        const __m256 e = exp256(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(s + j), vmx), sc));
        _mm256_storeu_ps(s + j, e);
        vz = _mm256_add_ps(vz, e);
    }
    if (full < L) {
        const __m256 e = _mm256_and_ps(tail, exp256(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(s + full), vmx), sc)));
        _mm256_storeu_ps(s + full, e);
        vz = _mm256_add_ps(vz, e);
    }
    return hsum8(vz);
}

static inline void transpose8x8(__m256 r[8]) {
    __m256 t[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        r[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        r[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        r[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        r[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm256_permute2f128_ps(r[i], r[4 + i], 0x20);
        t[4 + i] = _mm256_permute2f128_ps(r[i], r[4 + i], 0x31);
    }
    for (int i = 0; i < 8; i++) r[i] = t[i];
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
#elif defined(__AVX2__)
    if (d % 8 == 0) {
        for (int64_t j0 = 0; j0 < Lp; j0 += 8)
            for (int64_t c0 = 0; c0 < d; c0 += 8) {
                __m256 r[8];
                for (int i = 0; i < 8; i++)
                    r[i] = j0 + i < L ? _mm256_loadu_ps(k0 + (j0 + i) * row + c0) : _mm256_setzero_ps();
                transpose8x8(r);
                for (int i = 0; i < 8; i++) _mm256_storeu_ps(kt + (c0 + i) * Lp + j0, r[i]);
            }
        return;
    }
#endif
    for (int64_t k = 0; k < d; k++)
        for (int64_t j = L; j < Lp; j++) kt[k * Lp + j] = 0.0f;
    for (int64_t j = 0; j < L; j++)
        for (int64_t k = 0; k < d; k++) kt[k * Lp + j] = k0[j * row + k];
}

/* The scores s[r][0 .. n) of keys jlo .. jlo + n for query rows i0 + r: the position bias added
 * (bh points at the head's offset-0 entry, bias(i, j) = bh[j - i]) and, with a window, the keys
 * |j - i| >= window set to -1e30 (exp gives exactly 0). Rows past nq repeat query i0 (attend_rows
 * computes and drops them). */
static void adjust_scores(float *s, int64_t Lp, int64_t n, const float *bh, int64_t jlo, int64_t i0, int64_t nq,
                          int64_t window) {
    for (int64_t r = 0; r < MR; r++) {
        const int64_t i = i0 + (r < nq ? r : 0);
        float *sr = s + r * Lp;
        if (bh) {
            const float *b = bh + jlo - i;
            for (int64_t j = 0; j < n; j++) sr[j] += b[j];
        }
        if (window > 0) {
            for (int64_t j = 0; j < n && jlo + j <= i - window; j++) sr[j] = -1e30f;
            for (int64_t j = i + window - jlo > 0 ? i + window - jlo : 0; j < n; j++) sr[j] = -1e30f;
        }
    }
}

/* Attention of query rows i0 .. i0 + nq of one head over the keys they can see: all L, or with a
 * window only jlo .. jhi (the block's rows' windows together; jlo a multiple of 16, so the transposed
 * keys' zero padding to Lp covers the last vector), the rest of each row's window masked. */
static void attend_rows(const float *base, float *out, int64_t row, int64_t H, int64_t h, int64_t d,
                        int64_t L, int64_t Lp, int64_t i0, int64_t nq, const float *kt, float *s,
                        float *acc, float scale, const float *bh, int64_t window) {
    const float *q[MR];
    float inv[MR];
    for (int64_t r = 0; r < MR; r++) q[r] = base + (i0 + (r < nq ? r : 0)) * row + h * d;
    int64_t jlo = 0, jhi = L;
    if (window > 0) {
        jlo = i0 - window + 1 > 0 ? (i0 - window + 1) / 16 * 16 : 0;
        jhi = i0 + nq - 1 + window < L ? i0 + nq - 1 + window : L;
    }
    const int64_t n = jhi - jlo, n16 = (n + 15) / 16 * 16;
    const int adjust = bh != NULL || window > 0;
    const float *v0 = base + jlo * row + 2 * H + h * d;
#ifdef __AVX512F__
    scores_avx512(q, kt + jlo, d, n16, Lp, s);
    if (adjust) adjust_scores(s, Lp, n, bh, jlo, i0, nq, window);
    for (int64_t r = 0; r < MR; r++) inv[r] = 1.0f / softmax_numerators_avx512(s + r * Lp, n, scale);
    if (d % 16 == 0) {
        int64_t c0 = 0;
        for (; c0 + 32 <= d; c0 += 32) pv_avx512(v0, row, n, s, Lp, inv, acc, d, c0, 2);
        if (c0 < d) pv_avx512(v0, row, n, s, Lp, inv, acc, d, c0, 1);
        for (int64_t r = 0; r < nq; r++) memcpy(out + (i0 + r) * H + h * d, acc + r * d, sizeof(float) * d);
        return;
    }
#elif defined(__AVX2__)
    scores_avx2(q, kt + jlo, d, n16, Lp, s);
    if (adjust) adjust_scores(s, Lp, n, bh, jlo, i0, nq, window);
    for (int64_t r = 0; r < MR; r++) inv[r] = 1.0f / softmax_numerators_avx2(s + r * Lp, n, scale);
    if (d % 16 == 0) {
        for (int r0 = 0; r0 < MR; r0 += 4)
            for (int64_t c0 = 0; c0 < d; c0 += 16) pv_avx2(v0, row, n, s, Lp, inv, acc, d, c0, r0);
        for (int64_t r = 0; r < nq; r++) memcpy(out + (i0 + r) * H + h * d, acc + r * d, sizeof(float) * d);
        return;
    }
#else
    for (int64_t r = 0; r < MR; r++)
        for (int64_t j = 0; j < n; j++) {
            float v = 0.0f;
            for (int64_t k = 0; k < d; k++) v += q[r][k] * kt[k * Lp + jlo + j];
            s[r * Lp + j] = v;
        }
    if (adjust) adjust_scores(s, Lp, n, bh, jlo, i0, nq, window);
    for (int64_t r = 0; r < MR; r++) {
        float *sr = s + r * Lp, m = -INFINITY, z = 0.0f;
        for (int64_t j = 0; j < n; j++) m = fmaxf(m, sr[j]);
        for (int64_t j = 0; j < n; j++) {        /* 0, not a denormal, for masked keys (as exp512) */
            const float x = (sr[j] - m) * scale;
            sr[j] = x < -87.0f ? 0.0f : expf(x);
            z += sr[j];
        }
        inv[r] = 1.0f / z;
    }
#endif
    for (int64_t x = 0; x < MR * d; x++) acc[x] = 0.0f;
    for (int64_t j = 0; j < n; j++) {
        const float *vj = v0 + j * row;
        for (int64_t r = 0; r < MR; r++)
            for (int64_t k = 0; k < d; k++) acc[r * d + k] += s[r * Lp + j] * vj[k];
    }
    for (int64_t r = 0; r < nq; r++)
        for (int64_t k = 0; k < d; k++) out[(i0 + r) * H + h * d + k] = acc[r * d + k] * inv[r];
}

void varlen_attention(const void *qkv, void *out, const int64_t *cu, const int64_t *order,
                      int64_t nseq, int64_t nheads, int64_t d, float scale, int64_t max_len,
                      const float *bias, int64_t bias_stride, int64_t bias_center, int64_t window,
                      int bf16, int nthreads) {
    const int64_t H = nheads * d, row = 3 * H;
    const int64_t max_lp = (max_len + 15) / 16 * 16;
    #pragma omp parallel num_threads(nthreads)
    {
        float *kt = malloc(sizeof(float) * d * max_lp);
        float *s = malloc(sizeof(float) * MR * max_lp);
        float *acc = malloc(sizeof(float) * MR * d);
        /* bf16: the task's head widened to fp32, [L][q | k | v] rows, and its fp32 output [L][d] */
        float *x = bf16 ? malloc(sizeof(float) * 4 * d * max_lp) : NULL;
        #pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < nseq * nheads; task++) {
            const int64_t seq = order[task / nheads], h = task % nheads;
            const int64_t start = cu[seq], L = cu[seq + 1] - start, Lp = (L + 15) / 16 * 16;
            const float *bh = bias ? bias + h * bias_stride + bias_center : NULL;
            if (bf16) {
                const uint16_t *src = (const uint16_t *)qkv + start * row + h * d;
                float *o = x + 3 * d * L;
                for (int64_t i = 0; i < L; i++)
                    for (int p = 0; p < 3; p++) bf16_to_f32_row(src + i * row + p * H, x + (i * 3 + p) * d, d);
                transpose_keys(x + d, 3 * d, L, Lp, d, kt);
                for (int64_t i0 = 0; i0 < L; i0 += MR)
                    attend_rows(x, o, 3 * d, d, 0, d, L, Lp, i0, L - i0 < MR ? L - i0 : MR, kt, s, acc, scale, bh,
                                window);
                for (int64_t i = 0; i < L; i++)
                    f32_to_bf16_row(o + i * d, (uint16_t *)out + (start + i) * H + h * d, d);
                continue;
            }
            const float *base = (const float *)qkv + start * row;
            transpose_keys(base + H + h * d, row, L, Lp, d, kt);
            for (int64_t i0 = 0; i0 < L; i0 += MR)
                attend_rows(base, (float *)out + start * H, row, H, h, d, L, Lp, i0, L - i0 < MR ? L - i0 : MR,
                            kt, s, acc, scale, bh, window);
        }
        free(kt); free(s); free(acc); free(x);
    }
}

/* Causal attention of packed query tokens over a paged KV cache: prefill chunks and decode steps of
 * many sequences in one call, each reading exactly its own context (no padding to the longest).
 *   q:        fp32 query rows, head h of token t at q + t * q_stride + h * d
 *   k_cache:  one [kv_heads, ...] part of d * block_size elements per block and KV head:
 *             fp32 / bf16: [d][block_size], keys transposed, so the block's keys of one dimension are
 *             contiguous and one vector load holds that dimension of 16 keys; the scores of 16 keys
 *             are 16 lanes of FMAs with the query element broadcast, no horizontal sum per key (the
 *             row-major layout's per-key reduction held decode attention to 19 GB/s on GPT-2);
 *             int8: [d / 4][block_size][4], four dimensions of a key side by side, so one vector holds
 *             four dimensions of 16 keys, vpdpbusd's operand (see paged_heads_i8).
 *   v_cache:  fp32 / bf16: [block_size][d] (one key's values are one vector run);
 *             int8: [block_size / 4][d][4], four keys of a dimension side by side (vpdpbusd again).
 *   kind:     element type of both caches: KV_F32, KV_BF16, or KV_I8 with k_scale / v_scale
 *             [num_blocks, kv_heads, block_size] fp32 (one scale per token and KV head).
 *   block_tables: int32 [num_seqs, bt_stride]; sequence s owns query tokens cu_q[s] .. cu_q[s + 1]; its
 *   context after this step holds ctx_len[s] tokens, so its i-th query sits at position
 *   p = ctx_len[s] - n_q + i and attends to keys max(0, p - window + 1) .. p (window <= 0: unbounded).
 *   softcap:  > 0 soft-caps the scaled scores, softcap * tanh(s / softcap) (Gemma 2); 0: none.
 *   out:      fp32, head h of token t at out + t * out_stride + h * d
 * Work item = (sequence, chunk of up to QCHUNK queries, KV head; on the int8 VNNI path a group of KV
 * heads). Its rows, (query, head) pairs of the query heads sharing a KV head (grouped-query
 * attention), go PA_ROWS at a time, so each key and value vector loaded (and converted from bf16)
 * serves PA_ROWS rows. Softmax is exact. */
enum { KV_F32 = 0, KV_BF16 = 1, KV_I8 = 2 };
#define QCHUNK 16
#define PA_ROWS 4
#define SC_PAD 16   /* floats before each work item's score rows: a chunk's masked loads may start there */

#ifdef __AVX512F__
static inline __mmask16 lanes(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? 0 : (__mmask16)((1u << n) - 1u); }

/* Elements idx .. idx + 15 of an fp32 / bf16 cache (lanes outside m are 0), as fp32. */
static inline __m512 kv_load(const void *base, int64_t idx, __mmask16 m, int kind) {
    if (kind == KV_BF16) {
        const __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)base + idx);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(m, (const float *)base + idx);
}
#endif

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
/* One vpdpbusd as inline assembly: with the intrinsic, GCC 12 copied each accumulator around every
 * instruction and spilled them to the stack (int8_gemm_packed's loop ran at a third of the peak). */
static inline __attribute__((always_inline)) __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
    return acc;
}
#define HAVE_VNNI 1
#endif

static inline float kv_at(const void *base, int64_t idx, int kind) {
    if (kind == KV_BF16) return bf16_to_f32(((const uint16_t *)base)[idx]);
    if (kind == KV_I8) return (float)((const int8_t *)base)[idx];
    return ((const float *)base)[idx];
}

/* Where dimension c of the key at block offset j, and of its value, sit inside their block part. */
static inline int64_t k_index(int kind, int64_t c, int64_t j, int64_t bs) {
    return kind == KV_I8 ? ((c / 4) * bs + j) * 4 + c % 4 : c * bs + j;
}
static inline int64_t v_index(int kind, int64_t j, int64_t c, int64_t d) {
    return kind == KV_I8 ? ((j / 4) * d + c) * 4 + j % 4 : j * d + c;
}

static inline int64_t elem_size(int kind) { return kind == KV_F32 ? 4 : kind == KV_BF16 ? 2 : 1; }

/* The keys of block b (block size bs) inside a group's range lo .. hi. */
static inline int64_t block_first(int64_t b, int64_t bs, int64_t lo) { return b * bs > lo ? b * bs : lo; }
static inline int64_t block_last(int64_t b, int64_t bs, int64_t hi) { return (b + 1) * bs - 1 < hi ? (b + 1) * bs - 1 : hi; }

/* The next block's keys, values and (int8) scales while this one computes, and at the first block the
 * first one's too. Prefetching 2, 4 or 8 blocks ahead, into L1 or L2, made no difference beyond this
 * VM's noise (with the VNNI int8 kernel too); without the scales, 20% of the first int8 kernel's time
 * went to waiting for them. */
static inline void prefetch_block(int64_t b, int64_t lo, int64_t hi, const int32_t *table, int64_t kv_heads,
                                  int64_t kh, int64_t nh, int64_t part, const char *k_cache, const char *v_cache,
                                  const float *k_scale, const float *v_scale, int64_t bs) {
#ifdef __AVX512F__
    /* heads kh .. kh + nh - 1, whose parts (`part` bytes each) are adjacent */
    for (int64_t f = b == lo ? b : b + 1; f <= b + 1 && f <= hi; f++) {
        const int64_t at = (int64_t)table[f] * kv_heads + kh;
        for (int64_t x = 0; x < nh * part; x += 64) {
            _mm_prefetch(k_cache + at * part + x, _MM_HINT_T0);
            _mm_prefetch(v_cache + at * part + x, _MM_HINT_T0);
        }
        if (k_scale)
            for (int64_t x = 0; x < nh * bs; x += 16) {
                _mm_prefetch((const char *)(k_scale + at * bs + x), _MM_HINT_T0);
                _mm_prefetch((const char *)(v_scale + at * bs + x), _MM_HINT_T0);
            }
    }
#else
    (void)b; (void)lo; (void)hi; (void)table; (void)kv_heads; (void)kh; (void)nh; (void)part; (void)k_cache;
    (void)v_cache; (void)k_scale; (void)v_scale; (void)bs;
#endif
}

/* Gemma 2's soft-capping of scaled scores, in place over s[0 .. n): cap tanh(s / cap), computed as
 * cap - 2 cap / (1 + e^(2 s / cap)), one exp per score (exp's exact 0 and the clamp at 80 give -cap
 * and cap at the ends); absolute error about cap * 1e-7, nothing against softmax's exp. */
static void softcap_scores(float *s, int64_t n, float cap) {
    int64_t j = 0;
    const float k = 2.0f / cap;
#ifdef __AVX512F__
    for (; j + 16 <= n; j += 16) {
        const __m512 e = exp512(_mm512_min_ps(_mm512_mul_ps(_mm512_loadu_ps(s + j), _mm512_set1_ps(k)),
                                              _mm512_set1_ps(80.0f)));
        _mm512_storeu_ps(s + j, _mm512_sub_ps(_mm512_set1_ps(cap), _mm512_div_ps(_mm512_set1_ps(2.0f * cap),
                                                                                 _mm512_add_ps(_mm512_set1_ps(1.0f), e))));
    }
#elif defined(__AVX2__)
    for (; j + 8 <= n; j += 8) {
        const __m256 e = exp256(_mm256_min_ps(_mm256_mul_ps(_mm256_loadu_ps(s + j), _mm256_set1_ps(k)),
                                              _mm256_set1_ps(80.0f)));
        _mm256_storeu_ps(s + j, _mm256_sub_ps(_mm256_set1_ps(cap), _mm256_div_ps(_mm256_set1_ps(2.0f * cap),
                                                                                 _mm256_add_ps(_mm256_set1_ps(1.0f), e))));
    }
#endif
    for (; j < n; j++) s[j] = cap * tanhf(s[j] / cap);
}

/* Softmax of each row over its own keys [row_lo[r], row_hi[r]] (scores at sc + r * stride, key j at
 * j - lo), soft-capped first when cap > 0; keys of the group outside a row's range weigh 0. */
static inline void softmax_rows(int nr, float *sc, int64_t stride, const int64_t *row_lo, const int64_t *row_hi,
                                int64_t lo, int64_t n, float cap) {
    for (int r = 0; r < nr; r++) {
        float *sr = sc + r * stride;
        const int64_t a = row_lo[r] - lo, e = row_hi[r] - lo + 1;
        float m = -INFINITY, sum = 0.f;
        if (cap > 0.f) softcap_scores(sr + a, e - a, cap);
        for (int64_t j = a; j < e; j++) m = sr[j] > m ? sr[j] : m;
        for (int64_t j = 0; j < a; j++) sr[j] = 0.f;
        int64_t j = a;
#ifdef __AVX512F__
        const __m512 mx = _mm512_set1_ps(m);
        __m512 z = _mm512_setzero_ps();
        for (; j + 16 <= e; j += 16) {
            const __m512 x = exp512(_mm512_sub_ps(_mm512_loadu_ps(sr + j), mx));
            _mm512_storeu_ps(sr + j, x);
            z = _mm512_add_ps(z, x);
        }
        sum = _mm512_reduce_add_ps(z);
#elif defined(__AVX2__)
        const __m256 mx = _mm256_set1_ps(m);
        __m256 z = _mm256_setzero_ps();
        for (; j + 8 <= e; j += 8) {
            const __m256 x = exp256(_mm256_sub_ps(_mm256_loadu_ps(sr + j), mx));
            _mm256_storeu_ps(sr + j, x);
            z = _mm256_add_ps(z, x);
        }
        sum = hsum8(z);
#endif
        for (; j < e; j++) { sr[j] = expf(sr[j] - m); sum += sr[j]; }
        for (j = e; j < n; j++) sr[j] = 0.f;
        const float inv = 1.f / sum;
        for (j = a; j < e; j++) sr[j] *= inv;
    }
}

#if defined(__AVX2__) && !defined(__AVX512F__)
/* paged_rows in 8 lanes for AVX2-only CPUs, fp32 and bf16 caches (int8 ones: paged_rows_i8_avx2):
 * the same steps, half the vector width, 16 instead of 32 registers, so P.V takes 16-64 columns per
 * pass by the row count (below). */
static inline __m256i lanes8(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n < 0 ? 0 : n > 8 ? 8 : n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

static inline __m256 kv_load8(const void *base, int64_t idx, int64_t n, __m256i m, int kind) {
    if (kind == KV_BF16) {
        __m128i h;
        if (n >= 8) {
            h = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + idx));
        } else {
            uint16_t t[8] = {0};
            memcpy(t, (const uint16_t *)base + idx, sizeof(uint16_t) * (size_t)(n > 0 ? n : 0));
            h = _mm_loadu_si128((const __m128i *)t);
        }
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return n >= 8 ? _mm256_loadu_ps((const float *)base + idx) : _mm256_maskload_ps((const float *)base + idx, m);
}

static inline __attribute__((always_inline)) void paged_rows_avx2(
        int kind, int nr, int64_t nh, int64_t head_step, const float *const qr[PA_ROWS], float *const dst[PA_ROWS],
        const int64_t row_lo[PA_ROWS], const int64_t row_hi[PA_ROWS], int64_t lo, int64_t hi,
        const char *k_cache, const char *v_cache, const int32_t *table, int64_t kv_heads, int64_t kh0,
        int64_t d, int64_t bs, float scale, float cap, float *sc, int64_t stride, float *acc_mem) {
    const int64_t es = elem_size(kind), n = hi - lo + 1, part = d * bs * es;
    enum { CS = 4 };
    const int cs = nr >= 3 ? 2 : CS;          /* rows x chains accumulators: at most 8 */
    for (int64_t b = lo / bs; b <= hi / bs; b++) {
        const int64_t j_first = block_first(b, bs, lo), j_last = block_last(b, bs, hi);
        for (int64_t hh = 0; hh < nh; hh++) {
            const char *kb = k_cache + ((int64_t)table[b] * kv_heads + kh0 + hh) * part;
            float *sh = sc + hh * PA_ROWS * stride;
            for (int64_t j0 = j_first; j0 <= j_last; j0 += 8) {
                const int64_t off = j0 - b * bs, nk = j_last - j0 + 1;
                const __m256i m = lanes8(nk);
                __m256 a[PA_ROWS][CS];
                for (int r = 0; r < nr; r++)
                    for (int u = 0; u < cs; u++) a[r][u] = _mm256_setzero_ps();
                int64_t c = 0;
                for (; c + cs <= d; c += cs) {
                    #pragma GCC unroll 4
                    for (int u = 0; u < cs; u++) {
                        const __m256 kv = kv_load8(kb, (c + u) * bs + off, nk, m, kind);
                        for (int r = 0; r < nr; r++)
                            a[r][u] = _mm256_fmadd_ps(_mm256_broadcast_ss(qr[r] + hh * head_step + c + u), kv, a[r][u]);
                    }
                }
                for (; c < d; c++) {
                    const __m256 kv = kv_load8(kb, c * bs + off, nk, m, kind);
                    for (int r = 0; r < nr; r++)
                        a[r][0] = _mm256_fmadd_ps(_mm256_broadcast_ss(qr[r] + hh * head_step + c), kv, a[r][0]);
                }
                for (int r = 0; r < nr; r++) {
                    __m256 t = a[r][0];
                    for (int u = 1; u < cs; u++) t = _mm256_add_ps(t, a[r][u]);
                    _mm256_maskstore_ps(sh + r * stride + (j0 - lo), m, _mm256_mul_ps(t, _mm256_set1_ps(scale)));
                }
            }
        }
    }
    for (int64_t hh = 0; hh < nh; hh++)
        softmax_rows(nr, sc + hh * PA_ROWS * stride, stride, row_lo, row_hi, lo, n, cap);
    /* P.V in passes of nv vectors (8 nv columns) per row, nr x nv <= 8 accumulators, per block and
     * head in acc_mem: one row (a decode step without grouped-query attention) takes 64 columns per
     * pass, so a head of 64 reads its values once instead of once per 16 columns (GPT-2's decode
     * shape, benchmarks/paged_attention.py, fp32 cache: 15.0 -> 12.4 ms interleaved, bf16 3% faster) */
    enum { NV = 8 };
    const int nv = nr == 1 ? 8 : nr == 2 ? 4 : 2;
    memset(acc_mem, 0, sizeof(float) * (size_t)(nh * PA_ROWS * d));
    for (int64_t b = lo / bs; b <= hi / bs; b++) {
        const int64_t j_first = block_first(b, bs, lo), j_last = block_last(b, bs, hi);
        for (int64_t hh = 0; hh < nh; hh++) {
            const char *vb = v_cache + ((int64_t)table[b] * kv_heads + kh0 + hh) * part;
            const float *sh = sc + hh * PA_ROWS * stride;
            for (int64_t c0 = 0; c0 < d; c0 += 8 * nv) {
                const int64_t cw = d - c0 < 8 * nv ? d - c0 : 8 * nv;
                __m256i mk[NV];
                for (int u = 0; u < nv; u++) mk[u] = lanes8(cw - 8 * u);
                __m256 acc[PA_ROWS][NV];
                for (int r = 0; r < nr; r++)
                    for (int u = 0; u < nv; u++)
                        acc[r][u] = 8 * u < cw
                            ? _mm256_maskload_ps(acc_mem + (hh * PA_ROWS + r) * d + c0 + 8 * u, mk[u])
                            : _mm256_setzero_ps();
                for (int64_t j = j_first; j <= j_last; j++) {
                    const int64_t off = (j - b * bs) * d + c0;
                    __m256 pj[PA_ROWS];
                    for (int r = 0; r < nr; r++) pj[r] = _mm256_broadcast_ss(sh + r * stride + (j - lo));
                    for (int u = 0; u < nv; u++) {
                        const __m256 x = 8 * u < cw ? kv_load8(vb, off + 8 * u, cw - 8 * u, mk[u], kind)
                                                    : _mm256_setzero_ps();
                        for (int r = 0; r < nr; r++) acc[r][u] = _mm256_fmadd_ps(pj[r], x, acc[r][u]);
                    }
                }
                for (int r = 0; r < nr; r++)
                    for (int u = 0; u < nv && 8 * u < cw; u++)
                        _mm256_maskstore_ps(acc_mem + (hh * PA_ROWS + r) * d + c0 + 8 * u, mk[u], acc[r][u]);
            }
        }
    }
    for (int64_t hh = 0; hh < nh; hh++)
        for (int r = 0; r < nr; r++)
            memcpy(dst[r] + hh * head_step, acc_mem + (hh * PA_ROWS + r) * d, sizeof(float) * (size_t)d);
}
#endif

#if defined(__AVX2__) && !defined(__AVX512F__)
/* int8 caches on AVX2-only CPUs (block size a multiple of 8, d of 8): scores as int16 multiply-adds
 * like the int8 GEMM: each row's query quantized to int16 (scale max|q| / 16383: a d <= 1024 dot
 * product of int16 x int8 stays inside int32), the keys' [d / 4][bs][4] bytes widened 16 at a time
 * (4 keys x 4 dimensions), then times both scales; P.V likewise (below). The scalar version made
 * attention 39% of an int8 GPT-2 decode. */
static void paged_rows_i8_avx2(int nr, const float *const qr[PA_ROWS], float *const dst[PA_ROWS],
                               const int64_t row_lo[PA_ROWS], const int64_t row_hi[PA_ROWS], int64_t lo, int64_t hi,
                               const int8_t *k_cache, const int8_t *v_cache, const float *k_scale,
                               const float *v_scale, const int32_t *table, int64_t kv_heads, int64_t kh, int64_t d,
                               int64_t bs, float scale, float cap, float *sc, int64_t stride, int16_t *q16,
                               int16_t *wbuf) {
    float qsc[PA_ROWS];
    for (int r = 0; r < nr; r++) {
        float amax = 0.f;
        for (int64_t c = 0; c < d; c++) amax = fmaxf(amax, fabsf(qr[r][c]));
        qsc[r] = amax > 0.f ? amax / 16383.f : 1.f;
        const float inv = 1.f / qsc[r];
        for (int64_t c = 0; c < d; c++) q16[r * d + c] = (int16_t)nearbyintf(qr[r][c] * inv);
    }
    for (int64_t b = lo / bs; b <= hi / bs; b++) {
        const int64_t slot = (int64_t)table[b] * kv_heads + kh;
        const int8_t *kb = k_cache + slot * d * bs;
        const float *ks = k_scale + slot * bs;
        const int64_t j_first = block_first(b, bs, lo), j_last = block_last(b, bs, hi);
        for (int64_t j0 = j_first; j0 <= j_last; j0 += 8) {
            const int64_t off = j0 - b * bs, nk = j_last - j0 + 1 < 8 ? j_last - j0 + 1 : 8;
            __m256i a[PA_ROWS][2];
            for (int r = 0; r < nr; r++) a[r][0] = a[r][1] = _mm256_setzero_si256();
            for (int64_t c4 = 0; c4 < d / 4; c4++) {
                const int8_t *src = kb + (c4 * bs + off) * 4;
                int8_t part[32] = {0};
                if (nk < 8) { memcpy(part, src, (size_t)(4 * nk)); src = part; }   /* stay inside the block */
                const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)src));
                const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(src + 16)));
                for (int r = 0; r < nr; r++) {
                    int64_t four;
                    memcpy(&four, q16 + r * d + 4 * c4, 8);
                    const __m256i xb = _mm256_set1_epi64x(four);
                    a[r][0] = _mm256_add_epi32(a[r][0], _mm256_madd_epi16(w0, xb));
                    a[r][1] = _mm256_add_epi32(a[r][1], _mm256_madd_epi16(w1, xb));
                }
            }
            float kscale[8] = {0};
            memcpy(kscale, ks + off, sizeof(float) * (size_t)nk);
            const __m256 kv = _mm256_loadu_ps(kscale);
            for (int r = 0; r < nr; r++) {
                const __m256i dot = pair_sums8(a[r][0], a[r][1]);
                const __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(dot), kv), _mm256_set1_ps(qsc[r] * scale));
                _mm256_maskstore_ps(sc + r * stride + (j0 - lo), lanes8(nk), v);
            }
        }
    }
    softmax_rows(nr, sc, stride, row_lo, row_hi, lo, hi - lo + 1, cap);
    /* P.V as int16 multiply-adds too: w_j = p_j * v_scale_j per row, quantized to int16 against the
     * row's largest (relative error 1.5e-5 of it), meets the [4 keys] bytes of each dimension widened
     * to int16: lanes (dim c, keys 0-1), (dim c, keys 2-3). int32 sums flush to fp32 every 256 keys
     * (each lane then holds at most 128 products of 32767 x 127). */
    float wsc[PA_ROWS];
    /* keys lo .. hi, and room to start at a group edge: nr * nw <= PA_ROWS * stride, the caller's wbuf */
    const int64_t nw = (hi - lo + 4) / 4 * 4 + 8;
    const int64_t base = lo / 4 * 4;                  /* wbuf[r][j - base]: key j's weight, 0 outside lo .. hi */
    for (int r = 0; r < nr; r++) {
        float wmax = 0.f;
        for (int64_t j = lo; j <= hi; j++) {
            const int64_t b = j / bs, slot = (int64_t)table[b] * kv_heads + kh;
            wmax = fmaxf(wmax, sc[r * stride + (j - lo)] * v_scale[slot * bs + j % bs]);
        }
        wsc[r] = wmax > 0.f ? wmax / 32767.f : 1.f;
        const float inv = 1.f / wsc[r];
        int16_t *wr = wbuf + r * nw;
        memset(wr, 0, sizeof(int16_t) * (size_t)nw);
        for (int64_t j = lo; j <= hi; j++) {
            const int64_t b = j / bs, slot = (int64_t)table[b] * kv_heads + kh;
            wr[j - base] = (int16_t)nearbyintf(sc[r * stride + (j - lo)] * v_scale[slot * bs + j % bs] * inv);
        }
    }
    for (int64_t c0 = 0; c0 < d; c0 += 8) {
        __m256 acc[PA_ROWS][2];
        __m256i ia[PA_ROWS][2];
        for (int r = 0; r < nr; r++) {
            acc[r][0] = acc[r][1] = _mm256_setzero_ps();
            ia[r][0] = ia[r][1] = _mm256_setzero_si256();
        }
        int64_t since = 0;
        for (int64_t b = lo / bs; b <= hi / bs; b++) {
            const int8_t *vb = v_cache + ((int64_t)table[b] * kv_heads + kh) * bs * d;
            const int64_t j_first = block_first(b, bs, lo), j_last = block_last(b, bs, hi);
            for (int64_t g4 = (j_first - b * bs) / 4; g4 <= (j_last - b * bs) / 4; g4++) {
                const int8_t *src = vb + (g4 * d + c0) * 4;           /* [dims c0 .. c0 + 8][4 keys] */
                const __m256i v0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)src));
                const __m256i v1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(src + 16)));
                const int64_t j4 = b * bs + 4 * g4 - base;              /* keys outside lo .. hi weigh 0 */
                for (int r = 0; r < nr; r++) {
                    int64_t four;
                    memcpy(&four, wbuf + r * nw + j4, 8);
                    const __m256i wb = _mm256_set1_epi64x(four);
                    ia[r][0] = _mm256_add_epi32(ia[r][0], _mm256_madd_epi16(v0, wb));
                    ia[r][1] = _mm256_add_epi32(ia[r][1], _mm256_madd_epi16(v1, wb));
                }
                if (++since == 64) {
                    for (int r = 0; r < nr; r++)
                        for (int h = 0; h < 2; h++) {
                            acc[r][h] = _mm256_add_ps(acc[r][h], _mm256_cvtepi32_ps(ia[r][h]));
                            ia[r][h] = _mm256_setzero_si256();
                        }
                    since = 0;
                }
            }
        }
        for (int r = 0; r < nr; r++) {
            /* lanes (dim, keys 0-1) + (dim, keys 2-3): hadd in fp32 after the last flush */
            const __m256 f0 = _mm256_add_ps(acc[r][0], _mm256_cvtepi32_ps(ia[r][0]));
            const __m256 f1 = _mm256_add_ps(acc[r][1], _mm256_cvtepi32_ps(ia[r][1]));
            const __m256 sum = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_hadd_ps(f0, f1)), 0xD8));
            _mm256_storeu_ps(dst[r] + c0, _mm256_mul_ps(sum, _mm256_set1_ps(wsc[r])));
        }
    }
}
#endif

/* The reference version of a row group (see paged_rows), any element type, scalar: machines without
 * AVX-512, and int8 caches where VNNI or a block size that is a multiple of 16 is missing. */
static void paged_rows_scalar(int kind, int nr, const float *const qr[PA_ROWS], float *const dst[PA_ROWS],
                              const int64_t row_lo[PA_ROWS], const int64_t row_hi[PA_ROWS], int64_t lo, int64_t hi,
                              const char *k_cache, const char *v_cache, const float *k_scale, const float *v_scale,
                              const int32_t *table, int64_t kv_heads, int64_t kh, int64_t d, int64_t bs, float scale, float cap,
                              float *sc, int64_t stride) {
    const int64_t es = elem_size(kind);
    for (int64_t b = lo / bs; b <= hi / bs; b++) {
        const int64_t slot = (int64_t)table[b] * kv_heads + kh;
        const char *kb = k_cache + slot * d * bs * es;
        const int64_t j_first = block_first(b, bs, lo), j_last = block_last(b, bs, hi);
        for (int64_t j = j_first; j <= j_last; j++) {
            const int64_t off = j - b * bs;
            const float f = scale * (kind == KV_I8 ? k_scale[slot * bs + off] : 1.0f);
            for (int r = 0; r < nr; r++) {
                float acc = 0.f;
                for (int64_t c = 0; c < d; c++) acc += qr[r][c] * kv_at(kb, k_index(kind, c, off, bs), kind);
                sc[r * stride + (j - lo)] = acc * f;
            }
        }
    }
    softmax_rows(nr, sc, stride, row_lo, row_hi, lo, hi - lo + 1, cap);
    for (int r = 0; r < nr; r++)
        for (int64_t c = 0; c < d; c++) dst[r][c] = 0.f;
    for (int64_t b = lo / bs; b <= hi / bs; b++) {
        const int64_t slot = (int64_t)table[b] * kv_heads + kh;
        const char *vb = v_cache + slot * bs * d * es;
        const int64_t j_first = block_first(b, bs, lo), j_last = block_last(b, bs, hi);
        for (int64_t j = j_first; j <= j_last; j++) {
            const int64_t off = j - b * bs;
            const float vs = kind == KV_I8 ? v_scale[slot * bs + off] : 1.0f;
            for (int r = 0; r < nr; r++) {
                const float pj = sc[r * stride + (j - lo)] * vs;
                for (int64_t c = 0; c < d; c++) dst[r][c] += pj * kv_at(vb, v_index(kind, off, c, d), kind);
            }
        }
    }
}

#ifdef __AVX512F__
/* One group of nr <= PA_ROWS rows of a work item, fp32 or bf16 cache, for nh consecutive KV heads at
 * once (kh0 ..): head hh's rows are row r's query and output moved by hh * head_step floats, its
 * scores sit at sc + (hh * PA_ROWS + r) * stride, its output accumulates in acc + (hh * PA_ROWS + r) * d.
 * Keys lo .. hi (inclusive) cover every row's range [row_lo[r], row_hi[r]]. Blocks are the outer loop
 * and the group's heads the inner one, as in paged_heads_i8: a block's parts for consecutive heads are
 * adjacent, so each block is read as one run of nh parts (one head at a time, 4 KB fp32 / 2 KB bf16
 * runs scattered over the cache, decode attention read 14 / 11 GB/s of a 28 GB/s Zen 4 VM).
 * `kind` and `nr` are compile-time constants at every call (see paged_attention), so the loops
 * unroll into straight FMA runs with enough independent accumulators (8 or more) to keep both FMA
 * ports busy even at one row (decode without GQA). Every accumulator index is a constant at each use:
 * with a computed index GCC kept the accumulators on the stack, a load and a store around every FMA. */
static inline __attribute__((always_inline)) void paged_rows(
        int kind, int nr, int64_t nh, int64_t head_step, const float *const qr[PA_ROWS], float *const dst[PA_ROWS],
        const int64_t row_lo[PA_ROWS], const int64_t row_hi[PA_ROWS], int64_t lo, int64_t hi,
        const char *k_cache, const char *v_cache, const int32_t *table, int64_t kv_heads, int64_t kh0,
        int64_t d, int64_t bs, float scale, float cap, float *sc, int64_t stride, float *acc_mem) {
    const int64_t es = elem_size(kind), n = hi - lo + 1, part = d * bs * es;
    /* 1. scores s[r][j - lo] = scale * q_r . k_j; dimension c goes to chain c % CS of its row (4 rows
     *    x 8 chains would be all 32 registers) */
    enum { CS = 8 };
    const int cs = nr >= 3 ? 4 : CS;
    for (int64_t b = lo / bs; b <= hi / bs; b++) {
        const int64_t j_first = block_first(b, bs, lo), j_last = block_last(b, bs, hi);
        prefetch_block(b, lo / bs, hi / bs, table, kv_heads, kh0, nh, part, k_cache, v_cache, NULL, NULL, bs);
        for (int64_t hh = 0; hh < nh; hh++) {
            const char *kb = k_cache + ((int64_t)table[b] * kv_heads + kh0 + hh) * part;
            float *sh = sc + hh * PA_ROWS * stride;
            for (int64_t j0 = j_first; j0 <= j_last; j0 += 16) {
                const int64_t off = j0 - b * bs;
                const __mmask16 m = lanes(j_last - j0 + 1);
                __m512 a[PA_ROWS][CS];
                for (int r = 0; r < nr; r++)
                    for (int u = 0; u < cs; u++) a[r][u] = _mm512_setzero_ps();
                int64_t c = 0;
                for (; c + cs <= d; c += cs) {
                    #pragma GCC unroll 8
                    for (int u = 0; u < cs; u++) {
                        const __m512 kv = kv_load(kb, (c + u) * bs + off, m, kind);
                        for (int r = 0; r < nr; r++)
                            a[r][u] = _mm512_fmadd_ps(_mm512_set1_ps(qr[r][hh * head_step + c + u]), kv, a[r][u]);
                    }
                }
                for (; c < d; c++) {
                    const __m512 kv = kv_load(kb, c * bs + off, m, kind);
                    for (int r = 0; r < nr; r++)
                        a[r][0] = _mm512_fmadd_ps(_mm512_set1_ps(qr[r][hh * head_step + c]), kv, a[r][0]);
                }
                for (int r = 0; r < nr; r++) {
                    __m512 t = a[r][0];
                    for (int u = 1; u < cs; u++) t = _mm512_add_ps(t, a[r][u]);
                    _mm512_mask_storeu_ps(sh + r * stride + (j0 - lo), m, _mm512_mul_ps(t, _mm512_set1_ps(scale)));
                }
            }
        }
    }
    for (int64_t hh = 0; hh < nh; hh++)
        softmax_rows(nr, sc + hh * PA_ROWS * stride, stride, row_lo, row_hi, lo, n, cap);
    /* 3. out_r = sum_j p_r[j] v_j, 64 columns per pass, accumulated per block in acc_mem; with one or
     *    two rows, even and odd keys go to separate accumulators so at least 8 FMA chains are in flight */
    const int kp = nr <= 2 ? 2 : 1;
    memset(acc_mem, 0, sizeof(float) * (size_t)(nh * PA_ROWS * d));
    for (int64_t b = lo / bs; b <= hi / bs; b++) {
        const int64_t j_first = block_first(b, bs, lo), j_last = block_last(b, bs, hi);
        for (int64_t hh = 0; hh < nh; hh++) {
            const char *vb = v_cache + ((int64_t)table[b] * kv_heads + kh0 + hh) * part;
            const float *sh = sc + hh * PA_ROWS * stride;
            for (int64_t c0 = 0; c0 < d; c0 += 64) {
                const int64_t cw = d - c0 < 64 ? d - c0 : 64;
                const __mmask16 mk[4] = {lanes(cw), lanes(cw - 16), lanes(cw - 32), lanes(cw - 48)};
                __m512 acc[PA_ROWS][2][4];
                for (int r = 0; r < nr; r++)
                    for (int u = 0; u < 4; u++) {
                        acc[r][0][u] = _mm512_maskz_loadu_ps(mk[u], acc_mem + (hh * PA_ROWS + r) * d + c0 + 16 * u);
                        acc[r][1][u] = _mm512_setzero_ps();
                    }
                /* key j into accumulator set P; all four vectors run, the masks zero those past d */
#define V_KEY(P, j) do { \
                    const int64_t off = (j) - b * bs; \
                    __m512 x[4]; \
                    for (int u = 0; u < 4; u++) x[u] = kv_load(vb, off * d + c0 + 16 * u, mk[u], kind); \
                    for (int r = 0; r < nr; r++) { \
                        const __m512 pj = _mm512_set1_ps(sh[r * stride + ((j) - lo)]); \
                        for (int u = 0; u < 4; u++) acc[r][P][u] = _mm512_fmadd_ps(pj, x[u], acc[r][P][u]); \
                    } } while (0)
                int64_t j = j_first;
                if (kp == 2)
                    for (; j + 1 <= j_last; j += 2) { V_KEY(0, j); V_KEY(1, j + 1); }
                for (; j <= j_last; j++) V_KEY(0, j);
#undef V_KEY
                for (int r = 0; r < nr; r++)
                    for (int u = 0; u < 4; u++)
                        _mm512_mask_storeu_ps(acc_mem + (hh * PA_ROWS + r) * d + c0 + 16 * u, mk[u],
                                              _mm512_add_ps(acc[r][0][u], acc[r][1][u]));
            }
        }
    }
    for (int64_t hh = 0; hh < nh; hh++)
        for (int r = 0; r < nr; r++)
            memcpy(dst[r] + hh * head_step, acc_mem + (hh * PA_ROWS + r) * d, sizeof(float) * (size_t)d);
}
#endif

#ifdef HAVE_VNNI
/* A row group over an int8 cache, for nh consecutive KV heads at once (kh0 ..), in VNNI dot products
 * (bs a multiple of 16, d of 4). Head hh's rows are row r's query and output moved by hh * head_step
 * floats; its scores sit at sc + (hh * PA_ROWS + r) * stride, its output accumulates in
 * acc + (hh * PA_ROWS + r) * d. Blocks are the outer loop and the group's heads the inner one: a
 * block's parts for consecutive heads are adjacent, so each block is read as one run of nh KB
 * instead of 1 KB runs scattered over the cache (decode attention from memory ran at 12-15 GB/s
 * one head at a time).
 * Scores: each query row goes in as two unsigned bytes per element, q / sq = qh + ql / 254 with
 * sq = max |q| / 127 (qh = round(q / sq), ql = round(254 (q / sq - qh))), each + 128; per 16 keys and
 * 4 dimensions one vpdpbusd for qh, one for ql and one against ones (the keys' sums, shared by the
 * rows, which take the +128 back off). The query keeps ~15 bits, so the keys' own int8 rounding stays
 * the only error of note (quantizing q to one int8 had raised the output error from 1.1e-2 to 1.5e-2).
 * Values: per 16 keys and row, p_j * v_scale_j quantized to unsigned bytes against their maximum
 * (255 steps), then per 4 keys and 16 dimensions one vpdpbusd, and the int32 sums back to fp32 once
 * per 16 keys. Against converting every int8 to fp32 (two instructions per 16 elements before each
 * FMA) this is about a sixth of the vector instructions. */
/* The lanes of the 16 keys from k0 on that lie inside [j_first, j_last]. */
static inline __mmask16 chunk_keys(int64_t k0, int64_t j_first, int64_t j_last) {
    return (__mmask16)(lanes(j_last - k0 + 1) & ~lanes(j_first - k0));
}

static inline __attribute__((always_inline)) void paged_heads_i8(
        int nr, int64_t nh, int64_t head_step, const float *const qr[PA_ROWS], float *const dst[PA_ROWS],
        const int64_t row_lo[PA_ROWS], const int64_t row_hi[PA_ROWS], int64_t lo, int64_t hi,
        const int8_t *k_cache, const int8_t *v_cache, const float *k_scale, const float *v_scale,
        const int32_t *table, int64_t kv_heads, int64_t kh0, int64_t d, int64_t bs, float scale, float cap, float *sc,
        int64_t stride, uint8_t *qb, float *qs, float *acc) {
    const int64_t d4 = d / 4, n = hi - lo + 1, part = d * bs;
    for (int64_t hh = 0; hh < nh; hh++)
        for (int r = 0; r < nr; r++) {
            const float *x = qr[r] + hh * head_step;
            uint8_t *qh = qb + (hh * PA_ROWS + r) * 2 * d;
            float amax = 0.f;
            for (int64_t c = 0; c < d; c++) amax = fabsf(x[c]) > amax ? fabsf(x[c]) : amax;
            const float sq = (amax > 1e-30f ? amax : 1e-30f) / 127.f, inv = 1.f / sq;
            for (int64_t c = 0; c < d; c++) {
                const float t = x[c] * inv, h = nearbyintf(t);
                float l = nearbyintf((t - h) * 254.f);
                l = l > 127.f ? 127.f : l < -127.f ? -127.f : l;
                qh[c] = (uint8_t)(int)(h + 128.f);
                qh[d + c] = (uint8_t)(int)(l + 128.f);
            }
            qs[hh * PA_ROWS + r] = sq * scale;
        }
    const __m512i ones = _mm512_set1_epi8(1);
    /* 1. scores */
    for (int64_t b = lo / bs; b <= hi / bs; b++) {
        const int64_t j_first = block_first(b, bs, lo), j_last = block_last(b, bs, hi);
        prefetch_block(b, lo / bs, hi / bs, table, kv_heads, kh0, nh, part, (const char *)k_cache,
                       (const char *)v_cache, k_scale, v_scale, bs);
        for (int64_t hh = 0; hh < nh; hh++) {
            const int64_t slot = (int64_t)table[b] * kv_heads + kh0 + hh;
            const int8_t *kb = k_cache + slot * part;
            const uint8_t *qh = qb + hh * PA_ROWS * 2 * d;
            for (int64_t o = (j_first - b * bs) / 16 * 16; b * bs + o <= j_last; o += 16) {
                /* dimension group c4 goes to accumulator set c4 % sets: one set's chains were 16
                 * dependent dot products long (5 cycles each) and held the loop to their latency */
                enum { KS = 4 };
                const int sets = nr <= 2 ? KS : 2;
                __m512i ah[KS][PA_ROWS], al[KS][PA_ROWS], ks[KS];
                for (int t = 0; t < sets; t++) {
                    ks[t] = _mm512_setzero_si512();
                    for (int r = 0; r < nr; r++) ah[t][r] = al[t][r] = _mm512_setzero_si512();
                }
#define K_GROUP(t, c4) do { \
                    const __m512i kv = _mm512_loadu_si512(kb + ((c4) * bs + o) * 4); \
                    ks[t] = dpbusd(ks[t], ones, kv); \
                    for (int r = 0; r < nr; r++) { \
                        int32_t h4, l4; \
                        memcpy(&h4, qh + r * 2 * d + 4 * (c4), 4); \
                        memcpy(&l4, qh + r * 2 * d + d + 4 * (c4), 4); \
                        ah[t][r] = dpbusd(ah[t][r], _mm512_set1_epi32(h4), kv); \
                        al[t][r] = dpbusd(al[t][r], _mm512_set1_epi32(l4), kv); \
                    } } while (0)
                int64_t c4 = 0;
                for (; c4 + sets <= d4; c4 += sets)
                    for (int t = 0; t < sets; t++) K_GROUP(t, c4 + t);
                for (; c4 < d4; c4++) K_GROUP(0, c4);
#undef K_GROUP
                for (int t = 1; t < sets; t++) {
                    ks[0] = _mm512_add_epi32(ks[0], ks[t]);
                    for (int r = 0; r < nr; r++) {
                        ah[0][r] = _mm512_add_epi32(ah[0][r], ah[t][r]);
                        al[0][r] = _mm512_add_epi32(al[0][r], al[t][r]);
                    }
                }
                const __m512i corr = _mm512_slli_epi32(ks[0], 7);
                const __m512 f = _mm512_loadu_ps(k_scale + slot * bs + o);
                const int64_t k0 = b * bs + o;
                const __mmask16 m = chunk_keys(k0, j_first, j_last);
                for (int r = 0; r < nr; r++) {
                    const __m512 sh = _mm512_cvtepi32_ps(_mm512_sub_epi32(ah[0][r], corr));
                    const __m512 sl = _mm512_cvtepi32_ps(_mm512_sub_epi32(al[0][r], corr));
                    const __m512 s = _mm512_mul_ps(_mm512_fmadd_ps(sl, _mm512_set1_ps(1.f / 254.f), sh),
                                                   _mm512_mul_ps(f, _mm512_set1_ps(qs[hh * PA_ROWS + r])));
                    _mm512_mask_storeu_ps(sc + (hh * PA_ROWS + r) * stride + (k0 - lo), m, s);
                }
            }
        }
    }
    for (int64_t hh = 0; hh < nh; hh++)
        softmax_rows(nr, sc + hh * PA_ROWS * stride, stride, row_lo, row_hi, lo, n, cap);
    /* 3. values */
    memset(acc, 0, sizeof(float) * (size_t)(nh * PA_ROWS * d));
    for (int64_t b = lo / bs; b <= hi / bs; b++) {
        const int64_t j_first = block_first(b, bs, lo), j_last = block_last(b, bs, hi);
        for (int64_t hh = 0; hh < nh; hh++) {
            const int64_t slot = (int64_t)table[b] * kv_heads + kh0 + hh;
            const int8_t *vb = v_cache + slot * part;
            for (int64_t o = (j_first - b * bs) / 16 * 16; b * bs + o <= j_last; o += 16) {
                const int64_t k0 = b * bs + o;
                const __mmask16 m = chunk_keys(k0, j_first, j_last);
                const __m512 vs = _mm512_loadu_ps(v_scale + slot * bs + o);
                for (int r = 0; r < nr; r++) {
                    /* sc has SC_PAD floats before each row's first key: k0 - lo >= -15 */
                    const float *sr = sc + (hh * PA_ROWS + r) * stride;
                    const __m512 pv = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, sr + (k0 - lo)), vs);
                    const float pm = _mm512_reduce_max_ps(pv);
                    if (!(pm > 0.f)) continue;
                    const __m128i pb = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(pv, _mm512_set1_ps(255.f / pm))));
                    int32_t g4[4];
                    _mm_storeu_si128((__m128i *)g4, pb);
                    const __m512 back = _mm512_set1_ps(pm / 255.f);
                    float *ar = acc + (hh * PA_ROWS + r) * d;
                    for (int64_t c0 = 0; c0 < d; c0 += 64) {
                        const int64_t cw = d - c0 < 64 ? d - c0 : 64;
                        const __mmask16 mk[4] = {lanes(cw), lanes(cw - 16), lanes(cw - 32), lanes(cw - 48)};
                        __m512i ia[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                                         _mm512_setzero_si512()};
                        for (int g = 0; g < 4; g++) {
                            const __m512i pg = _mm512_set1_epi32(g4[g]);
                            const int8_t *vg = vb + ((o / 4 + g) * d + c0) * 4;
                            for (int u = 0; u < 4; u++) ia[u] = dpbusd(ia[u], pg, _mm512_maskz_loadu_epi32(mk[u], vg + 64 * u));
                        }
                        for (int u = 0; u < 4; u++)
                            _mm512_mask_storeu_ps(ar + c0 + 16 * u, mk[u],
                                _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[u]), back, _mm512_maskz_loadu_ps(mk[u], ar + c0 + 16 * u)));
                    }
                }
            }
        }
    }
    for (int64_t hh = 0; hh < nh; hh++)
        for (int r = 0; r < nr; r++) memcpy(dst[r] + hh * head_step, acc + (hh * PA_ROWS + r) * d, sizeof(float) * (size_t)d);
}
#endif

void paged_attention(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                     const float *k_scale, const float *v_scale, int kind,
                     const int32_t *block_tables, int64_t bt_stride, const int64_t *cu_q,
                     const int64_t *ctx_len, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                     int64_t d, int64_t block_size, int64_t window, float scale, float softcap, float *out,
                     int64_t out_stride, int64_t max_ctx, int threads) {
    const int64_t g = num_heads / num_kv_heads;
    int64_t n_items = 0;
    for (int64_t s = 0; s < num_seqs; s++) n_items += (cu_q[s + 1] - cu_q[s] + QCHUNK - 1) / QCHUNK;
    int64_t *item_seq = malloc(sizeof(int64_t) * (n_items > 0 ? n_items : 1));
    int64_t *item_q0 = malloc(sizeof(int64_t) * (n_items > 0 ? n_items : 1));
    for (int64_t s = 0, k = 0; s < num_seqs; s++)
        for (int64_t i = 0; i < cu_q[s + 1] - cu_q[s]; i += QCHUNK) { item_seq[k] = s; item_q0[k] = i; k++; }
    const int64_t stride = (max_ctx > 0 ? max_ctx : 1) + 16 + SC_PAD;
    /* work item = (query chunk, group of `gsize` KV heads): with AVX-512 or AVX2 (fp32, bf16; int8 with
     * VNNI) a block's heads are read together, in groups as large as leaves every thread 4 items (at
     * most 16 heads, which bounds the scratch); elsewhere one head each */
    int vnni = 0, grouped = 0;
#ifdef HAVE_VNNI
    vnni = kind == KV_I8 && block_size % 16 == 0 && d % 4 == 0;
#endif
#if defined(__AVX512F__) || defined(__AVX2__)
    grouped = vnni || kind == KV_F32 || kind == KV_BF16;
#endif
    int64_t gsize = 1;
    if (grouped) {
        const int64_t want = (4 * threads + n_items - 1) / (n_items > 0 ? n_items : 1);   /* groups per chunk */
        const int64_t groups = want < 1 ? 1 : want > num_kv_heads ? num_kv_heads : want;
        gsize = (num_kv_heads + groups - 1) / groups;
        gsize = gsize > 16 ? 16 : gsize;
    }
    const int64_t n_groups = (num_kv_heads + gsize - 1) / gsize;
    #pragma omp parallel num_threads(threads)
    {
        float *sc_mem = malloc(sizeof(float) * (gsize * PA_ROWS * stride + SC_PAD));
        float *sc = sc_mem + SC_PAD;
        uint8_t *qb = malloc((size_t)(gsize * PA_ROWS * 2 * d));
        float *qs = malloc(sizeof(float) * (size_t)(gsize * PA_ROWS));
        float *acc = malloc(sizeof(float) * (size_t)(gsize * PA_ROWS * d));
#if defined(__AVX2__) && !defined(__AVX512F__)
        int16_t *wbuf = malloc(sizeof(int16_t) * (size_t)(PA_ROWS * stride));    /* paged_rows_i8_avx2's P.V weights */
#endif
        #pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < n_items * n_groups; w++) {
            const int64_t it = w / n_groups, kh = (w % n_groups) * gsize, s = item_seq[it];
            const int64_t nh = num_kv_heads - kh < gsize ? num_kv_heads - kh : gsize;
            (void)nh;                                              /* used by the vector paths only */
            const int64_t nq = cu_q[s + 1] - cu_q[s], q0 = item_q0[it];
            const int64_t q1 = q0 + QCHUNK < nq ? q0 + QCHUNK : nq;
            const int64_t first = ctx_len[s] - nq;                 /* position of query 0 */
            const int64_t rows = (q1 - q0) * g;
            const int32_t *table = block_tables + s * bt_stride;
            for (int64_t r0 = 0; r0 < rows; r0 += PA_ROWS) {
                const float *qr[PA_ROWS];
                float *dst[PA_ROWS];
                int64_t row_lo[PA_ROWS], row_hi[PA_ROWS], lo = INT64_MAX, hi = -1;
                const int nr = (int)(rows - r0 < PA_ROWS ? rows - r0 : PA_ROWS);
                for (int r = 0; r < nr; r++) {
                    const int64_t i = q0 + (r0 + r) / g, h = kh * g + (r0 + r) % g, t = cu_q[s] + i, p = first + i;
                    qr[r] = q + t * q_stride + h * d;
                    dst[r] = out + t * out_stride + h * d;
                    row_lo[r] = (window > 0 && p - window + 1 > 0) ? p - window + 1 : 0;
                    row_hi[r] = p;
                    lo = row_lo[r] < lo ? row_lo[r] : lo;
                    hi = row_hi[r] > hi ? row_hi[r] : hi;
                }
                /* one specialized copy per element type and row count: neither is tested in the loops */
#define BY_ROWS(CALL) do { switch (nr) { case 1: CALL(1); break; case 2: CALL(2); break; \
                                         case 3: CALL(3); break; default: CALL(4); } } while (0)
#define I8_ROWS(NR) paged_heads_i8(NR, nh, g * d, qr, dst, row_lo, row_hi, lo, hi, (const int8_t *)k_cache, \
                                   (const int8_t *)v_cache, k_scale, v_scale, table, num_kv_heads, kh, d, \
                                   block_size, scale, softcap, sc, stride, qb, qs, acc)
#define F32_ROWS(NR) paged_rows(KV_F32, NR, nh, g * d, qr, dst, row_lo, row_hi, lo, hi, (const char *)k_cache, \
                                (const char *)v_cache, table, num_kv_heads, kh, d, block_size, scale, softcap, sc, \
                                stride, acc)
#define BF16_ROWS(NR) paged_rows(KV_BF16, NR, nh, g * d, qr, dst, row_lo, row_hi, lo, hi, (const char *)k_cache, \
                                 (const char *)v_cache, table, num_kv_heads, kh, d, block_size, scale, softcap, sc, \
                                 stride, acc)
#ifdef HAVE_VNNI
                if (vnni) { BY_ROWS(I8_ROWS); continue; }
#endif
#ifdef __AVX512F__
                if (kind == KV_F32) { BY_ROWS(F32_ROWS); continue; }
                if (kind == KV_BF16) { BY_ROWS(BF16_ROWS); continue; }
#elif defined(__AVX2__)
#undef F32_ROWS
#undef BF16_ROWS
#define F32_ROWS(NR) paged_rows_avx2(KV_F32, NR, nh, g * d, qr, dst, row_lo, row_hi, lo, hi, (const char *)k_cache, \
                                     (const char *)v_cache, table, num_kv_heads, kh, d, block_size, scale, softcap, \
                                     sc, stride, acc)
#define BF16_ROWS(NR) paged_rows_avx2(KV_BF16, NR, nh, g * d, qr, dst, row_lo, row_hi, lo, hi, \
                                      (const char *)k_cache, (const char *)v_cache, table, num_kv_heads, kh, d, \
                                      block_size, scale, softcap, sc, stride, acc)
                if (kind == KV_F32) { BY_ROWS(F32_ROWS); continue; }
                if (kind == KV_BF16) { BY_ROWS(BF16_ROWS); continue; }
#endif
#if defined(__AVX2__) && !defined(__AVX512F__)
                if (kind == KV_I8 && block_size % 8 == 0 && d % 8 == 0 && d <= 1024) {
                    paged_rows_i8_avx2(nr, qr, dst, row_lo, row_hi, lo, hi, (const int8_t *)k_cache,
                                       (const int8_t *)v_cache, k_scale, v_scale, table, num_kv_heads, kh, d,
                                       block_size, scale, softcap, sc, stride, (int16_t *)qb, wbuf);
                    continue;
                }
#endif
                paged_rows_scalar(kind, nr, qr, dst, row_lo, row_hi, lo, hi, (const char *)k_cache,
                                  (const char *)v_cache, k_scale, v_scale, table, num_kv_heads, kh, d, block_size,
                                  scale, softcap, sc, stride);
#undef BY_ROWS
#undef I8_ROWS
#undef F32_ROWS
#undef BF16_ROWS
            }
        }
        free(sc_mem);
        free(qb);
        free(qs);
        free(acc);
#if defined(__AVX2__) && !defined(__AVX512F__)
        free(wbuf);
#endif
    }
    free(item_seq);
    free(item_q0);
}

/* a tile call T(R) with its height R as a compile-time constant 1-6 (each height its own copy of the
 * tile's loop), for mr rows */
#define TILE_HEIGHTS(mr, T) do { switch (mr) { case 1: T(1); break; case 2: T(2); break; case 3: T(3); break; \
        case 4: T(4); break; case 5: T(5); break; default: T(6); } } while (0)

/* the first row of tile t of M rows split into `tiles` as evenly as possible (8 rows are 4 + 4, not
 * 6 + 2); tile t holds rows tile_row0(t) .. tile_row0(t + 1) - 1 */
static inline int64_t tile_row0(int64_t M, int64_t tiles, int64_t t) {
    return t * (M / tiles) + (t < M % tiles ? t : M % tiles);
}

/* int8 GEMM on weights packed once at load: acc[m][n] = sum_k x[m][k] * w[k][n] in exact int32, the
 * same numbers as torch._int_mm. Decoder linears run it at every row count of a decode step: at 1-16
 * rows oneDNN's int8 GEMM read GPT-2's weights at about 10 GB/s, a quarter of this machine's
 * bandwidth, and at 17-64 rows it ran at a third of the VNNI peak (benchmarks/decode_gemm.py).
 *   x:      int8 [M, K] rows `ldx` apart
 *   wp:     int8 [Np / 64][K4][64][4], K4 = ceil(K / 4), Np = N rounded up to 64: blocks of 64 columns,
 *           each block one contiguous run over K (the hardware prefetcher streams it; the earlier
 *           [K4][Np][4] layout jumped Np * 4 bytes between k groups), the four consecutive k of a column
 *           side by side (vpdpbusd's operand layout), zeros past K and N
 *   colsum: int32 [Np], 128 * sum_k w[k][n]: vpdpbusd multiplies unsigned by signed bytes, so x goes in
 *           as x + 128 (its sign bit flipped) and 128 times each column sum comes off at the end
 *   acc:    int32 [M, N]
 * Each thread takes whole 64-column blocks; a block's rows go in tiles of up to 6 (6 x 4 accumulators,
 * 4 weight vectors and a broadcast: 29 of the 32 registers), each tile one pass over the block's
 * weights (from L2 after the first). A tile's row count is a compile-time constant (one copy per
 * count) so its loop holds nothing but loads and dot products; tiles of 1-2 rows alternate two
 * accumulator sets over k so that 8 dot-product chains hide the instruction's latency. */
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
/* accumulators as named variables: GCC kept an array of them in memory, a store per dot product;
 * the dot product is dpbusd (inline assembly, see above) */
#define VT_DECL(r) __m512i c##r##0 = _mm512_setzero_si512(), c##r##1 = c##r##0, c##r##2 = c##r##0, c##r##3 = c##r##0
#define VT_ROW(r, g, W) do { if (ROWS > (r % 6)) { int32_t four; memcpy(&four, xu + (r % 6) * ldu + 4 * (g), 4); \
        const __m512i xb = _mm512_set1_epi32(four); \
        c##r##0 = dpbusd(c##r##0, xb, W##0); c##r##1 = dpbusd(c##r##1, xb, W##1); \
        c##r##2 = dpbusd(c##r##2, xb, W##2); c##r##3 = dpbusd(c##r##3, xb, W##3); } } while (0)
#define VT_LOAD(W, g) const __m512i W##0 = _mm512_loadu_si512(wb + (g) * 256), W##1 = _mm512_loadu_si512(wb + (g) * 256 + 64), \
        W##2 = _mm512_loadu_si512(wb + (g) * 256 + 128), W##3 = _mm512_loadu_si512(wb + (g) * 256 + 192)
#define VT_STORE(r, e) do { if (ROWS > r) { \
        const __m512i s0 = _mm512_add_epi32(_mm512_sub_epi32(c##r##0, _mm512_loadu_si512(cs)), e##0); \
        const __m512i s1 = _mm512_add_epi32(_mm512_sub_epi32(c##r##1, _mm512_loadu_si512(cs + 16)), e##1); \
        const __m512i s2 = _mm512_add_epi32(_mm512_sub_epi32(c##r##2, _mm512_loadu_si512(cs + 32)), e##2); \
        const __m512i s3 = _mm512_add_epi32(_mm512_sub_epi32(c##r##3, _mm512_loadu_si512(cs + 48)), e##3); \
        int32_t *o = acc + r * lda; \
        _mm512_mask_storeu_epi32(o, lanes(cols), s0); \
        if (cols > 16) _mm512_mask_storeu_epi32(o + 16, lanes(cols - 16), s1); \
        if (cols > 32) _mm512_mask_storeu_epi32(o + 32, lanes(cols - 32), s2); \
        if (cols > 48) _mm512_mask_storeu_epi32(o + 48, lanes(cols - 48), s3); } } while (0)

/* the next block's k group g into L2, while this block's first tile streams its own */
#define VT_PREFETCH(g) (_mm_prefetch((const char *)pf + (g) * 256, _MM_HINT_T1), \
                        _mm_prefetch((const char *)pf + (g) * 256 + 64, _MM_HINT_T1), \
                        _mm_prefetch((const char *)pf + (g) * 256 + 128, _MM_HINT_T1), \
                        _mm_prefetch((const char *)pf + (g) * 256 + 192, _MM_HINT_T1))
static inline __attribute__((always_inline)) void vnni_tile(const uint8_t *xu, int64_t ldu, const int8_t *wb,
                                                            int64_t K4, const int32_t *cs, int32_t *acc,
                                                            int64_t lda, int64_t cols, const int8_t *pf,
                                                            const int ROWS) {
    VT_DECL(0); VT_DECL(1); VT_DECL(2); VT_DECL(3); VT_DECL(4); VT_DECL(5);
    /* rows 6, 7: a second accumulator set for the odd k groups of 1-2 row tiles (VT_ROW reads row r % 6) */
    VT_DECL(6); VT_DECL(7);
    int64_t g = 0;
    if (ROWS <= 2) {
        for (; g + 2 <= K4; g += 2) {
            if (pf) VT_PREFETCH(g), VT_PREFETCH(g + 1);
            VT_LOAD(w, g);
            VT_ROW(0, g, w); VT_ROW(1, g, w);
            VT_LOAD(v, g + 1);
            VT_ROW(6, g + 1, v); VT_ROW(7, g + 1, v);
        }
    }
    for (; g < K4; g++) {
        if (pf) VT_PREFETCH(g);
        VT_LOAD(w, g);
        VT_ROW(0, g, w); VT_ROW(1, g, w); VT_ROW(2, g, w); VT_ROW(3, g, w); VT_ROW(4, g, w); VT_ROW(5, g, w);
    }
    const __m512i z0 = _mm512_setzero_si512(), z1 = z0, z2 = z0, z3 = z0;
    VT_STORE(0, c6); VT_STORE(1, c7); VT_STORE(2, z); VT_STORE(3, z); VT_STORE(4, z); VT_STORE(5, z);
}
#undef VT_DECL
#undef VT_ROW
#undef VT_LOAD
#undef VT_STORE
#undef VT_PREFETCH
#endif

#if defined(__AVX2__) && !(defined(__AVX512F__) && defined(__AVX512VNNI__))
/* AVX2 without VNNI: no 8-bit dot product that is exact (vpmaddubsw saturates at int16), so the
 * weights are widened to int16 on the fly (vpmovsxbw) and multiplied by vpmaddwd, two exact products
 * per int32 lane: 16 multiply-adds per instruction against an fp32 FMA's 8, from a quarter of fp32's
 * weight bytes. The packed layout is the VNNI one: 16 bytes at k group g hold 4 columns x 4 k, which
 * widen to lanes (col c, k 0-1), (col c, k 2-3); the row's 4 int16 x at g, broadcast, meet them, and
 * the two lanes of a column are added at the end. torch._int_mm on such a CPU ran at 4 GOP/s against
 * fp32's 90 GFLOP/s. Tile: ROWS <= 6 rows x 8 columns (chunk of a 64-column block), 12 accumulators. */
#define AT_ROW(r) do { if (ROWS > r) { int64_t four; memcpy(&four, x16 + 4 * (ROWS * g + r), 8); \
        const __m256i xb = _mm256_set1_epi64x(four); \
        a##r##0 = _mm256_add_epi32(a##r##0, _mm256_madd_epi16(w0, xb)); \
        a##r##1 = _mm256_add_epi32(a##r##1, _mm256_madd_epi16(w1, xb)); } } while (0)
#define AT_STORE(r) do { if (ROWS > r) { \
        store_i32_lanes(acc + r * lda, pair_sums8(a##r##0, a##r##1), cols); } } while (0)
static inline __attribute__((always_inline)) void avx2_tile(const int16_t *x16, const int8_t *wc,
                                                            int64_t K4, int32_t *acc, int64_t lda, int64_t cols,
                                                            const int ROWS) {
    /* named accumulators, not an array: with a[4][2] GCC spilled one to the stack and the loop ran at a
     * third of this speed */
    __m256i a00 = _mm256_setzero_si256(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00;
    __m256i a30 = a00, a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
    if (ROWS == 6) {
        /* the whole k loop in assembly, on all 16 ymm registers: 12 accumulators (ymm4-15), two widened
         * weight vectors, a broadcast and a product. GCC 12, given the same steps in intrinsics, kept
         * 9 of the 12 accumulators on the stack (94 against 230 GOP/s at [4096, 384] x [384, 1536]) */
        __m256i out[12];
        const int8_t *w = wc;
        int64_t n = K4;
        const int16_t *x0 = x16;
#define AT_ASM_ROW(addr, a0, a1) \
            "vpbroadcastq " addr ", %%ymm2\n\t" \
            "vpmaddwd %%ymm2, %%ymm0, %%ymm3\n\t" \
            "vpaddd %%ymm3, %%" a0 ", %%" a0 "\n\t" \
            "vpmaddwd %%ymm2, %%ymm1, %%ymm3\n\t" \
            "vpaddd %%ymm3, %%" a1 ", %%" a1 "\n\t"
        __asm__ volatile(
            "vpxor %%xmm4, %%xmm4, %%xmm4\n\t" "vpxor %%xmm5, %%xmm5, %%xmm5\n\t"
            "vpxor %%xmm6, %%xmm6, %%xmm6\n\t" "vpxor %%xmm7, %%xmm7, %%xmm7\n\t"
            "vpxor %%xmm8, %%xmm8, %%xmm8\n\t" "vpxor %%xmm9, %%xmm9, %%xmm9\n\t"
            "vpxor %%xmm10, %%xmm10, %%xmm10\n\t" "vpxor %%xmm11, %%xmm11, %%xmm11\n\t"
            "vpxor %%xmm12, %%xmm12, %%xmm12\n\t" "vpxor %%xmm13, %%xmm13, %%xmm13\n\t"
            "vpxor %%xmm14, %%xmm14, %%xmm14\n\t" "vpxor %%xmm15, %%xmm15, %%xmm15\n\t"
            "1:\n\t"
            "vpmovsxbw (%[w]), %%ymm0\n\t"
            "vpmovsxbw 16(%[w]), %%ymm1\n\t"
            AT_ASM_ROW("(%[x0])", "ymm4", "ymm5") AT_ASM_ROW("8(%[x0])", "ymm6", "ymm7")
            AT_ASM_ROW("16(%[x0])", "ymm8", "ymm9") AT_ASM_ROW("24(%[x0])", "ymm10", "ymm11")
            AT_ASM_ROW("32(%[x0])", "ymm12", "ymm13") AT_ASM_ROW("40(%[x0])", "ymm14", "ymm15")
            "addq $256, %[w]\n\t"
            "addq $48, %[x0]\n\t"
            "decq %[n]\n\t"
            "jnz 1b\n\t"
            "vmovdqu %%ymm4, (%[out])\n\t" "vmovdqu %%ymm5, 32(%[out])\n\t"
            "vmovdqu %%ymm6, 64(%[out])\n\t" "vmovdqu %%ymm7, 96(%[out])\n\t"
            "vmovdqu %%ymm8, 128(%[out])\n\t" "vmovdqu %%ymm9, 160(%[out])\n\t"
            "vmovdqu %%ymm10, 192(%[out])\n\t" "vmovdqu %%ymm11, 224(%[out])\n\t"
            "vmovdqu %%ymm12, 256(%[out])\n\t" "vmovdqu %%ymm13, 288(%[out])\n\t"
            "vmovdqu %%ymm14, 320(%[out])\n\t" "vmovdqu %%ymm15, 352(%[out])\n\t"
            : [w] "+r"(w), [x0] "+r"(x0), [n] "+r"(n)
            : [out] "r"(out)
            : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
              "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "cc", "memory");
#undef AT_ASM_ROW
        a00 = out[0]; a01 = out[1]; a10 = out[2]; a11 = out[3]; a20 = out[4]; a21 = out[5];
        a30 = out[6]; a31 = out[7]; a40 = out[8]; a41 = out[9]; a50 = out[10]; a51 = out[11];
    } else {
        for (int64_t g = 0; g < K4; g++) {
            const int8_t *w = wc + g * 256;
            const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w));
            const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 16)));
            AT_ROW(0); AT_ROW(1); AT_ROW(2); AT_ROW(3); AT_ROW(4);
        }
    }
    AT_STORE(0); AT_STORE(1); AT_STORE(2); AT_STORE(3); AT_STORE(4); AT_STORE(5);
}

/* One or two rows (a decode step of few sequences): avx2_tile's 8-column chunk gives only 2 or 4
 * accumulator chains, and the LM head at one row read 7 GB/s. Here 4 / ROWS chunks share each pass
 * over K (32 columns of one row, or 16 of two): 8 chains, each broadcast used 4 / ROWS times. */
static inline __attribute__((always_inline)) void avx2_tile_narrow(const int16_t *x16,
                                                                   const int8_t *wc, int64_t K4, int32_t *acc,
                                                                   int64_t lda, int64_t cols, const int ROWS) {
    __m256i a00 = _mm256_setzero_si256(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
    for (int64_t g = 0; g < K4; g++) {
        const int8_t *w = wc + g * 256;
        int64_t f0, f1 = 0;
        memcpy(&f0, x16 + 4 * ROWS * g, 8);
        if (ROWS == 2) memcpy(&f1, x16 + 4 * ROWS * g + 4, 8);
        const __m256i xb0 = _mm256_set1_epi64x(f0), xb1 = ROWS == 2 ? _mm256_set1_epi64x(f1) : xb0;
        /* accumulator pair i <- chunk c of the row whose broadcast is xb */
#define NW(i, c, xb) do { \
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 32 * (c)))); \
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 32 * (c) + 16))); \
        a##i##0 = _mm256_add_epi32(a##i##0, _mm256_madd_epi16(w0, xb)); \
        a##i##1 = _mm256_add_epi32(a##i##1, _mm256_madd_epi16(w1, xb)); } while (0)
        if (ROWS == 1) { NW(0, 0, xb0); NW(1, 1, xb0); NW(2, 2, xb0); NW(3, 3, xb0); }
        else { NW(0, 0, xb0); NW(1, 0, xb1); NW(2, 1, xb0); NW(3, 1, xb1); }
#undef NW
    }
    const __m256i sums[4][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
    for (int i = 0; i < 4; i++) {
        const int r = ROWS == 1 ? 0 : i % 2, c = ROWS == 1 ? i : i / 2;
        const int64_t left = cols - 8 * c;
        if (left <= 0) continue;
        store_i32_lanes(acc + r * lda + 8 * c, pair_sums8(sums[i][0], sums[i][1]), left);
    }
}
#undef AT_ROW
#undef AT_STORE
#endif

void int8_gemm_packed(const int8_t *x, int64_t ldx, const int8_t *wp, const int32_t *colsum, int32_t *acc,
                      int64_t M, int64_t K, int64_t N, int threads) {
    const int64_t K4 = (K + 3) / 4, blocks = (N + 63) / 64;
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
    /* x + 128 as unsigned bytes, rows padded to 4 * K4 (the padding meets zero weights), so each group of
     * four is one broadcast load in the loop below */
    const int64_t ldu = K4 * 4;
    uint8_t *xu = malloc((size_t)(M * ldu) + 64);
    for (int64_t m = 0; m < M; m++) {
        for (int64_t k = 0; k < K; k++) xu[m * ldu + k] = (uint8_t)(x[m * ldx + k] ^ 0x80);
        for (int64_t k = K; k < ldu; k++) xu[m * ldu + k] = 0;
    }
    const int64_t tiles = (M + 5) / 6;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t cb = 0; cb < blocks; cb++) {
        const int64_t n0 = cb * 64, cols = N - n0;
        const int8_t *wb = wp + cb * K4 * 256;
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t m0 = tile_row0(M, tiles, t), mr = tile_row0(M, tiles, t + 1) - m0;
            const uint8_t *xt = xu + m0 * ldu;
            int32_t *at = acc + m0 * N + n0;
            const int8_t *pf = t == 0 && cb + 1 < blocks ? wb + K4 * 256 : NULL;
#define TILE(R) vnni_tile(xt, ldu, wb, K4, colsum + n0, at, N, cols, pf, R)
            TILE_HEIGHTS(mr, TILE);
#undef TILE
        }
    }
    free(xu);
#elif defined(__AVX2__)
    /* x widened to int16 once, on all threads (on one, the GEMMs at MiniLM's shapes took 5-10% longer),
     * and laid out by row tile: tile t's mr rows at row m0 go [K4][mr][4], so its broadcasts (four k of
     * a row, 8 bytes) walk one contiguous run instead of 6 rows apart (as the fp32 GEMM's repacked x);
     * MiniLM's shapes at 3,900 rows: qkv, o and fc1 5-15% faster, fc2 level, 1-16 rows level
     * (interleaved A/B of two builds); k padded to 4 * K4 with zeros (they meet zero weights) */
    const int64_t ldx16 = K4 * 4, tiles = (M + 5) / 6;
    int16_t *x16 = malloc(sizeof(int16_t) * (size_t)(M * ldx16) + 64);
    #pragma omp parallel for schedule(static) num_threads(threads) if (M * K > 65536)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t m0 = tile_row0(M, tiles, t), mr = tile_row0(M, tiles, t + 1) - m0;
        int16_t *d = x16 + m0 * ldx16;
        for (int64_t r = 0; r < mr; r++) {
            const int8_t *xr = x + (m0 + r) * ldx;
            int16_t *dr = d + 4 * r;
            const int64_t step = 4 * mr;           /* int16 between a row's consecutive k groups */
            int64_t g = 0;
            for (; 4 * g + 16 <= K; g += 4) {      /* 16 k: one widening, four 8-byte stores */
                const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(xr + 4 * g)));
                const __m128i lo = _mm256_castsi256_si128(w), hi = _mm256_extracti128_si256(w, 1);
                _mm_storel_epi64((__m128i *)(dr + g * step), lo);
                _mm_storel_epi64((__m128i *)(dr + (g + 1) * step), _mm_unpackhi_epi64(lo, lo));
                _mm_storel_epi64((__m128i *)(dr + (g + 2) * step), hi);
                _mm_storel_epi64((__m128i *)(dr + (g + 3) * step), _mm_unpackhi_epi64(hi, hi));
            }
            for (; g < K4; g++)
                for (int j = 0; j < 4; j++) dr[g * step + j] = 4 * g + j < K ? xr[4 * g + j] : 0;
        }
    }
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t cb = 0; cb < blocks; cb++) {
        const int64_t n0 = cb * 64;
        const int8_t *wb = wp + cb * K4 * 256;
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t m0 = tile_row0(M, tiles, t), mr = tile_row0(M, tiles, t + 1) - m0;
            if (mr <= 2) {
                const int64_t step = 4 / mr;                     /* chunks per pass */
                for (int64_t c8 = 0; c8 < 8 && n0 + 8 * c8 < N; c8 += step) {
                    const int64_t cols = N - n0 - 8 * c8;
                    int32_t *at = acc + m0 * N + n0 + 8 * c8;
                    if (mr == 1) avx2_tile_narrow(x16 + m0 * ldx16, wb + 32 * c8, K4, at, N, cols, 1);
                    else avx2_tile_narrow(x16 + m0 * ldx16, wb + 32 * c8, K4, at, N, cols, 2);
                }
                continue;
            }
            for (int64_t c8 = 0; c8 < 8 && n0 + 8 * c8 < N; c8++) {
                const int64_t cols = N - n0 - 8 * c8;
#define TILE(R) avx2_tile(x16 + m0 * ldx16, wb + 32 * c8, K4, acc + m0 * N + n0 + 8 * c8, N, cols, R)
                TILE_HEIGHTS(mr, TILE);
#undef TILE
            }
        }
    }
    free(x16);
    (void)colsum;
#else
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t cb = 0; cb < blocks; cb++)
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = cb * 64; n < cb * 64 + 64 && n < N; n++) {
                int32_t s = 0;
                for (int64_t k = 0; k < K; k++) s += (int32_t)x[m * ldx + k] * wp[(cb * K4 + k / 4) * 256 + (n % 64) * 4 + k % 4];
                acc[m * N + n] = s;
            }
    (void)colsum;
#endif
}

#if defined(__AVX2__) && !defined(__AVX512F__)
/* fp32 GEMM for CPUs with AVX2 and no AVX-512, out[M, N] = act(x[M, K] @ W + bias), W packed by
 * ops/cpu.py pack_panels: [ceil(N / 16)][K][16] floats (16 columns side by side at each k, zeros past
 * N). On a 2-core AMD EPYC (benchmarks/decode_gemm.py, GPT-2's 768 x 2304 qkv weight) MKL's sgemm ran
 * 12 GFLOP/s at 4 rows, 39 at 16 and 86-112 at 256-1024, against this kernel's 79, 118 and 141-163;
 * MiniLM's encoder, all linears on it, gained 1-10% over addmm. Micro-kernel: ROWS <= 6 rows x 16 columns,
 * 12 accumulators, per k two weight loads and a broadcast per row: 12 FMAs, no spills (GCC keeps
 * named accumulators in registers). x is first repacked in tiles of 6 rows, [ceil(M / 6)][K][6]
 * (pack_rows6, 8 x 8 register transposes; a malloc per call, which keep_freed_memory's settings serve
 * from malloc's free lists), so a tile's broadcasts walk one contiguous run instead of 6 rows ldx
 * apart: 5-10% faster at MiniLM's qkv and fc1 and at 16-64 rows of GPT-2's, level at 1 row and where
 * N is 384 (interleaved runs; blocking K in chunks of 512 on top of it changed nothing). Threads take
 * whole 64-column blocks; a block's row tiles each make a pass over the block's 4 panels (from L2
 * after the first tile). A row's result never depends on the other rows. The activation runs once a
 * tile's 4 panels are stored, over its 6 x 64 block (still in L1): applied to each 16-column panel
 * as it was stored, GELU's erf (a dependent chain of ~20 operations) had 2 vectors to overlap and ran
 * latency-bound, 8% of MiniLM's whole fp32 forward (perf); over 64 columns fc1 + GELU ran 20-35%
 * faster (interleaved runs). */
#define FT_ROW(r) if (ROWS > r) { const __m256 a = _mm256_broadcast_ss(xp + 6 * k + r); \
        c##r##0 = _mm256_fmadd_ps(a, b0, c##r##0); c##r##1 = _mm256_fmadd_ps(a, b1, c##r##1); }
#define FT_STORE(r) if (ROWS > r) { float *o = out + r * ldo; \
        const __m256 v0 = _mm256_add_ps(c##r##0, bias0), v1 = _mm256_add_ps(c##r##1, bias1); \
        if (cols >= 16) { _mm256_storeu_ps(o, v0); _mm256_storeu_ps(o + 8, v1); } \
        else { float t[16]; _mm256_storeu_ps(t, v0); _mm256_storeu_ps(t + 8, v1); memcpy(o, t, sizeof(float) * cols); } }
static inline __attribute__((always_inline)) void f32_tile(const float *xp, const float *w, int64_t K,
                                                           const float *bias, float *out, int64_t ldo,
                                                           int64_t cols, const int ROWS) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    #pragma GCC unroll 4
    for (int64_t k = 0; k < K; k++) {
        const __m256 b0 = _mm256_loadu_ps(w + 16 * k), b1 = _mm256_loadu_ps(w + 16 * k + 8);
        FT_ROW(0) FT_ROW(1) FT_ROW(2) FT_ROW(3) FT_ROW(4) FT_ROW(5)
    }
    float bt[16] = {0};
    if (bias) memcpy(bt, bias, sizeof(float) * (cols < 16 ? cols : 16));
    const __m256 bias0 = _mm256_loadu_ps(bt), bias1 = _mm256_loadu_ps(bt + 8);
    FT_STORE(0) FT_STORE(1) FT_STORE(2) FT_STORE(3) FT_STORE(4) FT_STORE(5)
}
#undef FT_ROW
#undef FT_STORE

static void pack_rows6(const float *x, int64_t ldx, int64_t mr, int64_t K, float *d) {
    int64_t k = 0;
    if (mr == 6)
        for (; k + 8 < K; k += 8) {        /* not the last 8: their spill would reach the next tile */
            __m256 r[8];
            for (int i = 0; i < 6; i++) r[i] = _mm256_loadu_ps(x + i * ldx + k);
            r[6] = r[7] = _mm256_setzero_ps();
            transpose8x8(r);
            for (int i = 0; i < 8; i++) _mm256_storeu_ps(d + 6 * (k + i), r[i]);   /* 8 floats: 2 spill into the next k's */
        }
    for (; k < K; k++)
        for (int r = 0; r < 6; r++) d[6 * k + r] = r < mr ? x[r * ldx + k] : 0.0f;
}

void f32_gemm_packed(const float *x, int64_t ldx, const float *wp, const float *bias, int act, float *out,
                     int64_t ldo, int64_t M, int64_t K, int64_t N, int threads) {
    const int64_t panels = (N + 15) / 16, blocks = (panels + 3) / 4, tiles = (M + 5) / 6;
    float *xp = malloc(sizeof(float) * tiles * K * 6);
    #pragma omp parallel num_threads(threads)
    {
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; t++) pack_rows6(x + 6 * t * ldx, ldx, M - 6 * t < 6 ? M - 6 * t : 6, K, xp + t * K * 6);
    #pragma omp for schedule(static)
    for (int64_t cb = 0; cb < blocks; cb++)
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t m0 = 6 * t, mr = M - m0 < 6 ? M - m0 : 6;
            for (int64_t p = 4 * cb; p < 4 * cb + 4 && p < panels; p++) {
#define TILE(R) f32_tile(xp + t * K * 6, wp + p * K * 16, K, bias ? bias + 16 * p : NULL, \
                         out + m0 * ldo + 16 * p, ldo, N - 16 * p, R)
                TILE_HEIGHTS(mr, TILE);
#undef TILE
            }
            if (act) {
                const int64_t c0 = 64 * cb, cols = N - c0 < 64 ? N - c0 : 64;
                for (int64_t r = 0; r < mr; r++) activate_row(out + (m0 + r) * ldo + c0, cols, act);
            }
        }
    }
    free(xp);
}
#endif

#if defined(__AVX2__) && !defined(__AVX512F__)
/* out[M, N] = x[M, K] @ w^T for a weight stored as [N, K] rows (a decoder's LM head, tied to the
 * token embedding, so it is not repacked), on CPUs with AVX2 and no AVX-512. MKL multiplied GPT-2's
 * 768 x 50257 head at 5-6 GFLOP/s for 1-4 rows and 20 at 16 (16 ms for one row, 60 for 16). Tiles of up to 3
 * rows x 4 weight rows, the 8 lanes over k, 12 accumulators added across lanes at the end; threads
 * take groups of 4 weight rows, and every row of x passes over a group while it is in L1, so the
 * weight is read from memory once per call (19-20 GB/s at one row, this VM's read bandwidth).
 * Software prefetch of the next group's rows changed the time by -6% to +12% (1 to 64 rows,
 * interleaved runs), so there is none. */
#define NT_FMA(r, j) if (ROWS > r) c##r##j = _mm256_fmadd_ps(x##r, w##j, c##r##j);
#define NT_STEP(LOAD) do { \
        const __m256 x0 = LOAD(xr + k), x1 = ROWS > 1 ? LOAD(xr + ldx + k) : x0, x2 = ROWS > 2 ? LOAD(xr + 2 * ldx + k) : x0; \
        const __m256 w0 = LOAD(wr[0] + k); NT_FMA(0, 0) NT_FMA(1, 0) NT_FMA(2, 0) \
        const __m256 w1 = LOAD(wr[1] + k); NT_FMA(0, 1) NT_FMA(1, 1) NT_FMA(2, 1) \
        const __m256 w2 = LOAD(wr[2] + k); NT_FMA(0, 2) NT_FMA(1, 2) NT_FMA(2, 2) \
        const __m256 w3 = LOAD(wr[3] + k); NT_FMA(0, 3) NT_FMA(1, 3) NT_FMA(2, 3) } while (0)
#define NT_LOAD(ptr) _mm256_loadu_ps(ptr)
#define NT_LOAD_TAIL(ptr) _mm256_maskload_ps(ptr, tail)
static inline __attribute__((always_inline)) void nt_tile(const float *xr, int64_t ldx, const float *const wr[4],
                                                          int64_t K, float *o, int64_t ldo, int64_t cols,
                                                          const int ROWS) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c03 = c00, c10 = c00, c11 = c00, c12 = c00, c13 = c00;
    __m256 c20 = c00, c21 = c00, c22 = c00, c23 = c00;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) NT_STEP(NT_LOAD);
    if (k < K) {
        const __m256i tail = lanes8(K - k);
        NT_STEP(NT_LOAD_TAIL);
    }
    const float s[3][4] = {{hsum8(c00), hsum8(c01), hsum8(c02), hsum8(c03)},
                           {hsum8(c10), hsum8(c11), hsum8(c12), hsum8(c13)},
                           {hsum8(c20), hsum8(c21), hsum8(c22), hsum8(c23)}};
    for (int r = 0; r < ROWS; r++)
        for (int64_t j = 0; j < cols; j++) o[r * ldo + j] = s[r][j];
}
#undef NT_FMA
#undef NT_STEP
#undef NT_LOAD
#undef NT_LOAD_TAIL

void f32_gemm_nt(const float *x, int64_t ldx, const float *w, int64_t ldw, float *out, int64_t ldo,
                 int64_t M, int64_t K, int64_t N, int threads) {
    const int64_t groups = (N + 3) / 4;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t gi = 0; gi < groups; gi++) {
        const int64_t n0 = 4 * gi, cols = N - n0 < 4 ? N - n0 : 4;
        const float *wr[4];
        for (int j = 0; j < 4; j++) wr[j] = w + (n0 + (j < cols ? j : 0)) * ldw;   /* past N: a repeat, not stored */
        for (int64_t m0 = 0; m0 < M; m0 += 3) {
            const float *xr = x + m0 * ldx;
            float *o = out + m0 * ldo + n0;
            if (M - m0 >= 3) nt_tile(xr, ldx, wr, K, o, ldo, cols, 3);
            else if (M - m0 == 2) nt_tile(xr, ldx, wr, K, o, ldo, cols, 2);
            else nt_tile(xr, ldx, wr, K, o, ldo, cols, 1);
        }
    }
}
#endif

/* Store n tokens' K and V (fp32, head h of token t at k + t * k_stride + h * d, likewise v) into their
 * cache slots (block slot_blocks[t], offset slot_offsets[t]) in the cache's element type (see
 * paged_attention for the layouts). int8: per token and head, scale = max(max |x|, 1e-8) / 127 and
 * q = round-half-even(x / scale), the same numbers as ops/cpu.py's torch version; bf16 rounds to
 * nearest even as torch does. One call per layer instead of a dozen small torch ops (1.2 ms of a
 * 10 ms GPT-2 decode step). */
/* true divisions, not -ffast-math's reciprocal multiplies, so the int8 values and scales stay
 * bit-equal to torch's, on exact .5 ties too. optimize("no-reciprocal-math") keeps max / 127 a
 * division, but did not stop GCC from turning the loops' x / s into x * (1 / s) (one vdivss, then
 * vmulps), so those are explicitly rounded divisions, which it does not rewrite */
__attribute__((optimize("no-reciprocal-math")))
static void kv_store_row(const float *src, int64_t d, int kind, void *part, int is_key, int64_t off, int64_t bs,
                         float *scale) {
#define AT(c) (is_key ? k_index(kind, c, off, bs) : v_index(kind, off, c, d))
    if (kind == KV_F32) {
        for (int64_t c = 0; c < d; c++) ((float *)part)[AT(c)] = src[c];
    } else if (kind == KV_BF16) {
        for (int64_t c = 0; c < d; c++) ((uint16_t *)part)[AT(c)] = f32_to_bf16(src[c]);
    } else {
        float amax = 0.f;
        int64_t c = 0;
#ifdef __AVX512F__
        /* vectorized (the scalar divisions were 2 ms of a 35-sequence GPT-2 decode step): the same
         * correctly rounded divisions and round-half-even converts, so the same bytes */
        __m512 mx = _mm512_setzero_ps();
        for (; c + 16 <= d; c += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(src + c)));
        amax = _mm512_reduce_max_ps(mx);
#elif defined(__AVX2__)
        const __m256 nosign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        __m256 mx = _mm256_setzero_ps();
        for (; c + 8 <= d; c += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(nosign, _mm256_loadu_ps(src + c)));
        amax = hmax8(mx);
#endif
        for (; c < d; c++) amax = fabsf(src[c]) > amax ? fabsf(src[c]) : amax;
        const float s = (amax > 1e-8f ? amax : 1e-8f) / 127.0f;
        c = 0;
#ifdef __AVX512F__
        int8_t qv[16];
        const __m512 vs = _mm512_set1_ps(s);
        const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
        for (; c + 16 <= d; c += 16) {
            const __m512i n = _mm512_cvtps_epi32(_mm512_div_round_ps(_mm512_loadu_ps(src + c), vs,
                                                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            _mm_storeu_si128((__m128i *)qv, _mm512_cvtepi32_epi8(_mm512_min_epi32(_mm512_max_epi32(n, lo), hi)));
            for (int u = 0; u < 16; u++) ((int8_t *)part)[AT(c + u)] = qv[u];
        }
#elif defined(__AVX2__)
        int32_t qv[8];
        const __m256 vs = _mm256_set1_ps(s);
        const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
        for (; c + 8 <= d; c += 8) {
            __m256 x = _mm256_loadu_ps(src + c);
            __asm__("vdivps %1, %0, %0" : "+x"(x) : "x"(vs));     /* a division GCC cannot rewrite */
            const __m256i n = _mm256_cvtps_epi32(x);                /* MXCSR's round-half-even */
            _mm256_storeu_si256((__m256i *)qv, _mm256_min_epi32(_mm256_max_epi32(n, lo), hi));
            for (int u = 0; u < 8; u++) ((int8_t *)part)[AT(c + u)] = (int8_t)qv[u];
        }
#endif
        for (; c < d; c++) {
#ifdef __AVX512F__
            float q = nearbyintf(_mm_cvtss_f32(_mm_div_round_ss(_mm_set_ss(src[c]), _mm_set_ss(s),
                                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
#elif defined(__SSE__)
            float q = nearbyintf(_mm_cvtss_f32(_mm_div_ss(_mm_set_ss(src[c]), _mm_set_ss(s))));
#else
            volatile float sv = s;                                  /* no hoisted reciprocal */
            float q = nearbyintf(src[c] / sv);
#endif
            q = q > 127.f ? 127.f : q < -127.f ? -127.f : q;
            ((int8_t *)part)[AT(c)] = (int8_t)q;
        }
        *scale = s;
    }
#undef AT
}

void kv_write(const float *k, int64_t k_stride, const float *v, int64_t v_stride, const int64_t *slot_blocks,
              const int64_t *slot_offsets, int64_t n, void *k_cache, void *v_cache, float *k_scale, float *v_scale,
              int kind, int64_t kv_heads, int64_t d, int64_t bs, int threads) {
    const int64_t es = elem_size(kind);
    /* threads: the stores land on cache lines last read a step ago, mostly in memory by now */
    #pragma omp parallel for schedule(static) num_threads(threads) if (n * kv_heads >= 64)
    for (int64_t w = 0; w < n * kv_heads; w++) {
        const int64_t t = w / kv_heads, h = w % kv_heads;
        const int64_t slot = slot_blocks[t] * kv_heads + h, off = slot_offsets[t];
        float ks = 0.f, vs = 0.f;
        kv_store_row(k + t * k_stride + h * d, d, kind, (char *)k_cache + slot * d * bs * es, 1, off, bs, &ks);
        kv_store_row(v + t * v_stride + h * d, d, kind, (char *)v_cache + slot * d * bs * es, 0, off, bs, &vs);
        if (kind == KV_I8) { k_scale[slot * bs + off] = ks; v_scale[slot * bs + off] = vs; }
    }
}

/* Free the calling thread's OpenMP worker pool. libgomp keeps one pool per thread that ever ran a
 * parallel region, and when the pools' threads outnumber the CPUs it stops spinning between regions and
 * sleeps on a futex instead: with a model loaded on one thread and run on another, every parallel
 * region then paid a wake-up (8 -> 100 us on this VM) and a GPT-2 decode step went from 8 to 22 ms.
 * Engines call this on the loading thread before their own threads take the model over. */
int release_thread_pool(void) { return omp_pause_resource_all(omp_pause_soft); }

/* Whether this build has the VNNI kernels (int8 paged attention, int8_gemm_packed's fast path). */
int built_with_vnni(void) {
#ifdef HAVE_VNNI
    return 1;
#else
    return 0;
#endif
}

/* 1 when int8_gemm_packed is the AVX2 int16-madd kernel: on such CPUs torch._int_mm has no fast path
 * either, so int8 linears use this kernel at every row count */
int int8_gemm_is_avx2(void) {
#if defined(__AVX2__) && !(defined(__AVX512F__) && defined(__AVX512VNNI__))
    return 1;
#else
    return 0;
#endif
}

/* 1 when f32_gemm_packed exists: AVX2 without AVX-512, where MKL's sgemm runs small row counts at a
 * fraction of the FMA peak (with AVX-512 it runs at the peak, so fp32 linears keep torch's GEMM) */
int f32_gemm_is_native(void) {
#if defined(__AVX2__) && !defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

/* Rotary embedding in place, HF's rotate-half layout: for each token t and head h of x (rows
 * `stride` floats apart, heads d apart), with c = cos[t], s = sin[t] ([T, d / 2] each):
 * x1, x2 = halves of the head;  x1 <- x1 c - x2 s,  x2 <- x2 c + x1 s. */
void rope(float *x, int64_t stride, int64_t T, int64_t heads, int64_t d, const float *cos_t, const float *sin_t,
          int threads) {
    const int64_t half = d / 2;
    #pragma omp parallel for schedule(static) num_threads(threads) if (T * heads >= 256)
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_t + t * half, *s = sin_t + t * half;
        for (int64_t h = 0; h < heads; h++) {
            float *x1 = x + t * stride + h * d, *x2 = x1 + half;
            int64_t i = 0;
#ifdef __AVX512F__
            for (; i + 16 <= half; i += 16) {
                const __m512 a = _mm512_loadu_ps(x1 + i), b = _mm512_loadu_ps(x2 + i);
                const __m512 cv = _mm512_loadu_ps(c + i), sv = _mm512_loadu_ps(s + i);
                _mm512_storeu_ps(x1 + i, _mm512_fmsub_ps(a, cv, _mm512_mul_ps(b, sv)));
                _mm512_storeu_ps(x2 + i, _mm512_fmadd_ps(b, cv, _mm512_mul_ps(a, sv)));
            }
#endif
            for (; i < half; i++) {
                const float a = x1[i], b = x2[i];
                x1[i] = a * c[i] - b * s[i];
                x2[i] = b * c[i] + a * s[i];
            }
        }
    }
}
