"""Native CPU kernels (kernels.c), compiled on first use and called through ctypes.

The library is built with the system C compiler (`cc`, -O3 -march=native -ffast-math -fopenmp) into
~/.cache/turboserve (or $TURBOSERVE_CACHE), keyed by the source's hash and this CPU's flags, so a
build takes about a second once per machine. If no compiler is available, `lib()` returns None and
the ops fall back to their PyTorch versions (set TURBOSERVE_NATIVE=0 to force that).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("turboserve")
SOURCE = Path(__file__).with_name("kernels.c")

_lib = None
_tried = False


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor()


def _build() -> Path | None:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + _cpu_flags().encode() + platform.machine().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("TURBOSERVE_CACHE", Path.home() / ".cache" / "turboserve"))
    target = cache / f"kernels-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        out = Path(tmp) / "kernels.so"
        cmd = [compiler, "-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fopenmp", "-fPIC", "-shared",
               str(SOURCE), "-o", str(out), "-lm"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            log.warning("native kernels failed to build, using PyTorch ops: %s", result.stderr.strip()[:500])
            return None
        os.replace(out, target)    # atomic: concurrent first uses never see a half-written file
    return target


def lib():
    """The loaded kernel library, or None when native kernels are unavailable or switched off."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("TURBOSERVE_NATIVE", "1") == "0":
        return None
    path = _build()
    if path is None:
        return None
    L = ctypes.CDLL(str(path))
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    L.quantize_rows_i8.argtypes = [p, p, p, p, i64, i64, i32]
    L.dequantize_rows.argtypes = [p, p, p, p, p, i64, i64, i32]
    L.add_layer_norm.argtypes = [p, p, p, p, f32, p, i64, i64, i32]
    L.varlen_attention_f32.argtypes = [p, p, p, p, i64, i64, i64, f32, i64, i32]
    _lib = L
    return _lib


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _threads() -> int:
    return torch.get_num_threads()


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        assert t.is_contiguous() and t.device.type == "cpu", "native kernels need contiguous CPU tensors"


def quantize_rows(x: torch.Tensor, inv_smooth: torch.Tensor):
    _check(x, inv_smooth)
    rows, cols = x.shape
    q = torch.empty(rows, cols, dtype=torch.int8)
    scale = torch.empty(rows, 1, dtype=torch.float32)
    lib().quantize_rows_i8(_ptr(x), _ptr(inv_smooth), _ptr(q), _ptr(scale), rows, cols, _threads())
    return q, scale


def dequantize_into(acc, row_scale, col_scale, bias, out) -> None:
    _check(acc, row_scale, col_scale, bias, out)
    rows, cols = acc.shape
    lib().dequantize_rows(_ptr(acc), _ptr(row_scale), _ptr(col_scale), _ptr(bias), _ptr(out), rows, cols, _threads())


def add_layer_norm(x, residual, weight, bias, eps: float, out) -> torch.Tensor:
    _check(x, residual, weight, bias, out)
    rows, cols = x.shape
    lib().add_layer_norm(_ptr(x), _ptr(residual), _ptr(weight), _ptr(bias), eps, _ptr(out), rows, cols, _threads())
    return out


def varlen_attention(qkv: torch.Tensor, cu: torch.Tensor, order: torch.Tensor, num_heads: int,
                     max_len: int, out: torch.Tensor) -> torch.Tensor:
    _check(qkv, cu, order, out)
    head_dim = qkv.shape[1] // 3 // num_heads
    lib().varlen_attention_f32(_ptr(qkv), _ptr(out), _ptr(cu), _ptr(order), order.numel(), num_heads, head_dim,
                               head_dim ** -0.5, max_len, _threads())
    return out
