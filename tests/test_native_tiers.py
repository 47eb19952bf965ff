"""Every tier of the native kernels passes the kernel parity tests on this machine: kernels.c has
AVX-512, AVX2 and plain-C versions, and -march=native builds only the highest this CPU has, so the
lower ones are built here with TURBOSERVE_NATIVE_ISA and the tests rerun against them in a child
process (an AVX2-only CPU, as AMD Zen 1-3, then runs what CI machines with AVX-512 checked)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL_TESTS = ["tests/test_parity.py", "tests/test_generate.py", "-k",
                "native or packed_int8 or paged_attention or int8_decode or int8_and_bf16"]


def _cpu_flags() -> set:
    try:
        return set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return set()


def _run(isa: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "TURBOSERVE_NATIVE_ISA": isa}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_lower_kernel_tier_passes_the_kernel_tests(isa):
    flags = _cpu_flags()
    if "avx2" not in flags or "fma" not in flags:
        pytest.skip("not an x86 CPU with AVX2 + FMA")
    probe = _run(isa, "-c", "import json; from turboserve import native; print(json.dumps("
                            "[native.lib() is not None, native.has_vnni(), native.int8_gemm_everywhere()]))")
    assert probe.returncode == 0, probe.stderr
    built, vnni, avx2_gemm = json.loads(probe.stdout.strip().splitlines()[-1])
    assert built and not vnni and avx2_gemm == (isa == "avx2"), probe.stdout + probe.stderr
    r = _run(isa, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout
