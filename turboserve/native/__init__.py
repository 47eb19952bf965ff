"""Native CPU kernels (kernels.c), compiled on first use and called through ctypes.

The library is built with the system C compiler (`cc`, -O3 -march=native -ffast-math -fopenmp) into
~/.cache/turboserve (or $TURBOSERVE_CACHE), keyed by the source's hash and this CPU's flags, so a
build takes about a second once per machine. If no compiler is available, `lib()` returns None and
the ops fall back to their PyTorch versions (set TURBOSERVE_NATIVE=0 to force that).

kernels.c has three tiers, chosen at compile time from what -march=native enables: AVX-512 (with VNNI
for the int8 dot products), AVX2 + FMA (AMD Zen 1-3, Intel before Ice Lake: 8-lane versions of the
activations, attention and quantization, an int16-madd int8 GEMM, and fp32 GEMMs for linears and
LM heads, where MKL is slow at decode row counts), and plain C that the compiler
vectorizes as it can. TURBOSERVE_NATIVE_ISA=avx2 or =generic builds a lower tier on a CPU that has a
higher one (the tests run the kernels' parity checks that way, so every tier is checked on one machine).
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
import threading
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


def cpu_identity() -> str:
    """The CPU's model name and flags: what keys measurements made on it."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line for line in f if line.startswith("model name")), "")
    except OSError:
        name = ""
    return name + _cpu_flags()


def cache_dir() -> Path:
    """Where turboserve keeps what it builds and measures: $TURBOSERVE_CACHE, else ~/.cache/turboserve."""
    return Path(os.environ.get("TURBOSERVE_CACHE", Path.home() / ".cache" / "turboserve"))


# extra compiler flags of each kernel tier below the CPU's own (x86; elsewhere only "native" applies)
_ISA_FLAGS = {"native": [], "avx2": ["-mno-avx512f"], "generic": ["-mno-avx512f", "-mno-avx2", "-mno-fma"]}


def _build() -> Path | None:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None
    src = SOURCE.read_bytes()
    isa = _ISA_FLAGS.get(os.environ.get("TURBOSERVE_NATIVE_ISA", "native"))
    if isa is None:
        log.warning("TURBOSERVE_NATIVE_ISA must be one of %s; building for this CPU", ", ".join(_ISA_FLAGS))
        isa = []
    key = hashlib.sha256(src + _cpu_flags().encode() + platform.machine().encode()
                         + " ".join(isa).encode()).hexdigest()[:16]
    cache = cache_dir()
    target = cache / f"kernels-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        out = Path(tmp) / "kernels.so"
        cmd = [compiler, "-O3", "-march=native", *isa, "-mprefer-vector-width=512", "-ffast-math", "-fopenmp", "-fPIC",
               "-shared", str(SOURCE), "-o", str(out), "-lm"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            log.warning("native kernels failed to build, using PyTorch ops: %s", result.stderr.strip()[:500])
            return None
        os.replace(out, target)    # atomic: concurrent first uses never see a half-written file
    return target


_load_lock = threading.Lock()


def lib():
    """The loaded kernel library, or None when native kernels are unavailable or switched off.
    The first call builds it; other threads calling meanwhile wait for that build (they once got
    None and quietly ran the PyTorch fallback)."""
    global _lib, _tried
    if _tried:
        return _lib
    with _load_lock:
        if not _tried:
            _lib = _load()
            _tried = True
    return _lib


def _load():
    if os.environ.get("TURBOSERVE_NATIVE", "1") == "0":
        return None
    path = _build()
    if path is None:
        return None
    L = ctypes.CDLL(str(path))
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    L.row_epilogue.argtypes = [p, p, p, p, p, i32, p, p, p, f32, i32, p, p, p, p, i64, i64, i32, i32]
    L.varlen_attention.argtypes = [p, p, p, p, i64, i64, i64, f32, i64, p, i64, i64, i64, i32, i32]
    L.paged_attention.argtypes = [p, i64, p, p, p, p, i32, p, i64, p, p, i64, i64, i64, i64, i64, i64, f32, f32, p,
                                  i64, i64, i32]
    L.int8_gemm_packed.argtypes = [p, i64, p, p, p, i64, i64, i64, i32]
    L.kv_write.argtypes = [p, i64, p, i64, p, p, i64, p, p, p, p, i32, i64, i64, i64, i32]
    L.release_thread_pool.argtypes = []
    L.built_with_vnni.argtypes = []
    L.int8_gemm_is_avx2.argtypes = []
    L.f32_gemm_is_native.argtypes = []
    if L.f32_gemm_is_native():
        L.f32_gemm_packed.argtypes = [p, i64, p, p, i32, p, i64, i64, i64, i64, i32]
        L.f32_gemm_nt.argtypes = [p, i64, p, i64, p, i64, i64, i64, i64, i32]
    L.rope.argtypes = [p, i64, i64, i64, i64, p, p, i32]
    return L


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _threads() -> int:
    return torch.get_num_threads()


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        _require(t.is_contiguous() and t.device.type == "cpu", "native kernels need contiguous CPU tensors")


def _require(ok: bool, message: str) -> None:
    """The C code trusts every shape and index it is given: a mismatch is refused here, before it
    can read or write out of bounds (a ValueError, not an assert that -O would strip)."""
    if not ok:
        raise ValueError(f"native kernel: {message}")


ACTIVATIONS = {None: 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "silu": 4, "silu_mul": 5, "gelu_mul": 6,
               "gelu_tanh_mul": 7}
# gated activations: the row is gate | up, the result act(gate) * up, half as wide
GATED = {"silu_mul": "silu", "gelu_mul": "gelu", "gelu_tanh_mul": "gelu_tanh"}


def _opt(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def row_epilogue(src: torch.Tensor, *, row_scale=None, col_scale=None, bias=None, activation=None,
                 residual=None, ln=None, rms=False, out=None, inv_smooth=None, q=None, qscale=None) -> None:
    """See kernels.c: dequantize (src int32) or copy (src fp32), activation ("silu_mul" / "gelu_mul"
    halve the row: act(gate) * up), + residual, LayerNorm (RMSNorm with rms), store to `out`, quantize to
    `q`/`qscale` with `inv_smooth`. ln: (gamma, beta, eps); beta None with rms. A bf16 `src` takes
    bf16 residual, gamma, beta and out (the arithmetic is fp32)."""
    rows, cols = src.shape
    gamma, beta, eps = ln if ln is not None else (None, None, 0.0)
    _check(*(t for t in (src, row_scale, col_scale, bias, residual, gamma, beta, out, inv_smooth, q, qscale)
             if t is not None))
    is_int, bf16 = src.dtype == torch.int32, src.dtype == torch.bfloat16
    _require(all(t is None or (t.dtype == torch.bfloat16) == bf16 for t in (residual, gamma, beta, out)),
             "row_epilogue: src, residual, ln weights and out are all bf16 or none of them")
    lib().row_epilogue(None if is_int else src.data_ptr(), src.data_ptr() if is_int else None,
                       _opt(row_scale), _opt(col_scale), _opt(bias), ACTIVATIONS[activation], _opt(residual),
                       _opt(gamma), _opt(beta), eps, int(rms), _opt(out), _opt(inv_smooth), _opt(q), _opt(qscale),
                       rows, cols, int(bf16), _threads())


def varlen_attention(qkv: torch.Tensor, cu: torch.Tensor, order: torch.Tensor, num_heads: int,
                     max_len: int, out: torch.Tensor, position_bias: torch.Tensor | None = None,
                     window: int = 0) -> torch.Tensor:
    """position_bias: fp32 [num_heads, 2 * max_len - 1], head h's bias of key j for query i at
    [h, max_len - 1 + j - i] (model.relative_position_bias), added to the scaled scores. window > 0:
    query i attends to keys |j - i| < window only (the others are not computed)."""
    _check(qkv, cu, order, out)
    _require(qkv.dtype == out.dtype and qkv.dtype in (torch.float32, torch.bfloat16)
             and cu.dtype == order.dtype == torch.int64,
             "varlen_attention takes fp32 or bf16 qkv / out and int64 cu_seqlens / order")
    _require(qkv.shape[1] % (3 * num_heads) == 0 and out.shape == (qkv.shape[0], qkv.shape[1] // 3)
             and cu.numel() == order.numel() + 1 and int(cu[-1]) == qkv.shape[0]
             and (order.numel() == 0 or max_len >= int((cu[1:] - cu[:-1]).max())),
             "varlen_attention: qkv, out, cu_seqlens, order and max_len disagree")
    _require(window >= 0, "varlen_attention: window must be >= 0")
    head_dim = qkv.shape[1] // 3 // num_heads
    scale = head_dim ** -0.5
    bias = None
    if position_bias is not None:
        _require(position_bias.is_floating_point() and position_bias.shape == (num_heads, 2 * max_len - 1),
                 "varlen_attention: position_bias must be [num_heads, 2 * max_len - 1]")
        bias = (position_bias.float() / scale).contiguous()     # the kernel adds it to raw q.k before scaling
    lib().varlen_attention(_ptr(qkv), _ptr(out), _ptr(cu), _ptr(order), order.numel(), num_heads, head_dim,
                           scale, max_len, None if bias is None else _ptr(bias), 2 * max_len - 1, max_len - 1,
                           window, int(qkv.dtype == torch.bfloat16), _threads())
    return out


KV_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}


def paged_attention(q: torch.Tensor, cache, block_tables: torch.Tensor, cu_q: torch.Tensor, ctx_len: torch.Tensor,
                    num_heads: int, window: int, scale: float, max_ctx: int, out: torch.Tensor,
                    softcap: float = 0.0) -> torch.Tensor:
    """See kernels.c. q: fp32 [T, >= num_heads * d] rows (a view into the QKV output is fine: its row
    stride is passed); out: fp32 [T, num_heads * d]; cache: ops.cpu.PagedKV (fp32, bf16 or int8);
    softcap > 0: scores soft-capped (Gemma 2)."""
    k, v = cache.k, cache.v
    _check(k, v, block_tables, cu_q, ctx_len, out, *(t for t in (cache.k_scale, cache.v_scale) if t is not None))
    _require(q.stride(1) == 1 and q.dtype == out.dtype == torch.float32 and block_tables.dtype == torch.int32
             and cu_q.dtype == ctx_len.dtype == torch.int64, "paged_attention: dtypes or q's layout")
    num_blocks, kv_heads, d, block_size = k.shape
    _require(v.shape == (num_blocks, kv_heads, block_size, d) and q.shape[1] >= num_heads * d and out.shape[1] >= num_heads * d
             and out.shape[0] == q.shape[0] and cu_q.numel() == ctx_len.numel() + 1
             and block_tables.shape[0] >= ctx_len.numel() and num_heads % kv_heads == 0,
             "paged_attention: q, out, the cache and the step's tensors disagree")
    _require(softcap >= 0, "paged_attention: softcap must be >= 0")
    lib().paged_attention(_ptr(q), q.stride(0), _ptr(k), _ptr(v), _opt(cache.k_scale), _opt(cache.v_scale),
                          KV_KINDS[k.dtype], _ptr(block_tables), block_tables.stride(0), _ptr(cu_q), _ptr(ctx_len),
                          ctx_len.numel(), num_heads, kv_heads, d, block_size, window, scale, softcap, _ptr(out),
                          out.stride(0), max_ctx, _threads())
    return out


def int8_gemm_packed(x: torch.Tensor, packed: torch.Tensor, colsum: torch.Tensor, n: int,
                    out: torch.Tensor) -> torch.Tensor:
    """out [M, n] int32 = x [M, K] int8 @ W, W given VNNI-packed (ops.cpu.pack_vnni); see kernels.c."""
    _check(packed, colsum, out)
    _require(x.stride(1) == 1 and x.dtype == torch.int8 and out.dtype == torch.int32, "int8_gemm_packed: dtypes")
    m, k = x.shape
    _require(packed.numel() == -(-k // 4) * 4 * (-(-n // 64) * 64) and colsum.numel() >= n
             and out.shape == (m, n), f"int8_gemm_packed: x [{m}, {k}], out {tuple(out.shape)} and the weights "
                                      f"packed for {n} columns disagree")
    lib().int8_gemm_packed(_ptr(x), x.stride(0), _ptr(packed), _ptr(colsum), _ptr(out), m, k, n, _threads())
    return out


def f32_gemm_packed(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int, out: torch.Tensor,
                    activation: str | None = None) -> torch.Tensor:
    """out [M, n] = act(x [M, K] @ W + bias), W packed in 16-column panels (ops.cpu.pack_panels);
    only where f32_gemm_native() (see kernels.c)."""
    _check(packed, *(() if bias is None else (bias,)))
    m, k = x.shape
    _require(x.dtype == torch.float32 and out.dtype == torch.float32 and x.stride(1) == 1 and out.stride(1) == 1
             and x.stride(0) >= k and out.stride(0) >= n and x.device.type == out.device.type == "cpu",
             "f32_gemm_packed: fp32 CPU x and out with contiguous rows")
    _require(packed.shape == (-(-n // 16), k, 16) and out.shape == (m, n) and (bias is None or bias.numel() == n),
             f"f32_gemm_packed: x [{m}, {k}], out {tuple(out.shape)} and the weights packed for {n} columns disagree")
    _require(activation in ACTIVATIONS and activation not in GATED, f"f32_gemm_packed: activation {activation!r}")
    lib().f32_gemm_packed(_ptr(x), x.stride(0), _ptr(packed), _opt(bias), ACTIVATIONS[activation], _ptr(out),
                          out.stride(0), m, k, n, _threads())
    return out


def f32_gemm_nt(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [M, N] = x [M, K] @ w^T for w [N, K] as stored (a tied LM head); only where f32_gemm_native()."""
    m, k = x.shape
    _require(x.dtype == w.dtype == out.dtype == torch.float32 and x.stride(1) == 1 and w.stride(1) == 1
             and out.stride(1) == 1 and x.stride(0) >= k and w.stride(0) >= k
             and x.device.type == w.device.type == out.device.type == "cpu",
             "f32_gemm_nt: fp32 CPU tensors with contiguous rows")
    n = w.shape[0]
    _require(w.shape[1] == k and out.shape == (m, n) and out.stride(0) >= n,
             f"f32_gemm_nt: x [{m}, {k}], w {tuple(w.shape)} and out {tuple(out.shape)} disagree")
    lib().f32_gemm_nt(_ptr(x), x.stride(0), _ptr(w), w.stride(0), _ptr(out), out.stride(0), m, k, n, _threads())
    return out


def kv_write(cache, k: torch.Tensor, v: torch.Tensor, slot_blocks: torch.Tensor, slot_offsets: torch.Tensor) -> None:
    """Store K and V ([n, kv_heads, d] fp32 views with contiguous rows) at their cache slots; see kernels.c."""
    _check(cache.k, cache.v, slot_blocks, slot_offsets, *(t for t in (cache.k_scale, cache.v_scale) if t is not None))
    _require(k.dtype == v.dtype == torch.float32 and k.stride(2) == v.stride(2) == 1
             and k.stride(1) == v.stride(1) == k.shape[2] and slot_blocks.dtype == slot_offsets.dtype == torch.int64,
             "kv_write: dtypes or K / V layout")
    n, kv_heads, d = k.shape
    blocks, heads, dim, block_size = cache.k.shape          # ops.cpu.PagedKV's layout, int8 too
    _require(v.shape == k.shape and slot_blocks.numel() == slot_offsets.numel() == n and (heads, dim) == (kv_heads, d),
             "kv_write: K / V and the cache's heads or head size disagree")
    if n:                                       # one pass over each index tensor (every layer, every step)
        (b_lo, b_hi), (o_lo, o_hi) = torch.aminmax(slot_blocks), torch.aminmax(slot_offsets)
        _require(0 <= int(b_lo) and int(b_hi) < blocks and 0 <= int(o_lo) and int(o_hi) < block_size,
                 "kv_write: a slot outside the cache")
    lib().kv_write(_ptr(k), k.stride(0), _ptr(v), v.stride(0), _ptr(slot_blocks), _ptr(slot_offsets), n,
                   _ptr(cache.k), _ptr(cache.v), _opt(cache.k_scale), _opt(cache.v_scale), KV_KINDS[cache.k.dtype],
                   kv_heads, d, cache.k.shape[3], _threads())


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> None:
    """Rotary embedding in place (see kernels.c): x fp32 [T, >= num_heads * d] rows with unit column
    stride (a view into the QKV output is fine), cos, sin fp32 contiguous [T, d / 2]."""
    _check(cos, sin)
    _require(x.dtype == cos.dtype == sin.dtype == torch.float32 and x.stride(1) == 1, "rope_: dtypes or layout")
    T = x.shape[0]
    _require(cos.shape == sin.shape and cos.shape[0] == T and x.shape[1] >= num_heads * 2 * cos.shape[1],
             "rope_: x, cos and sin disagree")
    lib().rope(_ptr(x), x.stride(0), T, num_heads, 2 * cos.shape[1], _ptr(cos), _ptr(sin), _threads())


def has_vnni() -> bool:
    """Whether the library was built with AVX-512 VNNI (int8 paged attention in dot products)."""
    return lib() is not None and bool(lib().built_with_vnni())


def int8_gemm_everywhere() -> bool:
    """Whether int8 linears should take the native GEMM at every row count: on CPUs with AVX2 and no
    AVX-512 VNNI, where torch._int_mm has no fast kernel (4 GOP/s on a 2-core AMD EPYC, against the
    native int16-madd kernel's 180 and fp32's 115 GFLOP/s: benchmarks/decode_gemm.py)."""
    return lib() is not None and bool(lib().int8_gemm_is_avx2())


def f32_gemm_native() -> bool:
    """Whether fp32 linears should take the native GEMM (kernels.c f32_gemm_packed): on CPUs with AVX2
    and no AVX-512, where MKL's sgemm runs decode-sized row counts at a fraction of the FMA peak."""
    return lib() is not None and bool(lib().f32_gemm_is_native())


def release_thread_pool() -> None:
    """Free this thread's OpenMP worker pool (kernels.c says why). Call it on a thread that has run
    model work and hands the model to another thread; it costs nothing if the thread runs more later
    (a new pool is made), but while two threads hold pools on a machine with few cores, every parallel
    region sleeps instead of spinning."""
    if lib() is not None:
        lib().release_thread_pool()
