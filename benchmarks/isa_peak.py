"""Per-core arithmetic peaks of this CPU's vector units, from a small C kernel (no library involved).

    .venv/bin/python benchmarks/isa_peak.py

Measures, on one core and on all cores (one OpenMP thread per core), the throughput of
  fp32 FMA      vfmadd231ps zmm   (16 multiply-adds)                                  needs avx512f
  bf16 dot      vdpbf16ps zmm     (32 bf16 pair products summed into 16 fp32 lanes)   needs avx512_bf16
  int8 dot      vpdpbusd zmm      (64 u8 x s8 products summed into 16 int32 lanes)   needs avx512_vnni
and on a CPU without AVX-512 (AMD Zen 1-3, Intel before Ice Lake) the AVX2 instructions turboserve's
kernels use there:
  fp32 FMA      vfmadd231ps ymm   (8 multiply-adds)
  int16 madd    vpmaddwd ymm      (16 int16 products summed pairwise into 8 int32 lanes: the int8
                GEMM's step on such CPUs, kernels.c avx2_tile, which adds each product to its
                accumulator with a vpaddd: no accumulating form without VNNI)
with 12 independent accumulator chains (enough to cover each instruction's latency) and an empty asm
barrier per step so the compiler cannot fold the loop. Each multiply-add counts as 2 operations, so
the figures compare with GEMM GFLOP/s. This is the ceiling a GEMM on this machine can approach; the
library GEMMs' own rates are what benchmarks/encoder.py prints as its peaks.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
#define CHAINS 12          /* independent accumulators: enough to cover each instruction's latency */
#define STEPS 20000000L
/* one timed loop per instruction: VEC is the accumulator type, OP(acc) one instruction on it; twelve
 * named accumulators (an array of them ended up on the stack, each FMA waiting on a store) */
#define STEP(OP, a) a = OP(a); __asm__ volatile("" : "+v"(a))
#define KERNEL(NAME, VEC, ZERO, OP)                                                   \
static double NAME(void) {                                                            \
    double t = 0;                                                                     \
    _Pragma("omp parallel reduction(max:t)")                                          \
    {                                                                                 \
        volatile int seed = 0x3f803f80;                                               \
        const XVEC x = XSET(seed);                                                    \
        VEC a0 = ZERO, a1 = ZERO, a2 = ZERO, a3 = ZERO, a4 = ZERO, a5 = ZERO;         \
        VEC a6 = ZERO, a7 = ZERO, a8 = ZERO, a9 = ZERO, a10 = ZERO, a11 = ZERO;       \
        _Pragma("omp barrier")                                                        \
        const double t0 = now();                                                      \
        for (long s = 0; s < STEPS; s++) {                                            \
            STEP(OP, a0); STEP(OP, a1); STEP(OP, a2); STEP(OP, a3); STEP(OP, a4);    \
            STEP(OP, a5); STEP(OP, a6); STEP(OP, a7); STEP(OP, a8); STEP(OP, a9);    \
            STEP(OP, a10); STEP(OP, a11);                                             \
        }                                                                             \
        t = now() - t0;                                                               \
        volatile VEC sink = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11; \
        (void)sink;                                                                   \
    }                                                                                 \
    return t;                                                                         \
}
#ifdef __AVX512F__
#define XVEC __m512i
#define XSET _mm512_set1_epi32
#define FMA(a) _mm512_fmadd_ps(_mm512_castsi512_ps(x), _mm512_castsi512_ps(x), a)
KERNEL(run_fma, __m512, _mm512_setzero_ps(), FMA)
#else
#define XVEC __m256i
#define XSET _mm256_set1_epi32
#define FMA(a) _mm256_fmadd_ps(_mm256_castsi256_ps(x), _mm256_castsi256_ps(x), a)
KERNEL(run_fma, __m256, _mm256_setzero_ps(), FMA)
#define MADD(a) _mm256_madd_epi16(a, x)      /* chained on a: madd(x, x) would be hoisted out */
KERNEL(run_madd, __m256i, _mm256_setzero_si256(), MADD)
#endif
#ifdef __AVX512BF16__
#define BF16(a) _mm512_dpbf16_ps(a, (__m512bh)x, (__m512bh)x)
KERNEL(run_bf16, __m512, _mm512_setzero_ps(), BF16)
#endif
#ifdef __AVX512VNNI__
#define VNNI(a) _mm512_dpbusd_epi32(a, x, x)
KERNEL(run_vnni, __m512i, _mm512_setzero_si512(), VNNI)
#endif
static double best_of_3(double (*run)(void)) {      /* this VM's speed drifts: keep the fastest */
    double t = run();
    for (int i = 0; i < 2; i++) { const double u = run(); t = u < t ? u : t; }
    return t;
}
static void report(const char *name, double ops, double (*run)(void)) {
    omp_set_num_threads(1);
    const double one = ops * CHAINS * STEPS / best_of_3(run) / 1e9;
    const int n = omp_get_num_procs();
    omp_set_num_threads(n);
    const double all = ops * CHAINS * STEPS * n / best_of_3(run) / 1e9;
    printf("%s: %.0f GOP/s on one core, %.0f on %d cores\n", name, one, all, n);
}
int main(void) {
#ifdef __AVX512F__
    report("fp32 FMA (vfmadd231ps zmm, 16 multiply-adds)", 32, run_fma);
#else
    report("fp32 FMA (vfmadd231ps ymm, 8 multiply-adds)", 16, run_fma);
    report("int16 madd (vpmaddwd ymm, 16 multiply-adds)", 32, run_madd);
#endif
#ifdef __AVX512BF16__
    report("bf16 dot (vdpbf16ps, 32 multiply-adds)", 64, run_bf16);
#else
    printf("bf16 dot: not available on this CPU\n");
#endif
#ifdef __AVX512VNNI__
    report("int8 dot (vpdpbusd, 64 multiply-adds)", 128, run_vnni);
#else
    printf("int8 dot: not available on this CPU\n");
#endif
    return 0;
}
"""


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "peak.c", Path(tmp) / "peak"
        src.write_text(SOURCE)
        cc = os.environ.get("CC", "cc")
        subprocess.run([cc, "-O2", "-march=native", "-fopenmp", str(src), "-o", str(exe)], check=True)
        flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
        print("# CPU features: " + " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
                                         if f in flags.split()))
        sys.stdout.flush()
        return subprocess.run([str(exe)]).returncode


if __name__ == "__main__":
    raise SystemExit(main())
