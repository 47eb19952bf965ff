"""allocator.keep_freed_memory: freed large tensors stay in the process (reused, not re-faulted), and
TURBOSERVE_KEEP_FREED_MEMORY=0 leaves malloc alone. Each case runs in a fresh interpreter, since
mallopt settings are process-wide."""
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")

CHILD = """
import os, torch
from turboserve.allocator import keep_freed_memory
def rss_mib():
    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
on = keep_freed_memory()
before = rss_mib()
t = torch.ones(64 * 2**20 // 4)          # 64 MiB, above glibc's largest mmap threshold
del t
print(on, round(rss_mib() - before))
"""


def _run(flag: str) -> tuple[bool, float]:
    env = dict(os.environ, TURBOSERVE_KEEP_FREED_MEMORY=flag)
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True,
                         timeout=120).stdout.split()
    return out[0] == "True", float(out[1])


def test_freed_tensor_memory_stays_in_the_process():
    on, kept = _run("1")
    assert on
    assert kept >= 60          # the 64 MiB were freed into malloc's lists, not unmapped


def test_opt_out_returns_memory_to_the_kernel():
    on, kept = _run("0")
    assert not on
    assert kept < 16
